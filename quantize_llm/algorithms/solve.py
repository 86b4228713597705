"""GPTQ's error-feedback solve (Frantar et al., ICLR 2023), written once for every method that
rounds with it: gptq on its integer grid, nf4 --rounding gptq on the fixed NF4/FP4 grid, and
through gptq_quantize awq --then gptq and outlier --inner gptq.

Columns are rounded one at a time; each column's rounding error, divided by the pivot of the
upper Cholesky factor U of H^-1 (H = X^T X, the Hessian of the layer's inputs), is taken off the
columns not yet rounded in proportion to U's row. How a column is rounded is the caller's: a
`Grid`. Here live the pieces around it: the solver's options, the Hessian's accumulation, its
dead inputs, its damped factorization and the output error ||WX - QX|| / ||WX|| measured from it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..errors import SpecError
from .base import HessianNotFinite, NotPositiveDefinite

if TYPE_CHECKING:
    from ..core.qweight import QuantizedWeight


@dataclass(frozen=True)
class SolverOptions:
    """The solve's options, one definition for the four methods that use it.

    GPTQOptions, AWQOptions (then="gptq"), NF4Options (rounding="gptq") and OutlierOptions
    (inner="gptq") carry these as fields of their own, under these names and with these defaults
    (they are recipe keys, and the options recorded in config.json), and check them through
    `SolverOptions.of`. AWQOptions and OutlierOptions have no damp_max: theirs is the default.
    """

    block_size: int = 128          # columns per lazy-update block (not the quantization group)
    damp: float = 0.01             # added to diag(H), as a fraction of mean(diag(H))
    damp_max: float = 1.0          # damping is doubled after a failed Cholesky, up to this bound
    true_sequential: bool = True   # quantize q/k/v, then o, then gate/up, then down, re-running between

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SpecError(f"--block-size {self.block_size} must be at least 1", "128 is typical")
        if not 0 < self.damp_max <= 1:
            raise SpecError(f"damp_max {self.damp_max} must be in (0, 1]",
                            "1.0 is the default: a failed Cholesky doubles the damping up to it")
        if not 0 < self.damp <= self.damp_max:
            raise SpecError(f"--damp {self.damp} must be in (0, {self.damp_max:g}]", "0.01 is typical")

    @classmethod
    def of(cls, options: Any) -> SolverOptions:
        """The solver options of a method's Options (checked: SpecError when out of bounds)."""
        return cls(options.block_size, options.damp, getattr(options, "damp_max", cls.damp_max),
                   options.true_sequential)


@dataclass(frozen=True)
class SolveStats:
    damp: float                    # damping fraction finally used
    dead_columns: int              # inputs that never fired (diag(H) == 0), quantized as zeros
    seconds: float
    kept: Tensor | None = None     # with an outlier mask: the masked weights' final values (out, in), 0 elsewhere
    row_error: Tensor | None = None   # (out,) tr(D H' D^T) per row, H' the damped Hessian (feedback)
    ridge: float = 0.0             # what the damping added to H's diagonal (solve_energy)
    dead: Tensor | None = None     # (in,) bool: the inputs that never fired


def accumulate_hessian(hessians: dict[str, Tensor], name: str, x: Tensor) -> None:
    """hessians[name] += X^T X in float32 for inputs x (..., in); created on first use, on x's device.

    Inputs from other devices (a run spread over several) are moved to the sum's device first, so
    every batch's term is formed and added by the same operation, in batch order, wherever it ran."""
    x = x.reshape(-1, x.shape[-1]).float()                              # (tokens, in)
    h = hessians.get(name)
    if h is None:
        h = hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    x = x.to(h.device)
    h.addmm_(x.t(), x)


