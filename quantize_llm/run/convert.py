"""`quantize-llm convert`: re-encode a quantized checkpoint into another format without requantizing.

Every quantized module is decoded by its format's reader (ours or another tool's conventions: GPTQ
v1/v2, AutoAWQ GEMM, compressed-tensors pack-quantized) into the format-neutral QuantizedWeight and
encoded by the target format. The conversion is exact or refused: a module the target cannot
represent (a width, act-order, a zero point of 0 in GPTQ v1, a codebook, float16 outliers) stops it
with the module's name and the reason, before anything is written.

`bits` widens integer codes on the way (3-bit to 4-bit, say: the nearest setting vLLM serves,
formats/vllm.py): with shift = 2^(bits-1) - 2^(old-1), code + shift and zero + shift give the
same scale * (code - zero) on the wider grid, and a symmetric result stays symmetric.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .._version import __version__
from ..core.primitives import Float16Overflow, to_stored
from ..core.qweight import QuantizedWeight
from ..errors import ModelError, SpecError
from ..formats import get_format
from ..formats.base import ConfigFacts
from ..formats.checkpoint import CheckpointWriter, carried_files, check_output, local_folder
from ..formats.reading import QuantizedModules, linear_shape, marked_module
from ..models.architectures import get_architecture
from ..models.load import CheckpointReader, build_skeleton, check_against_config, resolve_model


@dataclass
class ConvertSummary:
    source: str
    output: str
    source_format: str
    target_format: str
    modules: int
    output_bytes: int
    seconds: float


def _target_problem(qw: QuantizedWeight, target: Any) -> str | None:
    """Why `target` cannot hold `qw` exactly, or None."""
    if qw.outliers is not None and target.name != "outlier":
        return f"it keeps {qw.outliers.count} float16 outlier weights, which the {target.name} format cannot hold"
    spec = qw.spec
    reason = target.supports(spec) or target.check_shape(spec, *qw.shape)
    if reason:
        return reason
    if not qw.is_codebook and int(qw.grid_zero.min()) < target.min_zero(spec):
        return (f"it has a zero point of {int(qw.grid_zero.min())}, which the {target.name} format cannot store "
                "(GPTQ v1 stores zero - 1); keep the source format")
    return None


def widen(qw: QuantizedWeight, bits: int) -> QuantizedWeight:
    """`qw` on a `bits`-wide integer grid, exactly (see the module docstring); refuses narrowing."""
    old = qw.spec.bits
    if qw.is_codebook:
        raise SpecError(f"--bits {bits}: a {qw.spec.codebook} codebook has no integer grid to widen",
                        "requantize with rtn, gptq or awq")
    if bits < old:
        raise SpecError(f"--bits {bits} would narrow {old}-bit codes, which cannot be exact",
                        f"requantize with --bits {bits}")
    if bits == old:
        return qw
    shift = 2 ** (bits - 1) - 2 ** (old - 1)
    return replace(qw, codes=(qw.codes.to(torch.int32) + shift).to(qw.codes.dtype), zero=qw.zero + shift,
                   spec=qw.spec.replace(bits=bits))


def convert(source: str, output: str | Path, fmt_name: str, *, overwrite: bool = False,
            max_shard_bytes: int = 2 * 1024 ** 3, on_event: Callable[[str, dict], None] | None = None,
            command: str | None = None, bits: int | None = None) -> ConvertSummary:
    emit = on_event or (lambda kind, data: None)
    start = time.perf_counter()
    target = get_format(fmt_name)
    output = Path(output).expanduser()
    check_output(output, overwrite=overwrite, protect=local_folder(source))
    folder = resolve_model(source)
    check_output(output, overwrite=overwrite, protect=[folder])
    with CheckpointReader(folder) as reader:
        config = dict(reader.config)
        qconfig = config.get("quantization_config")
        if not qconfig:
            raise ModelError(f"{source} is not quantized, so there is nothing to convert",
                             "quantize it with rtn, gptq, awq, nf4 or outlier")
        modules = QuantizedModules(reader)
        src_fmt = modules.fmt
        names = reader.names()
        prefixes = sorted(modules.prefixes)
        model_dtype = config.get("dtype") or config.get("torch_dtype")
        dtype = getattr(torch, str(model_dtype).removeprefix("torch."), None) if model_dtype else None
        skeleton = build_skeleton(folder, {k: v for k, v in config.items() if k != "quantization_config"})
        check_against_config(reader, skeleton, quantized=prefixes)
        shapes = {prefix: linear_shape(skeleton, prefix) for prefix in prefixes}

        def decoded(prefix: str) -> QuantizedWeight:
            qw = modules.decode(prefix, shapes[prefix])
            spec = qw.spec.replace(format=target.name, act_order=qw.g_idx is not None, min_zero=0)
            qw = replace(qw, spec=spec, source_dtype=dtype if isinstance(dtype, torch.dtype) else None)
            return qw if bits is None else widen(qw, bits)

        # Check every module before writing anything (headers and small tensors only are kept).
        specs = {}
        for prefix in prefixes:
            qw = decoded(prefix)
            problem = _target_problem(qw, target)
            if problem:
                raise SpecError(f"{prefix} cannot be converted to {target.name}: {problem}")
            specs[prefix] = qw.spec
        distinct = {(s.bits, s.group_size, s.sym) for s in specs.values()}
        base = max(distinct, key=lambda k: sum((s.bits, s.group_size, s.sym) == k for s in specs.values())) \
            if distinct else None
        if len(distinct) > 1 and not getattr(target, "per_module", False):
            raise SpecError(f"the modules use {len(distinct)} different settings, and the {target.name} format has "
                            "one for the whole checkpoint", "convert to gptq, which records per-module settings")
        quantized = set(prefixes)
        dense = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
        emit("start", {"model": source, "output": str(output), "total": len(prefixes), "unit": "modules",
                       "device": "cpu"})
        with CheckpointWriter(output, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                              protect=[folder]) as writer:
            used: set[str] = set()
            for prefix in prefixes:
                used.update(f"{prefix}.{t}" for t in src_fmt.tensor_names)
            for name in names:
                if name in used:
                    prefix = next(p for p in prefixes if name.startswith(p + "."))
                    if marked_module(name, src_fmt.markers) != prefix:
                        continue              # written with its module, at its marker
                    try:
                        encoded = target.encode(decoded(prefix))
                    except Float16Overflow as exc:
                        raise exc.at(prefix) from None
                    for local, tensor in encoded.items():
                        writer.add(f"{prefix}.{local}", tensor)
                    emit("block", {"index": prefixes.index(prefix), "blocks": len(prefixes), "seconds": 0.0,
                                   "peak_rss_mb": 0.0})
                    continue
                tensor = reader.read(name)
                owner = name[: -len(".bias")] if name.endswith(".bias") else None
                if owner in quantized and target.bias_dtype is not None:
                    tensor = to_stored(tensor, target.bias_dtype, "bias", owner)
                elif owner in quantized and isinstance(dtype, torch.dtype):
                    tensor = tensor.to(dtype)
                writer.add(name, tensor)
            new_qconfig = _config(target, specs, cast(tuple, base), qconfig, dense, skeleton, config, model_dtype)
            files: dict[str, bytes | str | Path] = {}
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name not in ("config.json", "quantize_config.json", "README.md") \
                        and not path.name.endswith((".safetensors", ".safetensors.index.json")):
                    files[path.name] = path
            files.update({n: p for n, p in carried_files(folder).items() if "/" in n})   # extra chat templates
            if target.config_file:
                files[target.config_file] = _json(new_qconfig)
            files["README.md"] = _card(source, output, src_fmt, target, command, folder, bits)
            writer.finish(config={**config, "quantization_config": new_qconfig}, files=files)
    summary = ConvertSummary(source, str(output), src_fmt.name, target.name, len(prefixes), writer.total_bytes,
                             time.perf_counter() - start)
    emit("done", summary.__dict__)
    return summary


def _config(target: Any, specs: dict, base: tuple, source_qconfig: dict, dense: list[str],
            skeleton: nn.Module, config: dict, model_dtype: Any) -> dict:
    first = next(iter(specs.values()))
    spec = first.replace(bits=base[0], group_size=base[1], sym=base[2],
                         act_order=any(s.act_order for s in specs.values()))
    meta = dict(source_qconfig.get("meta") or {})
    meta["converted"] = {"from": source_qconfig.get("quant_method"), "by": f"quantize-llm:{__version__}"}
    try:
        arch = get_architecture(config)
    except ModelError:
        arch = None
    listed = source_qconfig.get("modules_in_block_to_quantize")
    in_block = [list(g) for g in listed] if isinstance(listed, list) and all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in listed) else []
    if not in_block and arch is not None:
        in_block = [[n for n in group if any(p.endswith("." + n) for p in specs)] for group in arch.sequential]
        in_block = [g for g in in_block if g]
    return target.quantization_config(ConfigFacts(
        spec=spec, modules_in_block=in_block, dense_modules=dense, meta=meta,
        overrides={p: s for p, s in specs.items() if (s.bits, s.group_size, s.sym) != base},
        lm_head=any(p.split(".")[-1] == "lm_head" for p in specs),
        dtype=str(model_dtype).removeprefix("torch.") if model_dtype else None))


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"


def _card(source: str, output: Path, src_fmt: Any, target: Any, command: str | None, folder: Path,
          bits: int | None = None) -> str:
    old = folder / "README.md"
    body = old.read_text(encoding="utf-8") if old.is_file() else f"# {output.name}\n"
    kept = ("every weight, scale and zero point is unchanged" if bits is None else
            f"codes and zero points are widened to {bits}-bit by one shift, so every dequantized weight is unchanged")
    note = ["", "## Conversion", "",
            f"Re-encoded from the {src_fmt.name} format of `{source}` into the {target.description} by "
            f"quantize-llm {__version__}, without requantizing: {kept}.",
            "", "```", command or f"quantize-llm convert {source} -o {output.name} --format {target.name}", "```", ""]
    return body.rstrip("\n") + "\n" + "\n".join(note)
