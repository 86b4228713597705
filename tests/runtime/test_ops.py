"""The dequant_matmul op and QuantLinear against a float64 decoder written here from FORMATS.md §1."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.spec import QuantSpec
from quantize_llm.runtime.ops import kernel_status
from quantize_llm.runtime.qlinear import QuantLinear

op = torch.ops.quantize_llm.dequant_matmul

# FORMATS.md §1.4 table: v2 (true-zero) words of a symmetric zero 2^(bits-1), read as uint32;
# a block of 32 zeros takes `bits` words.
SYM_ZERO_WORDS = {2: [0xAAAAAAAA] * 2, 3: [0x24924924, 0x49249249, 0x92492492],
                  4: [0x88888888] * 4, 8: [0x80808080] * 8}


def decode_column(words: list[int], bits: int, n: int) -> list[int]:
    """§1.4: every 32 codes are a 32*bits-bit little-endian string cut into `bits` words."""
    codes = []
    for block in range(0, len(words), bits):
        string = sum((w & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(words[block:block + bits]))
        codes += [(string >> (k * bits)) & ((1 << bits) - 1) for k in range(32)]
    return codes[:n]


def decode(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Packed int32 along `dim` -> int64 codes with `n` entries along `dim`."""
    p = packed if dim == 0 else packed.t()
    cols = [decode_column(p[:, c].tolist(), bits, n) for c in range(p.shape[1])]
    codes = torch.tensor(cols, dtype=torch.int64).t()                    # (n, m)
    return codes if dim == 0 else codes.t()


def reference_weight(qweight, scales, qzeros, g_idx, bits: int) -> torch.Tensor:
    """W (out, in) float64: w[o, i] = scales[g, o] * (q[i, o] - z[g, o]) with g = g_idx[i]."""
    in_features, out_features = g_idx.numel(), qweight.shape[1]
    q = decode(qweight, bits, in_features, 0)                            # (in, out)
    z = decode(qzeros, bits, out_features, 1)                            # (G, out)
    g = g_idx.long()
    return ((q - z[g]).double() * scales.double()[g]).t()                # (out, in)


def test_reference_decoder_matches_the_worked_examples() -> None:
    assert decode_column([0x6BAF77A8], 4, 8) == [8, 10, 7, 7, 15, 10, 11, 6]
    assert decode_column([0x88FAC688, 0xC688FAC6, 0xFAC688FA], 3, 32) == [k % 8 for k in range(32)]
    for bits, words in SYM_ZERO_WORDS.items():
        assert set(decode_column(words, bits, 32)) == {2 ** (bits - 1)}


def random_words(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-2 ** 31, 2 ** 31, shape, generator=gen, dtype=torch.int64).to(torch.int32)


