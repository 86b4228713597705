"""Verification after writing, before the output is renamed into place.

1. Every quantized module is read back from the written files with the format's own reader and
   must decode to exactly the result the algorithm produced (a digest of codes, scales, zeros,
   group index and outliers is kept per module while the run streams).
2. In calibrated runs, the written checkpoint is loaded with `load_quantized` and run on the first
   calibration batch: the output of its last decoder block must match, within tolerance, what the
   fake-quantized blocks produced for the same tokens during the run.
Any mismatch fails the run; nothing broken is ever renamed into OUT.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from ..core.qweight import NestedAbsmax, QuantizedWeight
from ..errors import RunError

LOGITS_TOLERANCE = 1e-3     # relative; the written biases are float16 where the run used the source's


def digest(qw: QuantizedWeight) -> str:
    """A hash of what `qw` means (not of how a format packs it)."""
    h = hashlib.sha256()

    def add(t: Tensor | None) -> None:
        if t is not None:
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            flat = t.detach().to("cpu").reshape(-1).contiguous()        # stride 1 whatever the layout
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")

    add(qw.codes)
    scale = qw.scale.dequantize() if isinstance(qw.scale, NestedAbsmax) else qw.scale
    add(scale.to(torch.float32))
    add(None if qw.zero is None else qw.zero.to(torch.int32))
    if not qw.is_codebook:
        add(qw.group_index().to(torch.int32))
    if qw.outliers is not None:
        add(qw.outliers.dense(qw.shape, torch.float32))
    return h.hexdigest()


def check_modules(folder: Path, expected: dict[str, str]) -> int:
    """Decode every quantized module written in `folder`; each must match its expected digest."""
    from ..formats import format_for_config, module_qconfig
    from ..formats.reading import quantized_modules
    from ..models.load import CheckpointReader

    with CheckpointReader(folder) as reader:
        qconfig = reader.config["quantization_config"]
        fmt = format_for_config(qconfig)
        modules = quantized_modules(reader.names(), fmt)
        found = set(modules)
        if found != set(expected):
            missing = sorted(set(expected) - found) or sorted(found - set(expected))
            raise RunError(f"verification failed: the written checkpoint's quantized modules differ from the run's "
                           f"(first: {missing[0]})", "report it; nothing was written to the output")
        for prefix in sorted(found):
            local = modules[prefix]
            qw = fmt.decode({t: reader.read(full) for t, full in local.items()}, module_qconfig(qconfig, prefix))
            if digest(qw) != expected[prefix]:
                raise RunError(f"verification failed: {prefix} does not read back as it was quantized",
                               "report it; nothing was written to the output")
    return len(found)


def check_outputs(folder: Path, tokens: Tensor, expected: Tensor, layers: str, device: torch.device,
                  trust_remote_code: bool = False) -> float:
    """Relative difference between the last block's output of the written checkpoint on `tokens` and
    `expected` (the run's own); raises beyond LOGITS_TOLERANCE."""
    from ..calibration.sequential import text_model_path
    from ..runtime.load import load_quantized

    model = load_quantized(folder, device=device, dtype=torch.float32, trust_remote_code=trust_remote_code)
    blocks = cast(torch.nn.ModuleList, model.get_submodule(layers))
    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, output: Any) -> None:
        seen["out"] = output[0] if isinstance(output, tuple) else output
    handle = blocks[len(blocks) - 1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            base = model.get_submodule(text_model_path(model, layers))
            base(input_ids=tokens.to(device), use_cache=False)
    finally:
        handle.remove()
    got, want = seen["out"].float(), expected.to(device).float()
    diff = float((got - want).norm() / want.norm().clamp(min=1e-30))
    if not diff <= LOGITS_TOLERANCE:
        raise RunError(f"verification failed: the written checkpoint's last block differs from the quantized "
                       f"model's by {diff:.2e} (relative) on the first calibration batch",
                       "report it; nothing was written to the output")
    return diff
