"""GPTQ onto llama.cpp's block grids: the codes of a GGUF tensor chosen with error feedback.

For each block of a row (32 weights for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, a 256-weight super-block for
the k-quants) the grid (d, dmin, the sub-block scales and mins as the block stores them) is the
one llama.cpp's reference quantizer chooses (core/ggml.py), from the block's columns as they stand
when the solve reaches its first column, with the errors of the columns before fed back (as GPTQ
chooses a group's scale). Each column is then rounded to the nearest code of its sub-block's
grid, and the error goes to the columns after it through the inverse Hessian (solve.feedback),
exactly as for the integer grids. With act-order the columns are processed by decreasing
diag(H), and every block's grid is fixed up front from the original weights (as `--static-groups`
does for integer groups: a block's columns are no longer processed together).

With `--clip feedback` (and without act-order) the fields then take the errors the solve will
feed back into account: a Q4_0/Q5_0/Q8_0 block's scale is picked among the scales llama.cpp's
search tries, and a k-quant sub-block's integer scale (and min) among small steps around the
chosen ones, each by the cost of rounding the block's current columns in order with the errors
fed back inside it (the block's share of the output error), when the solve reaches its first
column.

The values fed back are the ones llama.cpp's dequantizer computes from the stored fields, in its
float32 arithmetic, so the solve sees the weights the file will hold.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..core import ggml
from ..core.spec import MethodRecord, QuantSpec
from ..errors import RunError
from .awq import AWQ, AWQOptions
from .base import BlockContext, LayerContext, naming
from .gptq import GPTQOptions
from .solve import (
    Grid,
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

# code = clip(rint(x / s), lo, hi) + offset; value = s * (code - offset)
_CENTERED = {"Q8_0": 0, "Q4_0": 8, "Q5_0": 16, "Q6_K": 32, "Q3_K": 4}
# the types whose block scale is chosen with the errors fed back inside the block (GgmlGrid._search):
# nmax of make_qx_quants
FEEDBACK_SEARCH = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}
# the k-quants whose sub-block scale (and min) are refined the same way (GgmlGrid._refine): the
# steps tried around the chosen 6-bit (Q6_K: 8-bit) integers and the integers' range
REFINE = {"Q4_K": ((-2, -1, 1, 2), (0, 63)), "Q5_K": ((-2, -1, 1, 2), (0, 63)),
          "Q6_K": ((-3, -2, -1, 1, 2, 3), (-128, 127)), "Q3_K": ((-3, -2, -1, 1, 2, 3), (0, 63))}


def _feedback_cost(x: Tensor, s: Tensor, m: Tensor, u: Tensor, lo: int, hi: int, affine: bool) -> Tensor:
    """solve.feedback_cost for C candidate grids (s, m) (C, rows) of a ggml sub-block: codes
    clamp(rint(x / s), lo, hi) with value s * code, or (affine) clamp(rint((x + m) / s), lo, hi)
    with value s * code - m; a 0 scale stands for code 0."""
    divisor = torch.where(s == 0, torch.ones_like(s), s)
    nonzero = (s != 0).to(s.dtype)

    def value(_: int, v: Tensor) -> Tensor:
        if affine:
            return s * torch.round((v + m) / divisor).clamp_(lo, hi).mul_(nonzero) - m
        return s * torch.round(v / divisor).clamp_(lo, hi).mul_(nonzero)
    return feedback_cost(x, u, s.shape[0], value)


def _scales(type_name: str, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(s, m) float32 (rows, sub-blocks) of blocks `params`, in the form the type's dequantizer
    uses: s * (code - offset) for the centred types, s * code - m for Q4_K/Q5_K, code * s + m for
    Q4_1/Q5_1 (m is 0 where unused)."""
    d = params["d"].astype(np.float32)
    rows = d.shape[0]
    if type_name in ("Q8_0", "Q4_0", "Q5_0"):
        return d, np.zeros_like(d)
    if type_name in ("Q4_1", "Q5_1"):
        return d, params["m"].astype(np.float32)
    if type_name in ("Q4_K", "Q5_K"):
        s = d[..., None] * params["sc"].astype(np.float32)
        m = params["dmin"].astype(np.float32)[..., None] * params["mn"].astype(np.float32)
        return s.reshape(rows, -1), m.reshape(rows, -1)
    if type_name == "Q6_K":
        s = d[..., None] * params["sc"].astype(np.float32)
        return s.reshape(rows, -1), np.zeros_like(s.reshape(rows, -1))
    if type_name == "Q3_K":
        s = d[..., None] * (params["sc"].astype(np.float32) - np.float32(32))
        return s.reshape(rows, -1), np.zeros_like(s.reshape(rows, -1))
    raise ValueError(f"unknown block type {type_name}")


