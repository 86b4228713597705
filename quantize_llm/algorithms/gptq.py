"""GPTQ (Frantar et al., ICLR 2023): quantize columns one at a time, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer input.

The solve is a pure function; `GPTQ` (the registered algorithm) only accumulates Hessians from the
inputs the runner shows it and calls the solve per Linear.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.primitives import CLIPS, Float16Overflow, LayerError, row_params, rtn_group_params
from ..core.qweight import QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import RunError, SpecError
from .base import HessianNotFinite, LayerContext, NotPositiveDefinite, naming, solve_overflow
from .registry import register


@dataclass(frozen=True)
class GPTQOptions:
    block_size: int = 128          # columns per lazy-update block (not the quantization group)
    damp: float = 0.01             # added to diag(H), as a fraction of mean(diag(H))
    damp_max: float = 1.0          # damping is doubled after a failed Cholesky, up to this bound
    static_groups: bool = False    # act-order with groups fixed on the original column order (trivial g_idx):
                                   # columns are permuted even when spec.act_order, which says whether a
                                   # non-trivial g_idx is stored, is off
    true_sequential: bool = True   # quantize q/k/v, then o, then gate/up, then down, re-running between
    clip: str = "mse"              # group range: "mse" (shrunk where the diag(H)-weighted error drops) or "minmax"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SpecError(f"--block-size {self.block_size} must be at least 1", "128 is typical")
        if not 0 < self.damp_max <= 1:
            raise SpecError(f"damp_max {self.damp_max} must be in (0, 1]",
                            "1.0 is the default: a failed Cholesky doubles the damping up to it")
        if not 0 < self.damp <= self.damp_max:
            raise SpecError(f"--damp {self.damp} must be in (0, {self.damp_max}]", "0.01 is typical")
        if self.clip not in CLIPS:
            raise SpecError(f"--clip {self.clip} is not known", f"choose one of {', '.join(CLIPS)}; mse is the default")


@dataclass(frozen=True)
class GPTQStats:
    damp: float                    # damping fraction finally used
    dead_columns: int              # inputs that never fired (diag(H) == 0), quantized as zeros
    seconds: float
    kept: Tensor | None = None     # with an outlier mask: the masked weights' final values (out, in), 0 elsewhere


def cholesky_inverse_upper(hessian: Tensor, damp: float, damp_max: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping; damping doubles on failure (returns the one used).

    Raises HessianNotFinite for inf/NaN entries (overflowed inputs: no damping helps) and
    NotPositiveDefinite when damp_max is reached."""
    n, start = hessian.shape[0], damp
    if not bool(torch.isfinite(hessian).all()):
        raise HessianNotFinite.of()
    mean_diag = float(torch.diagonal(hessian).mean())
    while True:
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)                         # (n, n) = H^-1
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        if damp >= damp_max:
            raise NotPositiveDefinite.of(n, damp, start)
        damp = min(damp * 2, damp_max)


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, spec: QuantSpec, options: GPTQOptions = GPTQOptions(),
                  outlier_mask: Tensor | None = None) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize a (out, in) weight with GPTQ given the (in, in) Hessian sum X^T X of its inputs.

    outlier_mask (out, in) bool: weights kept exactly (in float16, beside the codes). They are left
    out of their group's range, get the code of the zero point (dequantized 0), cause no error to
    propagate, and their final values (with the error propagated into them) come back in
    `stats.kept`.

    Does not modify `weight` or `hessian`. Works in float32 on their device (float64 when `weight`
    is float64, which the tests use to compare with a column-by-column reference).
    Columns are processed in act-order (decreasing diag(H)) when spec.act_order or
    options.static_groups. Groups are consecutive columns in processing order, except with
    options.static_groups, where they are the consecutive original columns and no g_idx is
    returned; a last group shorter than group_size is fine.
    Each group's scale and zero come from the group's columns as they stand when its first column
    is reached (so they include the error already propagated into them).
    """
    start = time.perf_counter()
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dt).clone()                                           # (out, in)
    h = hessian.to(dt).clone()                                          # (in, in)
    out_features, in_features = w.shape
    gs = spec.effective_group_size(in_features)
    n_groups = math.ceil(in_features / gs)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0                                                 # a never-seen input: any value
    w[:, dead] = 0.0                                                    # ... and its weight is moot
    mask = outlier_mask.to(w.device) if outlier_mask is not None else None
    kept = torch.zeros_like(w) if mask is not None else None

    # Static groups: scale and zero fixed up front from the original columns (FORMATS.md §1.6).
    static = rtn_group_params(w if mask is None else w.masked_fill(mask, 0.0), spec.bits, spec.group_size, spec.sym, spec.min_zero, options.clip) \
        if options.static_groups else None
    perm = None
    if spec.act_order or options.static_groups:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    hdiag = torch.diagonal(h).clone()                                   # (in,) in processing order
    hinv, damp = cholesky_inverse_upper(h, options.damp, options.damp_max)
    del h

    # original column index of processing position j
    order = perm if perm is not None else torch.arange(in_features, device=w.device)
    # group of each processing position: static groups follow the original columns
    group_of = (order // gs) if options.static_groups else (torch.arange(in_features, device=w.device) // gs)
    scale = torch.zeros(out_features, n_groups, dtype=torch.float16, device=w.device)
    zero = torch.zeros(out_features, n_groups, dtype=torch.int32, device=w.device)
    if static is not None:
        scale, zero = static
    qcodes = torch.zeros_like(w)                                        # (out, in) codes, as floats
    maxq = spec.maxq
    groups = group_of.tolist()                                          # plain ints: no per-column syncs
    diag = torch.diagonal(hinv).tolist()
    cur_s = cur_z = w.new_zeros(out_features)
    current = -1                                                        # group whose params are in cur_s
    for i1 in range(0, in_features, options.block_size):
        i2 = min(i1 + options.block_size, in_features)
        w1 = w[:, i1:i2].clone()                                        # (out, b)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = groups[j]
            if static is None and j % gs == 0:
                # The group's columns as they stand now. Past this block they have not yet
                # received this block's errors (the lazy update): apply those here.
                beyond = min(j + gs, in_features) - i2
                cols = w1[:, i:i + gs]
                if beyond > 0:
                    late = w[:, i2:i2 + beyond] - err1[:, :i] @ hinv[i1:j, i2:i2 + beyond]
                    cols = torch.cat([cols, late], dim=1)
                if mask is not None:   # outliers out of the range: 0 is always inside it
                    cols = cols.masked_fill(mask[:, j:j + cols.shape[1]], 0.0)
                # clip search weighs each column's rounding error by its input energy diag(H)
                scale[:, g], zero[:, g] = row_params(cols, spec.bits, spec.sym, spec.min_zero, options.clip,
                                                     hdiag[j:j + cols.shape[1]])
                current = -1
            if g != current:
                cur_s, cur_z, current = scale[:, g].to(dt), zero[:, g].to(dt), g
            col = w1[:, i]
            q = torch.round(col / cur_s).add_(cur_z).clamp_(0, maxq)
            if mask is not None:
                m = mask[:, j]
                q = torch.where(m, cur_z, q)
                kept[:, j] = torch.where(m, col, 0.0)
            qcodes[:, j] = q
            err = (col - cur_s * (q - cur_z)).div_(diag[j])
            if mask is not None:
                err = err.masked_fill(m, 0.0)
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)                # rank-1 update of the block
            err1[:, i] = err
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)              # lazy update of the rest

    codes = qcodes.to(torch.uint8)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if kept is not None:
            kept = kept[:, invperm]
        if not options.static_groups:
            g_idx = group_of[invperm].to(torch.int32)                   # (in,) original order
    qw = QuantizedWeight(codes=codes.contiguous(), scale=scale, zero=zero, g_idx=g_idx, spec=spec)
    return qw, GPTQStats(damp=damp, dead_columns=int(dead.sum()), seconds=time.perf_counter() - start, kept=kept)


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

    def observe(self, linear_name: str, x: Tensor) -> None:
        accumulate_hessian(self.hessians, linear_name, x)

    def record(self) -> MethodRecord:
        return MethodRecord(damp=self.options.damp, static_groups=self.options.static_groups,
                            true_sequential=self.options.true_sequential)

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
            metrics = {"method": "rtn"}
            if h is not None:
                w = layer.weights[name].float()
                diff = w - qw.dequantize(torch.float32)
                metrics["rel_error"] = math.sqrt(max(float(((diff @ h) * diff).sum()), 0.0)
                                                 / max(float(((w @ h) * w).sum()), 1e-30))
            layer.report(name, metrics)
            results[name] = qw
        by_input: dict[tuple[str, QuantSpec], list[str]] = {}   # same input and same spec: stacked
        for name in [n for n in layer.weights if n not in results]:
            by_input.setdefault((layer.input_of.get(name, name), layer.spec_of(name, self.spec)), []).append(name)
        missing = [names[0] for (key, _), names in by_input.items() if key not in self.hessians]
        if missing:
            raise RunError(f"block {layer.index}: no calibration inputs reached {missing[0]}")

        def solve(unit: tuple[tuple[str, QuantSpec], list[str]], device: torch.device) -> dict[str, QuantizedWeight]:
            (key, spec), names = unit
            h = self.hessians[key].to(device)
            stacked = torch.cat([layer.weights[n].to(device) for n in names], dim=0)   # (sum of out, in)
            try:
                qw, stats = gptq_quantize(stacked, h, spec, self.options)
            except Float16Overflow as exc:
                raise solve_overflow(exc, {layer.full_name(n): layer.weights[n] for n in names}, spec,
                                     self.options.damp) from None
            except LayerError as exc:
                raise exc.at(layer.full_name(*names)) from None
            row, solved = 0, {}
            for name in names:
                rows = layer.weights[name].shape[0]
                part = QuantizedWeight(codes=qw.codes[row:row + rows].contiguous(),
                                       scale=qw.scale[row:row + rows].contiguous(),
                                       zero=qw.zero[row:row + rows].contiguous(), g_idx=qw.g_idx, spec=qw.spec)
                w = stacked[row:row + rows].float()
                row += rows
                diff = w - part.dequantize(torch.float32)
                # ||WX - QX||^2 = tr(D H D^T) with D = W - Q and H = X^T X: no need to keep X.
                num = float(((diff @ h) * diff).sum())
                den = float(((w @ h) * w).sum())
                layer.report(name, {"rel_error": math.sqrt(max(num, 0.0) / max(den, 1e-30)), "damp": stats.damp,
                                    "dead_columns": stats.dead_columns,
                                    "seconds": stats.seconds * rows / stacked.shape[0]})
                solved[name] = part
            return solved

        for solved in layer.map(solve, list(by_input.items())):   # independent solves: side by side
            results.update(solved)
        for name in layer.weights:
            self.hessians.pop(layer.input_of.get(name, name), None)
        return results
