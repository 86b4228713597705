"""Calibration of MoE experts that transformers fuses into 3-D parameters: each expert's inputs.

transformers 5 runs fused experts through a registered "experts implementation" (its
`use_experts_implementation` classes: `gate_up_proj` or `up_proj`, then `down_proj`, with flags for
transposed storage, biases, the gating function and a post-expert norm). This module registers one
more, `quantize_llm_observe`, that computes the same function expert by expert and hands an observer:

- "in":  the tokens routed to expert e (the input of its gate and up projections), and
- "mid": the gated intermediate those tokens produce (the input of its down projection),

so each expert's Hessian comes from the tokens routed to it, however few. An expert that no
calibration token reaches (fewer than MIN_EXPERT_TOKENS) gets, for its statistics only, every token
that reaches the layer (run through that expert's own weights); the block's output keeps the normal
routing either way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

IMPLEMENTATION = "quantize_llm_observe"
FIRST = ("gate_up_proj", "up_proj")     # the experts' first projection (gate and up, or up alone)
SECOND = ("down_proj",)
# Fewer routed tokens than this: statistics from every token of the layer. Measured
# (scripts/bench_moe_fallback.py, README): an expert's own few tokens beat every token of the layer
# (and round-to-nearest), so only an expert that no calibration token reached takes the layer's.
MIN_EXPERT_TOKENS = 1

Observer = Callable[[nn.Module, int, str, Tensor, int], None]   # (experts module, expert, role, x, routed)
_observer: list[Observer | None] = [None]
_wants_all: list[Callable[[nn.Module, int], bool] | None] = [None]


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module transformers dispatches through its experts implementations."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and isinstance(
        getattr(module, "down_proj", None), Tensor)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    out = x @ weight if transposed else x @ weight.T
    return out + bias if bias is not None else out


def _expert(module: Any, e: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(gated intermediate, output before routing weights) of expert e on tokens x."""
    if module.has_gate:
        weight, bias = module.gate_up_proj[e], module.gate_up_proj_bias[e] if module.has_bias else None
        mid = module._apply_gate(_linear(x, weight, bias, module.is_transposed))
    else:
        weight, bias = module.up_proj[e], module.up_proj_bias[e] if module.has_bias else None
        mid = module.act_fn(_linear(x, weight, bias, module.is_transposed))
    out = _linear(mid, module.down_proj[e], module.down_proj_bias[e] if module.has_bias else None,
                  module.is_transposed)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return mid, out


def observe_forward(self: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts' output, expert by expert, with each expert's inputs handed to the observer:
    ("in", routed tokens) per expert and once ("in", every token) with expert -1; ("mid", the
    gated intermediate of the routed tokens), or of every token where `_wants_all(module, e)`."""
    observer, wants_all = _observer[0], _wants_all[0]
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    index = top_k_index.reshape(flat.shape[0], -1)
    weights = top_k_weights.reshape(flat.shape[0], -1)
    out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    if observer is not None:
        observer(self, -1, "in", flat, flat.shape[0])
    for e in range(int(self.down_proj.shape[0])):
        tokens, slots = torch.nonzero(index == e, as_tuple=True)
        routed = int(tokens.numel())
        mid = None
        if routed:
            x = flat[tokens]
            mid, y = _expert(self, e, x)
            out.index_add_(0, tokens, (y * weights[tokens, slots, None]).float())
            if observer is not None:
                observer(self, e, "in", x, routed)
        if observer is not None:
            if wants_all is not None and wants_all(self, e):
                mid, _ = _expert(self, e, flat)
            if mid is not None:
                observer(self, e, "mid", mid, routed)
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def register() -> bool:
    """Make `quantize_llm_observe` known to transformers (False where transformers has no experts
    implementations)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, observe_forward)
    return True


@contextlib.contextmanager
def observing(block: nn.Module, observer: Observer | None,
              wants_all: Callable[[nn.Module, int], bool] | None = None) -> Iterator[None]:
    """Inside: the block's fused experts run through `observe_forward`, calling `observer`."""
    register()
    modules = [m for m in block.modules() if is_fused_experts(m)]
    configs: list[Any] = [m.config for m in modules]
    saved = [(config, getattr(config, "_experts_implementation", None)) for config in configs]
    _observer[0], _wants_all[0] = observer, wants_all
    try:
        for config, _ in saved:
            config._experts_implementation = IMPLEMENTATION
        yield
    finally:
        _observer[0] = _wants_all[0] = None
        for config, value in saved:
            config._experts_implementation = value


@dataclass
class ExpertUnits:
    """The expert matrices of a block, by (experts module path, expert, role) -> local unit names."""

    units: dict[tuple[str, int, str], list[str]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)    # unit -> routed tokens seen

    def add(self, module: str, e: int, role: str, local: str) -> None:
        self.units.setdefault((module, e, role), []).append(local)


def expert_units(plans: list[Any]) -> ExpertUnits:
    """Group a block's expert LinearPlans (LinearPlan.expert) by experts module, expert and role."""
    found = ExpertUnits()
    for lp in plans:
        if lp.expert is None:
            continue
        target, _, e = lp.expert
        module, _, param = target.rpartition(".")
        role = "in" if param in FIRST else "mid" if param in SECOND else None
        if role is not None:
            found.add(module, e, role, lp.local)
    return found
