"""NF4/FP4 codes against bitsandbytes (run on the CPU), and GPTQ rounding onto the NF4 grid against
a float64 column-by-column reference."""
import re

import pytest
import torch
from reference import make_layer

from quantize_llm.algorithms.nf4 import NF4, NF4Options, nf4_gptq_quantize, nf4_quantize
from quantize_llm.core import nf4codes
from quantize_llm.core.packing import pack_nibbles, unpack_nibbles
from quantize_llm.core.qweight import NestedAbsmax, QuantizedWeight
from quantize_llm.core.spec import QuantSpec
from quantize_llm.errors import SpecError

F = pytest.importorskip("bitsandbytes.functional")


def spec(codebook: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> QuantSpec:
    return QuantSpec(method="nf4", format="bnb", codebook=codebook, blocksize=blocksize, double_quant=double_quant)


def test_tables_are_bitsandbytes_own():
    for codebook in ("nf4", "fp4"):
        assert torch.equal(nf4codes.code_table(codebook), F.get_4bit_type(codebook, device="cpu"))
    assert torch.equal(nf4codes.dynamic_map(), F.create_dynamic_map(signed=True))
    m = nf4codes.dynamic_map()   # FORMATS.md §3.3 anchors
    assert (m[0].item(), m[127].item(), m[255].item()) == (pytest.approx(-0.99296875), 0.0, 1.0)


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True), (128, False)])
@pytest.mark.parametrize("shape,dtype", [((48, 192), torch.float32), ((33, 65), torch.float32),
                                         ((7, 9), torch.bfloat16), ((96, 576), torch.float16),
                                         ((1, 5000), torch.float32)])
def test_bit_exact_with_bitsandbytes(codebook, blocksize, double_quant, shape, dtype):
    """Codes, absmax, nested absmax, offset and code map as quantize_4bit computes them on the CPU;
    (33, 65) and (7, 9) have odd element counts, and all but (48, 192) with blocksize 64 have
    blocks that cross rows or a partial last block."""
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w[0, : min(3, shape[1])] = 0.0                                      # exact zeros
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=codebook)
    qw = nf4_quantize(w, spec(codebook, blocksize, double_quant))
    pad = int(nf4codes.nearest_codes(torch.zeros(1), nf4codes.code_table(codebook)))
    assert torch.equal(pack_nibbles(qw.codes, pad), packed)
    if double_quant:
        assert isinstance(qw.scale, NestedAbsmax)
        assert torch.equal(qw.scale.codes, state.absmax)
        assert torch.equal(qw.scale.absmax, state.state2.absmax)
        assert qw.scale.offset == state.offset.item()
        assert torch.equal(qw.scale.code_map, state.state2.code)
    else:
        assert torch.equal(qw.scale, state.absmax)
    # and what bitsandbytes reads back, bit for bit. Its CPU dequantize_4bit kernel (0.50.2) indexes
    # absmax as row * (in // blocksize) + column // blocksize, which is only right when blocks do
    # not cross rows (the flat layout it writes, and its CUDA reader, make it a CPU bug); for the
    # other shapes, compare the absmax it decodes (odd widths would also torch.compile its fallback).
    if shape[1] % blocksize == 0:
        assert torch.equal(qw.dequantize(dtype), F.dequantize_4bit(packed, state))
    elif double_quant:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(qw.scale_tensor(), absmax)


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
def test_ties_and_special_blocks(codebook):
    """Values exactly on the decision thresholds (midpoints) and on the table entries, a block of
    zeros, a zero tail, negative zero: all encoded as bitsandbytes does."""
    table = nf4codes.code_table(codebook)
    ordered = table.sort().values
    mids = (ordered[:-1] + ordered[1:]) / 2
    row = torch.cat([torch.tensor([1.0]), mids, table, -mids, torch.tensor([-0.0, 0.0])])  # absmax 1
    w = torch.cat([row, torch.zeros(64), row * 0.37, torch.tensor([0.0, -0.0, 0.0])])
    w = torch.cat([w, torch.zeros(-w.numel() % 64 + 64 + 3)])           # an all-zero partial tail
    packed, state = F.quantize_4bit(w.view(1, -1), blocksize=64, compress_statistics=False, quant_type=codebook)
    codes, absmax = nf4codes.quantize_4bit(w.view(1, -1), codebook, 64)
    pad = int(nf4codes.nearest_codes(torch.zeros(1), table))
    assert torch.equal(pack_nibbles(codes, pad), packed) and torch.equal(absmax, state.absmax)
    assert absmax[-1].item() == pytest.approx(1e-38)                    # bnb floors a zero tail's absmax


