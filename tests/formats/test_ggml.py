"""llama.cpp block types (core/ggml.py) checked against the `gguf` package, an independent reader:
every type's bytes dequantize there to what our dequantizer says, and the 32-weight types'
round-to-nearest is byte for byte gguf's reference quantizer (which reproduces ggml's)."""
from __future__ import annotations

import numpy as np
import pytest

from quantize_llm.core import ggml

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

ALL = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
REFERENCE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]     # gguf.quants quantizes these


def weights(rows: int = 48, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x[1, :64] = 0                      # an all-zero sub-block and a zero super-block
    x[2, 256:] = 0
    x[3, 7] = 2.5                      # an outlier
    x[4] = np.abs(x[4])                # a row with no negative weight (mins clamp to 0)
    x[5, :256] = -0.01                 # a constant negative super-block
    x[6] *= 1e-6                       # tiny values
    return x


@pytest.mark.parametrize("name", ALL)
def test_bytes_dequantize_in_gguf_to_our_dequantization(name):
    x = weights()
    qw = ggml.quantize_rtn(name, x)
    packed = qw.pack()
    t = ggml.TYPES[name]
    assert packed.shape == (x.shape[0], x.shape[1] // t.block * t.nbytes)
    theirs = quants.dequantize(packed, T[name])
    np.testing.assert_array_equal(theirs, qw.dequantize())
    assert qw.codes.min() >= t.lo and qw.codes.max() <= t.hi


@pytest.mark.parametrize("name", REFERENCE)
def test_round_to_nearest_is_the_reference_quantizer_byte_for_byte(name):
    for seed in range(3):
        x = weights(seed=seed)
        np.testing.assert_array_equal(ggml.quantize_rtn(name, x).pack(), quants.quantize(x, T[name]))


@pytest.mark.parametrize("name", ALL)
def test_affine_form_and_fixed_grid_rounding_agree_with_the_codes(name):
    """s*code + m is the dequantized value, and nearest rounding on the fixed grid keeps the
    k-quants' codes (their reference rounds onto the chosen grid as its last step)."""
    x = weights()
    qw = ggml.quantize_rtn(name, x)
    s, m = qw.affine()
    sub = ggml.TYPES[name].sub
    S, M = np.repeat(s, sub, axis=1), np.repeat(m, sub, axis=1)
    np.testing.assert_allclose(S * qw.codes + M, qw.dequantize(), rtol=1e-6, atol=1e-9)
    if name.endswith("_K"):
        again = ggml.round_to_grid(name, S, M, x)
        live = S != 0
        agree = (again == qw.codes)[live].mean()
        assert agree > 0.999, agree


@pytest.mark.parametrize("name", ALL)
def test_error_is_what_the_type_promises(name):
    x = weights()
    err = np.sqrt(((ggml.quantize_rtn(name, x).dequantize() - x)[7:] ** 2).mean())
    bound = {"Q8_0": 5e-4, "Q6_K": 2e-3, "Q5_K": 3e-3, "Q5_0": 3.5e-3, "Q5_1": 3e-3, "Q4_K": 5e-3,
             "Q4_0": 6e-3, "Q4_1": 6e-3, "Q3_K": 9e-3}[name]
    assert err < bound, err


def test_columns_must_fill_blocks():
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        ggml.quantize_rtn("Q4_K", np.zeros((2, 64), np.float32))


def _make_qkx2_scalar(xs, weights, nmax, rmin, rdelta, nstep):
    """llama.cpp's make_qkx2_quants one float32 operation at a time (ggml-quants.c), including
    that its `min` follows the best trial: (scale, -min)."""
    f = np.float32
    lo, hi, sum_w, sum_x = xs[0], xs[0], weights[0], f(weights[0] * xs[0])
    for i in range(1, len(xs)):
        lo, hi = min(lo, xs[i]), max(hi, xs[i])
        sum_w, sum_x = f(sum_w + weights[i]), f(sum_x + f(weights[i] * xs[i]))
    lo = min(lo, f(0))
    if hi == lo:
        return f(0), f(-lo)
    iscale = f(f(nmax) / f(hi - lo))
    scale = f(f(1) / iscale)
    codes = [max(0, min(nmax, int(np.rint(f(iscale * f(v - lo)))))) for v in xs]
    best = f(0)
    for v, w, c in zip(xs, weights, codes, strict=True):
        d = f(f(f(scale * f(c)) + lo) - v)
        best = f(best + f(w * f(d * d)))
    for step in range(nstep + 1):
        iscale = f(f(f(f(rmin) + f(f(rdelta) * f(step))) + f(nmax)) / f(hi - lo))
        trial = [max(0, min(nmax, int(np.rint(f(iscale * f(v - lo)))))) for v in xs]
        sl = sl2 = sxl = f(0)
        for v, w, c in zip(xs, weights, trial, strict=True):
            sl, sl2, sxl = f(sl + f(w * f(c))), f(sl2 + f(f(w * f(c)) * f(c))), f(sxl + f(f(w * f(c)) * v))
        d = f(f(sum_w * sl2) - f(sl * sl))
        if d > 0:
            this_scale, this_min = f(f(f(sum_w * sxl) - f(sum_x * sl)) / d), f(f(f(sl2 * sum_x) - f(sl * sxl)) / d)
            if this_min > 0:
                this_min, this_scale = f(0), f(sxl / sl2)
            cur = f(0)
            for v, w, c in zip(xs, weights, trial, strict=True):
                e = f(f(f(this_scale * f(c)) + this_min) - v)
                cur = f(cur + f(w * f(e * e)))
            if cur < best:
                best, scale, lo = cur, this_scale, this_min
    return scale, f(-lo)


@pytest.mark.parametrize("nmax, rmin, nstep", [(15, -1.0, 20), (31, -0.5, 15)])   # Q4_K, Q5_K
def test_k_quant_scale_search_follows_llama_cpps_loop(nmax, rmin, nstep):
    """The sub-block search (scale and min) against a scalar transliteration of llama.cpp's loop,
    whose min moves to the best trial's (at Q5_K that quirk changed 0.8% of one SmolLM2 matrix's
    bytes before it was followed)."""
    g = np.random.default_rng(nmax)
    x = (g.standard_normal((64, 32)) * g.uniform(0.01, 0.1, (64, 1)) + g.uniform(-0.05, 0.02, (64, 1)))
    x = x.astype(np.float32)
    b = x[:, None, :]
    weights = (np.sqrt(ggml._seqsum(b * b) / np.float32(32))[..., None] + np.abs(b)).astype(np.float32)
    scale, the_min, _ = ggml._make_qkx2(b, weights, nmax, rmin, 0.1, nstep)
    for r in range(64):
        want = _make_qkx2_scalar(list(x[r]), list(weights[r, 0]), nmax, rmin, np.float32(0.1), nstep)
        assert (scale[r, 0], the_min[r, 0]) == want, r
