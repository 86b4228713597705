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
from contextlib import contextmanager
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


def _checked_output(output: str | Path, overwrite: bool) -> Path:
    """The absolute path of the GGUF file OUT names; OutputError where it cannot be written."""
    out = Path(os.path.abspath(gguf_output(output)))
    if out.is_dir():
        raise OutputError(f"{out} is a folder; a GGUF output is one file", "choose another -o")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists", "pass --overwrite to replace it, or choose another -o")
    if not out.parent.is_dir():
        raise OutputError(f"the folder {out.parent} does not exist", "create it first, or choose another -o")
    return out


@contextmanager
def _writing(tmp: Path, out: Path, arch: str, config: dict, scheme: str, folder: Path) -> Iterator[Any]:
    """A GGUFWriter of `arch` at `tmp` with the metadata and tokenizer written; the tensors the
    body adds are written when it ends and the file renamed to `out`; on any error the temporary
    file is removed."""
    import gguf

    writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
    try:
        gf.write_metadata(writer, arch, config, scheme, folder.name)
        gf.write_rope_scaling(writer, config, arch)
        gf.write_tokenizer(writer, folder, config)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _summary(model: str, out: Path, spec: dict, blocks: int, start: float, input_bytes: int, q_params: int,
             q_bytes: int, stage: str, emit: EventHandler) -> Summary:
    """The written file's Summary, emitted as the `done` event."""
    seconds = time.perf_counter() - start
    summary = Summary(model=model, output=str(out), spec=spec, blocks=blocks, seconds=seconds,
                      input_bytes=input_bytes, output_bytes=out.stat().st_size, quantized_params=q_params,
                      quantized_bytes=q_bytes, bits_per_weight=8 * q_bytes / max(q_params, 1),
                      peak_rss_mb=_peak_rss_mb(), timings={stage: seconds})
    emit("done", {k: v for k, v in summary.to_dict().items() if k != "layers"})
    return summary


def check_method(spec: QuantSpec, options: Any = None) -> None:
    """GGUF files are written by round-to-nearest (llama.cpp's reference quantizer), by GPTQ on
    the same block grids, or by AWQ's scaling before either (algorithms/ggml_gptq.py)."""
    if spec.method not in ("rtn", "gptq", "awq"):
        raise SpecError(f"GGUF output is written by rtn, gptq and awq, not {spec.method}",
                        "quantize with `quantize-llm rtn|gptq|awq ... --format gguf`")


def export_gguf(model: str, output: str | Path, spec: QuantSpec, scheme: str, *, overwrite: bool = False,
                on_event: EventHandler | None = None, trust_remote_code: bool = False,
                options: Any = None, calibration: Any = None, batch_size: int = 8, device: str = "auto") -> Summary:
    """Quantize MODEL into one GGUF file of `scheme` (formats/gguf.SCHEMES): rtn rounds each
    tensor as llama.cpp's reference quantizer does; gptq (`options` GPTQOptions, `calibration` a
    CalibrationSpec) solves the decoder blocks' Linears onto the same grids block by block on the
    calibration text, awq (AWQOptions) scales them first (the scales folded into the norms and
    Linears before them, which are written as folded), the rest as rtn."""

    emit = on_event or (lambda kind, data: None)
    check_method(spec, options)
    start = time.perf_counter()
    out = _checked_output(output, overwrite)
    folder = resolve_model(model, trust_remote_code=trust_remote_code)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with CheckpointReader(folder) as reader:
        config, sources = gf.text_model(dict(reader.config), reader.names())
        arch, _ = gf.family(config)
        plans = gf.plan_tensors(config, {n: tuple(reader.shape(m)) for n, m in sources.items()}, scheme,
                                spec.keep_dense)
        emit("start", {"model": model, "output": str(out), "blocks": int(config["num_hidden_layers"]),
                       "spec": spec.to_dict(), "device": "cpu", "input_bytes": reader.total_bytes})
        q_params = q_bytes = 0
        counts: dict[str, int] = {}
        with _writing(tmp, out, arch, config, scheme, folder) as writer:
            solved: set[str] = set()
            if spec.method in ("gptq", "awq"):   # the blocks' tensors, as their results come
                by_source = {plan.source: plan for plan in plans}
                for name, value in _solve_blocks(reader, folder, sources, spec, options, calibration, batch_size,
                                                 device, plans, trust_remote_code, emit):
                    plan = by_source[name]
                    if isinstance(value, ggml.GgmlWeight):
                        if plan.permute_heads:
                            value = permute_weight(value, plan.permute_heads)
                        array, raw = gf.packed_tensor(value)
                    else:   # the block's other tensors (AWQ's folded norms among them)
                        w = value.float().numpy()
                        array, raw = gf.encode_tensor(plan, gf.permute_rows(w, plan.permute_heads)
                                                      if plan.permute_heads else w)
                    writer.add_tensor(plan.name, array, raw_dtype=raw)
                    counts[plan.type] = counts.get(plan.type, 0) + 1
                    if raw is not None:
                        q_params += int(np.prod(plan.shape))
                        q_bytes += array.nbytes
                    solved.add(name)
            for plan in plans:
                if plan.source in solved:
                    continue
                w = reader.read(sources[plan.source], check_finite=True).float().numpy()
                if plan.permute_heads:
                    w = gf.permute_rows(w, plan.permute_heads)
                array, raw = gf.encode_tensor(plan, w)
                writer.add_tensor(plan.name, array, raw_dtype=raw)
                counts[plan.type] = counts.get(plan.type, 0) + 1
                if raw is not None:
                    q_params += int(np.prod(plan.shape))
                    q_bytes += array.nbytes
        input_bytes = reader.total_bytes
    return _summary(model, out, {**spec.to_dict(), "format": f"gguf:{scheme}"}, int(config["num_hidden_layers"]),
                    start, input_bytes, q_params, q_bytes, "quantize and write", emit)


