"""Quantized source checkpoints: FP8 ones are read as bfloat16, every other one is refused.

An FP8 checkpoint stores a Linear's weight `X.weight` in float8 (e4m3fn or e5m2) and beside it the
factor that turns the stored values back into the weight: `X.weight_scale_inv` (DeepSeek-V3, Qwen3-FP8:
transformers' fine-grained FP8, `quant_method: "fp8"`) or `X.weight_scale` (compressed-tensors'
float-quantized format, fbgemm_fp8). The factor is one of

- per block: shape (ceil(out/bn), ceil(in/bk)) for the config's block size [bn, bk] (`weight_block_size`,
  or compressed-tensors' `block_structure`); the last row and column blocks may be partial;
- per output channel: shape (out, 1) or (out,);
- per tensor: a single value (shape (), (1,) or (1, 1)),

with any leading dimensions of the weight (fused experts) repeated in front. `FP8Source` is the view
`CheckpointReader` gives of such a checkpoint: the weight reads as bfloat16 (the float64 product of
the stored value and its factor, rounded once), the factors and activation scales (`input_scale`,
`activation_scale`: a static activation scheme's, which a float model does not use) are not tensors
of the view, and config.json's quantization_config is moved to `reader.source_quantization`. So every
command sees an ordinary bfloat16 checkpoint.

`refuse_quantized` is the one line for any other quantized source.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, ModelError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")          # the factor of "<module>.weight"
ACTIVATION_SUFFIXES = (".input_scale", ".activation_scale", ".input_scale_ub")
FP8_METHODS = ("fp8", "fbgemm_fp8")                              # plus compressed-tensors' float-quantized
OUTPUT_DTYPE = torch.bfloat16
_CHUNK = 1 << 22                                                 # weights per float64 temporary (32 MiB)


def fp8_block(qconfig: Any) -> tuple[bool, tuple[int, int] | None]:
    """(is an FP8 source we read, its block size or None) for a config.json's quantization_config."""
    if not isinstance(qconfig, dict):
        return False, None
    method = str(qconfig.get("quant_method", "")).lower()
    if method in FP8_METHODS:
        return True, _block(qconfig.get("weight_block_size"))
    if method != "compressed-tensors":
        return False, None
    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return False, None
    blocks = set()
    for group in groups.values():
        weights = group.get("weights") if isinstance(group, dict) else None
        fmt = (group.get("format") if isinstance(group, dict) else None) or qconfig.get("format")
        if not isinstance(weights, dict) or fmt not in ("float-quantized", "naive-quantized") \
                or weights.get("type") != "float" or weights.get("num_bits") != 8 \
                or weights.get("strategy") not in ("tensor", "channel", "block"):
            return False, None
        blocks.add(_block(weights.get("block_structure")) if weights.get("strategy") == "block" else None)
    sized = blocks - {None}
    if len(sized) > 1:
        return False, None
    return True, next(iter(sized), None)