def test_nested_statistics_follow_the_cpu_kernel_not_plain_nearest():
    """bitsandbytes' CPU kernel maps values to 65536 bins before choosing an entry of the dynamic
    map; near 0, where entries are closer than a bin, that is not the nearest entry."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=g).abs() * 0.02
    x = x - x.mean()
    codes, absmax = nf4codes.quantize_8bit_dynamic(x)
    want, state = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, want) and torch.equal(absmax, state.absmax)
    code_map = nf4codes.dynamic_map()
    scaled = x / absmax.repeat_interleave(256)
    nearest = (scaled[:, None] - code_map[None, :]).abs().argmin(dim=1)
    assert (nearest != codes.long()).any()                              # why a nearest search would fail


def test_double_quant_round_trip_error_is_bounded():
    """The dequantized absmax is within half a dynamic-map step plus one of the CPU kernel's 65536
    bins (times the nested absmax) of the exact one, plus float32 rounding; the weights
    themselves are coded with the exact absmax."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.03
    exact = nf4_quantize(w, spec(double_quant=False))
    nested = nf4_quantize(w, spec(double_quant=True))
    assert torch.equal(exact.codes, nested.codes)
    got, want = nested.scale_tensor(), exact.scale
    code_map = nf4codes.dynamic_map()
    gap = (code_map[1:] - code_map[:-1]).max()                          # widest step of the map
    step = gap / 2 + 2 / (nf4codes.LUT_SIZE - 1)
    bound = nested.scale.absmax.repeat_interleave(256)[: want.numel()] * step + 1e-6 * want.abs()
    assert torch.all((got - want).abs() <= bound)
    assert (got - want).abs().max() > 0                                 # it is lossy


def test_nibble_order_worked_example():
    """FORMATS.md §3.2: codes 10 then 2 pack into 0xA2; an odd count is padded."""
    packed = pack_nibbles(torch.tensor([10, 2, 15], dtype=torch.uint8), pad=7)
    assert packed.tolist() == [[0xA2], [0xF7]]
    assert unpack_nibbles(packed, 3).tolist() == [10, 2, 15]


def test_dequantize_rows_matches_dequantize():
    w = torch.randn(13, 37, generator=torch.Generator().manual_seed(2))  # blocks cross rows
    qw = nf4_quantize(w, spec(blocksize=64))
    full = qw.dequantize()
    for start, stop in ((0, 13), (3, 4), (5, 11), (12, 13)):
        assert torch.equal(qw.dequantize_rows(start, stop), full[start:stop])


def test_codebook_weight_needs_no_zero_and_the_right_absmax_count():
    qw = nf4_quantize(torch.randn(4, 40), spec(double_quant=False))
    with pytest.raises(ValueError):
        QuantizedWeight(qw.codes, qw.scale[:-1], None, None, qw.spec)
    with pytest.raises(ValueError):
        QuantizedWeight(qw.codes, qw.scale, torch.zeros(4, 1), None, qw.spec)
    with pytest.raises(ValueError):
        qw.group_index()


@pytest.mark.parametrize("kwargs,needle", [(dict(blocksize=100), "--blocksize 100.*64, 128"),
                                           (dict(codebook="int4"), "--quant-type int4.*nf4 or fp4"),
                                           (dict(codebook="nf4", bits=3), "--bits 3")])
