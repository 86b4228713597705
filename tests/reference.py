"""Independent float64 / pure-Python references, and their test data, used only by tests.

Written from FORMATS.md's prose, not from the package's code: a different algorithm (Python
integers and bit strings) so that a bug in quantize_llm cannot hide in both.
"""
from __future__ import annotations

import math

import torch


def make_layer(out_features: int, in_features: int, tokens: int = 512, seed: int = 0):
    """Test data: a weight (out, in) and inputs X (tokens, in), correlated and with uneven channel
    scales, as calibration inputs are (the tests use X^T X as the Hessian)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features ** 0.5
    x = torch.randn(tokens, in_features, generator=g) @ (torch.eye(in_features) + 0.9 * mix)
    x = x * torch.linspace(0.2, 3.0, in_features)[torch.randperm(in_features, generator=g)]
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    return w, x


def minmax_f64(cols: torch.Tensor, bits: int, sym: bool, min_zero: int = 0):
    """Float64 min-max scale (rounded to float16 values) and zero per row, FORMATS.md §1.3."""
    maxq = 2 ** bits - 1
    xmin = torch.clamp(cols.min(dim=1).values, max=0)
    xmax = torch.clamp(cols.max(dim=1).values, min=0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1.0, 1.0
    if sym:
        s = 2 * torch.maximum(-xmin, xmax) / maxq
        z = torch.full_like(s, 2.0 ** (bits - 1))
    else:
        s = (xmax - xmin) / maxq
        z = torch.round(-xmin / s)
        low = z < min_zero
        z = z.clamp(min_zero, maxq)
        s = torch.where(low, xmax / (maxq - z), s)
    return s.to(torch.float16).double(), z


def rtn_f64(w: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int = 0):
    """Float64 RTN per FORMATS.md §1.3 with float16 scales and GPTQ-v1's minimum zero.

    Returns (codes int64 (out, in), scale float64 (out, G) holding float16 values,
    zero int64 (out, G), quotient float64 (out, in) = w / scale, for tie detection).
    """
    w = w.double()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    n_groups = math.ceil(in_f / gs)
    maxq = 2 ** bits - 1
    codes = torch.zeros(out_f, in_f, dtype=torch.int64)
    quot = torch.zeros(out_f, in_f, dtype=torch.float64)
    scale = torch.zeros(out_f, n_groups, dtype=torch.float64)
    zero = torch.zeros(out_f, n_groups, dtype=torch.int64)
    for g in range(n_groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        grp = w[:, cols]
        s16, z = minmax_f64(grp, bits, sym, min_zero)
        q = grp / s16[:, None]
        quot[:, cols] = q
        codes[:, cols] = torch.clamp(torch.round(q) + z[:, None], 0, maxq).long()
        scale[:, g], zero[:, g] = s16, z.long()
    return codes, scale, zero, quot


def dequant_f64(codes, scale, zero, g_idx) -> torch.Tensor:
    g = g_idx.long()
    return (codes.double() - zero[:, g].double()) * scale[:, g].double()


def unpack_column_bits(words: list[int], bits: int, n: int) -> list[int]:
    """FORMATS.md §1.4 read literally: each block of `bits` words is one little-endian bit string."""
    values = []
    for block in range(math.ceil(n / 32)):
        chunk = words[block * bits:(block + 1) * bits]
        string = 0
        for j, word in enumerate(chunk):
            string |= (word & 0xFFFFFFFF) << (32 * j)
        for k in range(32):
            if len(values) < n:
                values.append((string >> (k * bits)) & ((1 << bits) - 1))
    return values


def decode_gptq(qweight, qzeros, scales, g_idx, bits: int, v2: bool = False) -> torch.Tensor:
    """Float64 weight (out, in) from GPTQ tensors, per FORMATS.md §1.2-1.5, one column at a time."""
    rows, out_f = qweight.shape
    in_f = rows * 32 // bits
    n_groups = scales.shape[0]
    w = torch.zeros(out_f, in_f, dtype=torch.float64)
    zero_rows = [unpack_column_bits(qzeros[g].tolist(), bits, out_f) for g in range(n_groups)]
    for c in range(out_f):
        codes = unpack_column_bits(qweight[:, c].tolist(), bits, in_f)
        for i in range(in_f):
            g = int(g_idx[i])
            z = zero_rows[g][c] + (0 if v2 else 1)
            w[c, i] = float(scales[g, c]) * (codes[i] - z)
    return w


def gptq_f64(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool, *, min_zero: int = 0,
             damp: float = 0.01, act_order: bool = False, static_groups: bool = False, clip: str = "minmax",
             mask: torch.Tensor | None = None):
    """GPTQ one column at a time in float64, no lazy blocks (Frantar et al. 2023, Alg. 1).

    mask (out, in) bool: weights kept exactly (the outlier split): left out of their group's range,
    dequantized as their current (error-updated) value, and propagating no error.

    Group parameters: min-max of the group's current (error-updated) columns at its first column;
    with static groups, of the original columns. Returns (dequantized (out, in) float64 in the
    original column order, g_idx list).
    """
    W = w.double().clone()
    H = h.double().clone()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    maxq = 2 ** bits - 1

    def params(cols, weights=None):
        if clip in ("mse", "feedback"):   # brute force: every shrink 1, 0.99, ..., 0.2 of the range, weighted error
            best = None
            for i in range(81):
                p = 1 - i / 100
                lo = torch.clamp(cols.min(dim=1).values, max=0) * p
                hi = torch.clamp(cols.max(dim=1).values, min=0) * p
                s, z = minmax(torch.stack([lo, hi], dim=1))
                q = torch.clamp(torch.round(cols / s[:, None]) + z[:, None], 0, maxq)
                e = (((s[:, None] * (q - z[:, None]) - cols) ** 2) * weights).sum(dim=1)
                if best is None:
                    best = (e, s, z)
                else:
                    better = e < best[0]
                    best = (torch.where(better, e, best[0]), torch.where(better, s, best[1]),
                            torch.where(better, z, best[2]))
            return best[1], best[2]
        return minmax(cols)

    def minmax(cols):
        return minmax_f64(cols, bits, sym, min_zero)

    def feedback_choice(cols, u, s0, z0):
        """--clip feedback: per row, the mse choice or a range shrunk by 1, 0.975, ... 0.7,
        whichever costs least when the group's columns are rounded in order with full GPTQ
        updates inside the group (sum of squared (w - q) / U_jj); the first on a tie."""
        options = [(s0, z0)]
        for i in range(13):
            p = 1 - 0.025 * i
            lo = torch.clamp(cols.min(dim=1).values, max=0) * p
            hi = torch.clamp(cols.max(dim=1).values, min=0) * p
            options.append(minmax(torch.stack([lo, hi], dim=1)))
        best = None
        for s_c, z_c in options:
            work, cost = cols.clone(), torch.zeros(cols.shape[0], dtype=torch.float64)
            for k in range(cols.shape[1]):
                q = torch.clamp(torch.round(work[:, k] / s_c) + z_c, 0, maxq)
                err = (work[:, k] - s_c * (q - z_c)) / u[k, k]
                cost += err ** 2
                work[:, k:] -= err[:, None] * u[k, k:][None, :]
            if best is None:
                best = (cost, s_c, z_c)
            else:
                better = cost < best[0]
                best = (torch.where(better, cost, best[0]), torch.where(better, s_c, best[1]),
                        torch.where(better, z_c, best[2]))
        return best[1], best[2]

    M = torch.zeros_like(W, dtype=torch.bool) if mask is None else mask.clone()
    static = None
    if static_groups:
        static = [params(torch.where(M, 0.0, W)[:, g * gs:(g + 1) * gs]) for g in range(math.ceil(in_f / gs))]
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(in_f)
    W, H, M = W[:, perm], H[perm][:, perm], M[:, perm]
    hdiag = torch.diagonal(H).clone()
    H = H + damp * torch.diagonal(H).mean() * torch.eye(in_f, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    g_idx = [0] * in_f
    for j in range(in_f):
        if static_groups:
            g = int(perm[j]) // gs
            s, z = static[g]
        else:
            g = j // gs
            if j % gs == 0:
                s, z = params(torch.where(M[:, j:j + gs], 0.0, W[:, j:j + gs]), hdiag[j:j + gs])
                if clip == "feedback":
                    s, z = feedback_choice(W[:, j:j + gs], Hinv[j:j + gs, j:j + gs], s, z)
        g_idx[int(perm[j])] = g
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        Q[:, j] = torch.where(M[:, j], W[:, j], s * (q - z))
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
    return Q[:, torch.argsort(perm)], g_idx
