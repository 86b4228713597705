"""What the commands print as results: the run summary, AWQ's scale search, a checkpoint's modules,
an evaluation and a recipe's jobs.

Results go to stdout, except under `--log-json -`, where stdout carries the JSON events only and the
results go to stderr (`Results(log_json)`). Strings are printed as text, never as rich markup (they
hold paths and names: `[/x]` must print as it is); styles come as `Text`.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.spec import QuantSpec


class Results:
    """A command's results: stdout, or stderr when `--log-json -` writes the events to stdout. Wide
    enough off a terminal that names are never cut."""

    def __init__(self, log_json: Path | str | None = None) -> None:
        self.to_stderr = log_json is not None and str(log_json) == "-"

    def print(self, *args: Any, **kwargs: Any) -> None:
        stream = sys.stderr if self.to_stderr else sys.stdout
        Console(file=stream, highlight=False, markup=False,
                width=None if stream.isatty() else 200).print(*args, **kwargs)


out = Results()          # commands without --log-json print here


def human(nbytes: float) -> str:
    """Bytes in decimal units: 512 B, 1.50 KB, 2.00 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return str(nbytes)


def grid(spec: QuantSpec) -> str:
    """The stored grid in a few words: "w4g128 sym", "nf4 b64 double-quant"."""
    if spec.codebook != "int":
        return f"{spec.codebook} b{spec.blocksize}{' double-quant' if spec.double_quant else ''}"
    return f"w{spec.bits}g{spec.group_size} {'sym' if spec.sym else 'asym'}"


def by_name(name: str) -> str:
    """A module name with its block index replaced by *, to group the blocks' modules."""
    return re.sub(r"\.\d+\.", ".*.", name)


def print_summary(summary: Any, spec: QuantSpec, results: Results) -> None:
    """A finished quantization run: sizes and time, where the time went, the worst layers, and what
    was verified, evaluated and uploaded."""
    table = Table(title=f"{spec.method} {grid(spec)}")
    for col in ("blocks", "wall time", "input size", "output size", "bits/weight", "peak RSS"):
        table.add_column(col, justify="right")
    table.add_row(str(summary.blocks), f"{summary.seconds:.1f} s", human(summary.input_bytes),
                  human(summary.output_bytes), f"{summary.bits_per_weight:.3f}", f"{summary.peak_rss_mb:.0f} MiB")
    results.print(table)
    if summary.timings:
        total = sum(summary.timings.values())
        results.print("time by stage: " + ", ".join(f"{k} {v:.1f} s ({100 * v / max(total, 1e-9):.0f}%)" for k, v
                                                     in sorted(summary.timings.items(), key=lambda kv: -kv[1])))
    if summary.calibration:
        c = summary.calibration
        results.print(f"calibration: {c['source']}, {c['nsamples']} x {c['seqlen']} tokens, "
                      f"sha256 {c['sha256'][:16]}...")
    worst = sorted(summary.layers, key=lambda r: -r.metrics.get("rel_error", 0))[:5]
    if worst:
        results.print(_worst_layers(worst, calibrated=bool(summary.calibration)))
    if summary.verification:
        v = summary.verification
        diff = f"; last block matches the run to {v['last_block_rel_diff']:.1e}" if "last_block_rel_diff" in v else ""
        results.print(f"verified: {v['modules']} modules read back exactly{diff}")
    if summary.evaluation:
        e = summary.evaluation
        results.print(f"evaluation on {e['dataset']} ({e['windows']} x {e['seqlen']} tokens): perplexity "
                      f"{e['perplexity']:.3f} (source {e['baseline_perplexity']:.3f}, ratio {e['ppl_ratio']:.4f}), "
                      f"KL {e['kl']:.5f}; added to the model card")
    if summary.pushed_to:
        results.print(f"uploaded to {summary.pushed_to}")
    scaled = [r for r in summary.layers if "alpha" in r.metrics]
    if scaled:
        results.print(_awq_groups(scaled))
    results.print(f"wrote {summary.output}")


def _worst_layers(worst: list, calibrated: bool) -> Table:
    what = "output error ||WX - QX|| / ||WX||" if calibrated else "weight error ||W - W'|| / ||W||"
    table = Table(title=f"largest relative {what}")
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("rel. error", justify="right")
    damp = any("damp" in r.metrics for r in worst)
    if damp:
        table.add_column("damp", justify="right")
    if calibrated:
        table.add_column("seconds", justify="right")
    for r in worst:
        cells = [r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.metrics['rel_error']:.4f}"]
        if damp:
            cells.append(f"{r.metrics.get('damp', 0):g}")
        if calibrated:
            cells.append(f"{r.seconds:.2f}")
        table.add_row(*cells)
    return table


