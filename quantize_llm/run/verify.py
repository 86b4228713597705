"""Verification after writing, before the output is renamed into place.

1. Every quantized module is read back from the written files with the format's own reader and
   must decode to exactly the result the algorithm produced (a digest of codes, scales, zeros,
   group index and outliers is kept per module while the run streams).
2. In calibrated runs, the written checkpoint is run on the first calibration batch, block by
   block from the written shards (never loaded whole): the output of its last decoder block must
   match, within tolerance, what the fake-quantized blocks produced for the same tokens during the run.
Any mismatch fails the run; nothing broken is ever renamed into OUT.
"""
from __future__ import annotations

import copy
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
    `expected` (the run's own); raises beyond LOGITS_TOLERANCE.

    Streamed from the written shards: what comes before the blocks (embeddings, rotary tables)
    produces block 0's input and every block's keyword arguments, then is released; each block is
    then built from the shards (quantized Linears as load_quantized builds them, the rest in
    float32), run, and dropped before the next one is read. At most one block is held."""
    from ..calibration.sequential import (
        _block_forward,
        _Recorder,
        _Stop,
        embedding_rows,
        input_embeddings,
        lookup_rows,
        text_model_path,
    )
    from ..formats.reading import QuantizedModules
    from ..models.load import CheckpointReader, build_skeleton
    from ..models.weightmap import build as build_weight_map

    with CheckpointReader(folder) as reader:
        modules = QuantizedModules(reader)
        present = set(reader.names())
        model = build_skeleton(folder, reader.config, trust_remote_code=trust_remote_code)
        # Stored names -> the model's (renamed blocks, experts fused in memory), as load_quantized maps them.
        # (on a skeleton of its own: the conversion's operations look up shapes in the model, whose
        # blocks are replaced one by one below)
        weights = build_weight_map(build_skeleton(folder, reader.config, trust_remote_code=trust_remote_code),
                                   reader.names() + [f"{p}.weight" for p in modules.prefixes])
        base_path = text_model_path(model, layers)
        base = model.get_submodule(base_path) if base_path else model
        blocks = cast(torch.nn.ModuleList, model.get_submodule(layers))
        originals: list[torch.nn.Module | None] = list(blocks)
        n = len(blocks)
        calls: list[list[dict]] = [[] for _ in range(n)]
        inputs: list[Tensor] = []

        def live(block: torch.nn.Module, index: int, x: Tensor, kwargs: dict) -> Any:
            """Block `index` built from the shards and run (a copy, dropped after), for models whose
            blocks hand part of their output to the next one."""
            block = copy.deepcopy(block)
            _load_part(block, f"{layers}.{index}.", reader, modules, present, device, weights=weights)
            return _block_forward(block, x, kwargs, whole=True)

        def capture(live_blocks: bool) -> None:
            for lst in calls:
                lst.clear()
            inputs.clear()
            for i in range(n):
                blocks[i] = _Recorder(i, n - 1, calls, inputs, originals[i], live if live_blocks else None)
            with torch.no_grad():
                try:
                    base(input_ids=tokens.to(device), use_cache=False)
                except _Stop:
                    pass

        cut = embedding_rows(base, tokens)   # the embedding table only as far as the tokens use it
        hook = None
        try:
            loaded = _load_part(base, base_path + "." if base_path else "", reader, modules, present, device,
                                skip=layers[len(base_path) + 1:] + "." if base_path else layers + ".",
                                weights=weights, tied=dict(getattr(model, "all_tied_weights_keys", None) or {}),
                                rows=dict([cut]) if cut else None)
            hook = lookup_rows(input_embeddings(base), cut[1]) if cut else None
            try:
                capture(live_blocks=False)
            except (ValueError, TypeError):   # the blocks pass state along: run them for real
                capture(live_blocks=True)
        finally:
            for i in range(n):
                blocks[i] = torch.nn.Identity()
            if hook is not None:
                hook.remove()
        for name in loaded:   # the embeddings go before the first block comes
            _release(base, name)
        del loaded
        x = inputs[0]
        inputs.clear()
        for i in range(n):
            block = originals[i]
            originals[i] = None
            assert block is not None
            if not calls[i]:   # a block the model skips on text (a cross-attention layer)
                continue
            _load_part(block, f"{layers}.{i}.", reader, modules, present, device, weights=weights)
            with torch.no_grad():
                x = _block_forward(block, x, calls[i][0])
            del block
    got, want = x.float(), expected.to(device).float()
    diff = float((got - want).norm() / want.norm().clamp(min=1e-30))
    if not diff <= LOGITS_TOLERANCE:
        raise RunError(f"verification failed: the written checkpoint's last block differs from the quantized "
                       f"model's by {diff:.2e} (relative) on the first calibration batch",
                       "report it; nothing was written to the output")
    return diff


def _load_part(module: torch.nn.Module, prefix: str, reader: Any, modules: Any, present: set[str],
               device: torch.device, skip: str | None = None, weights: Any = None,
               tied: dict[str, str] | None = None, rows: dict[str, Tensor] | None = None) -> list[str]:
    """Build `module` (full name `prefix`) from the written checkpoint, as load_quantized would: its
    quantized Linears decoded into QuantLinear / NF4Linear / OutlierLinear, its other parameters
    read in float32, its buffers moved to `device`. Names under `skip` (local) are left alone.
    `prefix` is the module's path in the model; `weights` (models.weightmap.WeightMap) maps it to
    the stored names (renamed modules; experts stored one matrix each, fused in the model); `rows`:
    parameters of which only these rows are read (sequential.embedding_rows).
    Returns the local names of the parameters read."""
    from ..errors import CheckpointError
    from ..formats.reading import linear_shape
    from ..models.weightmap import WeightMap, piece_shape
    from ..runtime.load import _bias_for, _set_module
    from ..runtime.qlinear import NF4Linear, OutlierLinear, QuantLinear

    dtype = torch.float32
    weights = weights or WeightMap({}, {})
    memory = weights.memory_of()
    quantized = {}      # local module name -> stored prefix
    pieces: dict[str, Tensor] = {}   # stored name -> dequantized expert matrix
    state = dict(module.state_dict(keep_vars=True))
    for stored in modules.prefixes:
        target = memory.get(f"{stored}.weight", f"{stored}.weight")
        if not target.startswith(prefix) or (skip and target[len(prefix):].startswith(skip)):
            continue
        local = target[len(prefix):]
        if target in weights.fused:
            shape = piece_shape(weights, target, tuple(state[local].shape))
            pieces[f"{stored}.weight"] = modules.decode(stored, shape).dequantize(dtype)
        else:
            quantized[local.removesuffix(".weight")] = stored
    for local, full in quantized.items():
        qw = modules.decode(full, linear_shape(module, local))
        bias = _bias_for(reader, present, full, cast(torch.nn.Linear, module.get_submodule(local)))
        cls = NF4Linear if qw.is_codebook else OutlierLinear if qw.outliers is not None else QuantLinear
        built = cls.from_quantized(qw, bias, dtype)
        built.backend = "auto"
        _set_module(module, local, built.to(device))
    loaded = []
    for name, param in list(module.named_parameters()):
        if skip and name.startswith(skip):
            continue
        if param.device.type != "meta":
            continue
        if prefix + name in weights.fused:
            value = weights.assemble(prefix + name, lambda n: pieces[n] if n in pieces else reader.read(n))
        else:
            stored = weights.disk_name(prefix + name)
            if stored not in present and (tied or {}).get(prefix + name) in weights.to_disk:
                stored = weights.disk_name((tied or {})[prefix + name])   # tied to a stored parameter
            if stored not in present:
                raise CheckpointError(f"{stored} is missing from the checkpoint in {reader.folder}")
            value = reader.read(stored)
        if rows and name in rows:
            value = value.index_select(0, rows[name].to(value.device))
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        _set_param(module, name, torch.nn.Parameter(value, requires_grad=False))
        loaded.append(name)
    for name, buf in list(module.named_buffers()):
        if (skip and name.startswith(skip)) or buf.device.type == "meta" or buf.device == device:
            continue
        owner, _, leaf = name.rpartition(".")
        (module.get_submodule(owner) if owner else module)._buffers[leaf] = buf.to(device)
    return loaded


def _set_param(module: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._parameters[leaf] = value


def _release(module: torch.nn.Module, name: str) -> None:
    param = module.get_parameter(name)
    _set_param(module, name, torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))
