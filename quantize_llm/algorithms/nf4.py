"""NF4 / FP4 (bitsandbytes' 4-bit codebooks), with nearest or GPTQ rounding.

Nearest rounding reproduces `bitsandbytes.functional.quantize_4bit` bit for bit (nf4codes.py).
GPTQ rounding keeps the same per-block absmax, fixed first from the original weight (and, with
double quantization, taken as the reader will see it after the nested 8-bit round trip), then
picks each column's codes on that fixed grid with GPTQ's error feedback through the inverse
Hessian of the layer input (Frantar et al. 2023, Alg. 1, with the grid fixed instead of per-group
min-max). The result is stored in exactly the layout bitsandbytes reads.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core import nf4codes
from ..core.primitives import Float16Overflow, float16_excess
from ..core.qweight import NestedAbsmax, QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import RunError, SpecError
from .base import LayerContext, naming
from .registry import register
from .solve import (
    Grid,
    SolverOptions,
    SolveStats,
    accumulate_hessian,
    cholesky_inverse_upper,
    feedback,
    output_error,
    solve_diagonal,
)

ROUNDINGS = ("nearest", "gptq")
CHUNK_ELEMENTS = 1 << 22   # weights per slice for nearest rounding (blocks are independent)


@dataclass(frozen=True)
class NF4Options:
    rounding: str = "nearest"      # "nearest" (bitsandbytes) or "gptq" (error feedback, needs calibration)
    # gptq rounding: the solver's (SolverOptions says what they mean)
    block_size: int = SolverOptions.block_size
    damp: float = SolverOptions.damp
    damp_max: float = SolverOptions.damp_max
    true_sequential: bool = SolverOptions.true_sequential

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise SpecError(f"--rounding {self.rounding} is not supported",
                            f"choose {' or '.join(ROUNDINGS)}; nearest, bitsandbytes' own, needs no data")
        SolverOptions.of(self)


def _absmax_statistics(absmax: Tensor, spec: QuantSpec) -> Tensor | NestedAbsmax:
    """The stored form of a float32 absmax (nblocks,): itself, or double-quantized (FORMATS.md §3.3).

    The nested statistics are computed on the CPU, as bitsandbytes' CPU path does: a CUDA mean would
    sum in another order and could move the offset by an ulp. (Its CPU mean, torch's, also depends
    on the thread count beyond 32768 blocks; both sides use the same call.)

    An absmax beyond float16 is refused (Float16Overflow): bitsandbytes dequantizes into the
    compute dtype, float16 as often as not, and one such block would also set the nested offset
    (the mean) of every other block.
    """
    excess = float16_excess(absmax)
    if excess is not None:
        raise Float16Overflow.of("absmax", excess)
    if not spec.double_quant:
        return absmax
    codes, nested, offset = nf4codes.double_quantize(absmax.cpu())
    return NestedAbsmax(codes, nested, offset, nf4codes.dynamic_map()).to(absmax.device)


@torch.no_grad()
def nf4_quantize(weight: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Nearest rounding of a (out, in) weight onto spec.codebook, bit-exact with bitsandbytes.

    Does not modify `weight`; works in float32 on slices of whole blocks.
    """
    out_features, in_features = weight.shape
    flat = weight.reshape(-1)                                           # (n,) row-major
    n = flat.numel()
    step = max(1, CHUNK_ELEMENTS // spec.blocksize) * spec.blocksize    # whole blocks per slice
    codes = torch.empty(n, dtype=torch.uint8, device=weight.device)
    absmax = []
    for start in range(0, n, step):
        c, a = nf4codes.quantize_4bit(flat[start:start + step], spec.codebook, spec.blocksize)
        codes[start:start + step] = c
        absmax.append(a)
    return QuantizedWeight(codes=codes.view(out_features, in_features),
                           scale=_absmax_statistics(torch.cat(absmax), spec), zero=None, g_idx=None,
                           spec=spec, source_dtype=weight.dtype)


class CodebookGrid(Grid):
    """Rounding onto the fixed grid table * absmax of a 4-bit codebook (a `Grid` for `feedback`):
    the nearest entry, by the thresholds nf4codes uses. Column j of row r has the absmax of its
    block, absmax[(r * in + j) // blocksize] (blocks run along the flattened rows)."""

    fused: ClassVar[bool] = False

    def __init__(self, w: Tensor, absmax: Tensor, spec: QuantSpec) -> None:
        out_features, in_features = w.shape
        self.absmax, self.blocksize = absmax, spec.blocksize
        self.row_start = torch.arange(out_features, device=w.device) * in_features   # (out,) flat index
        table = nf4codes.code_table(spec.codebook, w.device)
        self.order, self.bounds = nf4codes.thresholds(table)            # nearest entry, as nf4codes
        self.table = table.to(w.dtype)
        self.codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=w.device)
        self.i1 = 0

    def block(self, i1: int, i2: int) -> None:
        cols = torch.arange(i1, i2, device=self.absmax.device)
        self.i1 = i1
        self.scale = self.absmax[(self.row_start[:, None] + cols[None, :]) // self.blocksize]   # (out, b)
        # An all-zero block has absmax 0: every code dequantizes to 0 there; scale its values to 0.
        s = self.scale
        self.inverse = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))

    def round(self, j: int, col: Tensor, current: Callable[[int, int], Tensor]) -> Tensor:
        i = j - self.i1
        q = self.order[torch.bucketize((col * self.inverse[:, i]).float(), self.bounds)]   # thresholds in float32
        self.codes[:, j] = q.to(torch.uint8)
        return self.table[q] * self.scale[:, i]