def solve_diagonal(hessian: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """diag(H) in `dtype` with an input that never fired (diag(H) == 0) counted as 1 (any value
    would do: nothing flows through it; its weights are moot and the solvers zero them), and the
    bool mask (in,) of those inputs; `hessian` is left as it is."""
    diag = torch.diagonal(hessian).to(dtype)
    dead = diag == 0
    return torch.where(dead, torch.ones_like(diag), diag), dead


# Rows of the Hessian copied or checked at a time: (rows, n) temporaries of at most 2^22 elements
# (16 MiB in float32) beside the two n x n matrices.
COPY_ELEMENTS = 2 ** 22


def _finite(m: Tensor) -> bool:
    """Every entry of the square `m` (row- or column-major) finite, checked in contiguous slices."""
    rows = m if m.is_contiguous() else m.mT
    step = max(1, COPY_ELEMENTS // max(m.shape[0], 1))
    return all(bool(torch.isfinite(rows[r:r + step]).all()) for r in range(0, rows.shape[0], step))


def _factor_buffer(hessian: Tensor, dtype: torch.dtype, perm: Tensor | None) -> Tensor:
    """P H P^T in `dtype` with never-fired inputs' diagonal set to 1, in column-major storage (the
    transpose of a row-major matrix), which LAPACK factors, inverts and factors again in place:
    torch copies a row-major operand first. Symmetry makes the row-major rows written here the
    column-major matrix's columns. Copied a block of rows at a time."""
    n = hessian.shape[0]
    buf = torch.empty(n, n, dtype=dtype, device=hessian.device)
    step = max(1, COPY_ELEMENTS // max(n, 1))
    for r in range(0, n, step):
        rows = hessian[perm[r:r + step]][:, perm] if perm is not None else hessian[r:r + step]
        buf[r:r + step] = rows
    diag = torch.diagonal(buf)
    diag.masked_fill_(diag == 0, 1.0)
    return buf.mT


def _permute_(m: Tensor, perm: Tensor) -> None:
    """m <- m[perm][:, perm] in place: rows, then columns, moved along the permutation's cycles with
    one row (column) of temporary space."""
    p = perm.tolist()
    n = len(p)
    for view in (m, m.mT):
        seen = [False] * n
        for i in range(n):
            if seen[i] or p[i] == i:
                continue
            saved, j = view[i].clone(), i
            while True:
                seen[j] = True
                k = p[j]
                if k == i:
                    view[j].copy_(saved)
                    break
                view[j].copy_(view[k])
                j = k


class Spill:
    """A copy of a tensor kept away from where the tensor is overwritten: on the host for a GPU
    tensor, in a temporary file for a CPU tensor of SPILL_BYTES or more, else a clone."""

    def __init__(self, t: Tensor) -> None:
        self.path: str | None = None
        self.copy: Tensor | None = None
        if t.device.type != "cpu":
            self.copy = t.to("cpu")
        elif t.numel() * t.element_size() >= SPILL_BYTES:
            import tempfile

            # the raw bytes, written from the tensor's own memory (a serializer's bytes copy
            # would cost the tensor's size again, the very memory this saves)
            fd, self.path = tempfile.mkstemp(prefix="quantize-llm-hessian-", suffix=".bin")
            with os.fdopen(fd, "wb") as f:
                f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
            self.shape, self.dtype = t.shape, t.dtype
        else:
            self.copy = t.clone()

    def restore(self, into: Tensor) -> None:
        if self.path is not None:
            if into.is_contiguous() and into.dtype == self.dtype and into.shape == self.shape:
                with open(self.path, "rb") as f:   # read straight into its memory
                    f.readinto(into.view(-1).view(torch.uint8).numpy().data)
            else:
                into.copy_(torch.from_file(self.path, size=into.numel(), dtype=self.dtype).view(self.shape))
        else:
            assert self.copy is not None
            into.copy_(self.copy)

    def close(self) -> None:
        if self.path is not None:
            os.unlink(self.path)
            self.path = None
        self.copy = None


SPILL_BYTES = 64 * 2 ** 20


def cholesky_inverse_upper(hessian: Tensor, damp: float, damp_max: float, perm: Tensor | None = None,
                           dtype: torch.dtype | None = None, overwrite: bool = False) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (P H P^T + damping)^-1 in `dtype` (default: hessian's); damping
    doubles on failure (returns the one used). `perm` (in,) is the processing order of the columns
    (None: as stored); inputs that never fired count as H_jj = 1 (`solve_diagonal`).

    LAPACK factors (H = L L^T), inverts (H^-1 = L^-T L^-1) and factors again (U) in place on a
    column-major matrix, and U is returned as a view of it (column-major). Without `overwrite`
    that is a copy: `hessian` is left as it is, and one n x n matrix is held beside it. With
    `overwrite` (a contiguous float32/64 `hessian` in `dtype`) it is `hessian` itself, whose
    memory U then takes: nothing n x n is held beside it; a copy kept off the device (`Spill`)
    brings it back if damping must grow. Raises HessianNotFinite for inf/NaN entries (overflowed
    inputs: no damping helps) and NotPositiveDefinite when damp_max is reached."""
    n, start = hessian.shape[0], damp
    dtype = dtype or hessian.dtype
    if not _finite(hessian):
        raise HessianNotFinite.of()
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    spill = None
    if overwrite:
        if hessian.dtype != dtype or not hessian.is_contiguous():
            raise ValueError("an overwritten Hessian must be contiguous and in the solve's dtype")
        spill = Spill(hessian)
    try:
        while True:
            if spill is None:
                a = _factor_buffer(hessian, dtype, perm)
            else:   # symmetric and row-major: its transpose is the same matrix, column-major
                if perm is not None:
                    _permute_(hessian, perm)
                a = hessian.mT
                diag = torch.diagonal(a)
                diag.masked_fill_(diag == 0, 1.0)
            diag = torch.diagonal(a)
            diag.add_(damp * float(diag.mean()))
            torch.linalg.cholesky_ex(a, out=(a, info))
            if int(info) == 0:
                torch.cholesky_inverse(a, out=a)                        # H^-1
                torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
                if int(info) == 0 and _finite(a):
                    return a, damp
            del a, diag
            if damp >= damp_max:
                raise NotPositiveDefinite.of(n, damp, start)
            damp = min(damp * 2, damp_max)
            if spill is not None:
                spill.restore(hessian)
    finally:
        if spill is not None:
            spill.close()


ENERGY_ELEMENTS = 1 << 24   # rows of D H formed at once by `energy` (64 MiB in float32)


def accumulate_cross(crosses: dict[str, Tensor], name: str, x: Tensor, x_float: Tensor) -> None:
    """crosses[name] += (X_f - X)^T X in float32: X (..., in) the inputs the quantized model gives a
    Linear, X_f the float model's inputs for the same tokens (input_error_target's C)."""
    x = x.reshape(-1, x.shape[-1]).float()
    c = crosses.get(name)
    if c is None:
        c = crosses[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    x = x.to(c.device)
    c.addmm_(x_float.reshape(-1, x.shape[1]).to(c.device, torch.float32).sub(x).t(), x)


@torch.no_grad()
def input_error_target(weight: Tensor, hessian: Tensor, cross: Tensor, alpha: float, damp: float,
                       damp_max: float) -> Tensor:
    """The weight W' (out, in) whose outputs on the quantized model's inputs X best reproduce the
    float model's outputs W X_f: argmin ||W' X - W X_f||^2 = W + W C H^-1, with H = X^T X (damped
    as the solve damps it: a fraction `damp` of mean(diag(H)), doubled while the Cholesky fails) and
    C = (X_f - X)^T X (accumulate_cross). GPTQ on W' with the same H then minimizes the asymmetric
    objective ||Q X - W X_f||^2 (GPTAQ's): the two differ by a constant, ||W' X - W X_f||^2.
    `alpha` scales the correction (QEP's propagation strength; 1 is the full least-squares target).
    Computed in float32 (float64 for a float64 weight) a slice of rows at a time, one n x n factor
    beside the Hessian; `weight` and `hessian` are left as they are."""
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n, start = hessian.shape[0], damp
    if not _finite(hessian):
        raise HessianNotFinite.of()
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    while True:
        factor = _factor_buffer(hessian, dt, None)
        diag = torch.diagonal(factor)
        diag.add_(damp * float(diag.mean()))
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
            break
        del factor, diag
        if damp >= damp_max:
            raise NotPositiveDefinite.of(n, damp, start)
        damp = min(damp * 2, damp_max)
    c = cross.to(hessian.device, dt)
    out = weight.to(hessian.device, dt, copy=True)
    step = max(1, COPY_ELEMENTS // max(n, 1))
    for r in range(0, out.shape[0], step):
        rows = out[r:r + step]
        # (W C H^-1)^T = H^-1 C^T W^T: H symmetric
        rows.add_(torch.cholesky_solve(c.mT @ rows.mT, factor).mT, alpha=alpha)
    return out


def energy(d: Tensor | tuple[int, Callable[[int, int], Tensor]], h: Tensor) -> float:
    """tr(D H D^T) for D (out, in) and H = X^T X (in, in): ||D X^T||^2 without keeping X. A slice
    of rows at a time, in h's dtype (d's rows are converted as they come): no temporary of D's
    size (at 405B's down_proj D H alone would be 3.5 GB); the same sum as in one piece up to its
    order. d may also be (rows, fn): fn(start, stop) gives rows start:stop of D, formed only then
    (D itself is never held; the same sum as on the tensor)."""
    rows, part_of = (d.shape[0], lambda a, b: d[a:b]) if isinstance(d, Tensor) else d
    step = max(1, ENERGY_ELEMENTS // max(h.shape[1], 1))
    total = 0.0
    for r in range(0, rows, step):
        part = part_of(r, min(r + step, rows)).to(h.device, h.dtype)
        total += float(((part @ h) * part).sum(dtype=torch.float64))
    return total


def solve_energy(row_error: Tensor, ridge: float, d: Tensor | float) -> float:
    """tr(D H D^T) of rows solved by `feedback`, without H: their summed row_error is tr(D H' D^T)
    for the damped H' = H + ridge I (dead inputs' diagonal 1 where D is 0), so subtract
    ridge ||D||^2. d (rows, in): W - Q with dead inputs' columns zeroed, or ||D||^2 itself
    (`squared_residual`)."""
    squared = d if isinstance(d, float) else float((d * d).sum())
    return max(float(row_error.sum()) - ridge * squared, 0.0)


RESIDUAL_ELEMENTS = 1 << 22   # weights of W - Q formed at once by squared_residual


def squared_residual(weight: Tensor, dequantize_rows: Callable[[int, int], Tensor], dead: Tensor | None = None,
                     rows: tuple[int, int] | None = None) -> float:
    """||W - Q||^2 over rows `rows` (default all) of `weight` (out, in), Q's rows given by
    dequantize_rows(start, stop) (float32), dead inputs' columns left out; a slice of rows at a
    time (no temporary of the weight's size)."""
    start, stop = rows or (0, weight.shape[0])
    step = max(1, RESIDUAL_ELEMENTS // max(weight.shape[1], 1))
    total = 0.0
    for r in range(start, stop, step):
        e = min(r + step, stop)
        d = weight[r:e].to(torch.float32) - dequantize_rows(r - start, e - start).to(weight.device)
        if dead is not None:
            d[:, dead] = 0.0
        total += float((d * d).sum(dtype=torch.float64))
    return total


def output_error(w: Tensor, q: Tensor | QuantizedWeight, h: Tensor) -> float:
    """||WX - QX|| / ||WX|| for a weight `w` (out, in) and its dequantized `q` (or the result
    itself, dequantized a slice of rows at a time), from H = X^T X; computed in w's dtype."""
    h = h.to(w.device, w.dtype)
    d = w - q if isinstance(q, Tensor) else \
        (w.shape[0], lambda a, b: w[a:b] - q.dequantize_rows(a, b, w.dtype).to(w.device))
    return math.sqrt(max(energy(d, h), 0.0) / max(energy(w, h), 1e-30))


class Grid:
    """How `feedback` rounds a column: the codes it stores and the values they dequantize to."""

    # The arithmetic of the update: fused (addr_/addmm_, the pivot as a Python number) or separate
    # products. They differ in the last bit; each grid keeps the one its checkpoints were made with.
    fused: ClassVar[bool] = True

    def block(self, i1: int, i2: int) -> None:
        """Called before columns i1 .. i2-1 (processing order) are rounded."""

    def round(self, j: int, col: Tensor, current: Callable[[int, int], Tensor]) -> Tensor:
        """Store the codes of column j for its current values `col` (out,); return what they
        dequantize to (out,). current(j, k): columns j .. j+k-1 as they stand now (every error
        fed back so far applied; fewer at the right edge)."""
        raise NotImplementedError


def feedback_cost(x: Tensor, u: Tensor, candidates: int, value: Callable[[int, Tensor], Tensor]) -> Tensor:
    """(C, rows): what rounding a run of columns x (rows, k) costs under each of C candidate
    grids, every column's error fed back to the columns after it through u = U[j:j+k, j:j+k]
    (the factor's block for these columns) as `feedback` does: the summed e_j^2, e_j = (x_j -
    value_j) / U_jj, the run's share of each row's output error (solve_energy). value(k, v):
    the grids' rounded values (C, rows) of column k, whose values under each grid are v (C, rows).
    The updates are applied lazily: one (k x C*rows) matrix-vector product per column."""
    rows, k_cols = x.shape
    errors = x.new_zeros(k_cols, candidates * rows)
    loss = x.new_zeros(candidates, rows)
    for k in range(k_cols):
        v = x[:, k].expand(candidates, rows)
        if k:
            v = v - (u[:k, k] @ errors[:k]).view(candidates, rows)
        e = (v - value(k, v)).div_(u[k, k])
        loss.addcmul_(e, e)
        errors[k] = e.reshape(-1)
    return loss


@torch.no_grad()
def feedback(w: Tensor, hinv: Tensor, block_size: int, grid: Grid, mask: Tensor | None = None,
             row_error: Tensor | None = None) -> Tensor | None:
    """Round the columns of `w` (out, in) in order with error feedback, updating `w` in place.

    hinv (in, in): the upper Cholesky factor U of H^-1, in the same column order. Columns go in
    lazy blocks of `block_size`: the error of a block reaches the columns after it in one matrix
    product. mask (out, in) bool: weights kept exactly (the grid stores what it likes there), which
    feed back no error; their final values, error received included, are returned (0 elsewhere)
    in `w` itself (a rounded block's columns are not read again: no second matrix of w's size).
    row_error (out,): the squared errors fed back, summed per row, are added to it: with
    W - Q = E U, that is each row's tr(D H' D^T) for the damped Hessian H' (`solve_energy`).
    """
    n = w.shape[1]
    fused = grid.fused
    pivots = torch.diagonal(hinv).tolist() if fused else torch.diagonal(hinv)   # plain floats: no syncs
    i1 = i2 = 0
    w1 = err1 = w

    def current(j: int, k: int) -> Tensor:
        cols = w1[:, j - i1:j - i1 + k]
        beyond = min(j + k, n) - i2
        if beyond > 0:   # past the block these columns still lack its errors (the lazy update)
            late = w[:, i2:i2 + beyond] - err1[:, :j - i1] @ hinv[i1:j, i2:i2 + beyond]
            cols = torch.cat([cols, late], dim=1)
        return cols

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()                                        # (out, b)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        kept1 = torch.zeros_like(w1) if mask is not None else None
        grid.block(i1, i2)
        for i in range(i2 - i1):
            j = i1 + i
            col = w1[:, i]
            err = (col - grid.round(j, col, current)).div_(pivots[j])
            if mask is not None:
                m = mask[:, j]
                kept1[:, i] = torch.where(m, col, 0.0)   # type: ignore[index]  # set whenever mask is
                err = err.masked_fill(m, 0.0)
            if fused:
                w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)            # rank-1 update of the block
            else:
                w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        if fused:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)          # lazy update of the rest
        else:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        if row_error is not None:
            row_error += (err1 * err1).sum(dim=1)
        if kept1 is not None:
            w[:, i1:i2] = kept1
    return w if mask is not None else None
