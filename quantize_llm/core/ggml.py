"""llama.cpp's block types (ggml): choosing a row's grid, rounding onto it, and the bytes.

Pure numpy on float32, no I/O. Layouts follow ggml's block structs (`ggml/src/ggml-common.h`:
block_q8_0, block_q4_0, block_q4_1, block_q5_0, block_q5_1, block_q3_K, block_q4_K, block_q5_K,
block_q6_K; QK_K = 256) and the reference quantizers of `ggml/src/ggml-quants.c`
(`quantize_row_*_ref`, `make_qkx2_quants`, `make_qx_quants`, `make_q3_quants`), which llama.cpp's
`llama-quantize` runs when no importance matrix is given. Every float32 operation is done in the
order the C code does it (sums accumulated left to right, products rounded before they are added),
so `quantize_rtn` writes the same bytes as llama.cpp's reference quantizers built without fused
multiply-add (`-DGGML_NATIVE=OFF`, the usual portable build).

A quantized weight is `GgmlWeight`: the type, the stored per-block fields (`params`) and the codes
as the block stores them (`codes`, int16, unsigned offsets included). Every type's value is affine
in its code within a sub-block: `w = s * code + m` (`affine`), which is what fixed-grid rounding
(GPTQ over a chosen grid) needs; `dequantize` follows ggml's own dequantizers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256
F32 = np.float32


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int          # weights per block
    nbytes: int         # bytes per block
    sub: int            # weights per sub-block (one scale)
    lo: int             # smallest stored code
    hi: int             # largest stored code
    bits: float         # bits per weight including scales


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", 32, 34, 32, -128, 127, 8.5),
    BlockType("Q4_0", 32, 18, 32, 0, 15, 4.5),
    BlockType("Q4_1", 32, 20, 32, 0, 15, 5.0),
    BlockType("Q5_0", 32, 22, 32, 0, 31, 5.5),
    BlockType("Q5_1", 32, 24, 32, 0, 31, 6.0),
    BlockType("Q3_K", QK_K, 110, 16, 0, 7, 3.4375),
    BlockType("Q4_K", QK_K, 144, 32, 0, 15, 4.5),
    BlockType("Q5_K", QK_K, 176, 32, 0, 31, 5.5),
    BlockType("Q6_K", QK_K, 210, 16, 0, 63, 6.5625),
)}


@dataclass(frozen=True)
class GgmlWeight:
    """One matrix (rows, cols) in a ggml block type. `params` holds the stored fields per block,
    shaped (rows, blocks per row, ...): d/dmin/m float16, sc/mn the integer sub-block scales and
    mins as stored before bit packing; `codes` int16 (rows, cols) as the block stores them."""

    type: str
    params: dict[str, np.ndarray]
    codes: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(s, m) float32 (rows, sub-blocks per row): a code c of sub-block j stands for s*c + m."""
        return affine(self.type, self.params)

    def dequantize(self) -> np.ndarray:
        return dequantize(self)

    def pack(self) -> np.ndarray:
        """The blocks' bytes, uint8 (rows, bytes per row), as ggml stores them."""
        return pack(self)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right in float32 (C's `for (...) s += a[i]`)."""
    return np.cumsum(a, axis=-1, dtype=F32)[..., -1]


def _rint(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even, as int32."""
    return np.rint(v).astype(np.int32)


def _f16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=F32).astype(np.float16)


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    rows, cols = x.shape
    if cols % size:
        raise ValueError(f"{cols} columns are not a multiple of the block size {size}")
    return np.ascontiguousarray(x, dtype=F32).reshape(rows, cols // size, size)


# ---- the 32-weight types (reference quantizers, ggml-quants.c quantize_row_q*_ref) -------------------------

def _q8_0(x: np.ndarray) -> tuple[dict, np.ndarray]:
    b = _blocks(x, 32)
    amax = np.abs(b).max(axis=-1)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    v = b * inv[..., None]
    q = np.trunc(v + np.copysign(F32(0.5), v))          # roundf: half away from zero
    # roundf(x) rounds half away, but x + 0.5 can round up in float32; fix those
    q = np.where(np.abs(q - v) > 0.5, q - np.copysign(F32(1), v), q)
    return {"d": _f16(d)}, q.astype(np.int16)


def _signed_max(b: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block (the first one, as `if (amax < fabsf(v))`)."""
    idx = np.abs(b).argmax(axis=-1)
    return np.take_along_axis(b, idx[..., None], axis=-1)[..., 0]


def _q4_0(x: np.ndarray, nmax: int = 8) -> tuple[dict, np.ndarray]:
    b = _blocks(x, 32)
    d = _signed_max(b) / F32(-nmax)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    v = b * inv[..., None] + F32(nmax + 0.5)
    q = np.minimum(np.trunc(v).astype(np.int32), 2 * nmax - 1)
    return {"d": _f16(d)}, q.astype(np.int16)


def _importance_weights(b: np.ndarray, importance: np.ndarray, over: int) -> np.ndarray:
    """llama.cpp's weights under an importance matrix: imp_j * sqrt(sigma2 + x_j^2), sigma2 the
    mean square of the `over` weights around (b: (..., blocks, sub), importance per column)."""
    rows = b.shape[0]
    sq = (b * b).reshape(rows, -1, over)
    sigma2 = (sq.sum(axis=-1) / F32(over)).astype(F32)
    sigma2 = np.repeat(sigma2, over, axis=-1).reshape(b.shape)
    imp = np.broadcast_to(importance.astype(F32).reshape(-1), (rows, importance.size)).reshape(b.shape)
    return (imp * np.sqrt(sigma2 + b * b)).astype(F32)


def _q4_0_weighted(x: np.ndarray, nmax: int, importance: np.ndarray) -> tuple[dict, np.ndarray]:
    """Q4_0/Q5_0 with the scale searched under importance weights (make_qx_quants, as llama.cpp
    does with an importance matrix); the codes on the stored grid."""
    b = _blocks(x, 32)
    scale, _ = _make_qx(b, nmax, _importance_weights(b, importance, 32))
    params = {"d": _f16(scale)}
    d = params["d"].astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint(b / d[..., None]), -nmax, nmax - 1) + nmax
    q = np.where((d == 0)[..., None], nmax, q)
    return params, q.reshape(x.shape[0], -1).astype(np.int16)


def _q4_1(x: np.ndarray, nmax: int = 15) -> tuple[dict, np.ndarray]:
    b = _blocks(x, 32)
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    d = (hi - lo) / F32(nmax)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    v = (b - lo[..., None]) * inv[..., None] + F32(0.5)
    q = np.trunc(v).astype(np.int32)
    q = np.minimum(q, 15) if nmax == 15 else q & 0xFF   # Q5_1's reference casts without a clamp
    return {"d": _f16(d), "m": _f16(lo)}, q.astype(np.int16)


# ---- the k-quants' searches --------------------------------------------------------------------------------

def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
               nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants over sub-blocks x (..., n) with weights w: (scale, the_min, L)."""
    lo = np.minimum(x.min(axis=-1), F32(0))
    hi = x.max(axis=-1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = hi == lo
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        L = np.clip(_rint(iscale[..., None] * (x - lo[..., None])), 0, nmax)
        diff = scale[..., None] * L.astype(F32) + lo[..., None] - x
        best = _seqsum(w * (diff * diff))
        best_min = lo.copy()
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
            La = np.clip(_rint(iscale[..., None] * (x - lo[..., None])), 0, nmax)
            lf = La.astype(F32)
            sum_l = _seqsum(w * lf)
            sum_l2 = _seqsum(w * lf * lf)
            sum_xl = _seqsum(w * lf * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale[..., None] * lf + this_min[..., None] - x
            cur = _seqsum(w * (diff * diff))
            better = (D > 0) & (cur < best) & ~flat
            L = np.where(better[..., None], La, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            best_min = np.where(better, this_min, best_min)
            # llama.cpp's loop keeps its `min` variable at the best min so far: the next trials'
            # codes and inverse scales are taken from it, not from the block's minimum
            lo = np.where(better, this_min, lo)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat[..., None], 0, L)
    return scale, (-best_min).astype(F32), L


def scale_trials(x: np.ndarray, nmax: int, importance: np.ndarray | None = None) -> np.ndarray:
    """The scales make_qx_quants weighs for blocks of 32 of x (rows, cols): for each of its 19
    trial inverse scales -(nmax + 0.1 k) / max (k = 0, -9 .. 9), the least-squares scale of the
    codes it rounds to, under llama.cpp's importance weights (`importance` per column) or x^2.
    float32 (rows, cols / 32, 19); 0 where a trial's codes are all 0."""
    b = _blocks(x, 32)
    w = b * b if importance is None else _importance_weights(b, importance, 32)
    mx = _signed_max(b)
    out = np.zeros((*b.shape[:2], 19), dtype=F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, step in enumerate([0, *range(-9, 0), *range(1, 10)]):
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            lf = np.clip(_rint(iscale[..., None] * b), -nmax, nmax - 1).astype(F32)
            sumlx, suml2 = _seqsum(w * b * lf), _seqsum(w * lf * lf)
            out[..., i] = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _make_qx(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, weights) over sub-blocks x (..., n): (scale, L);
    without weights x^2 (the reference's)."""
    mx = _signed_max(x)
    zero = np.abs(mx) < F32(1e-15)
    w = x * x if weights is None else weights
    with np.errstate(divide="ignore", invalid="ignore"):
        def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            lv = np.clip(_rint(iscale[..., None] * x), -nmax, nmax - 1)
            lf = lv.astype(F32)
            return lv, _seqsum(w * x * lf), _seqsum(w * lf * lf)

        iscale = F32(-nmax) / mx
        L, sumlx, suml2 = trial(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            lv, sumlx, suml2 = trial(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[..., None], lv, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero[..., None], 0, L + nmax)
    return np.where(zero, F32(0), scale).astype(F32), L


def _make_q3(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) over sub-blocks x (..., n): (scale, L)."""
    mx = _signed_max(x)
    zero = np.abs(mx) < F32(1e-15)
    n = x.shape[-1]
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-nmax) / mx
        L = np.clip(_rint(iscale[..., None] * x), -nmax, nmax - 1)
        lf = L.astype(F32)
        sumlx = _seqsum(w * x * lf)
        suml2 = _seqsum(w * lf * lf)
        for _ in range(5):
            changed = np.zeros(mx.shape, dtype=bool)
            for i in range(n):
                xi, wi, li = x[..., i], w[..., i], L[..., i].astype(F32)
                slx = sumlx - wi * xi * li
                ok = slx > 0
                sl2 = suml2 - wi * li * li
                new_l = np.clip(_rint(xi * sl2 / slx), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                ok &= new_l != L[..., i]
                slx2 = slx + wi * xi * nf
                sl22 = sl2 + wi * nf * nf
                ok &= (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[..., i] = np.where(ok, new_l, L[..., i])
                sumlx = np.where(ok, slx2, sumlx)
                suml2 = np.where(ok, sl22, suml2)
                changed |= ok
            if not changed.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = np.where(zero[..., None], 0, L + nmax)
    return np.where(zero, F32(0), scale).astype(F32), L


def _kx_params(scales: np.ndarray, mins: np.ndarray) -> dict:
    """Q4_K/Q5_K: super-block d, dmin and the 6-bit sub-block scales and mins (rows, nb, 8)."""
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    sc = np.minimum(_rint(inv_scale[..., None] * scales) & 0xFF, 63)
    mn = np.minimum(_rint(inv_min[..., None] * mins) & 0xFF, 63)
    return {"d": _f16(max_scale / F32(63)), "dmin": _f16(max_min / F32(63)),
            "sc": sc.astype(np.uint8), "mn": mn.astype(np.uint8)}


def _qk_x(x: np.ndarray, nmax: int, rmin: float, nstep: int,
          importance: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    b = _blocks(x, 32)
    if importance is None:
        sum_x2 = _seqsum(b * b)
        av_x = np.sqrt(sum_x2 / F32(32))
        weights = av_x[..., None] + np.abs(b)
    else:   # sigma2 over the 256-weight super-block, twice its mean square (llama.cpp's imatrix path)
        rows = b.shape[0]
        sq = (b * b).reshape(rows, -1, QK_K)
        sigma2 = np.repeat((F32(2) * sq.sum(axis=-1) / F32(QK_K)).astype(F32), QK_K, axis=-1).reshape(b.shape)
        imp = np.broadcast_to(importance.astype(F32).reshape(-1), (rows, importance.size)).reshape(b.shape)
        weights = (imp * np.sqrt(sigma2 + b * b)).astype(F32)
    scales, mins, L = _make_qkx2(b, weights, nmax, rmin, 0.1, nstep)
    rows, nsub = scales.shape
    params = _kx_params(scales.reshape(rows, -1, 8), mins.reshape(rows, -1, 8))
    codes = L.reshape(rows, -1)
    return params, _round_fixed("Q4_K" if nmax == 15 else "Q5_K", params, x, keep=codes)


def _q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    b = _blocks(x, 16)
    scales, L = _make_qx(b, 32, None if importance is None else _importance_weights(b, importance, QK_K))
    rows = scales.shape[0]
    sb = scales.reshape(rows, -1, 16)
    idx = np.abs(sb).argmax(axis=-1)
    max_scale = np.take_along_axis(sb, idx[..., None], axis=-1)[..., 0]
    zero = np.abs(max_scale) < F32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        d = F32(1) / iscale
        sc = np.minimum(_rint(iscale[..., None] * sb), 127)
    params = {"d": _f16(np.where(zero, F32(0), d)), "sc": np.where(zero[..., None], 0, sc).astype(np.int8)}
    codes = np.where(np.repeat(zero, QK_K, axis=-1), 0, L.reshape(rows, -1))
    return params, _round_fixed("Q6_K", params, x, keep=codes)


def _q3_k(x: np.ndarray) -> tuple[dict, np.ndarray]:
    b = _blocks(x, 16)
    scales, L = _make_q3(b, 4)
    rows = scales.shape[0]
    sb = scales.reshape(rows, -1, 16)
    idx = np.abs(sb).argmax(axis=-1)
    max_scale = np.take_along_axis(sb, idx[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / max_scale
        sc = np.clip(_rint(iscale[..., None] * sb).astype(np.int8), -32, 31) + 32
        d = F32(1) / iscale
    none = max_scale == 0
    params = {"d": _f16(np.where(none, F32(0), d)), "sc": np.where(none[..., None], 0, sc).astype(np.uint8)}
    return params, _round_fixed("Q3_K", params, x, keep=L.reshape(rows, -1))


# ---- the grid as s * code + m, fixed-grid rounding, dequantization ------------------------------------------

def affine(type_name: str, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(s, m) float32 (rows, sub-blocks per row): code c of sub-block j stands for s*c + m."""
    d = params["d"].astype(F32)
    if type_name == "Q8_0":
        return d, np.zeros_like(d)
    if type_name in ("Q4_0", "Q5_0"):
        return d, d * F32(-8 if type_name == "Q4_0" else -16)
    if type_name in ("Q4_1", "Q5_1"):
        return d, params["m"].astype(F32)
    rows = d.shape[0]
    if type_name in ("Q4_K", "Q5_K"):
        s = d[..., None] * params["sc"].astype(F32)
        m = -(params["dmin"].astype(F32)[..., None] * params["mn"].astype(F32))
        return s.reshape(rows, -1), m.reshape(rows, -1)
    if type_name == "Q6_K":
        s = (d[..., None] * params["sc"].astype(F32)).reshape(rows, -1)
        return s, s * F32(-32)
    if type_name == "Q3_K":
        s = (d[..., None] * (params["sc"].astype(F32) - F32(32))).reshape(rows, -1)
        return s, s * F32(-4)
    raise ValueError(f"unknown block type {type_name}")


def _round_fixed(type_name: str, params: dict, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The k-quants' last step: every weight rounded to the nearest code of its sub-block's fixed
    grid, in the reference's own arithmetic; sub-blocks whose scale is 0 keep `keep`."""
    t = TYPES[type_name]
    rows = x.shape[0]
    b = _blocks(x, t.sub)
    d = params["d"].astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if type_name in ("Q4_K", "Q5_K"):
            s = (d[..., None] * params["sc"].astype(F32)).reshape(rows, -1)
            dm = (params["dmin"].astype(F32)[..., None] * params["mn"].astype(F32)).reshape(rows, -1)
            q = np.clip(_rint((b + dm[..., None]) / s[..., None]), t.lo, t.hi)
        elif type_name == "Q6_K":
            s = (d[..., None] * params["sc"].astype(F32)).reshape(rows, -1)
            q = np.clip(_rint(b / s[..., None]), -32, 31) + 32
        else:  # Q3_K
            s = (d[..., None] * (params["sc"].astype(np.int8) - 32).astype(F32)).reshape(rows, -1)
            q = np.clip(_rint(b / s[..., None]), -4, 3) + 4
    q = np.where((s == 0)[..., None], keep.reshape(b.shape), q)
    return q.reshape(rows, -1).astype(np.int16)


def round_to_grid(type_name: str, s: np.ndarray, m: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Nearest codes of x (rows, n) on a fixed grid given per weight (s, m broadcast to x); where
    s is 0 the code is the lowest (any code stands for m there)."""
    t = TYPES[type_name]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint((x - m) / s), t.lo, t.hi)
    return np.where(s == 0, 0 if t.lo < 0 else t.lo, q).astype(np.int16)


def quantize_rtn(type_name: str, x: np.ndarray, importance: np.ndarray | None = None) -> GgmlWeight:
    """x float32 (rows, cols) as llama.cpp's reference quantizer rounds it (no importance matrix).
    With `importance` (cols,), e.g. the calibration inputs' mean squares, the fields of Q4_0,
    Q5_0, Q4_K, Q5_K and Q6_K are searched under llama.cpp's importance weights instead (the
    other types ignore it)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if type_name not in TYPES:
        raise ValueError(f"unknown block type {type_name}")
    _blocks(x, TYPES[type_name].block)
    if importance is not None and type_name in ("Q4_0", "Q5_0"):
        params, codes = _q4_0_weighted(x, 8 if type_name == "Q4_0" else 16, importance)
        return GgmlWeight(type_name, params, codes.reshape(x.shape).astype(np.int16))
    if importance is not None and type_name in ("Q4_K", "Q5_K"):
        params, codes = _qk_x(x, 15 if type_name == "Q4_K" else 31, -1.0 if type_name == "Q4_K" else -0.5,
                              20 if type_name == "Q4_K" else 15, importance)
        return GgmlWeight(type_name, params, codes.reshape(x.shape).astype(np.int16))
    if importance is not None and type_name == "Q6_K":
        params, codes = _q6_k(x, importance)
        return GgmlWeight(type_name, params, codes.reshape(x.shape).astype(np.int16))
    if type_name == "Q8_0":
        params, codes = _q8_0(x)
    elif type_name == "Q4_0":
        params, codes = _q4_0(x, 8)
    elif type_name == "Q5_0":
        params, codes = _q4_0(x, 16)
    elif type_name == "Q4_1":
        params, codes = _q4_1(x, 15)
    elif type_name == "Q5_1":
        params, codes = _q4_1(x, 31)
    elif type_name == "Q4_K":
        params, codes = _qk_x(x, 15, -1.0, 20)
    elif type_name == "Q5_K":
        params, codes = _qk_x(x, 31, -0.5, 15)
    elif type_name == "Q6_K":
        params, codes = _q6_k(x)
    elif type_name == "Q3_K":
        params, codes = _q3_k(x)
    else:
        raise ValueError(f"unknown block type {type_name}")
    return GgmlWeight(type_name, params, codes.reshape(x.shape).astype(np.int16))


def dequantize(qw: GgmlWeight) -> np.ndarray:
    """float32 (rows, cols): what llama.cpp computes from the blocks."""
    t = TYPES[qw.type]
    rows, cols = qw.shape
    q = qw.codes.astype(F32).reshape(rows, -1, t.sub)
    d = qw.params["d"].astype(F32)
    if qw.type == "Q8_0":
        return (q * d[..., None]).reshape(rows, cols)
    if qw.type in ("Q4_0", "Q5_0"):
        return ((q - F32(8 if qw.type == "Q4_0" else 16)) * d[..., None]).reshape(rows, cols)
    if qw.type in ("Q4_1", "Q5_1"):
        return (q * d[..., None] + qw.params["m"].astype(F32)[..., None]).reshape(rows, cols)
    if qw.type in ("Q4_K", "Q5_K"):
        s = (d[..., None] * qw.params["sc"].astype(F32)).reshape(rows, -1)
        m = (qw.params["dmin"].astype(F32)[..., None] * qw.params["mn"].astype(F32)).reshape(rows, -1)
        return (s[..., None] * q - m[..., None]).reshape(rows, cols)
    if qw.type == "Q6_K":
        s = (d[..., None] * qw.params["sc"].astype(F32)).reshape(rows, -1)
        return (s[..., None] * (q - F32(32))).reshape(rows, cols)
    if qw.type == "Q3_K":
        s = (d[..., None] * (qw.params["sc"].astype(F32) - F32(32))).reshape(rows, -1)
        return (s[..., None] * (q - F32(4))).reshape(rows, cols)
    raise ValueError(f"unknown block type {qw.type}")


# ---- bytes ---------------------------------------------------------------------------------------------------

def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(np.uint8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros(sc.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    return out


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes holding 16 six-bit scales (stored + 32)."""
    sc = sc.astype(np.uint8)
    out = np.zeros(sc.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:8] = (sc[..., 0:8] & 0xF) | ((sc[..., 8:16] & 0xF) << 4)
    high = sc >> 4                                       # 2 bits each
    for j in range(16):
        out[..., 8 + j % 4] |= (high[..., j] << (2 * (j // 4))).astype(np.uint8)
    return out


def pack(qw: GgmlWeight) -> np.ndarray:
    t = TYPES[qw.type]
    rows, cols = qw.shape
    nb = cols // t.block
    q = qw.codes.reshape(rows, nb, t.block)
    p = qw.params
    if qw.type == "Q8_0":
        parts = [_u8(p["d"].astype(np.float16)[..., None]), q.astype(np.int8).view(np.uint8)]
    elif qw.type in ("Q4_0", "Q4_1"):
        parts = [_u8(p["d"].astype(np.float16)[..., None])]
        if qw.type == "Q4_1":
            parts.append(_u8(p["m"].astype(np.float16)[..., None]))
        parts.append(_nibbles(q[..., :16], q[..., 16:]))
    elif qw.type in ("Q5_0", "Q5_1"):
        parts = [_u8(p["d"].astype(np.float16)[..., None])]
        if qw.type == "Q5_1":
            parts.append(_u8(p["m"].astype(np.float16)[..., None]))
        high = ((q >> 4) & 1).astype(np.uint32)            # element j's fifth bit at bit j of qh
        qh = (high << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
        parts += [_u8(qh.astype("<u4")[..., None]), _nibbles(q[..., :16], q[..., 16:])]
    elif qw.type in ("Q4_K", "Q5_K"):
        head = [_u8(p["d"].astype(np.float16)[..., None]), _u8(p["dmin"].astype(np.float16)[..., None]),
                _pack_k_scales(p["sc"], p["mn"])]
        chunks = q.reshape(rows, nb, 4, 2, 32)               # 64-weight chunks: low half, high half
        qs = _nibbles(chunks[..., 0, :], chunks[..., 1, :]).reshape(rows, nb, 128)
        if qw.type == "Q4_K":
            parts = [*head, qs]
        else:
            bit = ((chunks >> 4) & 1).astype(np.uint8)       # (rows, nb, 4, 2, 32)
            shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)   # chunk c, half h
            qh = (bit << shifts[None, None, :, :, None]).sum(axis=(2, 3)).astype(np.uint8)
            parts = [*head, qh, qs]
    elif qw.type == "Q6_K":
        c = q.reshape(rows, nb, 2, 4, 32).astype(np.uint8)  # 128-weight halves, four 32-runs
        ql = np.concatenate([_nibbles(c[..., 0, :], c[..., 2, :]), _nibbles(c[..., 1, :], c[..., 3, :])], axis=-1)
        qh = ((c[..., 0, :] >> 4) | ((c[..., 1, :] >> 4) << 2) | ((c[..., 2, :] >> 4) << 4)
              | ((c[..., 3, :] >> 4) << 6)).astype(np.uint8)
        parts = [ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), p["sc"].astype(np.int8).view(np.uint8),
                 _u8(p["d"].astype(np.float16)[..., None])]
    elif qw.type == "Q3_K":
        u = q.astype(np.uint8)
        hbit = (u >> 2) & 1                                  # weight j's bit in hmask[j % 32], bit j // 32
        hmask = (hbit.reshape(rows, nb, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2).astype(np.uint8)
        low = (u & 3).reshape(rows, nb, 2, 4, 32)
        qs = (low[..., 0, :] | (low[..., 1, :] << 2) | (low[..., 2, :] << 4) | (low[..., 3, :] << 6)).astype(np.uint8)
        parts = [hmask, qs.reshape(rows, nb, 64), _pack_q3_scales(p["sc"]), _u8(p["d"].astype(np.float16)[..., None])]
    else:
        raise ValueError(f"unknown block type {qw.type}")
    out = np.concatenate([a.reshape(rows, nb, -1) for a in parts], axis=-1)
    assert out.shape[-1] == t.nbytes, (qw.type, out.shape)
    return out.reshape(rows, nb * t.nbytes)