def test_spec_refuses_bad_combinations(kwargs, needle):
    with pytest.raises(SpecError) as info:
        QuantSpec(method="nf4", format="bnb", **kwargs)
    assert re.search(needle, info.value.one_line())


def test_options_and_algorithm_checks():
    with pytest.raises(SpecError, match="--rounding"):
        NF4Options(rounding="stochastic")
    with pytest.raises(SpecError, match="--quant-type int"):
        NF4(QuantSpec(method="nf4"))
    assert NF4(spec(), NF4Options(rounding="gptq")).needs_calibration
    assert not NF4(spec()).needs_calibration


# ---- GPTQ rounding --------------------------------------------------------------------------------

def gptq_onto_grid_f64(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, table: torch.Tensor,
                       damp: float = 0.01) -> torch.Tensor:
    """Naive float64 GPTQ, one column at a time, onto the fixed grid table * scale (out, in).

    Independent of the implementation: explicit inverse, nearest entry by argmin over the table.
    """
    w, h, scale, table = w.double().clone(), h.double().clone(), scale.double(), table.double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)          # H^-1 = U^T U
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        s = scale[:, j]
        idx = (w[:, j, None] - table[None, :] * s[:, None]).abs().argmin(dim=1)
        q[:, j] = table[idx] * s
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return q


@pytest.mark.parametrize("codebook,blocksize,double_quant,in_features",
                         [("nf4", 64, True, 128), ("fp4", 64, False, 96), ("nf4", 128, True, 80)])
def test_gptq_rounding_matches_columnwise_reference(codebook, blocksize, double_quant, in_features):
    """in_features 80 with blocksize 128: blocks cross rows."""
    w, x = make_layer(24, in_features)
    h = x.double().t() @ x.double()
    s = spec(codebook, blocksize, double_quant)
    got, stats = nf4_gptq_quantize(w.double(), h, s, NF4Options(rounding="gptq", block_size=32))
    nearest = nf4_quantize(w, s)
    absmax = nearest.scale_tensor()                                      # the grid is fixed up front
    scale = absmax[torch.arange(w.numel()) // blocksize].view(w.shape)
    want = gptq_onto_grid_f64(w, h, scale, nf4codes.code_table(codebook))
    torch.testing.assert_close(got.dequantize(torch.float64), want, rtol=0, atol=1e-7)
    assert stats.damp == 0.01 and stats.dead_columns == 0
    # the stored statistics are exactly those of nearest rounding: only the codes differ
    if double_quant:
        assert torch.equal(got.scale.codes, nearest.scale.codes) and got.scale.offset == nearest.scale.offset
    else:
        assert torch.equal(got.scale, nearest.scale)
    assert not torch.equal(got.codes, nearest.codes)


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
def test_gptq_rounding_lowers_output_error(codebook):
    w, x = make_layer(64, 256)
    s = spec(codebook)
    g, _ = nf4_gptq_quantize(w, x.t() @ x, s, NF4Options(rounding="gptq"))
    r = nf4_quantize(w, s)
    ref = x @ w.t()
    err_g = torch.linalg.norm(x @ g.dequantize().t() - ref)
    err_r = torch.linalg.norm(x @ r.dequantize().t() - ref)
    assert err_g < 0.85 * err_r, (float(err_g), float(err_r))


def test_gptq_rounding_dead_columns_and_zero_blocks():
    w, x = make_layer(16, 128)
    x[:, 5] = 0                                                          # an input that never fires
    w[3, :64] = 0                                                        # one all-zero block: absmax 0
    qw, stats = nf4_gptq_quantize(w, x.t() @ x, spec(double_quant=False), NF4Options(rounding="gptq"))
    deq = qw.dequantize()
    assert stats.dead_columns == 1 and torch.all(deq[:, 5] == 0) and torch.all(deq[3, :64] == 0)
    assert torch.isfinite(deq).all()
