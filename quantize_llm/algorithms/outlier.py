"""The outlier split: most weights on a low-bit grid, the few that would do the most damage kept in
float16 beside them.

mode "weight" (SpQR-like): each weight's sensitivity is w^2 / [H^-1]_jj (the error GPTQ's
  objective charges for disturbing it; H = X^T X of the layer's calibration inputs, damped) when
  calibration data is used, else w^2 (magnitude). The top fraction of each layer, or those whose
  sensitivity exceeds X^2 times the layer's mean (`threshold` X), are kept.
mode "channel" (LLM.int8()-like): input columns whose calibration activations reach |x| >= the
  threshold (default 6.0), or the top fraction of columns by max |x|, are kept whole.
The rest is quantized by the inner algorithm (RTN or GPTQ) with the kept weights left out of
their group's range and of GPTQ's error propagation; their codes are the zero point, so the
dequantized codes are exactly 0 there and the weight is codes + outliers.
"""
from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor

from ..core.primitives import CLIPS, Float16Overflow, default_g_idx, quantize_codes, rtn_group_params, to_float16
from ..core.qweight import Outliers, QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import RunError, SpecError
from .base import LayerContext, naming, solve_overflow
from .gptq import GPTQOptions, gptq_quantize
from .registry import register
from .solve import (
    SolverOptions,
    SolveStats,
    accumulate_hessian,
    cholesky_inverse_upper,
    energy,
    output_error,
    solve_energy,
    squared_residual,
)

INNER = ("rtn", "gptq")
MODES = ("weight", "channel")
CHANNEL_THRESHOLD = 6.0          # LLM.int8()'s outlier threshold on |activation|
WEIGHT_FRACTION = 0.005


@dataclass(frozen=True)
class OutlierOptions:
    inner: str = "rtn"             # the algorithm for the low-bit part: rtn or gptq
    mode: str = "weight"           # weight (scattered weights) or channel (whole input columns)
    fraction: float | None = None  # share kept in float16 (weights, or input columns in channel mode)
    threshold: float | None = None # weight: sensitivity above threshold^2 x mean; channel: max |x| >= threshold
    calibrated: bool = False       # score weights with the inverse Hessian (implied by gptq and channel mode)
    clip: str = "minmax"           # group range of the low-bit part (as for rtn / gptq)
    # the solver's, for inner="gptq" and the calibrated score (SolverOptions says what they mean;
    # damp_max is its default)
    damp: float = SolverOptions.damp
    block_size: int = SolverOptions.block_size
    true_sequential: bool = SolverOptions.true_sequential

    def __post_init__(self) -> None:
        if self.inner not in INNER:
            raise SpecError(f"--inner {self.inner} is not known",
                            f"choose one of {', '.join(INNER)}; rtn is the default, gptq needs calibration data")
        if self.mode not in MODES:
            raise SpecError(f"--mode {self.mode} is not known",
                            f"choose one of {', '.join(MODES)}; weight is the default")
        if self.fraction is not None and self.threshold is not None:
            raise SpecError("--outlier-fraction and --outlier-threshold were both given", "pass only one of them")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0 <= self.fraction <= 0.5):
            raise SpecError(f"--outlier-fraction {self.fraction} is outside [0, 0.5]",
                            "it is the share kept in float16: 0.005 keeps 0.5%")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold > 0):
            raise SpecError(f"--outlier-threshold {self.threshold} must be a positive number",
                            f"{CHANNEL_THRESHOLD} is LLM.int8()'s activation threshold")
        if self.clip not in CLIPS:
            raise SpecError(f"--clip {self.clip} is not known",
                            f"choose one of {', '.join(CLIPS)}; minmax suits --inner rtn, mse --inner gptq")
        SolverOptions.of(self)

    @property
    def needs_calibration(self) -> bool:
        return self.inner == "gptq" or self.mode == "channel" or self.calibrated

    def selection(self) -> tuple[str, float]:
        """("fraction", f) or ("threshold", t), with the mode's default when neither was given."""
        if self.fraction is not None:
            return "fraction", self.fraction
        if self.threshold is not None:
            return "threshold", self.threshold
        return ("threshold", CHANNEL_THRESHOLD) if self.mode == "channel" else ("fraction", WEIGHT_FRACTION)