def permute_weight(weight: ggml.GgmlWeight, heads: int) -> ggml.GgmlWeight:
    """`weight`'s rows in the order gf.permute_rows gives a float matrix (rows are independent
    in every block type: the codes and each row's fields move together)."""
    order = gf.permute_rows(np.arange(weight.shape[0]), heads)
    return ggml.GgmlWeight(weight.type, {k: v[order] for k, v in weight.params.items()}, weight.codes[order])


def _solve_blocks(reader: CheckpointReader, folder: Path, sources: dict[str, str], spec: QuantSpec, options: Any,
                  calibration: Any, batch_size: int, device: str, plans: list[gf.TensorPlan],
                  trust_remote_code: bool, emit: EventHandler) -> Iterator[tuple[str, Any]]:
    """GPTQ (or AWQ) onto the planned block types, block by block on the calibration text:
    (text-model name, ggml weight) of every decoder Linear whose planned type is a ggml block
    type, and (text-model name, tensor) of every other tensor of the blocks as the run leaves it
    (AWQ folds its scales into norms). The whole model runs (a multimodal one included: its
    language model reads the text); `sources` maps the text model's names to the checkpoint's
    (gf.text_model)."""
    import dataclasses

    import torch

    from ..algorithms.awq import AWQOptions
    from ..algorithms.ggml_gptq import GgmlAWQ, GgmlGPTQ, GgmlResult
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

    if spec.method == "awq":
        options = options if isinstance(options, AWQOptions) else AWQOptions()
    else:
        options = options if isinstance(options, GPTQOptions) else GPTQOptions()
    calibration = calibration or CalibrationSpec()
    config = dict(reader.config)
    back = {stored: name for name, stored in sources.items()}   # checkpoint name -> text-model name
    types = {sources[plan.source].removesuffix(".weight"): plan.type for plan in plans if plan.type in ggml.TYPES}
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
    algorithm: Any
    if spec.method == "awq":
        algorithm = GgmlAWQ(spec, options, {(b.index, lp.local): types[lp.name] for b in blocks for lp in b.linears
                                            if lp.name in types})
    else:
        algorithm = GgmlGPTQ(spec, options, types)
    for result in run(blocks, algorithm, lambda name: reader.read(name, check_finite=True), devices, cal, Timer()):
        for name, (qw, bias) in result.quantized.items():
            if not isinstance(qw, GgmlResult):
                raise RunError(f"{name}: no calibration input reached it, so GPTQ could not round it",
                               "quantize with rtn for this model")
            yield back[f"{name}.weight"], qw.weight
            if bias is not None:   # as the run leaves it (AWQ may fold scales into it)
                yield back[f"{name}.bias"], bias
        for name, value in result.passthrough.items():
            yield back.get(name, name), value
        emit("block", {"index": result.index, "blocks": len(blocks), "seconds": result.seconds,
                       "peak_rss_mb": peak_rss_mb(), "layers": [dataclasses.asdict(r) for r in result.reports]})


