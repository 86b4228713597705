"""Bit packing against FORMATS.md §1.4's worked examples and an independent bit-string reader."""
import pytest
import torch
from reference import unpack_column_bits

from quantize_llm.core.packing import pack_int32, unpack_int32


def u32(x: int) -> int:
    return x & 0xFFFFFFFF


def test_4bit_worked_example():
    codes = torch.tensor([8, 10, 7, 7, 15, 10, 11, 6], dtype=torch.uint8).view(8, 1)
    word = pack_int32(codes, 4)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert u32(int(word)) == 0x6BAF77A8 and int(word) == 1806661544


def test_3bit_worked_example_straddling_words():
    codes = (torch.arange(32) % 8).to(torch.uint8).view(32, 1)
    words = [u32(int(w)) for w in pack_int32(codes, 3)[:, 0]]
    assert words == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]


@pytest.mark.parametrize("bits,field,v1_words", [
    (2, 1, [0x55555555]), (3, 3, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]),
    (4, 7, [0x77777777]), (8, 127, [0x7F7F7F7F])])
def test_sym_v1_zero_words(bits, field, v1_words):
    zeros = torch.full((1, 64), field, dtype=torch.uint8)          # one group, 64 output columns
    words = [u32(int(w)) for w in pack_int32(zeros, bits, dim=1)[0]]
    assert len(words) == 64 * bits // 32
    assert words == v1_words * (len(words) // len(v1_words))       # the pattern repeats over every word


def test_8bit_negative_word_is_twos_complement():
    codes = torch.tensor([0, 0, 0, 0x80], dtype=torch.uint8).view(4, 1)
    assert int(pack_int32(codes, 8)) == -(2 ** 31)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 96])
def test_round_trip_and_independent_reader(bits, n):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (n, 5), dtype=torch.uint8)
    words = pack_int32(codes, bits)
    assert words.shape == (n * bits // 32, 5)
    assert torch.equal(unpack_int32(words, bits, n), codes)
    for c in range(5):
        assert unpack_column_bits(words[:, c].tolist(), bits, n) == codes[:, c].tolist()
    # along dim 1 (qzeros packs along out)
    t = codes.t().contiguous()
    assert torch.equal(pack_int32(t, bits, dim=1), words.t())
    assert torch.equal(unpack_int32(pack_int32(t, bits, dim=1), bits, n, dim=1), t)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError):
        pack_int32(torch.zeros(33, 1, dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        pack_int32(torch.zeros(7, 1, dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        unpack_int32(torch.zeros(3, 1, dtype=torch.int32), 4, 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_column_slices_gives_the_same_words(monkeypatch, bits):
    import quantize_llm.core.packing as packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (64, 37), generator=g, dtype=torch.int32).to(torch.uint8)
    whole = pack_int32(codes, bits, dim=0)
    monkeypatch.setattr(packing, "PACK_ELEMENTS", 64 * 5)               # 5 columns at a time, 8 slices
    assert torch.equal(pack_int32(codes, bits, dim=0), whole)
    assert torch.equal(unpack_int32(whole, bits, 64, dim=0), codes)