def top_fraction(score: Tensor, fraction: float) -> Tensor:
    """bool mask of the round(fraction * n) largest entries of `score` (ties: the first in order)."""
    n = score.numel()
    k = round(fraction * n)
    flat = score.reshape(-1)
    if not k:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    # The k-th largest value, then every larger entry and the first ties: what a stable descending
    # sort's first k are, without its n int64 indices and buffers (1.2 GB at 8B down_proj's size).
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing:
        ties = (flat == threshold).nonzero().flatten()[:missing]
        mask[ties] = True
    return mask.view(score.shape)


def inverse_hessian_diagonal(h: Tensor, damp: float, damp_max: float = SolverOptions.damp_max) -> tuple[Tensor, float]:
    """diag((H + d * mean(diag H) I)^-1) float32, and the damping d used: `damp`, doubled up to
    `damp_max` while H is not positive definite (GPTQ's escalation). A never-seen input counts as
    diag 1 (as in GPTQ). Works in h's dtype (float32 or float64) on one copy; does not modify `h`."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    upper, used = cholesky_inverse_upper(h, damp, damp_max, dtype=dt)   # H^-1 = U^T U
    return torch.linalg.vector_norm(upper, dim=0).square_().float(), used


SCORE_ELEMENTS = 1 << 22   # sensitivities formed at once by weight_mask


def _scores(w: Tensor, hinv_diag: Tensor | None) -> Iterator[tuple[int, Tensor]]:
    """(first row, the sensitivities of a slice of rows) over `w`, SCORE_ELEMENTS at a time."""
    step = max(1, SCORE_ELEMENTS // max(w.shape[1], 1))
    diag = hinv_diag.clamp(min=1e-30).to(w.device) if hinv_diag is not None else None
    for r in range(0, w.shape[0], step):
        score = w[r:r + step].float() ** 2
        if diag is not None:
            score.div_(diag)
        yield r, score


def weight_mask(w: Tensor, how: tuple[str, float], hinv_diag: Tensor | None) -> Tensor:
    """Weight-mode selection on (out, in) `w`, its sensitivities formed a slice of rows at a time
    (nothing of the weight's size but the mask)."""
    kind, value = how
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if kind == "fraction":
        k = round(value * w.numel())
        if not k:
            return mask
        # the k-th largest sensitivity: the largest float t with k of them >= t, by bisection on
        # the bits of non-negative float32s (their order is their bits' order), then every larger
        # one and the first ties: what a stable descending sort's first k are
        def at_least(t: float) -> int:
            return sum(int((score >= t).sum()) for _, score in _scores(w, hinv_diag))

        lo, hi = 0, 0x7F800000                                       # 0.0 (all count) .. +inf (excluded)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at_least(_float_of(mid)) >= k:
                lo = mid
            else:
                hi = mid
        threshold = _float_of(lo)
        missing = k - sum(int((score > threshold).sum()) for _, score in _scores(w, hinv_diag))
        for r, score in _scores(w, hinv_diag):
            part = score > threshold
            if missing > 0:
                ties = (score == threshold).view(-1).nonzero().flatten()[:missing]
                part.view(-1)[ties] = True
                missing -= len(ties)
            mask[r:r + len(score)] = part
        return mask
    total = sum(float(score.sum(dtype=torch.float64)) for _, score in _scores(w, hinv_diag))
    bar = value ** 2 * total / max(w.numel(), 1)
    for r, score in _scores(w, hinv_diag):
        mask[r:r + len(score)] = score > bar
    return mask


def _float_of(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def channel_mask(act_max: Tensor, how: tuple[str, float]) -> Tensor:
    """Channel-mode selection: bool (in,) of the input columns kept."""
    kind, value = how
    if kind == "fraction":
        return top_fraction(act_max, value)
    return act_max >= value


def to_outliers(values: Tensor, mask: Tensor, mode: str) -> Outliers:
    """Pack the masked entries of `values` (out, in) as weight-mode CSR or channel-mode columns.

    Raises Float16Overflow for a kept value beyond float16's range."""
    out_features, in_features = values.shape
    if mode == "channel":
        columns = mask.any(dim=0).nonzero().flatten()
        return Outliers("channel", to_float16(values[:, columns], "outlier value").contiguous(),
                        columns=columns.to(torch.int32))
    rows, cols = mask.nonzero(as_tuple=True)                           # row-major: rows ascending
    counts = torch.bincount(rows, minlength=out_features)
    row_ptr = torch.zeros(out_features + 1, dtype=torch.int32, device=values.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    index_dtype = torch.int16 if in_features <= 2 ** 15 else torch.int32
    return Outliers("weight", to_float16(values[rows, cols], "outlier value"), row_ptr=row_ptr,
                    col_idx=cols.to(index_dtype))


@register
class OutlierSplit:
    name: ClassVar[str] = "outlier"
    needs_calibration: bool = False   # per instance: see OutlierOptions.needs_calibration
    codebooks: ClassVar[tuple[str, ...]] = ("int",)
    prepare_block = None

    def __init__(self, spec: QuantSpec, options: OutlierOptions | None = None) -> None:
        self.spec = spec
        self.options = options or OutlierOptions()
        self.needs_calibration = self.options.needs_calibration
        self.how = self.options.selection()
        self.hessians: dict[str, Tensor] = {}
        self.act_max: dict[str, Tensor] = {}

    def record(self) -> MethodRecord:
        """The solver's settings, and what a reader needs to know about the outliers."""
        kind, value = self.how
        keys = (("outlier_mode", self.options.mode), (f"outlier_{kind}", value), ("outlier_inner", self.options.inner),
                ("outlier_dtype", "float16"))
        return MethodRecord(damp=self.options.damp, true_sequential=self.options.true_sequential, keys=keys)

    def observe(self, linear_name: str, x: Tensor) -> None:
        if self.options.mode == "channel":
            amax = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            prev = self.act_max.get(linear_name)
            self.act_max[linear_name] = amax if prev is None else torch.maximum(prev, amax.to(prev.device))
        accumulate_hessian(self.hessians, linear_name, x)   # GPTQ, the score, and the output error

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        keys = {layer.input_of.get(name, name) for name in layer.weights}
        users = Counter(layer.input_of.get(name, name) for name in layer.weights)

        def solve(name: str, device: torch.device) -> QuantizedWeight:
            start = time.perf_counter()
            weight = layer.weights[name].to(device)
            key = layer.input_of.get(name, name)
            h = self.hessians.get(key)
            if self.needs_calibration and h is None and key not in self.act_max:
                raise RunError(f"block {layer.index}: no calibration inputs reached {name}")
            w = weight if weight.dtype == torch.float64 else weight.float()   # float64: the tests' references
            # A Hessian only this Linear reads is factored where it lies by inner gptq (nothing n x n
            # beside it); its output error then comes from the solve (solve.solve_energy).
            own = h is not None and users[key] == 1 and self.options.inner == "gptq"
            if own:
                h = self.hessians.pop(key)
            h = h.to(device) if h is not None else None
            total = energy(w, h.to(w.dtype)) if own and h is not None else None
            damps: list[float] = []             # the damping of the score and of GPTQ, where used
            with naming(layer.full_name(name)):
                select: Tensor | Callable[[Tensor], Tensor]
                if self.options.mode == "channel":
                    select = channel_mask(self.act_max[key].to(w.device), self.how).expand_as(w).contiguous()
                elif h is not None and self.options.inner == "gptq":   # scored from GPTQ's own factor
                    select = functools.partial(weight_mask, w, self.how)
                elif h is not None and self.options.calibrated:
                    hinv, damp = inverse_hessian_diagonal(h, self.options.damp)
                    damps.append(damp)
                    select = weight_mask(w, self.how, hinv.to(w.device))
                    del hinv
                else:
                    select = weight_mask(w, self.how, None)
                qw, stats = self._quantize(layer.full_name(name), w, h, select, layer.spec_of(name, self.spec),
                                           damps, own)
            split = cast(Outliers, qw.outliers)   # the split always sets them
            metrics = {"outliers": split.count, "outlier_share": split.count / w.numel(),
                       "seconds": time.perf_counter() - start}
            if damps:
                metrics["damp"] = max(damps)
            if stats is not None and total is not None:
                assert stats.row_error is not None and stats.dead is not None
                squared = squared_residual(w, qw.dequantize_rows, stats.dead)
                metrics["rel_error"] = math.sqrt(solve_energy(stats.row_error, stats.ridge, squared)
                                                 / max(total, 1e-30))
            elif h is not None:
                metrics["rel_error"] = output_error(w, qw, h)
            layer.report(name, metrics)
            return qw

        names = list(layer.weights)
        results = dict(zip(names, layer.map(solve, names), strict=True))   # independent solves: side by side
        for key in keys:
            self.hessians.pop(key, None)
            self.act_max.pop(key, None)
        return results

    def _quantize(self, module: str, w: Tensor, h: Tensor | None, select: Tensor | Callable[[Tensor], Tensor],
                  spec: QuantSpec, damps: list[float], own_hessian: bool = False,
                  ) -> tuple[QuantizedWeight, SolveStats | None]:
        """The low-bit part and the outliers of `w`, and GPTQ's stats (None for inner rtn); appends
        GPTQ's damping to `damps`. `select` is the outlier mask, or (inner gptq) a function of
        diag(H'^-1) that returns it."""
        opts = self.options
        stats = None
        if opts.inner == "rtn":
            mask = cast(Tensor, select)
            # Outliers leave the range: 0 is always inside it, so zeroing them removes their pull.
            masked = w.masked_fill(mask, 0.0)
            scale, zero = rtn_group_params(masked, spec.bits, spec.group_size, spec.sym, spec.min_zero, opts.clip)
            g_idx = default_g_idx(w.shape[1], spec.group_size, w.device)
            codes = quantize_codes(masked, scale, zero, g_idx, spec.bits)   # masked: code == zero
            kept = w
            g_store = None
        else:
            chosen: list[Tensor] = []

            def keep(diagonal: Tensor) -> Tensor:   # the mask, remembered for the split below
                chosen.append(select(diagonal) if callable(select) else select)
                return chosen[-1]

            try:
                qw, stats = gptq_quantize(w, cast(Tensor, h), spec,   # inner gptq: calibrated, h is set
                                          GPTQOptions(block_size=opts.block_size, damp=opts.damp, clip=opts.clip),
                                          outlier_mask=keep, own_hessian=own_hessian)
            except Float16Overflow as exc:
                masked = w.masked_fill(chosen[-1], 0.0) if chosen else w
                raise solve_overflow(exc, {module: masked}, spec, opts.damp) from None
            damps.append(stats.damp)
            codes, scale, zero, g_store = qw.codes, qw.grid_scale, qw.grid_zero, qw.g_idx
            kept = cast(Tensor, stats.kept)   # set when an outlier mask is given
            mask = chosen[-1]
        return QuantizedWeight(codes=codes, scale=scale, zero=zero, g_idx=g_store, spec=spec,
                               outliers=to_outliers(kept, mask, opts.mode)), stats