@torch.no_grad()
def nf4_gptq_quantize(weight: Tensor, hessian: Tensor, spec: QuantSpec,
                      options: NF4Options = NF4Options()) -> tuple[QuantizedWeight, SolveStats]:
    """GPTQ rounding of a (out, in) weight onto the codebook grid of fixed per-block absmax.

    `hessian` (in, in) is X^T X of the layer inputs. Does not modify either. Works in float32
    (float64 when `weight` is float64, which the tests use against a column-by-column reference).
    The absmax of every block comes from the original weight, as nearest rounding would store it;
    the grid of column j in row r is table * absmax_eff[(r*in + j) // blocksize], where absmax_eff
    is the absmax a reader dequantizes (the nested round trip included).
    """
    start = time.perf_counter()
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    stats = _absmax_statistics(nf4codes.block_absmax(weight, spec.blocksize), spec)
    absmax = (stats.dequantize() if isinstance(stats, NestedAbsmax) else stats).to(dt)  # (nblocks,) as read
    w = weight.to(dt).clone()                                           # (out, in)
    _, dead = solve_diagonal(hessian, dt)
    w[:, dead] = 0.0                                                    # never-fired inputs: moot weights
    hinv, damp = cholesky_inverse_upper(hessian, options.damp, options.damp_max, dtype=dt)
    grid = CodebookGrid(w, absmax, spec)
    feedback(w, hinv, options.block_size, grid)
    qw = QuantizedWeight(codes=grid.codes, scale=stats, zero=None, g_idx=None, spec=spec, source_dtype=weight.dtype)
    return qw, SolveStats(damp=damp, dead_columns=int(dead.sum()), seconds=time.perf_counter() - start)


@register
class NF4:
    """The registered algorithm; calibrated (Hessians X^T X in float32) only for GPTQ rounding."""

    name: ClassVar[str] = "nf4"
    codebooks: ClassVar[tuple[str, ...]] = nf4codes.CODEBOOKS

    def __init__(self, spec: QuantSpec, options: NF4Options | None = None) -> None:
        if spec.codebook not in self.codebooks:
            raise SpecError(f"--quant-type {spec.codebook} is not supported by nf4",
                            f"choose {' or '.join(self.codebooks)}")
        self.spec = spec
        self.options = options or NF4Options()
        self.needs_calibration = self.options.rounding == "gptq"
        self.hessians: dict[str, Tensor] = {}

    prepare_block = None

    def record(self) -> MethodRecord:
        return MethodRecord(damp=self.options.damp, true_sequential=self.options.true_sequential)

    def observe(self, linear_name: str, x: Tensor) -> None:
        accumulate_hessian(self.hessians, linear_name, x)

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        if not self.needs_calibration:
            results = {}
            for name, w in layer.weights.items():
                with naming(layer.full_name(name)):
                    results[name] = nf4_quantize(w, self.spec)
            return results
        for name in layer.weights:
            if layer.input_of.get(name, name) not in self.hessians:
                raise RunError(f"block {layer.index}: no calibration inputs reached {name}")

        def solve(name: str, device: torch.device) -> QuantizedWeight:
            weight = layer.weights[name].to(device)
            h = self.hessians[layer.input_of.get(name, name)].to(device)
            with naming(layer.full_name(name)):   # the absmax is fixed: an overflow is the weight's own
                qw, stats = nf4_gptq_quantize(weight, h, self.spec, self.options)
            layer.report(name, {"rel_error": output_error(weight.float(), qw, h),
                                "damp": stats.damp,
                                "dead_columns": stats.dead_columns, "seconds": stats.seconds})
            return qw

        names = list(layer.weights)
        results = dict(zip(names, layer.map(solve, names), strict=True))   # independent solves: side by side
        for key in {layer.input_of.get(n, n) for n in layer.weights}:
            self.hessians.pop(key, None)
        return results
