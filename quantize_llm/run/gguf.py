"""Writing a GGUF file (`--format gguf[:TYPE]`): one file that llama.cpp runs.

OUT names the file; `.gguf` is appended when OUT does not end in it. The file is written under a
temporary name beside it (`.NAME.tmp-PID`) and renamed into place once complete; an existing OUT
is refused without --overwrite. Round-to-nearest (`rtn`) reproduces llama.cpp's own reference
quantizer for every block type (core/ggml.py). Container rules: formats/gguf.py.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core import ggml
from ..core.spec import QuantSpec
from ..errors import OutputError, RunError, SpecError
from ..formats import gguf as gf
from ..models.load import CheckpointReader, resolve_model
from .summary import Summary

EventHandler = Callable[[str, dict], None]


def gguf_output(output: str | Path) -> Path:
    path = Path(output).expanduser()
    return path if path.name.endswith(".gguf") else path.with_name(path.name + ".gguf")


def check_method(spec: QuantSpec) -> None:
    """GGUF files are written by round-to-nearest (llama.cpp's reference quantizer) or by GPTQ on
    the same block grids (algorithms/ggml_gptq.py)."""
    if spec.method not in ("rtn", "gptq"):
        raise SpecError(f"GGUF output is written by rtn and gptq so far, not {spec.method}",
                        "quantize with `quantize-llm rtn|gptq ... --format gguf`")


def export_gguf(model: str, output: str | Path, spec: QuantSpec, scheme: str, *, overwrite: bool = False,
                on_event: EventHandler | None = None, trust_remote_code: bool = False,
                options: Any = None, calibration: Any = None, batch_size: int = 8, device: str = "auto") -> Summary:
    """Quantize MODEL into one GGUF file of `scheme` (formats/gguf.SCHEMES): rtn rounds each
    tensor as llama.cpp's reference quantizer does; gptq (`options` GPTQOptions, `calibration` a
    CalibrationSpec) solves the decoder blocks' Linears onto the same grids block by block on the
    calibration text, the rest as rtn."""
    import gguf

    emit = on_event or (lambda kind, data: None)
    check_method(spec)
    start = time.perf_counter()
    out = Path(os.path.abspath(gguf_output(output)))
    if out.is_dir():
        raise OutputError(f"{out} is a folder; a GGUF output is one file", "choose another -o")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists", "pass --overwrite to replace it, or choose another -o")
    if not out.parent.is_dir():
        raise OutputError(f"the folder {out.parent} does not exist", "create it first, or choose another -o")
    folder = resolve_model(model, trust_remote_code=trust_remote_code)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with CheckpointReader(folder) as reader:
        config = dict(reader.config)
        arch, _ = gf.family(config)
        plans = gf.plan_tensors(config, {n: tuple(reader.shape(n)) for n in reader.names()}, scheme, spec.keep_dense)
        emit("start", {"model": model, "output": str(out), "blocks": int(config["num_hidden_layers"]),
                       "spec": spec.to_dict(), "device": "cpu", "input_bytes": reader.total_bytes})
        writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
        q_params = q_bytes = 0
        counts: dict[str, int] = {}
        try:
            gf.write_metadata(writer, arch, config, scheme, folder.name)
            gf.write_tokenizer(writer, folder, config)
            solved: set[str] = set()
            if spec.method == "gptq":   # the blocks' Linears, as their results come
                by_source = {plan.source: plan for plan in plans}
                for name, weight in _solve_blocks(reader, folder, config, spec, options, calibration, batch_size,
                                                  device, plans, trust_remote_code, emit):
                    plan = by_source[name]
                    if plan.permute_heads:
                        weight = permute_weight(weight, plan.permute_heads)
                    array, raw = gf.packed_tensor(weight)
                    writer.add_tensor(plan.name, array, raw_dtype=raw)
                    counts[plan.type] = counts.get(plan.type, 0) + 1
                    q_params += int(np.prod(plan.shape))
                    q_bytes += array.nbytes
                    solved.add(name)
            for plan in plans:
                if plan.source in solved:
                    continue
                w = reader.read(plan.source, check_finite=True).float().numpy()
                if plan.permute_heads:
                    w = gf.permute_rows(w, plan.permute_heads)
                array, raw = gf.encode_tensor(plan, w)
                writer.add_tensor(plan.name, array, raw_dtype=raw)
                counts[plan.type] = counts.get(plan.type, 0) + 1
                if raw is not None:
                    q_params += int(np.prod(plan.shape))
                    q_bytes += array.nbytes
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, out)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        input_bytes = reader.total_bytes
    seconds = time.perf_counter() - start
    summary = Summary(model=model, output=str(out), spec={**spec.to_dict(), "format": f"gguf:{scheme}"},
                      blocks=int(config["num_hidden_layers"]), seconds=seconds, input_bytes=input_bytes,
                      output_bytes=out.stat().st_size, quantized_params=q_params, quantized_bytes=q_bytes,
                      bits_per_weight=8 * q_bytes / max(q_params, 1), peak_rss_mb=_peak_rss_mb(),
                      timings={"quantize and write": seconds})
    emit("done", {k: v for k, v in summary.to_dict().items() if k != "layers"})
    return summary


def permute_weight(weight: ggml.GgmlWeight, heads: int) -> ggml.GgmlWeight:
    """`weight`'s rows in the order gf.permute_rows gives a float matrix (rows are independent
    in every block type: the codes and each row's fields move together)."""
    order = gf.permute_rows(np.arange(weight.shape[0]), heads)
    return ggml.GgmlWeight(weight.type, {k: v[order] for k, v in weight.params.items()}, weight.codes[order])


