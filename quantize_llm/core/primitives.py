"""Pure per-group math for integer grids: parameters, codes, dequantization.

Nothing here holds a module, a file or a device: tensors in, new tensors out, inputs untouched.
Conventions (FORMATS.md §1.3): codes are unsigned in [0, 2^bits); `zero` is in the integer domain;
`w' = scale * (code - zero)`. Scales are rounded to float16 (the formats' contract) *before* codes
are computed, so the dequantized weight is exactly what every reader of the checkpoint will see.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import CheckpointError, QuantizeError

FP16_TINY = 2.0 ** -24   # smallest positive float16 (subnormal): a scale never rounds to 0 below it
FP16_MAX = 65504.0


class LayerError(QuantizeError):
    """Raised by math that does not know which Linear it works on; `at(module)` returns the same
    error naming the module (once: an error already named keeps its name)."""

    module: str | None = None

    def at(self, module: str) -> LayerError:
        if self.module is not None:
            return self
        named = type(self).__new__(type(self))
        named.__dict__.update(self.__dict__)
        named.module, named.message, named.hint = module, f"{module}: {self.message}", self.module_hint(module)
        named.args = (named.message,)
        return named

    def module_hint(self, module: str) -> str | None:
        """The fix, once the module is known."""
        return self.hint


class Float16Overflow(LayerError, CheckpointError):
    """A value the result needs (a scale, an absmax, a bias, an outlier value) lies beyond
    float16's range, where the formats store it. Comes from the checkpoint's weights."""

    what: str = "value"                  # "scale", "absmax", "bias", "outlier value"
    value: float = float("nan")          # the value that does not fit

    @classmethod
    def of(cls, what: str, value: float, source: float | None = None) -> Float16Overflow:
        origin = f" (from a weight of {source:.3g})" if source is not None else ""
        exc = cls(f"{what} {value:.3g}{origin} exceeds float16's {FP16_MAX:g}",
                  "keep the Linear dense with --keep-dense, or the weights are damaged")
        exc.what, exc.value = what, value
        return exc

    def module_hint(self, module: str) -> str:
        return f"keep it dense with --keep-dense '{re.escape(module)}$', or the weights are damaged"


def float16_excess(t: Tensor) -> float | None:
    """The largest |value| of `t` beyond float16's range (inf and NaN included), or None."""
    bad = ~(t.abs() <= FP16_MAX)
    if not bool(bad.any()):
        return None
    return float(t[bad].double().abs().max())   # NaN only when every such value is NaN


def to_float16(t: Tensor, what: str, module: str | None = None) -> Tensor:
    """`t` as float16, refusing (Float16Overflow, naming `module` when given) any value beyond
    float16's range instead of storing inf."""
    excess = float16_excess(t)
    if excess is not None:
        exc = Float16Overflow.of(what, excess)
        raise exc.at(module) if module is not None else exc
    return t.to(torch.float16)


def to_stored(t: Tensor, dtype: torch.dtype | None, what: str, module: str | None = None) -> Tensor:
    """`t` in `dtype` (None keeps it as it is); a float16 target goes through `to_float16`."""
    if dtype is None:
        return t
    return to_float16(t, what, module) if dtype == torch.float16 else t.to(dtype)


def minmax_params(w: Tensor, bits: int, sym: bool, min_zero: int = 0) -> tuple[Tensor, Tensor]:
    """Scale and zero per row of `w` (rows, n), min/max with 0 forced into the range.

    Returns `scale` float16 (rows,) and `zero` int32 (rows,). Does not modify `w`.
    sym: zero = 2^(bits-1), scale = 2*amax / maxq. asym: scale = (max - min) / maxq,
    zero = round(-min / scale) clamped to [min_zero, maxq]; when the clamp raises the zero (only
    possible with min_zero > 0, e.g. GPTQ v1 cannot store 0), the scale is recomputed so that the
    group's maximum stays representable with that zero.
    """
    maxq = 2 ** bits - 1
    # min/max are exact in float32; the arithmetic on them runs in float64 so that the float16
    # scale and the rounded zero do not depend on float32 rounding at a tie.
    xmin = w.float().amin(dim=1).clamp(max=0).double()                 # (rows,)
    xmax = w.float().amax(dim=1).clamp(min=0).double()                 # (rows,)
    empty = (xmin == 0) & (xmax == 0)
    # An all-zero group would give scale 0; (-1, 1) dequantizes it exactly to zeros anyway.
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        raised = zero < min_zero
        zero = zero.clamp(min_zero, maxq)
        scale = torch.where(raised, xmax / (maxq - zero), scale)
    try:
        return to_fp16_scale(scale), zero.to(torch.int32)
    except Float16Overflow:   # name the weight that asked for it
        i = int(scale.argmax())
        raise Float16Overflow.of("scale", float(scale[i]), max(-float(xmin[i]), float(xmax[i]))) from None


