"""The model card (README.md) written beside every quantized checkpoint: what was done, with which
settings, how to load it, and the exact command."""
from __future__ import annotations

from pathlib import Path

from .._version import __version__
from .summary import Summary


def model_card(summary: Summary, qconfig: dict, command: str | None, folder: Path,
               layout: str = "GPTQ layout that transformers (with optimum and gptqmodel) and vLLM load") -> str:
    """README.md for the output: what was done, with which settings, and how to load it."""
    spec = summary.spec
    source_license = _front_matter_value(folder / "README.md", "license")
    head = ["---", "library_name: transformers", f"tags: [quantize-llm, {qconfig['quant_method']}, "
            f"{spec['bits']}-bit, {spec['method']}]"]
    if source_license:
        head.append(f"license: {source_license}")
    if "/" in summary.model and not Path(summary.model).exists():
        head.append(f"base_model: {summary.model}")
    head.append("---")
    gs = "per channel" if spec["group_size"] == -1 else str(spec["group_size"])
    grid = [("bits", spec["bits"]), ("group size", gs), ("symmetric", spec["sym"]), ("act-order", spec["act_order"]),
            ("format", f"{qconfig['quant_method']} ({qconfig.get('checkpoint_format', '')})")]
    stored = "scales and zeros included"
    if spec["codebook"] != "int":   # a 4-bit table with a per-block absmax: no groups, zeros or order
        grid = [("codebook", spec["codebook"]), ("block size", spec["blocksize"]),
                ("double quantization", spec["double_quant"]), ("format", qconfig["quant_method"])]
        stored = "absmax and nested statistics included"
    rows = [("method", spec["method"]), *grid,
            ("kept unquantized", ", ".join(spec["keep_dense"]) or "embeddings, norms, lm_head"),
            *([("per-module settings", f"chosen for the budget: {len(spec['overrides'])} overrides (see Allocation)")]
              if summary.allocation and spec.get("overrides") else []),
            *([("per-module overrides (first match wins)",
                "; ".join(f"`{o['match']}`: " + ", ".join(f"{k} {v}" for k, v in o.items() if k != "match")
                          for o in spec["overrides"]))] if spec.get("overrides") and not summary.allocation else []),
            (f"bits per weight (quantized Linears, {stored})", f"{summary.bits_per_weight:.3f}"),
            ("quantized parameters", f"{summary.quantized_params:,}"),
            *([("calibration", f"{summary.calibration['source']}: {summary.calibration['nsamples']} x "
                               f"{summary.calibration['seqlen']} tokens"),
               ("calibration tokens SHA-256", summary.calibration["sha256"]),
               ("calibration rule", summary.calibration["rule"])] if summary.calibration else []),
            ("tool", f"quantize-llm {__version__}")]
    table = ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    cmd = command or f"quantize-llm {spec['method']} {summary.model}"
    body = [f"# {Path(summary.output).name}", "",
            f"`{summary.model}` quantized to {spec['bits']}-bit with {spec['method'].upper()} by quantize-llm "
            f"{__version__}, stored in the {layout}.", "", *table, "", "## Command", "", "```",
            cmd, "```", "", *_allocation(summary, spec), "## Loading", "", "```python",
            "from quantize_llm import load_quantized",
            f"model = load_quantized(\"{Path(summary.output).name}\")", "```", ""]
    return "\n".join(head + [""] + body)


def _allocation(summary: Summary, spec: dict) -> list[str]:
    """The --target-bpw allocation: the plan's lines, then each module's own setting."""
    if not summary.allocation:
        return []
    gs = "-channel" if spec["group_size"] == -1 else f"g{spec['group_size']}"
    rows = [f"| `{o['match'].strip('^$').replace(chr(92), '')}` | w{o['bits']}"
            f"{'-channel' if o['group_size'] == -1 else 'g' + str(o['group_size'])}{'' if o['sym'] else '-asym'} |"
            for o in spec["overrides"]]
    return ["## Allocation", "", "```", *summary.allocation, "```", "",
            f"Every other quantized Linear: w{spec['bits']}{gs}{'' if spec['sym'] else '-asym'}.", "",
            "| module | setting |", "|---|---|", *rows, ""]


def _front_matter_value(readme: Path, key: str) -> str | None:
    try:
        lines = readme.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip() or None
    return None
