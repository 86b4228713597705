"""RTN results against a float64 reference of FORMATS.md §1.3 (tests/reference.py)."""
import pytest
import torch
from reference import dequant_f64, minmax_f64, rtn_f64

from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.primitives import default_g_idx
from quantize_llm.core.spec import QuantSpec
from quantize_llm.errors import SpecError


def near_tie(quot: torch.Tensor) -> torch.Tensor:
    """Where w/scale lies within float32 rounding of a .5 boundary (fp32 vs fp64 may round apart)."""
    frac = quot - torch.floor(quot)
    return (frac - 0.5).abs() < 1e-5 * quot.abs().clamp(min=1)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 32, False), (3, 64, False),
                                                 (2, 32, True), (8, -1, True), (8, 128, False),
                                                 (4, 80, False), (3, 48, True)])
def test_rtn_matches_float64_reference(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = (torch.randn(48, 160) * 0.05).to(torch.bfloat16)          # 160 % 80 != 0 etc: partial groups
    w[3, :40] = 0.0                                                # an all-zero group
    w[5, :] = w[5, :].abs()                                        # an all-positive row (asym zero 0 -> 1)
    min_zero = 0 if sym else 1
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, min_zero=min_zero)
    got = rtn_quantize(w, spec)
    codes, scale, zero, quot = rtn_f64(w, bits, group_size, sym, min_zero)
    assert got.scale.dtype == torch.float16 and got.codes.dtype == torch.uint8
    assert torch.equal(got.scale.double(), scale)
    assert torch.equal(got.zero.long(), zero)
    differ = got.codes.long() != codes
    assert not (differ & ~near_tie(quot)).any()
    assert differ.float().mean() < 1e-3
    ref = dequant_f64(codes, scale, zero, default_g_idx(160, group_size))
    close = ~differ
    assert torch.equal(got.dequantize(torch.float64)[close], ref[close])
    assert int(got.zero.min()) >= min_zero


def test_partial_last_group_uses_only_its_columns():
    w = torch.zeros(32, 96)
    w[:, :64] = 0.01
    w[:, 64:] = torch.linspace(-8, 8, 32)                          # the partial group (32 of 64)
    got = rtn_quantize(w, QuantSpec(bits=4, group_size=64, sym=True))
    assert got.scale.shape == (32, 2)
    assert torch.allclose(got.scale[:, 1].float(), torch.full((32,), 16 / 15), rtol=1e-3)
    assert torch.allclose(got.scale[:, 0].float(), torch.full((32,), 0.02 / 15), rtol=1e-3)


def test_sym_worked_example():
    w = torch.tensor([[-0.11, 0.3] + [0.0] * 30])
    got = rtn_quantize(w, QuantSpec(bits=4, group_size=32, sym=True))
    assert int(got.zero[0, 0]) == 8
    assert int(got.codes[0, 0]) == 5 and abs(float(got.dequantize()[0, 0]) + 0.12) < 1e-4


def test_all_zero_weight_dequantizes_to_zero():
    got = rtn_quantize(torch.zeros(32, 64), QuantSpec(bits=4, group_size=32, sym=False, min_zero=1))
    assert torch.equal(got.dequantize(), torch.zeros(32, 64))


@pytest.mark.parametrize("kwargs,needle", [({"bits": 5}, "--bits 5"), ({"group_size": 0}, "--group-size 0"),
                                           ({"group_size": -2}, "--group-size -2"),
                                           ({"keep_dense": ("(",)}, "regular expression")])
def test_bad_specs_are_refused(kwargs, needle):
    with pytest.raises(SpecError, match=needle.replace("(", r"\(")):
        QuantSpec(**kwargs)


def test_spec_round_trips_and_rejects_unknown_keys():
    spec = QuantSpec(bits=3, group_size=64, sym=False, keep_dense=("lm_head",))
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="unknown setting"):
        QuantSpec.from_dict({"bits": 4, "groupsize": 128})


def test_mse_clip_search_matches_brute_force_and_never_loses_to_minmax():
    from quantize_llm.core.primitives import mse_params

    torch.manual_seed(3)
    w = torch.randn(16, 64) * 0.05
    w[0, 0] = 1.0                                                  # an outlier that min-max must cover
    s, z = mse_params(w, 3, False, 1)
    def err(scale, zero, row):
        sc, zr = scale.double(), zero.double()
        q = torch.clamp(torch.round(w[row].double() / sc) + zr, 0, 7)
        return float(((sc * (q - zr) - w[row].double()) ** 2).sum())
    for row in range(16):
        best = None
        for i in range(0, 81):                                     # brute force over the same grid
            p = 1 - i / 100
            lo = torch.tensor([[float(w[row].min().clamp(max=0)) * p, float(w[row].max().clamp(min=0)) * p]])
            ts, tz = minmax_f64(lo.double(), 3, False, 1)          # the reference's scale and zero
            e = err(ts[0], tz[0], row)
            if best is None or e < best - 1e-12:
                best = e
        assert err(s[row], z[row], row) == pytest.approx(best, rel=1e-5)
        ms, mz = minmax_f64(w[row:row + 1].double(), 3, False, 1)
        assert err(s[row], z[row], row) <= err(ms[0], mz[0], row) + 1e-12
