"""Which Linears of a block share an input, and in what order they run: found by running the block.

One forward pass of a materialized block on real inputs, with a hook before every Linear of
interest, records the tensor each one receives. Linears that receive the very same tensor object
(q/k/v reading the normalized hidden states, gate and up reading the MLP's input) form one group,
whose statistics are gathered once; groups are ordered by when they first run, which is the order
true-sequential quantization must follow. Nothing depends on module names: a renamed or fused
projection, a hybrid block or an unusual MLP is found the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn


@dataclass(frozen=True)
class Layout:
    """The traced structure of one block.

    groups   Linears that share an input, each group in call order, groups in execution order
    unused   Linears the forward pass never reached (they get no calibration statistics)
    """

    groups: tuple[tuple[str, ...], ...]
    unused: tuple[str, ...]


def trace(block: nn.Module, names: tuple[str, ...] | list[str],
          forward: Callable[[], Any] | list[Callable[[], Any]]) -> Layout:
    """Run `forward()` (one forward pass of `block`) with a hook before each Linear in `names`.

    Given several forward passes (one per calibration batch), they run in turn until every Linear
    has been reached: a MoE expert that no token of the first batch is routed to is found in a
    later one (and grouped with whatever shares its input there)."""
    calls: list[tuple[str, Tensor]] = []
    seen: set[str] = set()

    def make(name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in seen:
                return
            x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
            if isinstance(x, Tensor):
                seen.add(name)
                calls.append((name, x))   # holding x keeps its id unique during the pass
        return pre_hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make(n), with_kwargs=True) for n in names]
    try:
        for run in forward if isinstance(forward, list) else [forward]:
            run()
            if len(seen) == len(names):
                break
    finally:
        for h in handles:
            h.remove()
    order: dict[int, list[str]] = {}
    for name, x in calls:
        order.setdefault(id(x), []).append(name)
    groups = tuple(tuple(g) for g in order.values())
    return Layout(groups, tuple(n for n in names if n not in seen))


# ---- AWQ's scaling groups, found by measurement ---------------------------------------------------

# Last path components of query/key projections: AWQ's clip search leaves them alone (their error
# is amplified by the softmax, which the per-Linear clip objective does not see).
QUERY_KEY = {"q_proj", "k_proj", "query", "key", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "wq", "wk",
             "wqkv", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "qk_proj"}
FOLD_CHECK = 1e-4   # relative difference allowed between a scaled producer's output and the input / s


def _common_parent(names: tuple[str, ...]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):   # up to the shortest name
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def awq_groups(block: nn.Module, layout: Layout, forward: Callable[[], Any], seed: int = 0) -> tuple[Any, ...]:
    """AWQ's scaling groups of a block (models.architectures.AWQScale), found by measurement.

    For each traced group, the operation whose output is the group's input: a module with a
    per-channel weight (a norm) whose output is that very tensor, or an earlier Linear such that
    dividing its output rows by random positive scales s divides the group's input by s (nothing
    but per-channel-linear operations in between: attention's weighted sum over values, a gated
    MLP's product). A norm's form is measured the same way: dividing `weight` by s (it multiplies
    by weight) or `1 + weight` (it multiplies by 1 + weight) must divide its output by s.
    Groups with no such producer get no scaling.
    """
    import torch

    from ..models.architectures import AWQScale

    firsts = {g[0]: g for g in layout.groups}
    inputs: dict[str, Tensor] = {}
    produced: dict[int, tuple[str, tuple, dict, Tensor]] = {}   # holding the output keeps its id unique
    handles = []

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in inputs and args and isinstance(args[0], Tensor):
                inputs[name] = args[0]
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if isinstance(output, Tensor):
                produced.setdefault(id(output), (name, args, kwargs, output))
        return hook

    linears = {n for g in layout.groups for n in g}
    for name, module in block.named_modules():
        if name in firsts:
            handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        weight = getattr(module, "weight", None)
        if name and name not in linears and isinstance(weight, Tensor) and weight.dim() == 1:
            handles.append(module.register_forward_hook(post(name), with_kwargs=True))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    generator = torch.Generator().manual_seed(seed)
    order = [n for g in layout.groups for n in g]
    entries = []
    for group in layout.groups:
        x = inputs.get(group[0])
        if x is None:
            continue
        width = x.shape[-1]
        s = (torch.rand(width, generator=generator) * 1.5 + 0.5).to(x.device, x.dtype)
        target = x / s
        # The module whose output the scale search compares: for a norm's group, the smallest
        # module holding the whole group (the attention, the MLP), where the error shows after
        # whatever follows the Linears inside it; a lone Linear fed by a Linear is its own.
        inspect = _common_parent(group) or (group[0] if len(group) == 1 else "")
        found = None
        if id(x) in produced:
            name, args, kwargs, _ = produced[id(x)]
            norm = block.get_submodule(name)
            offset = _norm_form(norm, args, kwargs, s, target) if norm.weight.shape == (width,) else None
            if offset is not None:
                found = AWQScale(name, group, inspect, offset)
        else:
            earlier = [n for n in order[:order.index(group[0])] if n not in group]
            for name in reversed(earlier):
                prev = block.get_submodule(name)
                if prev.out_features == width and _scales_through(block, prev, group[0], forward, s, target):
                    found = AWQScale(name, group, group[0] if len(group) == 1 else inspect)
                    break
        if found is not None and found.inspect:
            entries.append(found)
    return tuple(entries)


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(((a.float() - b.float()).norm() <= FOLD_CHECK * b.float().norm().clamp(min=1e-30)).item())


def _norm_form(norm: nn.Module, args: tuple, kwargs: dict, s: Tensor, target: Tensor) -> float | None:
    """0.0 when the norm multiplies by `weight`, 1.0 when by `1 + weight`, None when neither fits."""
    import torch

    weight = cast(Tensor, norm.weight)
    bias: Any = getattr(norm, "bias", None)
    original = weight.data.clone()
    original_bias = bias.data.clone() if isinstance(bias, Tensor) else None
    try:
        for offset in (0.0, 1.0):
            weight.data = (original + offset) / s.to(original.dtype) - offset
            if original_bias is not None:
                bias.data = original_bias / s.to(original_bias.dtype)
            with torch.no_grad():
                out = norm(*args, **kwargs)
            if isinstance(out, Tensor) and out.shape == target.shape and _close(out, target):
                return offset
    finally:
        weight.data = original
        if original_bias is not None:
            bias.data = original_bias
    return None


def _scales_through(block: nn.Module, prev: nn.Module, first: str, forward: Callable[[], Any], s: Tensor,
                    target: Tensor) -> bool:
    """Whether dividing `prev`'s output rows by s divides the input of Linear `first` by s."""
    import torch

    seen: list[Tensor] = []
    weight, bias = cast(Tensor, prev.weight), cast(Any, prev.bias)   # a Linear's
    original, original_bias = weight.data.clone(), bias.data.clone() if bias is not None else None

    def hook(module: nn.Module, args: tuple) -> None:
        if not seen and args and isinstance(args[0], Tensor):
            seen.append(args[0])

    handle = block.get_submodule(first).register_forward_pre_hook(hook)
    try:
        weight.data = original / s.to(original.dtype)[:, None]
        if original_bias is not None:
            bias.data = original_bias / s.to(original_bias.dtype)
        with torch.no_grad():
            forward()
    finally:
        handle.remove()
        weight.data = original
        if original_bias is not None:
            bias.data = original_bias
    return bool(seen) and seen[0].shape == target.shape and _close(seen[0], target)


def query_key(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The Linears among `names` that project queries or keys (by their last path component)."""
    return tuple(n for n in names if n.rsplit(".", 1)[-1] in QUERY_KEY)
