"""GPTQ (Frantar et al., ICLR 2023) on the integer grid: quantize columns one at a time, spreading
each column's rounding error over the columns not yet quantized through the inverse Hessian of the
layer input (the loop is solve.py's; the grid of per-group scale and zero is this file's).

`gptq_quantize` is a pure function; `GPTQ` (the registered algorithm) only accumulates Hessians
from the inputs the runner shows it and calls it per Linear.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.primitives import CLIPS, Float16Overflow, LayerError, row_params, rtn_group_params, shrunk_params
from ..core.qweight import QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import RunError, SpecError
from .base import LayerContext, naming, solve_overflow
from .registry import register
from .solve import (
    Grid,
    SolverOptions,
    SolveStats,
    accumulate_cross,
    accumulate_hessian,
    cholesky_inverse_upper,
    energy,
    feedback,
    feedback_cost,
    input_error_target,
    output_error,
    solve_diagonal,
    solve_energy,
    squared_residual,
)


@dataclass(frozen=True)
class GPTQOptions:
    # the solver's (SolverOptions says what they mean)
    block_size: int = SolverOptions.block_size
    damp: float = SolverOptions.damp
    damp_max: float = SolverOptions.damp_max
    static_groups: bool = False    # act-order with groups fixed on the original column order (trivial g_idx):
                                   # columns are permuted even when spec.act_order, which says whether a
                                   # non-trivial g_idx is stored, is off
    true_sequential: bool = SolverOptions.true_sequential
    clip: str = "mse"              # group range: "mse" (shrunk where the diag(H)-weighted error drops), "minmax",
                                   # or "feedback" (IntegerGrid.feedback_params)
    qep: float = 0.0               # fit the float model's outputs: each Linear's target corrected for the error
                                   # of its inputs by this strength (solve.input_error_target; 1: GPTAQ's
                                   # asymmetric objective); 0: plain GPTQ on the quantized model's inputs

    def __post_init__(self) -> None:
        SolverOptions.of(self)
        if self.clip not in GPTQ_CLIPS:
            raise SpecError(f"--clip {self.clip} is not known",
                            f"choose one of {', '.join(GPTQ_CLIPS)}; mse is the default")
        if not 0 <= self.qep <= 1:
            raise SpecError(f"--qep {self.qep:g} must be in [0, 1]",
                            "1 fits the float model's outputs fully, 0 (the default) is plain GPTQ")

    @property
    def range_clip(self) -> str:
        """The clip of ranges chosen without the solve (static groups; feedback's first candidate)."""
        return "mse" if self.clip == "feedback" else self.clip


GPTQ_CLIPS = (*CLIPS, "feedback")
# the range factors p (range p*min .. p*max) tried beside the mse search's choice by --clip feedback
FEEDBACK_SHRINKS = tuple(1 - 0.025 * i for i in range(13))   # 1.0, 0.975, ... 0.7


class IntegerGrid(Grid):
    """GPTQ's rounding onto the integer grid of per-group scale and zero (a `Grid` for `feedback`).

    Each group's scale and zero come from the group's columns as they stand when its first
    column is reached, or, with `static` (scale, zero), are fixed up front. Codes of masked
    weights are the zero point (they dequantize to 0) and the mask keeps them out of the range.
    """

    fused: ClassVar[bool] = True

    def __init__(self, w: Tensor, spec: QuantSpec, clip: str, hdiag: Tensor, groups: list[int],
                 static: tuple[Tensor, Tensor] | None, mask: Tensor | None, hinv: Tensor | None = None) -> None:
        out_features, in_features = w.shape
        self.spec, self.hdiag, self.groups, self.mask = spec, hdiag, groups, mask
        # "feedback" needs the factor (and groups of consecutive processing positions, no outliers)
        self.hinv = hinv if clip == "feedback" and static is None and mask is None else None
        self.clip = "mse" if clip == "feedback" else clip
        self.gs, self.maxq = spec.effective_group_size(in_features), spec.maxq
        self.static = static
        if static is not None:
            self.scale, self.zero = static
        else:
            n_groups = math.ceil(in_features / self.gs)
            self.scale = torch.zeros(out_features, n_groups, dtype=torch.float16, device=w.device)
            self.zero = torch.zeros(out_features, n_groups, dtype=torch.int32, device=w.device)
        self.codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)   # (out, in) codes
        self.cur_s = self.cur_z = w.new_zeros(out_features)
        self.loaded = -1                                                # the group whose params are in cur_s

    def feedback_params(self, j: int, cols: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        """--clip feedback: per row, among the mse search's range (`scale`, `zero`) and the
        ranges shrunk by FEEDBACK_SHRINKS, the one whose rounding of the group's current columns
        `cols` (rows, k), each column's error fed back to the columns after it inside the group as
        the solve will, costs the least (solve.feedback_cost: the group's share of the output
        error). A tie keeps the mse search's."""
        assert self.hinv is not None
        spec, k = self.spec, cols.shape[1]
        p = torch.tensor(FEEDBACK_SHRINKS, dtype=torch.float64, device=cols.device)
        s_t, z_t = shrunk_params(cols, spec.bits, spec.sym, spec.min_zero, p)
        s16 = torch.cat([scale[None], s_t])                                       # (C, rows) float16
        z32 = torch.cat([zero[None], z_t])
        s, z = s16.to(cols.dtype), z32.to(cols.dtype)
        maxq = self.maxq

        def value(_: int, v: Tensor) -> Tensor:   # IntegerGrid.round's arithmetic
            return s * (torch.round(v / s).add_(z).clamp_(0, maxq) - z)
        u = self.hinv[j:j + k, j:j + k].to(cols.dtype)
        best = feedback_cost(cols, u, s.shape[0], value).argmin(dim=0)[None]       # first minimum
        return s16.gather(0, best)[0], z32.gather(0, best)[0]

    def round(self, j: int, col: Tensor, current: Callable[[int, int], Tensor]) -> Tensor:
        g = self.groups[j]
        if self.static is None and j % self.gs == 0:
            spec = self.spec
            cols = current(j, self.gs)
            if self.mask is not None:   # outliers out of the range: 0 is always inside it
                cols = cols.masked_fill(self.mask[:, j:j + cols.shape[1]], 0.0)
            # clip search weighs each column's rounding error by its input energy diag(H)
            self.scale[:, g], self.zero[:, g] = row_params(cols, spec.bits, spec.sym, spec.min_zero, self.clip,
                                                           self.hdiag[j:j + cols.shape[1]])
            if self.hinv is not None:
                self.scale[:, g], self.zero[:, g] = self.feedback_params(j, cols, self.scale[:, g], self.zero[:, g])
            self.loaded = -1
        if g != self.loaded:
            self.cur_s, self.cur_z, self.loaded = self.scale[:, g].to(col.dtype), self.zero[:, g].to(col.dtype), g
        s, z = self.cur_s, self.cur_z
        q = torch.round(col / s).add_(z).clamp_(0, self.maxq)
        if self.mask is not None:
            q = torch.where(self.mask[:, j], z, q)
        self.codes[:, j] = q
        return s * (q - z)


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, spec: QuantSpec, options: GPTQOptions = GPTQOptions(),
                  outlier_mask: Tensor | Callable[[Tensor], Tensor] | None = None, own: bool = False,
                  own_hessian: bool = False) -> tuple[QuantizedWeight, SolveStats]:
    """Quantize a (out, in) weight with GPTQ given the (in, in) Hessian sum X^T X of its inputs.

    outlier_mask (out, in) bool: weights kept exactly (in float16, beside the codes). They are left
    out of their group's range, get the code of the zero point (dequantized 0), cause no error to
    propagate, and their final values (with the error propagated into them) come back in
    `stats.kept`. A callable instead of the mask is given diag(H'^-1) (in,) of the damped Hessian
    from the solve's own factorization, float32, and returns the mask (the outlier split's
    sensitivity score, at no extra n x n).

    Does not modify `hessian` unless `own_hessian` (then its memory is the factorization's: the
    Hessian is gone afterwards, and nothing n x n is held beside it), nor `weight` unless `own`
    (the caller hands it over: it is rounded in place when already in the work dtype, saving a
    copy). Works in float32 on their device (float64 when `weight` is float64, which the tests use
    to compare with a column-by-column reference); without own_hessian it holds one n x n matrix
    beside the Hessian (solve.cholesky_inverse_upper). The stats carry what the output error
    needs without the Hessian (solve.solve_energy).
    Columns are processed in act-order (decreasing diag(H)) when spec.act_order or
    options.static_groups. Groups are consecutive columns in processing order, except with
    options.static_groups, where they are the consecutive original columns and no g_idx is
    returned; a last group shorter than group_size is fine.
    """
    start = time.perf_counter()
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dt)                                                   # (out, in), rounded in place
    if w is weight and not own:
        w = w.clone()
    in_features = w.shape[1]
    gs = spec.effective_group_size(in_features)
    mask = outlier_mask.to(w.device) if isinstance(outlier_mask, Tensor) else None

    # Static groups: scale and zero fixed up front from the original columns (FORMATS.md §1.6).
    hdiag, dead = solve_diagonal(hessian, dt)                           # (in,), never-fired inputs as 1
    w[:, dead] = 0.0                                                    # their weights are moot
    perm = None
    if spec.act_order or options.static_groups:
        perm = torch.argsort(hdiag, descending=True, stable=True)
        hdiag = hdiag[perm]                                             # processing order
    ridge = float(hdiag.mean())
    hinv, damp = cholesky_inverse_upper(hessian, options.damp, options.damp_max, perm, dt,
                                        overwrite=own_hessian and hessian.dtype == dt and hessian.is_contiguous())
    if callable(outlier_mask):   # chosen from diag(H'^-1) = the squared column norms of its factor
        diagonal = torch.linalg.vector_norm(hinv, dim=0).square_()      # processing order, no n x n temporary
        if perm is not None:
            diagonal = torch.empty_like(diagonal).index_copy_(0, perm, diagonal)
        mask = outlier_mask(diagonal.float()).to(w.device)
        del diagonal
    static = None
    if options.static_groups:
        static = rtn_group_params(w if mask is None else w.masked_fill(mask, 0.0), spec.bits, spec.group_size,
                                  spec.sym, spec.min_zero, options.range_clip)
    if perm is not None:
        w = w[:, perm]
        if mask is not None:
            mask = mask[:, perm]
    ridge *= damp

    # original column index of processing position j
    order = perm if perm is not None else torch.arange(in_features, device=w.device)
    # group of each processing position: static groups follow the original columns
    group_of = (order // gs) if options.static_groups else (torch.arange(in_features, device=w.device) // gs)
    grid = IntegerGrid(w, spec, options.clip, hdiag, group_of.tolist(), static, mask, hinv)   # plain ints: no syncs
    row_error = torch.zeros(w.shape[0], dtype=dt, device=w.device)
    kept = feedback(w, hinv, options.block_size, grid, mask, row_error)   # w itself, or None
    del hinv, w

    codes = grid.codes
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if kept is not None:
            kept = kept[:, invperm]
        if not options.static_groups:
            g_idx = group_of[invperm].to(torch.int32)                   # (in,) original order
    qw = QuantizedWeight(codes=codes.contiguous(), scale=grid.scale, zero=grid.zero, g_idx=g_idx, spec=spec)
    return qw, SolveStats(damp=damp, dead_columns=int(dead.sum()), seconds=time.perf_counter() - start, kept=kept,
                          row_error=row_error, ridge=ridge, dead=dead)


@register
class GPTQ:
    """The registered algorithm: Hessians X^T X accumulated in float32 from the runner's hooks."""

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    codebooks: ClassVar[tuple[str, ...]] = ("int",)
    prepare_block = None

    def __init__(self, spec: QuantSpec, options: GPTQOptions | None = None) -> None:
        self.spec = spec
        self.options = options or GPTQOptions()
        self.hessians: dict[str, Tensor] = {}
        self.crosses: dict[str, Tensor] = {}   # --qep: (X_f - X)^T X per input (solve.accumulate_cross)

    @property
    def float_inputs(self) -> bool:
        """Whether the runner must show it the float model's inputs beside the quantized model's
        (observe_pair): --qep."""
        return self.options.qep > 0

    def observe(self, linear_name: str, x: Tensor) -> None:
        accumulate_hessian(self.hessians, linear_name, x)

    def observe_pair(self, linear_name: str, x: Tensor, x_float: Tensor) -> None:
        """x the input the quantized model gives the Linear, x_float the float model's for the same tokens."""
        accumulate_hessian(self.hessians, linear_name, x)
        accumulate_cross(self.crosses, linear_name, x, x_float)

    def record(self) -> MethodRecord:
        return MethodRecord(damp=self.options.damp, static_groups=self.options.static_groups,
                            true_sequential=self.options.true_sequential,
                            keys=(("qep", self.options.qep),) if self.options.qep else ())

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        """Linears sharing an input share a Hessian; GPTQ treats rows independently, so their
        weights are stacked and solved together (one factorization, one column loop), which gives
        exactly the result of solving each alone."""
        results = {}
        for name in [n for n in layer.weights if layer.spec_of(n, self.spec).method == "rtn"]:
            # a per-module `method = "rtn"` override: nearest rounding, output error still from H
            from .rtn import rtn_quantize

            spec = layer.spec_of(name, self.spec)
            h = self.hessians.get(layer.input_of.get(name, name))
            with naming(layer.full_name(name)):
                qw = rtn_quantize(layer.weights[name], spec)
            metrics: dict[str, Any] = {"method": "rtn"}
            if h is not None:
                metrics["rel_error"] = output_error(layer.weights[name].float(), qw, h)
            layer.report(name, metrics)
            results[name] = qw
        by_input: dict[tuple[str, QuantSpec], list[str]] = {}   # same input and same spec: stacked
        for name in [n for n in layer.weights if n not in results]:
            by_input.setdefault((layer.input_of.get(name, name), layer.spec_of(name, self.spec)), []).append(name)
        missing = [names[0] for (key, _), names in by_input.items() if key not in self.hessians]
        if missing:
            raise RunError(f"block {layer.index}: no calibration inputs reached {missing[0]}")

        users = Counter(key for key, _ in by_input)

        def solve(unit: tuple[tuple[str, QuantSpec], list[str]], device: torch.device) -> dict[str, QuantizedWeight]:
            (key, spec), names = unit
            # The last solve reading a Hessian factors it where it lies (no n x n copy beside it).
            last = users[key] == 1
            h = (self.hessians.pop(key) if last else self.hessians[key]).to(device)
            # ||WX||^2 per Linear now: the Hessian may be gone after the solve
            totals = [energy(layer.weights[n], h.to(torch.float32)) for n in names]   # rows converted a slice at a time
            cross = self.crosses.pop(key, None) if last else self.crosses.get(key)
            # --qep: each Linear's target corrected for its input error (errors are reported against it)
            targets = {n: layer.weights[n] for n in names} if cross is None else {
                n: input_error_target(layer.weights[n], h, cross, self.options.qep, self.options.damp,
                                      self.options.damp_max) for n in names}
            del cross
            parts = [targets[n] for n in names]
            if len(parts) > 1:   # stacked straight into the work dtype (no copy as stored beside it)
                dt = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
                stacked = torch.empty(sum(p.shape[0] for p in parts), parts[0].shape[1], dtype=dt, device=device)
                row = 0
                for p in parts:
                    stacked[row:row + p.shape[0]].copy_(p)
                    row += p.shape[0]
            else:
                stacked = parts[0].to(device)
            own = any(stacked is not p for p in parts)   # a copy of ours: rounded in place
            try:
                qw, stats = gptq_quantize(stacked, h, spec, self.options, own=own, own_hessian=last)
            except Float16Overflow as exc:
                raise solve_overflow(exc, {layer.full_name(n): targets[n] for n in names}, spec,
                                     self.options.damp) from None
            except LayerError as exc:
                raise exc.at(layer.full_name(*names)) from None
            del stacked, h
            row, solved, total = 0, {}, qw.codes.shape[0]
            assert stats.row_error is not None and stats.dead is not None
            for name, whole in zip(names, totals, strict=True):
                rows = layer.weights[name].shape[0]
                part = QuantizedWeight(codes=qw.codes[row:row + rows].contiguous(),
                                       scale=qw.grid_scale[row:row + rows].contiguous(),
                                       zero=qw.grid_zero[row:row + rows].contiguous(), g_idx=qw.g_idx, spec=qw.spec)
                squared = squared_residual(targets[name].to(device), part.dequantize_rows, stats.dead)
                error = math.sqrt(solve_energy(stats.row_error[row:row + rows], stats.ridge, squared)
                                  / max(whole, 1e-30))
                row += rows
                layer.report(name, {"rel_error": error, "damp": stats.damp,
                                    "dead_columns": stats.dead_columns,
                                    "seconds": stats.seconds * rows / total})
                solved[name] = part
            return solved

        for solved in layer.map(solve, list(by_input.items())):   # independent solves: side by side
            results.update(solved)
        for name in layer.weights:
            self.hessians.pop(layer.input_of.get(name, name), None)
            self.crosses.pop(layer.input_of.get(name, name), None)
        return results
