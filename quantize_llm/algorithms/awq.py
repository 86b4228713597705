"""AWQ (Lin et al., MLSys 2024): activation-aware scaling, then clipping, then rounding.

Per decoder block, before any of its Linears is quantized (`prepare_block`):
  1. one forward pass over the calibration batches records, for every scaling group of the
     architecture map (models/architectures.py, `AWQScale`), the mean |x| of each input channel
     of its Linears, and the inputs of the module the search inspects;
  2. per group, for alpha = 0, 1/grid, ..., (grid-1)/grid: s = mean|x|^alpha normalized by
     sqrt(max(s) min(s)); the group's weights W*s are rounded to the grid and divided by s again,
     and the inspected module's output error on the recorded inputs is measured; the best alpha
     wins (alpha = 0, i.e. plain rounding, on a tie);
  3. s is folded: the producing operation (a norm, or the rows of the previous Linear) is divided
     by s and the group's Linears are multiplied by it, so the block computes the same function.
Then, stage by stage like GPTQ (`observe` / `quantize_layer`), each Linear's range is clipped per
group where that lowers its output error (measured through the Hessian X^T X of its real inputs)
and the weights are rounded to the nearest grid point, or by GPTQ (`then="gptq"`).
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..core import narrow
from ..core.devices import move, spread
from ..core.primitives import Float16Overflow, clip_search, default_g_idx, quantize_codes, rtn_group_params
from ..core.qweight import QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import CheckpointError, ModelError, RunError, SpecError
from .base import BlockContext, LayerContext, naming, solve_overflow
from .gptq import GPTQOptions, gptq_quantize
from .registry import register
from .rtn import rtn_quantize
from .solve import SolverOptions, Spill, accumulate_hessian, energy, output_error

THEN = ("rtn", "gptq")
FOLD_TOLERANCE = 0.02     # folding may change a block's output only by the rounding of stored norms
TRIAL_ELEMENTS = 1 << 24  # clip search: trials x rows x group columns evaluated at once
ENERGY_SLICE = 1 << 22    # input_energy: rows of D (and of D X^T) formed at once


@dataclass(frozen=True)
class AWQOptions:
    grid: int = 20                 # exponents alpha = i / grid, i = 0 .. grid-1
    clip: bool = True              # search each group's range after scaling
    clip_grid: int = 20            # clip ratios 1, 1 - 1/clip_grid, ... down to 1 - max_shrink
    max_shrink: float = 0.5
    search_samples: int = 16       # calibration sequences the scale search runs inspected modules on (0: all)
    duo_scaling: bool = False      # AutoAWQ's variant: s = mean|x|^alpha / mean|w|^(1-alpha) (w normalized per group)
    then: str = "rtn"              # rounding after scaling and clipping: "rtn" or "gptq"
    # then="gptq": the solver's (SolverOptions says what they mean; damp_max is its default)
    damp: float = SolverOptions.damp
    block_size: int = SolverOptions.block_size
    true_sequential: bool = SolverOptions.true_sequential   # observed stage by stage with either rounding

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise SpecError(f"--grid {self.grid} must be at least 1", "20 is AWQ's default")
        if self.clip_grid < 1:
            raise SpecError(f"--clip-grid {self.clip_grid} must be at least 1", "20 is AWQ's default")
        if not 0 <= self.max_shrink < 1:
            raise SpecError(f"--max-shrink {self.max_shrink} must be in [0, 1)", "0.5 is AWQ's default")
        if self.search_samples < 0:
            raise SpecError(f"--search-samples {self.search_samples} must be 0 (all) or more", "16 is the default")
        if self.then not in THEN:
            raise SpecError(f"--then {self.then} is not known",
                            f"choose one of {', '.join(THEN)}; rtn is AWQ's own rounding")
        SolverOptions.of(self)


def awq_scales(act_mean: Tensor, alpha: float) -> Tensor:
    """s = act_mean^alpha / sqrt(max * min), computed in the log domain so that flat activations
    give exactly 1 for every alpha. Channels that never fire are treated as 1e-5 of the largest."""
    a = act_mean.double()
    a = a.clamp(min=max(float(a.max()) * 1e-5, 1e-30))
    log_a = a.log()
    centre = (log_a.max() + log_a.min()) / 2
    return torch.exp(alpha * (log_a - centre)).float()


def weight_mean(weights: list[Tensor], group_size: int) -> Tensor:
    """Per input channel, the mean over rows of |w| / max|w| of its group (AutoAWQ's duo scaling)."""
    w = torch.cat([x.float() for x in weights], dim=0).abs()             # (rows, in)
    rows, n = w.shape
    gs = n if group_size == -1 or n % group_size else group_size
    g = w.view(rows, n // gs, gs)
    return (g / (g.amax(dim=2, keepdim=True) + 1e-6)).view(rows, n).mean(dim=0)


def duo_scales(act_mean: Tensor, w_mean: Tensor, alpha: float) -> Tensor:
    """s = act_mean^alpha / (w_mean^(1-alpha) + 1e-4), normalized by sqrt(max * min)."""
    s = act_mean.double().clamp(min=1e-30) ** alpha / (w_mean.double() ** (1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return (s / (s.max() * s.min()).sqrt()).float()


def fake_rtn(weight: Tensor, spec: QuantSpec) -> Tensor:
    """The weight rounded to its min-max grid and dequantized (float32)."""
    return rtn_quantize(weight, spec).dequantize(torch.float32)


def scaled_fake_rtn(weight: Tensor, s: Tensor, spec: QuantSpec,
                    rows: Callable[[int, int], Tensor] | None = None) -> Tensor:
    """fake_rtn(weight * s) / s (float32), a slice of rows at a time: rows round independently,
    so only the result and slice-sized temporaries are held. rows(start, stop): the weight's rows
    as the run computes with them (a Linear held narrow: core/narrow.py), if not `weight`'s own."""
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    step = max(1, TRIAL_ELEMENTS // max(weight.shape[1], 1))
    for r in range(0, weight.shape[0], step):
        part = weight[r:r + step] if rows is None else rows(r, min(r + step, weight.shape[0]))
        out[r:r + step] = fake_rtn(part * s, spec).div_(s)
    return out


def hessian_clip_params(w: Tensor, h: Tensor, spec: QuantSpec, grid: int = 20,
                        max_shrink: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Per (row, group) range chosen by output error: the clip trials of `clip_search`
    (p = 1, 1 - 1/grid, ... 1 - max_shrink) scored by d^T H_gg d, d the group's weight error and
    H_gg the group's block of the input Hessian X^T X; the least error wins (p = 1 on a tie).

    w (out, in) float32; h (in, in). Returns scale float16 (out, G), zero int32 (out, G), and the
    chosen p (out, G) float32. Does not modify its inputs.
    """
    out_features, in_features = w.shape
    gs = spec.effective_group_size(in_features)
    n_groups = spec.n_groups(in_features)
    trials = int(max_shrink * grid) + 1
    scale = torch.empty(out_features, n_groups, dtype=torch.float16, device=w.device)
    zero = torch.empty(out_features, n_groups, dtype=torch.int32, device=w.device)
    ratio = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    for g in range(n_groups):
        cols = slice(g * gs, min(in_features, (g + 1) * gs))
        hg = h[cols, cols].float()                                       # (k, k)
        step = max(1, TRIAL_ELEMENTS // (trials * hg.shape[0]))
        for r in range(0, out_features, step):
            scale[r:r + step, g], zero[r:r + step, g], ratio[r:r + step, g] = clip_search(
                w[r:r + step, cols], spec.bits, spec.sym, spec.min_zero, _energies(hg), grid, max_shrink)
    return scale, zero, ratio


def clamp_to_range(w: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, maxq: int) -> Tensor:
    """w clamped to the range its groups' grids span, [-z s, (maxq - z) s], as a new float32
    tensor formed a slice of rows at a time (no per-column scale of the weight's size)."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    step = max(1, TRIAL_ELEMENTS // 8 // max(w.shape[1], 1))
    index = g_idx.long()
    for r in range(0, w.shape[0], step):
        s = scale[r:r + step].float().index_select(1, index)
        z = zero[r:r + step].float().index_select(1, index)
        torch.minimum(torch.maximum(w[r:r + step], -z * s), (maxq - z) * s, out=out[r:r + step])
    return out


def _energies(h: Tensor) -> Callable[[Tensor], Tensor]:
    """d (T, rows, k) -> (T, rows): per row, d H d^T, the energy of its output error d X^T."""
    return lambda d: ((d @ h) * d).sum(-1)


@register
class AWQ:
    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    codebooks: ClassVar[tuple[str, ...]] = ("int",)

    def __init__(self, spec: QuantSpec, options: AWQOptions | None = None) -> None:
        self.spec = spec
        self.options = options or AWQOptions()
        self.hessians: dict[str, Tensor] = {}
        self.no_clip: tuple[str, ...] = ()
        self.specs: dict[str, QuantSpec] = {}

    def record(self) -> MethodRecord:
        return MethodRecord(damp=self.options.damp, true_sequential=self.options.true_sequential)

    # ---- scale search and folding (once per block) ----------------------------------------------

    def prepare_block(self, ctx: BlockContext) -> None:
        arch = ctx.arch
        if arch is None or not arch.awq:
            raise ModelError(f"AWQ found no scaling group in block {ctx.index}: no norm or Linear produces the input "
                             "of its Linears with nothing but per-channel operations in between",
                             "use gptq for this model, or add AWQScale entries for the family in "
                             "models/architectures.py")
        self.no_clip = arch.awq_no_clip
        block = ctx.block
        groups = []
        for entry in arch.awq:
            if not any(name in ctx.quantize for name in entry.layers):
                continue
            reason = fold_problem(block, entry)
            if reason is None:
                groups.append(entry)
            else:
                for name in entry.layers:
                    ctx.report(name, {"awq_skipped": reason})
        if not groups:
            return
        batch = ctx.inputs[0].shape[0]
        n_search = len(ctx.inputs) if self.options.search_samples == 0 else \
            min(len(ctx.inputs), -(-self.options.search_samples // batch))
        stats = _Capture(block, groups, n_search)
        ctx.capture(stats.hooks(), None)
        stats.put_away()
        reference = ctx.forward(0)
        if not bool(torch.isfinite(reference).all()):   # no scale search or fold check means anything
            raise CheckpointError(f"block {ctx.index}: its output on the calibration inputs overflows float32 "
                                  "(inf or NaN)", "a weight, norm or embedding holds a huge value: the checkpoint "
                                  "looks damaged")
        self.specs = ctx.specs
        # Several devices: the search's trial alphas are spread over block copies, one per device,
        # each folded like the block after every group (the same arithmetic as on the block).
        devices = tuple(ctx.devices) or (next(block.parameters()).device,)
        copies = [block] + [ctx.replicate(dev)  # type: ignore[misc]  # the runner sets it for several devices
                            for dev in devices[1:]] if len(devices) > 1 else [block]
        try:
            for entry in groups:
                stats.bring_back(entry)
                s, metrics = self._search(copies, devices, entry, stats, ctx.quantize)
                for copy, dev in zip(copies, devices, strict=True):
                    fold(copy, entry, s.to(dev), ctx.modified if copy is block else set(),
                         skip={f"{n}.weight" for n in ctx.quantize})
                for name in entry.layers:
                    ctx.report(name, metrics)
                stats.release(entry)
        finally:
            stats.discard()
        del copies
        # Stored norms and dense Linears are rounded to the checkpoint's dtype: later stages and the
        # next block then see exactly what the checkpoint will hold.
        for name in ctx.modified:
            param = block.get_parameter(name)
            param.data = param.data.to(ctx.stored_dtype[name]).to(param.dtype)
        change = float((ctx.forward(0) - reference).norm() / reference.norm().clamp(min=1e-30))
        if not change <= FOLD_TOLERANCE:
            raise RunError(f"block {ctx.index}: folding the AWQ scales changed the block's output by "
                           f"{change:.1%}; the AWQ groups (models/architectures.py, or measured) do not fit "
                           "this model", "use gptq or rtn for this model, and report it")

    def _search(self, copies: list[nn.Module], devices: tuple[torch.device, ...], entry: Any,
                stats: _Capture, quantize: tuple[str, ...]) -> tuple[Tensor, dict]:
        """The best scales for one group, and the metrics of the search. Trial alpha i runs on
        copies[i % n] (the block itself first); the best is the first of the smallest errors, as
        in a loop on one device."""
        act_mean = stats.act_mean(entry)
        names = [n for n in entry.layers if n in quantize]
        alphas = [i / self.options.grid for i in range(self.options.grid)]
        trials = [self._trials(copy, dev, entry, stats, names, act_mean)
                  for copy, dev in zip(copies, devices, strict=True)]
        try:
            errors = spread(devices, len(alphas), lambda i, dev: trials[i % len(devices)].trial(alphas[i]))
        finally:
            for t in trials:
                t.restore()
        best_err, best = math.inf, None
        for i, err in enumerate(errors):
            if err < best_err:
                best_err, best = err, i
        best_s = trials[0].scales(alphas[best]) if best is not None else torch.ones_like(act_mean)
        return best_s, {"alpha": alphas[best] if best is not None else 0.0,
                        "search_error_before": errors[0], "search_error_after": best_err}

    def _trials(self, block: nn.Module, device: torch.device, entry: Any, stats: _Capture, names: list[str],
                act_mean: Tensor) -> _Trials:
        """The search's trials on `block` (a copy on `device`, or the block itself)."""
        linears = {n: cast(nn.Linear, block.get_submodule(n)) for n in names}
        # Trials assign new tensors to .data (never write into these), so the block's own weights
        # are the originals: no copy of the group is held beside them.
        originals = {n: m.weight.data for n, m in linears.items()}
        # a Linear held narrow: its original rows as the run computes with them (widened, with the
        # scalings folded so far); otherwise views of the weight itself
        rows = {n: functools.partial(narrow.widened, m, weight=originals[n]) for n, m in linears.items()}
        error = stats.error_fn(block, entry, device)
        act = act_mean.to(device)
        w_mean = weight_mean([rows[n](0) for n in linears], self.spec.group_size) if self.options.duo_scaling \
            else None

        def scales(alpha: float) -> Tensor:
            return (duo_scales(act, w_mean, alpha) if w_mean is not None else awq_scales(act, alpha)).to(act.device)

        def trial(alpha: float) -> float:
            s = scales(alpha)
            try:
                for n, m in linears.items():   # one trial weight and its codes live at a time
                    m.weight.data = originals[n]   # the previous trial's weight goes first
                    m.weight.data = self.fake(n, originals[n], s, rows[n])
            except Float16Overflow:   # scales float16 cannot store: not a candidate (the rounding
                return math.inf       # step names the weight if no alpha avoids it)
            return error(linears, rows)

        def restore() -> None:
            for n, m in linears.items():
                m.weight.data = originals[n]
        return _Trials(trial, restore, scales)

    def fake(self, name: str, weight: Tensor, s: Tensor, rows: Callable[[int, int], Tensor] | None = None) -> Tensor:
        """The search's trial weight of Linear `name` (local): weight * s rounded as it will be
        stored, divided by s again (float32); rows: as scaled_fake_rtn."""
        return scaled_fake_rtn(weight, s, self.specs.get(name, self.spec), rows)

    # ---- clipping and rounding (stage by stage) --------------------------------------------------

    def observe(self, linear_name: str, x: Tensor) -> None:
        accumulate_hessian(self.hessians, linear_name, x)

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        keys = {layer.input_of.get(name, name) for name in layer.weights}
        missing = [k for k in keys if k not in self.hessians]
        if missing:
            raise RunError(f"block {layer.index}: no calibration inputs reached {missing[0]}")

        def solve(name: str, device: torch.device) -> QuantizedWeight:
            start = time.perf_counter()
            weight = layer.weights[name].to(device)
            h = self.hessians[layer.input_of.get(name, name)].to(device)
            with naming(layer.full_name(name)):
                qw, ratio = self._round(name, weight.float(), h, layer.full_name(name), layer.spec_of(name, self.spec))
            metrics = {"rel_error": output_error(weight.float(), qw, h),
                       "seconds": time.perf_counter() - start}
            if ratio is not None:
                metrics["clip"] = ratio
            layer.report(name, metrics)
            return qw

        names = list(layer.weights)
        results = dict(zip(names, layer.map(solve, names), strict=True))   # independent solves: side by side
        for key in keys:
            del self.hessians[key]
        return results

    def _round(self, name: str, w: Tensor, h: Tensor, module: str,
               spec: QuantSpec) -> tuple[QuantizedWeight, float | None]:
        opts = self.options
        clip = opts.clip and name not in self.no_clip
        if clip:
            scale, zero, ratio = hessian_clip_params(w, h, spec, opts.clip_grid, opts.max_shrink)
        else:
            scale, zero = rtn_group_params(w, spec.bits, spec.group_size, spec.sym, spec.min_zero)
            ratio = None
        g_idx = default_g_idx(w.shape[1], spec.group_size, w.device)
        if opts.then == "rtn":
            codes = quantize_codes(w, scale, zero, g_idx, spec.bits)
            qw = QuantizedWeight(codes=codes, scale=scale, zero=zero, g_idx=None, spec=spec)
        else:
            # AWQ's clipping, then GPTQ's error-compensating rounding on the clipped weights.
            if clip:
                w = clamp_to_range(w, scale, zero, g_idx, spec.maxq)
            try:
                qw, _ = gptq_quantize(w, h, spec, GPTQOptions(block_size=opts.block_size, damp=opts.damp,
                                                                      clip="minmax"))
            except Float16Overflow as exc:
                raise solve_overflow(exc, {module: w}, spec, opts.damp) from None
        return qw, (float(ratio.mean()) if ratio is not None else None)


def fold_problem(block: nn.Module, entry: Any) -> str | None:
    """None when `entry`'s scales can be folded in this block, else why not."""
    try:
        prev = block.get_submodule(entry.prev)
        layers = [block.get_submodule(n) for n in entry.layers]
    except AttributeError as exc:
        return f"module missing ({exc})"
    width = layers[0].in_features
    if any(m.in_features != width for m in layers):
        return "its Linears differ in input width"
    if isinstance(prev, nn.Linear):
        chunks, _ = entry.prev_chunk
        if prev.out_features != chunks * width:
            return (f"{entry.prev} has {prev.out_features} outputs, not {chunks} x {width} "
                    "(grouped-query attention)")
        return None
    weight = getattr(prev, "weight", None)
    if weight is None or weight.shape != (width,):
        return f"{entry.prev} has no per-channel weight of size {width}"
    return None


def fold(block: nn.Module, entry: Any, s: Tensor, modified: set[str], skip: AbstractSet[str] = frozenset()) -> None:
    """Divide `entry.prev` by s and multiply the input columns of `entry.layers` by s, in place.

    Adds the names of the parameters rewritten to `modified`, except those in `skip` (the weights
    that are about to be quantized, and so written from their quantized result).
    """
    prev = block.get_submodule(entry.prev)
    touched = []
    if isinstance(prev, nn.Linear):
        _, index = entry.prev_chunk
        rows = slice(index * s.numel(), (index + 1) * s.numel())
        narrow.divide_rows(prev, rows, s)
        touched.append(f"{entry.prev}.weight")
        if prev.bias is not None:
            prev.bias.data[rows] /= s
            touched.append(f"{entry.prev}.bias")
    else:
        offset = entry.norm_offset
        weight = cast(Tensor, prev.weight)   # a norm's
        weight.data = (weight.data + offset) / s - offset
        touched.append(f"{entry.prev}.weight")
        if getattr(prev, "bias", None) is not None:
            cast(Tensor, prev.bias).data /= s
            touched.append(f"{entry.prev}.bias")
    for name in entry.layers:
        narrow.scale_columns(cast(nn.Linear, block.get_submodule(name)), s)
        touched.append(f"{name}.weight")
    modified.update(n for n in touched if n not in skip)


@dataclass
class _Trials:
    trial: Callable[[float], float]      # alpha -> the group's relative output error
    restore: Callable[[], None]          # put the original weights back
    scales: Callable[[float], Tensor]    # alpha -> the scales tried


class _Capture:
    """Statistics recorded in one forward pass of a block, for the scale search of its groups.

    Per group: the sum of |x| over every token reaching its Linears; and either the inputs of the
    inspected module for the first `n_search` batches, or, when the inspected module is the
    group's only Linear, what its output error needs without a forward: the inputs X of every
    batch while they are fewer rows than the Linear is wide, else their Hessian X^T X (smaller
    then; formed from the batches recorded so far, in order, as it would have been from the start).
    Both give ||D X^T||^2; the inputs are also the cheaper product when tokens < width (a 512-token
    calibration of a 53248-wide down_proj: 0.1 GB of inputs against an 11.3 GB Hessian).
    """

    def __init__(self, block: nn.Module, groups: list[Any], n_search: int) -> None:
        self.block, self.groups, self.n_search = block, groups, n_search
        self.abs_sum: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self.inputs: dict[str, list[tuple[tuple, dict]]] = {}
        self.hessians: dict[str, Tensor] = {}
        self.flat: dict[str, list[Tensor]] = {}   # a linear-inspect group's inputs while fewer than its width
        self._away: dict[str, tuple[Spill, torch.Size, torch.dtype, torch.device]] = {}

    @staticmethod
    def _linear_inspect(entry: Any) -> bool:
        return entry.layers == (entry.inspect,)

    def hooks(self) -> dict[str, Callable]:
        fns: dict[str, list[Callable]] = {}
        for entry in self.groups:
            first = entry.layers[0]
            fns.setdefault(first, []).append(self._stat_hook(entry))
            if not self._linear_inspect(entry):
                fns.setdefault(entry.inspect, []).append(self._input_hook(entry))

        def chain(fs: list[Callable]) -> Callable:
            return lambda batch, args, kwargs: [f(batch, args, kwargs) for f in fs]
        return {name: chain(fs) for name, fs in fns.items()}

    def _stat_hook(self, entry: Any) -> Callable:
        key = entry.prev

        def hook(batch: int, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            self.abs_sum[key] = self.abs_sum.get(key, 0) + flat.abs().sum(0)
            self.count[key] = self.count.get(key, 0) + flat.shape[0]
            if self._linear_inspect(entry):
                kept = self.flat.get(key, [])
                if key in self.hessians or sum(x.shape[0] for x in kept) + flat.shape[0] > flat.shape[1]:
                    for x in self.flat.pop(key, []):   # the Hessian is the smaller now
                        accumulate_hessian(self.hessians, key, x)
                    accumulate_hessian(self.hessians, key, flat)
                else:
                    self.flat.setdefault(key, []).append(flat.clone())
        return hook

    def _input_hook(self, entry: Any) -> Callable:
        key = entry.prev

        def hook(batch: int, args: tuple, kwargs: dict) -> None:
            if batch < self.n_search:
                self.inputs.setdefault(key, []).append((args, dict(kwargs)))
        return hook

    def act_mean(self, entry: Any) -> Tensor:
        if entry.prev not in self.count:
            raise RunError(f"no calibration inputs reached {entry.layers[0]}")
        return self.abs_sum[entry.prev] / self.count[entry.prev]

    def error_fn(self, block: nn.Module, entry: Any,
                 device: torch.device | None = None) -> Callable[[dict, dict], float]:
        """error(linears, rows): the inspected module's relative output error with the linears'
        current (trial) weights against the original ones (rows[name](start, stop): a Linear's
        original rows, as _trials gives them); `block` is on `device`."""
        if self._linear_inspect(entry):
            if entry.prev in self.flat:
                xs = [x if device is None else x.to(device) for x in self.flat[entry.prev]]

                def measure(d: tuple[int, Callable[[int, int], Tensor]]) -> float:
                    return input_energy(d, xs)
            else:
                h = self.hessians[entry.prev] if device is None else self.hessians[entry.prev].to(device)

                def measure(d: tuple[int, Callable[[int, int], Tensor]]) -> float:
                    return energy(d, h)
            totals: list[float] = []   # ||W X^T||^2 of the originals: the same for every trial

            def linear_error(linears: dict, rows: dict) -> float:
                num = sum(measure((m.weight.shape[0], functools.partial(_difference, rows[n], m)))
                          for n, m in linears.items())
                if not totals:
                    totals.append(sum(measure((m.weight.shape[0], rows[n])) for n, m in linears.items()))
                return num / max(totals[0], 1e-30)
            return linear_error

        module = block.get_submodule(entry.inspect)
        recorded = self.inputs.get(entry.prev, [])
        if not recorded:
            raise RunError(f"no calibration inputs reached {entry.inspect}")
        if device is not None:
            recorded = move(recorded, device)
        targets = [_output(module, args, kwargs) for args, kwargs in recorded]
        den = sum(float((t ** 2).sum()) for t in targets)

        def module_error(linears: dict, rows: dict) -> float:
            num = 0.0
            for (args, kwargs), target in zip(recorded, targets, strict=True):
                num += float(((_output(module, args, kwargs) - target) ** 2).sum())
            return num / max(den, 1e-30)
        return module_error

    def put_away(self) -> None:
        """Keep the captured Hessians off the device (a file, or the host from a GPU: solve.Spill)
        until their group is searched: down_proj's alone is n x n at the MLP width."""
        self._away = {key: (Spill(h), h.shape, h.dtype, h.device) for key, h in self.hessians.items()}
        self.hessians.clear()

    def bring_back(self, entry: Any) -> None:
        """The Hessian of `entry`'s group, back from where put_away kept it."""
        away = self._away.pop(entry.prev, None)
        if away is not None:
            spill, shape, dtype, device = away
            h = torch.empty(shape, dtype=dtype, device=device)
            spill.restore(h)
            spill.close()
            self.hessians[entry.prev] = h

    def release(self, entry: Any) -> None:
        for d in (self.abs_sum, self.inputs, self.hessians, self.flat):
            d.pop(entry.prev, None)
        away = self._away.pop(entry.prev, None)
        if away is not None:
            away[0].close()

    def discard(self) -> None:
        """Delete what put_away still keeps (groups not searched, or a failed search)."""
        for spill, *_ in self._away.values():
            spill.close()
        self._away.clear()


def _difference(rows: Callable[[int, int], Tensor], linear: nn.Linear, start: int, stop: int) -> Tensor:
    """Rows start:stop of W - W_trial: the original rows as the run computes with them, less the
    trial weight the Linear holds now."""
    return rows(start, stop) - linear.weight.data[start:stop]


def input_energy(d: tuple[int, Callable[[int, int], Tensor]], xs: list[Tensor]) -> float:
    """||D X^T||^2 for D given as (rows, fn(start, stop)) and the inputs X as (tokens, in) batches;
    a slice of D's rows at a time (neither D nor D X^T is formed whole)."""
    rows, part_of = d
    width = max([x.shape[0] for x in xs] + [xs[0].shape[1] if xs else 1])
    step = max(1, ENERGY_SLICE // width)
    total = 0.0
    for r in range(0, rows, step):
        part = part_of(r, min(r + step, rows)).float()
        for x in xs:
            total += float((x @ part.t()).square_().sum(dtype=torch.float64))
    return total


def _output(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    out = module(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()