class GgmlGrid(Grid):
    """A `Grid` for `feedback` on one ggml block type. `order[j]`: the original column of
    processing position j (None: the identity). `static`: every block's fields fixed up front
    (act-order); else each block's are chosen when its first column is reached."""

    fused: ClassVar[bool] = True

    def __init__(self, type_name: str, rows: int, cols: int, device: torch.device,
                 static: ggml.GgmlWeight | None = None, order: list[int] | None = None,
                 importance: np.ndarray | None = None, hinv: Tensor | None = None) -> None:
        t = ggml.TYPES[type_name]
        if cols % t.block:
            raise ValueError(f"{type_name} needs rows of a multiple of {t.block} weights, not {cols}")
        self.type, self.t, self.order, self.device = type_name, t, order, device
        self.importance = importance   # per original column: weighs the fields' search (None: the reference's)
        # the solve's factor U: with it, a Q4_0/Q5_0/Q8_0 block's scale is the one whose rounding,
        # errors fed back inside the block, costs the least (FEEDBACK_SEARCH)
        searched = static is None and order is None
        self.hinv = hinv if type_name in FEEDBACK_SEARCH and searched else None
        # ... and the k-quants' sub-block scales, each when its first column is reached
        self.refine = hinv if type_name in REFINE and searched else None
        self.codes = torch.zeros(rows, cols, dtype=torch.int16, device=device)
        self.fields: dict[str, np.ndarray] = {}
        self.s = torch.zeros(rows, cols // t.sub, dtype=torch.float32, device=device)
        self.m = torch.zeros_like(self.s)
        # the reference's codes: what a sub-block whose scale is 0 stores (any code stands for m there)
        self.keep = torch.zeros(rows, cols, dtype=torch.int16, device=device)
        self.static = static is not None
        if static is not None:
            self.fields = {k: v.copy() for k, v in static.params.items()}
            self._load(slice(None), static.params)
            self.keep.copy_(torch.from_numpy(static.codes))

    def _load(self, subs: slice, params: dict[str, np.ndarray]) -> None:
        s, m = _scales(self.type, params)
        self.s[:, subs] = torch.from_numpy(np.ascontiguousarray(s)).to(self.device)
        self.m[:, subs] = torch.from_numpy(np.ascontiguousarray(m)).to(self.device)

    def _choose(self, block: int, cols: Tensor) -> None:
        """The reference quantizer's fields for block `block` from its current columns."""
        t = self.t
        imp = self.importance[block * t.block:(block + 1) * t.block] if self.importance is not None else None
        reference = ggml.quantize_rtn(self.type, cols.detach().float().cpu().numpy(), imp)
        chosen = reference.params
        self.keep[:, block * t.block:(block + 1) * t.block] = torch.from_numpy(reference.codes)
        if not self.fields:
            nblocks = self.codes.shape[1] // t.block
            self.fields = {k: np.zeros((v.shape[0], nblocks, *v.shape[2:]), dtype=v.dtype)
                           for k, v in chosen.items()}
        if self.hinv is not None:
            chosen = {"d": self._search(block, cols, chosen["d"][:, 0])[:, None]}
        for k, v in chosen.items():
            self.fields[k][:, block] = v[:, 0]
        per = t.block // t.sub
        self._load(slice(block * per, (block + 1) * per), chosen)

    def _search(self, block: int, cols: Tensor, reference: np.ndarray) -> np.ndarray:
        """float16 (rows,) scales of block `block` (Q4_0/Q5_0/Q8_0: one scale per 32 weights, codes
        centred): among the reference's and every scale make_qx_quants tries (ggml.scale_trials),
        per row the one whose rounding of the block's current columns `cols` (rows, 32), each
        column's error fed back to the columns after it inside the block through the factor U as
        the solve will, leaves the least summed squared error e_j = (x_j - q_j) / U_jj: the
        block's share of the row's output error (solve.solve_energy). A tie keeps the reference."""
        t, nmax = self.t, FEEDBACK_SEARCH[self.type]
        assert self.hinv is not None
        x = cols.detach().float()
        imp = self.importance[block * t.block:(block + 1) * t.block] if self.importance is not None else None
        trials = ggml.scale_trials(x.cpu().numpy(), nmax, imp)[:, 0]                  # (rows, 19)
        stored = np.concatenate([reference[:, None], trials.astype(np.float16)], axis=1).astype(np.float32)
        d = torch.from_numpy(stored).to(x.device).t().contiguous()                    # (C, rows)
        j = block * t.block
        u = self.hinv[j:j + t.block, j:j + t.block].float()
        lo, hi = (-127, 127) if self.type == "Q8_0" else (-nmax, nmax - 1)
        loss = _feedback_cost(x, d, torch.zeros_like(d), u, lo, hi, affine=False)
        best = loss.argmin(dim=0)                                                    # first minimum
        return d.gather(0, best[None])[0].cpu().numpy().astype(np.float16)

    def _refine(self, j: int, cols: Tensor) -> None:
        """A k-quant sub-block's integer scale (and, Q4_K/Q5_K, its min) starting at column j,
        moved by the steps of REFINE (each alone, then both for Q4_K/Q5_K) where that lowers
        the cost of rounding its current columns `cols` with the errors fed back inside it
        (_feedback_cost); the super-block's d and dmin stay. A tie keeps the chosen integers."""
        assert self.refine is not None
        t = self.t
        block, i, sub = j // t.block, (j % t.block) // t.sub, j // t.sub
        steps, (lo_int, hi_int) = REFINE[self.type]
        x = cols.detach().float()
        dev = x.device
        d = torch.from_numpy(self.fields["d"][:, block].astype(np.float32)).to(dev)
        sc = torch.from_numpy(self.fields["sc"][:, block, i].astype(np.int64)).to(dev)
        affine = self.type in ("Q4_K", "Q5_K")
        moves = [(0, 0)] + [(a, 0) for a in steps]
        if affine:
            moves += [(0, b) for b in steps] + [(a, b) for a in steps for b in steps]
            dmin = torch.from_numpy(self.fields["dmin"][:, block].astype(np.float32)).to(dev)
            mn = torch.from_numpy(self.fields["mn"][:, block, i].astype(np.int64)).to(dev)
        a = torch.tensor([mv[0] for mv in moves], device=dev)[:, None]
        b = torch.tensor([mv[1] for mv in moves], device=dev)[:, None]
        sc_c = (sc[None] + a).clamp_(lo_int, hi_int)                                # (C, rows)
        if affine:
            mn_c = (mn[None] + b).clamp_(lo_int, hi_int)
            s_c = d[None] * sc_c.float()
            m_c = dmin[None] * mn_c.float()
            lo, hi = t.lo, t.hi
        else:
            off = _CENTERED[self.type]
            s_c = d[None] * (sc_c - (32 if self.type == "Q3_K" else 0)).float()
            m_c = torch.zeros_like(s_c)
            lo, hi = t.lo - off, t.hi - off
        u = self.refine[j:j + t.sub, j:j + t.sub].float()
        best = _feedback_cost(x, s_c, m_c, u, lo, hi, affine).argmin(dim=0)[None]   # first minimum
        self.fields["sc"][:, block, i] = sc_c.gather(0, best)[0].cpu().numpy().astype(self.fields["sc"].dtype)
        self.s[:, sub] = s_c.gather(0, best)[0]
        if affine:
            self.fields["mn"][:, block, i] = mn_c.gather(0, best)[0].cpu().numpy().astype(self.fields["mn"].dtype)
            self.m[:, sub] = m_c.gather(0, best)[0]

    def round(self, j: int, col: Tensor, current: Callable[[int, int], Tensor]) -> Tensor:
        t = self.t
        if not self.static and j % t.block == 0:
            self._choose(j // t.block, current(j, t.block))
        if self.refine is not None and j % t.sub == 0:
            self._refine(j, current(j, t.sub))
        c = self.order[j] if self.order is not None else j
        sub = c // t.sub
        s, m = self.s[:, sub], self.m[:, sub]
        zero = s == 0
        keep = self.keep[:, c].to(col.dtype)
        off = _CENTERED.get(self.type)
        if off is not None:
            lo, hi = (-127, 127) if self.type == "Q8_0" else (t.lo - off, t.hi - off)
            q = torch.where(zero, keep, torch.round(col / s).clamp_(lo, hi).nan_to_num_(0.0).add_(off))
            value = s * (q - off)
        elif self.type in ("Q4_K", "Q5_K"):
            q = torch.where(zero, keep, torch.round((col + m) / s).clamp_(t.lo, t.hi).nan_to_num_(0.0))
            value = s * q - m
        else:   # Q4_1, Q5_1
            q = torch.where(zero, keep, torch.round((col - m) / s).clamp_(t.lo, t.hi).nan_to_num_(0.0))
            value = q * s + m
        self.codes[:, c] = q.to(torch.int16)
        return value

    def result(self) -> ggml.GgmlWeight:
        return ggml.GgmlWeight(self.type, self.fields, self.codes.cpu().numpy())


@dataclass
class GgmlStats:
    damp: float
    row_error: Tensor
    ridge: float
    dead: Tensor
    seconds: float


@torch.no_grad()
def ggml_gptq(weight: Tensor, hessian: Tensor, type_name: str, options: GPTQOptions | None = None,
              act_order: bool = False, own_hessian: bool = False,
              weighted: bool = True, search: bool | None = None) -> tuple[ggml.GgmlWeight, GgmlStats]:
    """GPTQ of a (out, in) weight onto ggml block type `type_name`, given the Hessian sum X^T X of
    its inputs. Works in float32; does not modify `weight`, nor `hessian` unless `own_hessian`
    (it is then factored where it lies). `weighted`: each block's fields are searched under
    llama.cpp's importance weights with diag(H) as the importance (what llama-imatrix measures)
    where the type has such a search (ggml.quantize_rtn); else they are the reference's.
    `search` (without act-order; default: options.clip == "feedback", i.e. `--clip feedback`):
    a Q4_0/Q5_0/Q8_0 block's scale, and a k-quant sub-block's integer scale and min, are chosen
    by their cost with the errors fed back inside the block (GgmlGrid._search, GgmlGrid._refine).
    It lowers a layer's output error on its calibration inputs but did not lower SmolLM2's
    perplexity (README), so it is not the default."""
    start = time.perf_counter()
    options = options or GPTQOptions()
    search = options.clip == "feedback" if search is None else search
    w = weight.to(torch.float32, copy=True)
    hdiag, dead = solve_diagonal(hessian, torch.float32)
    w[:, dead] = 0.0                                                    # their weights are moot
    perm = torch.argsort(hdiag, descending=True, stable=True) if act_order else None
    ridge = float((hdiag[perm] if perm is not None else hdiag).mean())
    importance = hdiag.float().cpu().numpy() if weighted else None   # original column order
    # act-order: every block's fields from the original weights, up front
    static = ggml.quantize_rtn(type_name, w.cpu().numpy(), importance) if act_order else None
    hinv, damp = cholesky_inverse_upper(hessian, options.damp, options.damp_max, perm, torch.float32,
                                        overwrite=own_hessian and hessian.dtype == torch.float32
                                        and hessian.is_contiguous())
    if perm is not None:
        w = w[:, perm]
    grid = GgmlGrid(type_name, w.shape[0], w.shape[1], w.device, static, perm.tolist() if perm is not None else None,
                    importance, hinv if search else None)
    row_error = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    feedback(w, hinv, options.block_size, grid, None, row_error)
    del hinv
    return grid.result(), GgmlStats(damp=damp, row_error=row_error, ridge=ridge * damp, dead=dead,
                                    seconds=time.perf_counter() - start)


class GgmlResult:
    """A Linear's result for the block runner: the ggml weight, dequantized as llama.cpp does."""

    def __init__(self, weight: ggml.GgmlWeight) -> None:
        self.weight = weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def to(self, device: Any) -> GgmlResult:
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.from_numpy(ggml.dequantize(self.weight)).to(dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:
        w = self.weight
        part = ggml.GgmlWeight(w.type, {k: v[start:stop] for k, v in w.params.items()}, w.codes[start:stop])
        return torch.from_numpy(ggml.dequantize(part)).to(dtype)


class GgmlGPTQ:
    """GPTQ writing ggml block types: `types` maps a Linear's full name to its ggml type (the
    GGUF scheme's per-tensor rules); Linears without one are not expected here."""

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    codebooks: ClassVar[tuple[str, ...]] = ("ggml",)
    prepare_block = None

    def __init__(self, spec: QuantSpec, options: GPTQOptions | None = None,
                 types: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.options = options or GPTQOptions()
        self.types = types or {}
        self.hessians: dict[str, Tensor] = {}
        self.crosses: dict[str, Tensor] = {}   # --qep: (X_f - X)^T X per input, as GPTQ's

    @property
    def float_inputs(self) -> bool:
        """--qep: the runner shows it the float model's inputs beside the quantized model's."""
        return self.options.qep > 0

    def observe(self, linear_name: str, x: Tensor) -> None:
        accumulate_hessian(self.hessians, linear_name, x)

    def observe_pair(self, linear_name: str, x: Tensor, x_float: Tensor) -> None:
        accumulate_hessian(self.hessians, linear_name, x)
        accumulate_cross(self.crosses, linear_name, x, x_float)

    def record(self) -> MethodRecord:
        return MethodRecord(damp=self.options.damp, true_sequential=self.options.true_sequential,
                            keys=(("qep", self.options.qep),) if self.options.qep else ())

    def quantize_layer(self, layer: LayerContext) -> dict[str, Any]:
        users = Counter(layer.input_of.get(name, name) for name in layer.weights)
        results: dict[str, Any] = {}
        for name, weight in layer.weights.items():
            key = layer.input_of.get(name, name)
            if key not in self.hessians:
                raise RunError(f"block {layer.index}: no calibration inputs reached {name}")
            full = layer.prefix + name
            type_name = self.types.get(full)
            if type_name is None:
                raise RunError(f"{full}: no GGUF type was planned for it")
            users[key] -= 1
            own = users[key] == 0   # the last Linear reading this Hessian factors it where it lies
            h = self.hessians.pop(key) if own else self.hessians[key]
            w = weight.float()
            total = energy(w, h)
            cross = self.crosses.pop(key, None) if own else self.crosses.get(key)
            if cross is not None:   # --qep: the target corrected for the input error (the error is reported against it)
                w = input_error_target(w, h, cross, self.options.qep, self.options.damp, self.options.damp_max)
            del cross
            with naming(full):
                gw, stats = ggml_gptq(w, h, type_name, self.options, self.spec.act_order, own_hessian=own)
            del h
            result = GgmlResult(gw)
            squared = squared_residual(w, result.dequantize_rows, stats.dead)
            error = math.sqrt(solve_energy(stats.row_error, stats.ridge, squared) / max(total, 1e-30))
            layer.report(name, {"rel_error": error, "damp": stats.damp, "ggml_type": type_name,
                                "seconds": stats.seconds})
            results[name] = result
        return results


class GgmlAWQ(AWQ):
    """AWQ writing ggml block types: the scale search rounds each trial weight with llama.cpp's
    reference quantizer of the Linear's planned type (instead of the integer grid), the scales
    are folded as for every AWQ run, and each Linear is then rounded onto its type: by the
    reference's fields searched under llama.cpp's importance weights with diag(H) as the
    importance (then="rtn": what llama-quantize does with an importance matrix, on AWQ's scaled
    weights), or by GPTQ on the grid (then="gptq", ggml_gptq). `types` maps (block index, local
    Linear name) to its ggml type."""

    codebooks: ClassVar[tuple[str, ...]] = ("ggml",)

    def __init__(self, spec: QuantSpec, options: AWQOptions | None = None,
                 types: dict[tuple[int, str], str] | None = None) -> None:
        super().__init__(spec, options)
        self.types = types or {}
        self.block_types: dict[str, str] = {}

    def prepare_block(self, ctx: BlockContext) -> None:
        self.block_types = {local: t for (index, local), t in self.types.items() if index == ctx.index}
        super().prepare_block(ctx)

    def fake(self, name: str, weight: Tensor, s: Tensor, rows: Callable[[int, int], Tensor] | None = None) -> Tensor:
        type_name = self.block_types[name]
        scaled = ((weight if rows is None else rows(0, weight.shape[0])).float() * s).cpu().numpy()
        rounded = ggml.dequantize(ggml.quantize_rtn(type_name, scaled))
        return torch.from_numpy(rounded).to(weight.device).div_(s)

    def quantize_layer(self, layer: LayerContext) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, weight in layer.weights.items():
            key = layer.input_of.get(name, name)
            if key not in self.hessians:
                raise RunError(f"block {layer.index}: no calibration inputs reached {name}")
            type_name = self.block_types.get(name)
            if type_name is None:
                raise RunError(f"{layer.prefix + name}: no GGUF type was planned for it")
            start = time.perf_counter()
            w = weight.float()
            h = self.hessians[key]
            with naming(layer.prefix + name):
                if self.options.then == "gptq":
                    gw, _ = ggml_gptq(w, h, type_name, GPTQOptions(block_size=self.options.block_size,
                                                                   damp=self.options.damp))
                else:
                    importance = solve_diagonal(h, torch.float32)[0].cpu().numpy()
                    gw = ggml.quantize_rtn(type_name, w.cpu().numpy(), importance)
            result = GgmlResult(gw)
            error = output_error(w, result.dequantize(torch.float32).to(w.device), h)
            layer.report(name, {"rel_error": error, "ggml_type": type_name, "seconds": time.perf_counter() - start})
            results[name] = result
        for name in layer.weights:
            self.hessians.pop(layer.input_of.get(name, name), None)
        return results
