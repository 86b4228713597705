"""Where a model's decoder blocks are and which of their Linears are quantized, found from the model.

The model is instantiated on the meta device (models.load.build_skeleton); from it:

- `find_blocks`: the ModuleList of repeated decoder blocks of the language model. Its length is the
  text config's layer count; blocks may be of different kinds (hybrid attention/state-space models,
  interleaved dense and MoE blocks). Lists inside vision towers, audio encoders and projectors are
  never chosen.
- `block_linears`: every nn.Linear (subclasses included) inside one block, in registration order,
  minus the MoE routers (`is_router`), which stay dense: a router picks experts by comparing its
  logits, and rounding its few rows moves tokens between experts.

Everything else stays dense and is reported by the plan: vision towers, projectors, routers,
state-space convolutions and their special parameters, experts fused into 3-D parameters (not yet
quantized), embeddings, and the head. Which Linears share an input, and in what order they run, is
found by the calibrated runner from a traced forward pass of each block (calibration/trace.py).

`models/architectures.py` holds the overrides where discovery needs help (AWQ's scaling groups of the
families measured so far, and the order their Linears are written in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from ..errors import ModelError

# Path components that mark a part of a multimodal model that is not the language model.
NOT_TEXT = ("vision", "visual", "image", "audio", "speech", "video", "vit", "siglip", "projector",
            "mm_projector", "multi_modal", "perceiver", "resampler", "patch", "talker", "code2wav", "token2wav")
# ...and of an encoder, which holds the blocks only in encoder-style causal LMs (BERT-like heads).
ENCODER = "encoder"
# config.json keys that give a MoE layer's number of experts.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_layer")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class Blocks:
    """The decoder blocks: the ModuleList's path and, per block, its quantizable Linears."""

    path: str                                  # e.g. "model.layers", "model.language_model.layers"
    linears: tuple[tuple[str, ...], ...]       # per block: local Linear names, registration order
    routers: tuple[tuple[str, ...], ...]       # per block: Linears kept dense as MoE routers
    fused: tuple[tuple[str, ...], ...]         # per block: 3-D parameters (fused experts), kept dense


def text_config(config: Any) -> Any:
    """The language model's config of a (possibly multimodal) transformers config object."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except (TypeError, ValueError):
            return get()
    return config


def _text_int(config: Any, keys: tuple[str, ...], least: int) -> int | None:
    """The first of `keys` the (text) config sets to an integer of at least `least`."""
    text = text_config(config)
    for key in keys:
        value = getattr(text, key, None)
        if isinstance(value, int) and value >= least:
            return value
    return None


def layer_count(config: Any) -> int | None:
    """The number of decoder blocks the (text) config declares, or None when it names none."""
    return _text_int(config, LAYER_COUNT_KEYS, 1)


def expert_count(config: Any) -> int | None:
    """The number of experts of a MoE layer the (text) config declares (None: not a MoE)."""
    return _text_int(config, EXPERT_COUNT_KEYS, 2)


def is_not_text(path: str) -> bool:
    """Whether a module path names part of a vision tower, audio encoder or projector."""
    parts = path.lower().split(".")
    return any(word in part for part in parts for word in NOT_TEXT)


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_blocks(skeleton: nn.Module, override: str | None = None) -> str:
    """The path of the ModuleList of decoder blocks in `skeleton` (see the module docstring).

    Candidates are ModuleLists outside vision/audio parts whose blocks hold Linears or 3-D
    parameters; those whose length is the text config's layer count come first, then the
    outermost (a list of experts inside a block is never preferred to the list of blocks).
    """
    if override is not None:
        try:
            skeleton.get_submodule(override)
        except AttributeError:
            raise ModelError(f"the model has no {override}, where models/architectures.py says its blocks are",
                             "report the model; the override is out of date") from None
        return override
    count = layer_count(getattr(skeleton, "config", None))
    candidates = []
    for path, module in skeleton.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or is_not_text(path):
            continue
        if not any(_has_linear(b) or any(p.dim() == 3 for p in b.parameters()) for b in module):
            continue
        candidates.append((ENCODER in path.lower(), len(module) != count, path.count("."), -len(module), path))
    if not candidates:
        name = type(skeleton).__name__
        raise ModelError(f"{name} has no list of decoder blocks holding Linear layers (its layers are "
                         "not torch.nn.Linear modules)", "this family cannot be quantized by this tool yet; "
                         "report the model")
    return min(candidates)[-1]


def is_router(name: str, module: nn.Linear, experts: int | None) -> bool:
    """A MoE router: a Linear whose outputs are one logit per expert."""
    last = name.rsplit(".", 1)[-1]
    if experts is not None and module.out_features == experts:
        return True
    return last in ("router", "gate") and module.out_features <= 512 and module.out_features < module.in_features // 4


def block_linears(block: nn.Module, experts: int | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(quantizable Linears, routers, fused 3-D parameters) of one block, as local names."""
    linears: list[str] = []
    routers: list[str] = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and name:
            (routers if is_router(name, module, experts) else linears).append(name)
    fused = tuple(n for n, p in block.named_parameters() if p.dim() == 3 and not any(
        n.startswith(r + ".") for r in routers) and "conv" not in n.rsplit(".", 1)[-1] and "conv" not in n)
    return tuple(linears), tuple(routers), fused


def discover(skeleton: nn.Module, override: str | None = None) -> Blocks:
    """The decoder blocks of `skeleton` and their Linears."""
    path = find_blocks(skeleton, override)
    layers = cast(nn.ModuleList, skeleton.get_submodule(path))
    experts = expert_count(getattr(skeleton, "config", None))
    found = [block_linears(block, experts) for block in layers]
    return Blocks(path, tuple(f[0] for f in found), tuple(f[1] for f in found), tuple(f[2] for f in found))