def _block(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    raise CheckpointError(f"config.json's FP8 block size is {value!r}; it must be two positive integers",
                          "restore the config.json the checkpoint was saved with")


def refuse_quantized(model: str, qconfig: Any) -> None:
    """Raise the one-line refusal for a source checkpoint that is quantized other than in FP8."""
    from ..formats import FORMATS

    method = qconfig.get("quant_method", "unknown method") if isinstance(qconfig, dict) else "unreadable"
    ours = {fmt.quant_method for fmt in FORMATS.values()}
    hint = "start from the unquantized checkpoint"
    if method in ours:
        hint += ", or re-encode this one into another format with `quantize-llm convert`"
    raise ModelError(f"{model} is already quantized ({method}); only FP8 sources are read (as bfloat16) "
                     "and quantized again", hint)


class FP8Source:
    """The bfloat16 view of an FP8 checkpoint's tensor table (see the module docstring).

    Built from the stored table (names in order, each one's dtype and shape); every weight/factor
    pair is checked here, from the headers, so a damaged checkpoint is refused before any read.
    """

    def __init__(self, qconfig: dict, names: list[str], dtype: Callable[[str], torch.dtype],
                 shape: Callable[[str], tuple[int, ...]], where: Path | str) -> None:
        _, self.block = fp8_block(qconfig)
        self.scale_of: dict[str, str] = {}          # fp8 weight -> its factor
        self.hidden: set[str] = set()               # stored tensors that are not tensors of the view
        present = set(names)
        for name in names:
            if name.endswith(ACTIVATION_SUFFIXES):
                self.hidden.add(name)
                continue
            suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
            if suffix is None:
                continue
            weight = name[: -len(suffix)] + ".weight"
            if weight not in present or weight in self.scale_of:
                continue                            # a parameter of its own (or a second factor: refused below)
            if dtype(weight) not in FP8_DTYPES:
                raise CheckpointError(f"{where}: {name} scales {weight}, which is {_short(dtype(weight))}, not "
                                      "float8", "restore the checkpoint as its quantizer wrote it")
            if dtype(name) not in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu):
                raise CheckpointError(f"{where}: the FP8 scale {name} is {_short(dtype(name))}; float32, "
                                      "bfloat16, float16 or float8_e8m0fnu are read",
                                      "restore the checkpoint as its quantizer wrote it")
            self._kind(weight, tuple(shape(weight)), name, tuple(shape(name)), where)
            self.scale_of[weight] = name
            self.hidden.add(name)
        for name in names:
            if name not in self.scale_of and name not in self.hidden and dtype(name) in FP8_DTYPES:
                raise CheckpointError(f"{where}: tensor {name} is float8 but has no scale "
                                      f"({name}_scale_inv or {name}_scale)",
                                      "the checkpoint is incomplete; re-download it")
        self._shape = shape

    def _kind(self, weight: str, wshape: tuple[int, ...], scale: str, sshape: tuple[int, ...],
              where: Path | str) -> str:
        """How `scale` covers `weight`: block, channel or tensor; anything else is refused."""
        if len(wshape) < 2:
            raise CheckpointError(f"{where}: the FP8 tensor {weight} has shape {list(wshape)}; a matrix is needed",
                                  "restore the checkpoint as its quantizer wrote it")
        lead, (out, inp) = wshape[:-2], wshape[-2:]
        if self.block is not None and sshape == (*lead, math.ceil(out / self.block[0]), math.ceil(inp / self.block[1])):
            return "block"
        if math.prod(sshape) == 1 and not lead:
            return "tensor"
        if sshape in ((*lead, out, 1), (*lead, out)):
            return "channel"
        if sshape in ((*lead, 1, 1), (*lead, 1)) or (lead and sshape == lead):
            return "tensor"
        grid = (f"[{', '.join(map(str, lead))}{', ' if lead else ''}{math.ceil(out / self.block[0])}, "
                f"{math.ceil(inp / self.block[1])}] for blocks of {list(self.block)}, " if self.block else "")
        raise CheckpointError(f"{where}: the FP8 scale {scale} has shape {list(sshape)}, which fits no layout of "
                              f"{weight} {list(wshape)} (expected {grid}[{out}, 1] per channel or one value)",
                              "the scales and config.json's weight_block_size disagree; restore the config.json "
                              "the checkpoint was saved with")

    def names(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.hidden]

    def dtype(self, name: str, stored: torch.dtype) -> torch.dtype:
        return OUTPUT_DTYPE if name in self.scale_of else stored

    def nbytes(self, name: str, stored: int) -> int:
        if name in self.scale_of:
            return math.prod(self._shape(name)) * OUTPUT_DTYPE.itemsize
        return stored

    def dequantize(self, weight: Tensor, scale: Tensor) -> Tensor:
        """bfloat16 weight = stored value x its factor, computed in float64 and rounded once (in
        chunks of rows, so the float64 temporaries stay small)."""
        *lead, out, inp = weight.shape
        n = math.prod(lead)
        w3, s = weight.reshape(n, out, inp), scale.to(torch.float64)
        bn = bk = 0
        if self.block is not None and tuple(s.shape) == (*lead, math.ceil(out / self.block[0]),
                                                         math.ceil(inp / self.block[1])):
            (bn, bk), s3 = self.block, s.reshape(n, *s.shape[-2:])
        elif s.numel() == 1:
            s3 = s.reshape(1, 1, 1).expand(n, 1, 1)
        elif s.numel() == n * out:
            s3 = s.reshape(n, out, 1)                                       # per output channel
        else:
            s3 = s.reshape(n, 1, 1)                                         # one value per expert
        result = torch.empty((n, out, inp), dtype=OUTPUT_DTYPE)
        step = max(1, _CHUNK // max(inp, 1))
        if bn:
            step = max(bn, step // bn * bn)
        for e in range(n):
            for r in range(0, out, step):
                w = w3[e, r:r + step].to(torch.float64)
                if bn:
                    f = s3[e, r // bn: math.ceil((r + w.shape[0]) / bn)]
                    f = f.repeat_interleave(bn, dim=0)[: w.shape[0]].repeat_interleave(bk, dim=1)[:, :inp]
                elif s3.shape[1] == out:
                    f = s3[e, r:r + step]
                else:
                    f = s3[e]
                result[e, r:r + step] = (w * f).to(OUTPUT_DTYPE)
        return result.reshape(weight.shape)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_float_model(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The float model of a source checkpoint, eval mode on CPU in `dtype`: through transformers'
    from_pretrained (safetensors only), or, for an FP8 source, built from our reader's bfloat16 view."""
    from transformers import AutoModelForCausalLM

    from .load import CheckpointReader, build_skeleton, check_against_config

    with CheckpointReader(folder) as reader:
        if reader.source_quantization is None:
            reader = None
        else:
            from ..runtime.load import _load_dense

            model = build_skeleton(folder, reader.config, trust_remote_code=trust_remote_code)
            check_against_config(reader, model)
            _load_dense(model, {n: reader.read(n) for n in reader.names()}, dtype)
    if reader is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code).eval()
    model.tie_weights()  # type: ignore[operator]  # a transformers model (build_skeleton)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise CheckpointError(f"{name} is missing from the checkpoint in {folder}")
    return model.to(dtype).eval()


@dataclass(frozen=True)
class Offload:
    """Where accelerate's big-model offloading puts the float model's modules for a memory budget."""

    device_map: dict[str, str | int]   # module -> the work device (kept in memory) or "disk" (read at every pass)
    resident_bytes: int                # weights kept on the work device between forward passes
    streamed_bytes: int                # the largest module read from the checkpoint during a pass (0: none is)


def offload_map(folder: Path, config: dict, dtype: torch.dtype, budget: int, device: torch.device,
                trust_remote_code: bool = False) -> Offload:
    """The device map that keeps at most `budget` bytes of the float model's weights (in `dtype`) on
    `device` at once: modules in order on the device while they fit beside room for the largest
    module still to place, every one after on "disk", read from the checkpoint's files when a
    forward pass reaches it and dropped after (accelerate's infer_auto_device_map). On a GPU nothing
    is held in host memory. Decoder blocks are never split. Computed on a meta model with its tied
    weights tied, as from_pretrained builds it, so the plan and the run get the same map."""
    from accelerate.utils import compute_module_sizes, get_max_layer_size, infer_auto_device_map

    model, split = _meta_model(folder, config, dtype, trust_remote_code)
    key: str | int = "cpu" if device.type == "cpu" else (device.index or 0)
    memory: dict[str | int, int] = {key: budget} if device.type == "cpu" else {key: budget, "cpu": 0}
    with warnings.catch_warnings():   # that the buffers of modules left on disk (rotary tables) may not fit
        warnings.filterwarnings("ignore", message="Current model requires")
        device_map = dict(infer_auto_device_map(model, max_memory=memory, no_split_module_classes=split,
                                                dtype=dtype))
    sizes = compute_module_sizes(model, dtype=dtype)
    resident = sum(sizes[name] for name, where in device_map.items() if where != "disk")
    on_disk = [(name, model.get_submodule(name)) for name, where in device_map.items() if where == "disk"]
    if on_disk == [("", model)]:
        on_disk = list(model.named_children())
    streamed = get_max_layer_size(on_disk, sizes, split)[0] if on_disk else 0
    return Offload(device_map, resident, streamed)


def largest_module(folder: Path, config: dict, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[str, int]:
    """(name, bytes in `dtype`) of the float model's largest module that offloading never splits:
    a decoder block, the embeddings or the output head."""
    from accelerate.utils import compute_module_sizes, get_max_layer_size

    model, split = _meta_model(folder, config, dtype, trust_remote_code)
    size, names = get_max_layer_size(list(model.named_children()), compute_module_sizes(model, dtype=dtype), split)
    return (names[0] if names else ""), size


def _meta_model(folder: Path, config: dict, dtype: torch.dtype, trust_remote_code: bool) -> tuple[torch.nn.Module,
                                                                                                 list[str]]:
    """The float model on the meta device in `dtype`, its tied weights tied, and the classes of
    its modules that are never split (decoder blocks)."""
    from .load import build_skeleton

    # In `dtype`: accelerate sizes a tensor by the smaller of its own dtype and the one it is given,
    # so a bfloat16 skeleton would count half of what a float32 load holds.
    model = build_skeleton(folder, config, trust_remote_code=trust_remote_code).to(dtype)
    model.tie_weights()  # type: ignore[operator]  # a transformers model (build_skeleton)
    return model, list(getattr(model, "_no_split_modules", None) or [])


def load_offloaded(folder: Path, dtype: torch.dtype, device_map: dict[str, str | int], offload_folder: Path,
                   trust_remote_code: bool = False) -> torch.nn.Module:
    """The float model of a safetensors checkpoint in `dtype`, eval mode, dispatched by `device_map`
    (offload_map): modules on "disk" stay on the meta device and are read from the checkpoint's own
    files at every forward pass, converted to `dtype` (accelerate's hooks); `offload_folder` holds
    only what cannot be read as stored (weights transformers converts on load). The caller removes
    it after the model's last use."""
    from transformers import AutoModelForCausalLM

    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)   # its warning that offloaded weights sit on the meta device: the plan says so
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, device_map=device_map,
                                                    offload_folder=str(offload_folder),
                                                    trust_remote_code=trust_remote_code).eval()
    finally:
        log.setLevel(level)


M_MMAP_THRESHOLD = -3           # glibc's mallopt parameter
MMAP_THRESHOLD_MAX = 32 << 20   # the most glibc's own adjustment of it reaches on a 64-bit system


@contextlib.contextmanager
def mapped_allocations(threshold: int = 1 << 20) -> Iterator[None]:
    """Inside: glibc gives allocations of `threshold` bytes or more mappings of their own, returned
    to the system when freed. An offloaded model's weights arrive and leave at every forward pass;
    from glibc's heap, where its adjustable threshold sends everything under 32 MiB, the space they
    freed stayed with the process between the small allocations around it (measured on a 623 MB
    model read from disk at every pass: 1.7 to 3.5 times what a pass holds at a time, varying from
    run to run; inside, what the plan predicts). After, the threshold is fixed at that 32 MiB.
    Without glibc, nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        yield
        return
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