def make_args(bits: int, group_size: int, sym: bool, act_order: bool, in_features: int = 128,
              out_features: int = 64, seed: int = 0):
    """Random packed tensors in the runtime layout (random bits: any word is a valid code)."""
    gen = torch.Generator().manual_seed(seed)
    gs = in_features if group_size == -1 else group_size
    n_groups = in_features // gs
    qweight = random_words((in_features * bits // 32, out_features), gen)
    if sym:
        words = torch.tensor(SYM_ZERO_WORDS[bits], dtype=torch.int64)      # one block of 32
        words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)       # as int32 bits
        qzeros = words.repeat(n_groups, out_features // 32).to(torch.int32)
    else:
        qzeros = random_words((n_groups, out_features * bits // 32), gen)
    scales = (torch.rand(n_groups, out_features, generator=gen) * 0.05 + 0.005).half()
    g_idx = torch.arange(in_features) // gs
    if act_order:  # FORMATS.md §1.6: g_idx = (arange(in) // gs)[invperm]
        perm = torch.randperm(in_features, generator=gen)
        g_idx = g_idx[torch.argsort(perm)]
    x = torch.randn(5, in_features, generator=gen)
    return x, qweight, scales, qzeros, g_idx.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_op_matches_float64_reference(bits: int, group_size: int, sym: bool) -> None:
    x, qweight, scales, qzeros, g_idx = make_args(bits, group_size, sym, act_order=group_size != -1)
    want = x.double() @ reference_weight(qweight, scales, qzeros, g_idx, bits).t()
    got = op(x, qweight, scales, qzeros, g_idx, bits, group_size)
    assert got.dtype == torch.float32 and got.shape == (5, 64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    got64 = op(x.double(), qweight, scales, qzeros, g_idx, bits, group_size)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    x, qweight, scales, qzeros, g_idx = make_args(4, 32, False, act_order=True)
    x = x.to(dtype)
    want = x.double() @ reference_weight(qweight, scales, qzeros, g_idx, 4).t()
    got = op(x, qweight, scales, qzeros, g_idx, 4, 32)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=1e-2, atol=1e-2)


def test_fake_registration() -> None:
    args = make_args(3, 32, False, act_order=True)
    if hasattr(torch.library, "opcheck"):
        torch.library.opcheck(op.default, (*args, 3, 32))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        out = op(*fake, 3, 32)
    assert out.shape == (5, 64) and out.dtype == torch.float32


@pytest.mark.parametrize("change, message", [
    (dict(bits=5), "bits must be one of"),
    (dict(group_size=0), "group_size"),
    (dict(qweight=lambda a: a[:-1]), "qweight"),
    (dict(qweight=lambda a: a.long()), "qweight must be a 2-D int32"),
    (dict(qzeros=lambda a: a[:, :-1]), "qzeros"),
    (dict(scales=lambda a: a[:, :-1]), "scales"),
    (dict(g_idx=lambda a: a[:-1]), "g_idx"),
    (dict(x=lambda a: a[None]), "x must be a 2-D float"),
])
def test_bad_arguments_raise(change: dict, message: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    names = ("x", "qweight", "scales", "qzeros", "g_idx")
    args = dict(zip(names, make_args(4, 32, False, act_order=False), strict=True), bits=4, group_size=32)
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(ValueError, match=message):
        op(*args.values())
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=message):
        op(*[mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args.values()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: tests/runtime/test_cuda.py")
def test_kernel_status_says_why_there_is_no_kernel() -> None:
    status = kernel_status()
    assert not status.available
    assert status.reason in (f"this torch build ({torch.__version__}) has no CUDA support", "no CUDA GPU is visible")


@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, False), (3, -1, True), (8, 64, False)])
def test_quantlinear_matches_the_dequantized_linear(bits: int, group_size: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen)
    qw = rtn_quantize(weight, QuantSpec(bits=bits, group_size=group_size, sym=sym,
                                        min_zero=0 if sym else 1))
    module = QuantLinear.from_quantized(qw, bias, torch.float32)
    assert (module.in_features, module.out_features, module.bits) == (128, 96, bits)
    assert f"bits={bits}" in repr(module) and f"group_size={group_size}" in repr(module)
    torch.testing.assert_close(module.dequantize_weight(), qw.dequantize(), rtol=0, atol=0)
    x = torch.randn(2, 3, 128, generator=gen)
    torch.testing.assert_close(module(x), F.linear(x, qw.dequantize(), bias), rtol=1e-5, atol=1e-5)


def test_quantlinear_act_order_and_zero_point_zero() -> None:
    """A true zero of 0 (unstorable in v1) and a permuted g_idx survive the runtime layout."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.rand(32, 64, generator=gen)          # all positive: asym zero rounds to 0
    perm = torch.randperm(64, generator=gen)
    qw = rtn_quantize(weight[:, perm], QuantSpec(bits=4, group_size=32, sym=False))
    assert int(qw.zero.min()) == 0
    inv = torch.argsort(perm)
    from quantize_llm.core.qweight import QuantizedWeight

    qw = QuantizedWeight(codes=qw.codes[:, inv], scale=qw.scale, zero=qw.zero,
                         g_idx=(torch.arange(64) // 32)[inv].to(torch.int32), spec=qw.spec)
    module = QuantLinear.from_quantized(qw, None, torch.float32)
    assert torch.equal(module.g_idx, torch.arange(64, dtype=torch.int32) // 32)      # stored sorted by group
    assert torch.equal(qw.g_idx[module.perm.long()], module.g_idx)
    torch.testing.assert_close(module.dequantize_weight(), qw.dequantize(), rtol=0, atol=0)
    x = torch.randn(4, 64, generator=gen)
    torch.testing.assert_close(module(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)
