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