def tensor_types(path: Path | str) -> dict[str, Any]:
    """GGUF name -> ggml type name of every tensor in a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _peak_rss_mb() -> float:
    from .execute import peak_rss_mb

    return peak_rss_mb()


# ---- convert: a quantized checkpoint's codes into GGUF blocks, exactly --------------------------------------

def ggml_of(qw: Any) -> ggml.GgmlWeight:
    """The ggml block weight holding exactly the values of `qw` (a format-neutral QuantizedWeight):
    4-bit symmetric groups of 32 are Q4_0 (d = the group's float16 scale, code as stored: value
    d * (code - 8)), 8-bit symmetric groups of 32 are Q8_0 (code - 128 as the signed byte). Other
    settings have no exact ggml block: SpecError naming the reason."""
    spec = qw.spec
    if qw.is_codebook or qw.outliers is not None:
        raise SpecError("its values are not on an integer grid of groups (a codebook or float16 outliers)")
    if qw.g_idx is not None and not _trivial_g_idx(qw.g_idx, spec.group_size):
        raise SpecError("its groups follow act-order (g_idx), and ggml's blocks are 32 consecutive weights")
    if spec.group_size != 32 or qw.shape[1] % 32:
        raise SpecError(f"it has groups of {spec.group_size}, and ggml's Q4_0/Q8_0 blocks are 32 consecutive "
                        "weights with one float16 scale (requantize with --format gguf instead)")
    zero = qw.grid_zero
    if spec.bits not in (4, 8) or bool((zero != 2 ** (spec.bits - 1)).any()):
        raise SpecError(f"it is {spec.bits}-bit {'symmetric' if spec.sym else 'asymmetric'}; only 4- and 8-bit "
                        "symmetric groups (zero 8 or 128) are exactly Q4_0 or Q8_0")
    d = qw.grid_scale.cpu().numpy().astype(np.float16)                         # (rows, groups)
    codes = qw.codes.cpu().numpy().astype(np.int16)
    if spec.bits == 4:
        return ggml.GgmlWeight("Q4_0", {"d": d}, codes)
    return ggml.GgmlWeight("Q8_0", {"d": d}, codes - 128)


def _trivial_g_idx(g_idx: Any, group_size: int) -> bool:
    """g_idx is the trivial i // group_size."""
    import torch

    return bool(torch.equal(g_idx.cpu().long(), torch.arange(g_idx.numel()) // group_size))


def _exact_float(w: np.ndarray) -> tuple[np.ndarray, str]:
    """A non-quantized matrix as F16 where every value survives the cast, else F32."""
    half = w.astype(np.float16)
    return (half, "F16") if np.array_equal(half.astype(np.float32), w) else (np.ascontiguousarray(w), "F32")


def convert_gguf(source: str, output: str | Path, *, overwrite: bool = False,
                 on_event: EventHandler | None = None) -> Summary:
    """A quantized checkpoint (any reader's format) as one GGUF file without requantizing: every
    quantized Linear as the ggml block holding exactly its values (`ggml_of`), the other tensors
    as F32 (1-D, as llama.cpp expects) or F16/F32 (matrices, whichever is exact). Every module is
    checked before anything is written; a module without an exact block stops the conversion with
    its name and the reason."""
    import torch

    from ..formats.reading import QuantizedModules, linear_shape
    from ..models.load import build_skeleton, check_against_config

    emit = on_event or (lambda kind, data: None)
    start = time.perf_counter()
    out = _checked_output(output, overwrite)
    folder = resolve_model(source)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with CheckpointReader(folder) as reader:
        config = dict(reader.config)
        if not config.get("quantization_config"):
            raise SpecError(f"{source} is not quantized, so there is nothing to convert",
                            "write GGUF from a float checkpoint with `quantize-llm rtn|gptq MODEL --format gguf`")
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        arch, _ = gf.family(plain)
        modules = QuantizedModules(reader)
        skeleton = build_skeleton(folder, plain)
        prefixes = sorted(modules.prefixes)
        check_against_config(reader, skeleton, quantized=prefixes)
        linears = {p: linear_shape(skeleton, p) for p in prefixes}
        shapes: dict[str, tuple[int, ...]] = {f"{p}.weight": tuple(linears[p]) for p in prefixes}
        packed = {f"{p}.{t}" for p in prefixes for t in modules.fmt.tensor_names}
        shapes.update({n: tuple(reader.shape(n)) for n in reader.names() if n not in packed})
        plans = {plan.source: plan for plan in gf.plan_tensors(plain, shapes, "Q8_0")}
        weights: dict[str, ggml.GgmlWeight] = {}
        for prefix in prefixes:    # every module checked (and kept: codes and scales) before writing
            try:
                weights[prefix] = ggml_of(modules.decode(prefix, linears[prefix]))
            except SpecError as exc:
                raise SpecError(f"{prefix} cannot be converted to GGUF exactly: {exc.message}",
                                exc.hint or "requantize from the float checkpoint with --format gguf") from None
        kinds = [w.type for w in weights.values()]
        scheme = max(set(kinds), key=kinds.count) if kinds else "Q8_0"
        emit("start", {"model": source, "output": str(out), "total": len(prefixes), "unit": "modules",
                       "device": "cpu"})
        q_params = q_bytes = 0
        with _writing(tmp, out, arch, plain, scheme, folder) as writer:
            for name, plan in plans.items():
                prefix = name.removesuffix(".weight")
                if prefix in weights:
                    qw = weights[prefix]
                    if plan.permute_heads:
                        qw = permute_weight(qw, plan.permute_heads)
                    array, raw = gf.packed_tensor(qw)
                    q_params += int(np.prod(plan.shape))
                    q_bytes += array.nbytes
                    writer.add_tensor(plan.name, array, raw_dtype=raw)
                    continue
                w = reader.read(name, check_finite=True).to(torch.float32).numpy()
                if plan.permute_heads:
                    w = gf.permute_rows(w, plan.permute_heads)
                if plan.shift:
                    w = w + np.float32(plan.shift)
                array, _kind = (np.ascontiguousarray(w), "F32") if w.ndim < 2 or plan.type == "F32" else _exact_float(w)
                writer.add_tensor(plan.name, array)
        input_bytes = reader.total_bytes
    return _summary(source, out, {"method": "convert", "format": f"gguf:{scheme}"}, int(plain["num_hidden_layers"]),
                    start, input_bytes, q_params, q_bytes, "convert and write", emit)
