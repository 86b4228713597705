"""Load a quantized checkpoint into a transformers model whose quantized Linears are QuantLinear
(integer grids) or NF4Linear (NF4/FP4 codebooks).

checkpoint folder -> Format.decode per quantized module -> QuantizedWeight -> QuantLinear, then every
other tensor (embeddings, norms, lm_head, Linears kept dense) loaded as is. Only our own reader
touches the files: safetensors only, trust_remote_code off, no transformers quantizer involved.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..errors import CheckpointError, ModelError, UsageError
from ..formats.reading import QuantizedModules, linear_shape
from ..models.load import CheckpointReader, build_skeleton, check_against_config, resolve_model
from ..models.weightmap import build as build_weight_map
from ..models.weightmap import piece_shape
from .qlinear import NF4Linear, OutlierLinear, QuantLinear

BACKENDS = ("auto", "torch", "cuda")


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, backend: str = "auto",
                   trust_remote_code: bool = False) -> PreTrainedModel:
    """A quantized checkpoint (folder, hub id or cache entry) as an eval-mode model on `device`.

    dtype: activations, norms, embeddings and biases (default: the checkpoint's config dtype,
    else float32); scales stay as stored (float16; an NF4 absmax float32). backend: "auto" uses the
    CUDA kernels on a CUDA device where they load (else the PyTorch path, with one warning saying
    why), "cuda" insists on them (a UsageError where they cannot load), "torch" always runs the
    PyTorch path. trust_remote_code: build a model whose config.json names code of its own with
    that code (models/load.py build_skeleton).
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    if backend == "cuda":
        from . import cuda

        if torch.device(device).type != "cuda":
            raise UsageError(f"backend 'cuda' runs on a CUDA device, not {device}", "pass device='cuda'")
        st = cuda.status()
        if not st.available:
            raise UsageError(f"the CUDA kernels cannot be used here: {st.reason}",
                             "use backend 'auto' or 'torch' (the PyTorch implementation)")
    from ..formats.gguf import is_gguf

    if is_gguf(Path(str(path)).expanduser()):      # one GGUF file: dequantized weights (runtime/gguf.py)
        from .gguf import load_gguf

        return cast(PreTrainedModel, load_gguf(path, device=device, dtype=dtype))
    folder = resolve_model(str(path), trust_remote_code=trust_remote_code)
    with CheckpointReader(folder) as reader:
        config = reader.config
        qconfig = config.get("quantization_config")
        if not qconfig:
            raise ModelError(f"{folder} is not a quantized checkpoint; load it with transformers",
                             "AutoModelForCausalLM.from_pretrained(folder), or quantize it first")
        modules = QuantizedModules(reader)
        dtype = dtype or config_dtype(config)
        model = cast(PreTrainedModel, build_skeleton(folder, config, trust_remote_code=trust_remote_code))
        check_against_config(reader, model, quantized=modules.prefixes)
        names = reader.names()
        present = set(names)
        used: set[str] = set()
        # Stored names -> the model's: renamed modules, and experts that are one matrix each in the
        # checkpoint but fused into 3-D parameters in memory (those are dequantized into them).
        weights = build_weight_map(model, names + [f"{p}.weight" for p in modules.prefixes])
        memory = weights.memory_of()
        pieces: dict[str, Tensor] = {}
        state = dict(model.state_dict(keep_vars=True))
        for prefix in modules.prefixes:
            used.update(modules.tensors(prefix).values())
            target = memory.get(f"{prefix}.weight", f"{prefix}.weight")
            if target in weights.fused:
                shape = piece_shape(weights, target, tuple(state[target].shape))
                pieces[f"{prefix}.weight"] = modules.decode(prefix, shape).dequantize(dtype)
                continue
            path = target.removesuffix(".weight")
            qw = modules.decode(prefix, linear_shape(model, path))
            linear = cast(nn.Linear, model.get_submodule(path))
            bias = _bias_for(reader, present, prefix, linear)
            used.add(f"{prefix}.bias")
            module_cls = NF4Linear if qw.is_codebook else OutlierLinear if qw.outliers is not None else QuantLinear
            _set_module(model, path, module_cls.from_quantized(qw, bias, dtype))
        rest = {memory.get(n, n): reader.read(n) for n in names
                if n not in used and memory.get(n, n) not in weights.fused}
        for target in weights.fused:
            rest[target] = weights.assemble(target, lambda n: pieces[n] if n in pieces else reader.read(n))
    _load_dense(model, rest, dtype)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, (QuantLinear, NF4Linear)):
            module.backend = "torch" if backend == "torch" else "auto"
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise CheckpointError(f"{name} is missing from the checkpoint in {folder}")
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to() for models only


def config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The model dtype config.json declares ("dtype" or the older "torch_dtype"), else float32."""
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name).replace("torch.", ""), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _bias_for(reader: Any, present: set[str], prefix: str, linear: nn.Linear) -> Tensor | None:
    name = f"{prefix}.bias"
    if linear.bias is None:
        if name in present:
            raise CheckpointError(f"unexpected tensor {name}: the model's {prefix} has no bias")
        return None
    if name not in present:
        raise CheckpointError(f"{name} is missing from the checkpoint")
    return reader.read(name)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _load_dense(model: nn.Module, tensors: dict[str, Tensor], dtype: torch.dtype) -> None:
    """Assign the unquantized tensors to the model's parameters/buffers (floats cast to `dtype`)."""
    expected = model.state_dict(keep_vars=True)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    state = {}
    for name, t in tensors.items():
        if name not in expected:
            if any(p.search(name) for p in ignore):
                continue
            raise CheckpointError(f"unexpected tensor {name}: the model has no such parameter",
                                  "is config.json the one this checkpoint was written with?")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{name} has shape {list(t.shape)}, the model expects "
                                  f"{list(expected[name].shape)}")
        state[name] = t.to(dtype) if t.dtype.is_floating_point else t
    model.load_state_dict(state, strict=False, assign=True)