def _awq_groups(reports: list) -> Table:
    """AWQ's scale search, per Linear name over all blocks (every block's figures are in --log-json)."""
    rows: dict[str, list] = {}
    for r in reports:
        rows.setdefault(by_name(r.name), []).append(r.metrics)
    table = Table(title="AWQ scale search (mean over blocks; error of the inspected module, relative)")
    for col in ("layer", "alpha", "error at alpha 0", "error at chosen alpha"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for key, ms in rows.items():
        n = len(ms)
        table.add_row(f"{key} (x{n})", f"{sum(m['alpha'] for m in ms) / n:.2f}",
                      f"{sum(m['search_error_before'] for m in ms) / n:.3g}",
                      f"{sum(m['search_error_after'] for m in ms) / n:.3g}")
    return table


def print_inspection(info: Any, all_modules: bool, results: Results) -> None:
    """A checkpoint's quantized modules (by name over the blocks, or each one), sizes and bits per weight."""
    table = Table(title=f"{info.path} ({info.quant_method})")
    for col in ("module", "bits", "group", "sym", "shape (out x in)", "bytes"):
        table.add_column(col, justify="left" if col == "module" else "right")
    rows: dict[str, list] = {}
    for m in info.modules:
        group = f"{m.codebook} b{m.group_size}" if m.codebook != "int" else \
            "channel" if m.group_size == -1 else str(m.group_size)
        sym = "-" if m.codebook != "int" else "yes" if m.sym else "no"
        key = m.name if all_modules else by_name(m.name)
        if info.quant_method == "gguf" and not all_modules:
            key = f"{key} [{m.codebook}]"          # a mix gives one name several ggml types
        row = rows.setdefault(f"{key} {m.bits} {group} {sym}", [key, m.bits, group, sym, m.shape, 0, 0])
        row[5] += m.nbytes
        row[6] += 1
    for name, bits, group, sym, shape, nbytes, count in rows.values():
        label = name if count == 1 else f"{name} (x{count})"
        table.add_row(label, str(bits), group, sym, f"{shape[0]} x {shape[1]}", f"{nbytes:,}")
    results.print(table)
    results.print(f"quantized modules: {len(info.modules)}   quantized weights: {info.quantized_params:,}")
    results.print(f"quantized tensors: {human(info.quantized_bytes)}   whole checkpoint: {human(info.total_bytes)}")
    what = "ggml blocks: codes with their block and sub-block scales" if info.quant_method == "gguf" \
        else "codes, absmax and their nested statistics" if any(m.codebook != "int" for m in info.modules) \
        else "codes, scales, zeros, g_idx and the float16 outliers with their indices" \
        if info.quant_method == "quantize_llm_outlier" else "codes, scales, zeros and g_idx"
    results.print(f"bits per weight: {info.bits_per_weight:.3f} ({what})")
    from ..eval.inspection import allocation_lines

    for line in allocation_lines(info):
        results.print(line)


def print_evaluation(result: Any, model: str, dataset: Path, baseline: str | None, results: Results) -> None:
    """Perplexity of MODEL on a text, with the baseline's, the ratio and the KL divergence when there is one."""
    table = Table(title=f"{model} on {dataset.name} ({result.windows} x {result.seqlen} tokens)")
    table.add_column("model")
    for col in ("perplexity", "ratio", "KL to baseline"):
        table.add_column(col, justify="right")
    if result.baseline_perplexity is not None:
        table.add_row(str(baseline), f"{result.baseline_perplexity:.3f}", "1.000", "-")
        table.add_row(model, f"{result.perplexity:.3f}", f"{result.ppl_ratio:.4f}", f"{result.kl:.5f}")
    else:
        table.add_row(model, f"{result.perplexity:.3f}", "-", "-")
    results.print(table)


def print_jobs(recipe: Path, jobs: list, indices: list[int], results: Results) -> None:
    """`run --check`: the jobs of a recipe, validated."""
    table = Table(title=f"{recipe}: {len(jobs)} job(s)")
    for col in ("index", "name", "method", "spec", "model", "output"):
        table.add_column(col)
    for i in indices:
        j = jobs[i]
        table.add_row(str(i), j.name, j.spec.method, f"{grid(j.spec)} -> {j.spec.format}", j.model, str(j.output))
    results.print(table)
