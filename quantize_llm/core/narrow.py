"""Linears held narrower than the run's dtype (a block held narrow: calibration/sequential.py).

Such a Linear keeps its weight as stored (bf16, say) and is widened for each call. A per-channel
rescaling folded into it while it is held (AWQ: its input columns multiplied by s, or a slice of its
rows divided by s) is not applied to the stored weight, which could not hold the result exactly:
it is kept beside it and replayed, in the order it came, whenever the weight is widened. That is
the arithmetic a weight held wide goes through, in the same order, so the widened weight is
exactly the wide one.
"""
from __future__ import annotations

from torch import Tensor, nn

_KEY = "narrow_scalings"   # module.__dict__[_KEY] = (the run's dtype, [(kind, s, rows), ...])


def hold(linear: nn.Linear, dtype: object) -> None:
    """Mark `linear` (its weight narrower than `dtype`) as held narrow, with no scaling yet."""
    linear.__dict__[_KEY] = (dtype, [])


def release(linear: nn.Module) -> None:
    linear.__dict__.pop(_KEY, None)


def scaled(linear: nn.Module) -> bool:
    """Whether `linear` is held narrow with scalings still to be applied when it is widened."""
    entry = linear.__dict__.get(_KEY)
    return entry is not None and bool(entry[1])


def scale_columns(linear: nn.Linear, s: Tensor) -> None:
    """Multiply the weight's input columns by s (in, ): in place, or kept for widening."""
    entry = linear.__dict__.get(_KEY)
    if entry is None:
        linear.weight.data *= s[None, :]
    else:
        entry[1].append(("columns", s, None))


def divide_rows(linear: nn.Linear, rows: slice, s: Tensor) -> None:
    """Divide the weight's rows `rows` (a slice with start and stop) by s: in place, or kept."""
    entry = linear.__dict__.get(_KEY)
    if entry is None:
        linear.weight.data[rows] /= s[:, None]
    else:
        entry[1].append(("rows", s, rows))


def widened(linear: nn.Linear, start: int = 0, stop: int | None = None, weight: Tensor | None = None) -> Tensor:
    """Rows start:stop of the weight the run computes with: the stored weight (or `weight`, the
    stored tensor a caller kept) widened to the run's dtype, with the scalings replayed. A weight
    already in the run's dtype (held wide, or a trial weight a search assigned) is returned as it
    is (a view: never write into it)."""
    w = linear.weight if weight is None else weight
    stop = w.shape[0] if stop is None else stop
    entry = linear.__dict__.get(_KEY)
    if entry is None or w.dtype == entry[0]:
        return w[start:stop]
    dtype, scalings = entry
    out = w[start:stop].to(dtype)
    for kind, s, rows in scalings:
        if kind == "columns":
            out *= s[None, :]
        else:
            a, b = max(rows.start, start), min(rows.stop, stop)
            if a < b:
                out[a - start:b - start] /= s[a - rows.start:b - rows.start, None]
    return out