def to_fp16_scale(scale: Tensor) -> Tensor:
    """Round a positive float scale to float16, never to 0; beyond float16 raises Float16Overflow."""
    excess = float16_excess(scale)
    if excess is not None:
        raise Float16Overflow.of("scale", excess)
    return scale.clamp(min=FP16_TINY).to(torch.float16)


def expand_groups(t: Tensor, g_idx: Tensor) -> Tensor:
    """Per-group tensor (out, G) -> per-column (out, in) by `g_idx` (in,)."""
    return t.index_select(1, g_idx.long())


def default_g_idx(in_features: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """g_idx[i] = i // group_size (group_size -1 = one group): the order without act-order."""
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // gs).to(torch.int32)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, bits: int) -> Tensor:
    """Codes uint8 (out, in) = clamp(round(w / scale) + zero, 0, maxq), per column's group.

    `w` (out, in) float; `scale` float16 (out, G); `zero` int32 (out, G); `g_idx` int32 (in,).
    Formed a slice of rows at a time (ELEMENTWISE_SLICE): only the codes are held whole.
    """
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    for rows in _row_slices(w.shape):
        s = expand_groups(scale[rows], g_idx).float()                   # (slice, in)
        z = expand_groups(zero[rows], g_idx).float()
        q = torch.round(w[rows].float() / s).add_(z)
        codes[rows] = q.clamp_(0, 2 ** bits - 1)
    return codes


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """w' = scale * (code - zero) per column's group; (out, in) in `dtype`, formed a slice of rows
    at a time (the result is the only full-size tensor: a Linear served from its codes costs one
    copy of its weight in `dtype`, not five).

    Exact in float32: a float16 scale times an integer below 2^9 needs at most 20 mantissa bits.
    """
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    for rows in _row_slices(codes.shape):
        s = expand_groups(scale[rows], g_idx).to(dtype)                 # (slice, in)
        z = expand_groups(zero[rows], g_idx).to(dtype)
        torch.sub(codes[rows].to(dtype), z, out=out[rows]).mul_(s)
    return out


# quantize_codes / dequantize_codes: elements formed per slice of rows (the per-column scale and
# zero, the float codes): 16 MiB in float32, whatever the weight's size.
ELEMENTWISE_SLICE = 1 << 22


def _row_slices(shape: torch.Size | tuple[int, ...]) -> list[slice]:
    step = max(1, ELEMENTWISE_SLICE // max(shape[1], 1))
    return [slice(r, r + step) for r in range(0, shape[0], step)]


CLIPS = ("minmax", "mse")
# clip search: trials x rows x columns formed at once (1 MiB in float32). Small on purpose: the
# search is a chain of elementwise passes, and a slice that stays in cache (and in the allocator's
# reused memory, not fresh pages from the kernel each pass) runs it about 10x faster than 64 MiB ones.
CLIP_TRIAL_ELEMENTS = 1 << 18


def row_params(w: Tensor, bits: int, sym: bool, min_zero: int = 0, clip: str = "minmax",
               weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero per row of `w` by min-max range (`clip="minmax"`) or clip search ("mse",
    optionally weighting each column's error by `weights`)."""
    if clip == "mse":
        return mse_params(w, bits, sym, min_zero, weights)
    return minmax_params(w, bits, sym, min_zero)


def rtn_group_params(w: Tensor, bits: int, group_size: int, sym: bool,
                     min_zero: int = 0, clip: str = "minmax") -> tuple[Tensor, Tensor]:
    """Min-max scale and zero for consecutive groups of `w` (out, in); a partial last group is fine.

    Returns `scale` float16 (out, G) and `zero` int32 (out, G). Does not modify `w`.
    """
    out_features, in_features = w.shape
    gs = in_features if group_size == -1 else group_size
    n_groups = -(-in_features // gs)
    pad = n_groups * gs - in_features
    w = w.float()
    if pad:
        # Repeating the last column keeps the partial group's min and max unchanged.
        w = torch.cat([w, w[:, -1:].expand(out_features, pad)], dim=1)  # (out, G*gs)
    rows = w.reshape(out_features * n_groups, gs)                       # (out*G, gs)
    scale, zero = row_params(rows, bits, sym, min_zero, clip)
    return scale.view(out_features, n_groups), zero.view(out_features, n_groups)


def mse_params(w: Tensor, bits: int, sym: bool, min_zero: int = 0, weights: Tensor | None = None,
               grid: int = 100, max_shrink: float = 0.8) -> tuple[Tensor, Tensor]:
    """Like `minmax_params`, but the range is shrunk where that lowers the rounding error.

    For each row of `w` (rows, n), the clip trials of `clip_search` are scored by the squared error
    sum_c weights[c] (w - w')^2 (the clip search of the GPTQ authors' quantizer; `weights` (n,),
    e.g. the Hessian diagonal of those input columns, makes it activation-aware). Returns float16
    scale (rows,) and int32 zero (rows,). Does not modify `w`.
    """
    weights = weights.float() if weights is not None else None

    def score(d: Tensor) -> Tensor:   # d is clip_search's own temporary: squared in place
        d = d.square_()
        return (d.mul_(weights) if weights is not None else d).sum(-1)
    scale, zero, _ = clip_search(w, bits, sym, min_zero, score, grid, max_shrink)
    return scale, zero


def shrunk_params(w: Tensor, bits: int, sym: bool, min_zero: int, p: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of `w` (rows, n) and each factor of `p` (T,) float64, the min-max scale and
    zero of the range (p*min, p*max) (0 kept inside): float16 (T, rows) and int32 (T, rows)."""
    rows = w.shape[0]
    xmin = w.float().amin(dim=1).clamp(max=0).double()
    xmax = w.float().amax(dim=1).clamp(min=0).double()
    trials = torch.stack([(xmin[None] * p[:, None]).reshape(-1), (xmax[None] * p[:, None]).reshape(-1)], dim=1)
    s, z = minmax_params(trials, bits, sym, min_zero)                   # (T*rows,)
    return s.view(len(p), rows), z.view(len(p), rows)


def clip_search(w: Tensor, bits: int, sym: bool, min_zero: int, score: Callable[[Tensor], Tensor],
                grid: int, max_shrink: float) -> tuple[Tensor, Tensor, Tensor]:
    """The clip trial grid: for each row of `w` (rows, n), the ranges (p*min, p*max) for
    p = 1, 1 - 1/grid, ... down to 1 - max_shrink are rounded to and `score`d; the least score
    wins (the largest p on a tie).

    score(d) -> (T, rows) takes the trials' errors d = w' - w (T, rows, n), a temporary it may
    overwrite. Returns scale float16
    (rows,), zero int32 (rows,) and the chosen p (rows,) float32. Does not modify `w`.
    """
    w = w.float()
    rows = w.shape[0]
    p = 1 - torch.arange(0, int(max_shrink * grid) + 1, device=w.device, dtype=torch.float64) / grid   # (T,)
    s, z = shrunk_params(w, bits, sym, min_zero, p)                     # (T, rows)
    sf, zf = s.float()[..., None], z.float()[..., None]                 # (T, rows, 1)
    # The trials' (T, rows, n) temporaries are formed a slice of rows at a time, at most
    # CLIP_TRIAL_ELEMENTS elements each, whatever the width: every row is scored on its own, so the
    # result is the same as in one piece.
    step = max(1, CLIP_TRIAL_ELEMENTS // max(1, len(p) * w.shape[1]))
    best = torch.empty(1, rows, dtype=torch.int64, device=w.device)
    maxq = 2 ** bits - 1
    for r in range(0, rows, step):
        sr, zr, wr = sf[:, r:r + step], zf[:, r:r + step], w[None, r:r + step]
        # d = s * (clamp(round(w / s) + z, 0, maxq) - z) - w, in one (T, step, n) temporary
        d = torch.div(wr, sr).round_().add_(zr).clamp_(0, maxq).sub_(zr).mul_(sr).sub_(wr)
        err = score(d)                                                  # (T, step)
        best[:, r:r + step] = err.argmin(dim=0, keepdim=True)           # first minimum
        del d, err
    return s.gather(0, best)[0], z.gather(0, best)[0], p.float()[best[0]]