def _solve_blocks(reader: CheckpointReader, folder: Path, config: dict, spec: QuantSpec, options: Any,
                  calibration: Any, batch_size: int, device: str, plans: list[gf.TensorPlan],
                  trust_remote_code: bool, emit: EventHandler) -> Iterator[tuple[str, ggml.GgmlWeight]]:
    """GPTQ onto the planned block types, block by block on the calibration text: (checkpoint
    name, ggml weight) of every decoder Linear whose planned type is a ggml block type."""
    import dataclasses

    import torch

    from ..algorithms.ggml_gptq import GgmlGPTQ, GgmlResult
    from ..algorithms.gptq import GPTQOptions
    from ..calibration.data import CalibrationSpec
    from ..calibration.sequential import Calibration, Timer, run
    from ..core.devices import resolve_devices
    from ..models.architectures import get_architecture
    from ..models.load import build_skeleton
    from ..models.structure import discover
    from ..models.weightmap import build as build_weight_map
    from .execute import load_calibration_tokens, peak_rss_mb
    from .plan import plan_blocks

    options = options if isinstance(options, GPTQOptions) else GPTQOptions()
    calibration = calibration or CalibrationSpec()
    types = {plan.source.removesuffix(".weight"): plan.type for plan in plans if plan.type in ggml.TYPES}
    devices = resolve_devices(device)
    arch = get_architecture(config)
    skeleton = build_skeleton(folder, config, trust_remote_code=trust_remote_code)
    found = discover(skeleton, arch.layers if arch is not None else None)
    weights = build_weight_map(skeleton, reader.names())
    blocks = plan_blocks(reader, found, arch, skeleton, spec.replace(format="gptq", group_size=128), weights)
    blocks = [dataclasses.replace(b, linears=tuple(dataclasses.replace(lp, quantize=lp.name in types, spec=None)
                                                   for lp in b.linears)) for b in blocks]
    tokens = load_calibration_tokens(folder, config, calibration, devices[0], emit,
                                     trust_remote_code=trust_remote_code).tokens
    cal = Calibration(skeleton, found.path, tokens, true_sequential=options.true_sequential, batch_size=batch_size,
                      dtype=torch.float32, arch=arch, stored_dtype=reader.dtype, weights=weights)
    algorithm = GgmlGPTQ(spec, options, types)
    for result in run(blocks, algorithm, lambda name: reader.read(name, check_finite=True), devices, cal, Timer()):
        for name, (qw, _bias) in result.quantized.items():
            if not isinstance(qw, GgmlResult):
                raise RunError(f"{name}: no calibration input reached it, so GPTQ could not round it",
                               "quantize with rtn for this model")
            yield f"{name}.weight", qw.weight
        emit("block", {"index": result.index, "blocks": len(blocks), "seconds": result.seconds,
                       "peak_rss_mb": peak_rss_mb(), "layers": [dataclasses.asdict(r) for r in result.reports]})


def tensor_types(path: Path | str) -> dict[str, Any]:
    """GGUF name -> ggml type name of every tensor in a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _peak_rss_mb() -> float:
    from .execute import peak_rss_mb

    return peak_rss_mb()
