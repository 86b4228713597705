"""The AutoAWQ GEMM layout against FORMATS.md §2, decoded by a reader written from the spec."""
from __future__ import annotations

import pytest
import torch

from quantize_llm.core.packing import pack_awq, unpack_awq
from quantize_llm.core.qweight import QuantizedWeight
from quantize_llm.core.spec import MethodRecord, QuantSpec
from quantize_llm.formats.awq import AWQFormat
from quantize_llm.formats.base import ConfigFacts

REV = [0, 4, 1, 5, 2, 6, 3, 7]     # FORMATS.md §2.3: column 8j + m lives in nibble REV[m]


def spec_decode(tensors: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """W (out, in) in float64 from qweight/qzeros/scales, one nibble at a time, as §2.3 states it."""
    qweight, qzeros, scales = (tensors[k] for k in ("qweight", "qzeros", "scales"))
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8

    def nibble(words: torch.Tensor, col: int) -> torch.Tensor:
        word = words[:, col // 8].to(torch.int64) & 0xFFFFFFFF
        return (word >> (4 * REV[col % 8])) & 0xF

    w = torch.empty(in_features, out_features, dtype=torch.float64)
    for c in range(out_features):
        q = nibble(qweight, c).double()                                    # (in,)
        z = nibble(qzeros, c).double()                                     # (G,)
        s = scales[:, c].double()                                          # (G,)
        g = torch.arange(in_features) // group_size
        w[:, c] = (q - z[g]) * s[g]
    return w.t()


def test_worked_example() -> None:
    codes = torch.tensor([[4, 4, 4, 4, 7, 6, 6, 4]], dtype=torch.uint8)
    word = pack_awq(codes)
    assert word.shape == (1, 1)
    assert int(word[0, 0]) & 0xFFFFFFFF == 0x46446744
    assert torch.equal(unpack_awq(word), codes)


def test_pack_round_trip_uses_every_bit() -> None:
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    codes[0, :8] = 15                                                      # sign bit of the int32 word set
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)
    assert int(pack_awq(codes)[0, 0]) == -1


def random_result(out_features: int = 48, in_features: int = 256, group_size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    return QuantizedWeight(
        codes=torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=g),
        scale=(torch.rand(out_features, n_groups, generator=g) * 0.01 + 1e-3).half(),
        zero=torch.randint(0, 16, (out_features, n_groups), dtype=torch.int32, generator=g),
        g_idx=None, spec=QuantSpec(method="awq", bits=4, group_size=group_size, sym=False, format="awq"))


def test_encode_matches_the_spec_decoder_and_round_trips() -> None:
    qw = random_result()
    tensors = AWQFormat.encode(qw)
    assert tensors["qweight"].shape == (256, 6) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (4, 6) and tensors["scales"].shape == (4, 48)
    assert tensors["scales"].dtype == torch.float16
    torch.testing.assert_close(spec_decode(tensors, 64), qw.dequantize(torch.float64), rtol=0, atol=0)
    config = AWQFormat.quantization_config(ConfigFacts(qw.spec, []))
    back = AWQFormat.decode(tensors, config)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale) and back.g_idx is None


def test_zeros_are_raw_not_minus_one() -> None:
    qw = random_result()
    qw.zero.zero_()                                                        # a zero of 0 is storable here
    tensors = AWQFormat.encode(qw)
    assert int(tensors["qzeros"].abs().sum()) == 0


def test_config_has_the_keys_readers_need() -> None:
    spec = QuantSpec(method="awq", bits=4, group_size=128, sym=False, format="awq")
    config = AWQFormat.quantization_config(ConfigFacts(
        spec, [], meta={"method": "awq"}, record=MethodRecord(damp=0.01),
        dense_modules=["lm_head", "model.layers.0.mlp.down_proj"]))
    assert config == {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm",
                      "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"],
                      "meta": {"method": "awq"}}


@pytest.mark.parametrize("changes, message", [
    ({"bits": 3}, "4-bit codes only"), ({"bits": 8}, "4-bit codes only"),
    ({"group_size": -1}, "need a group size"), ({"act_order": True}, "act-order"),
])
def test_unsupported_specs_are_refused(changes: dict, message: str) -> None:
    spec = QuantSpec(method="awq", format="awq").replace(**changes)
    assert message in AWQFormat.supports(spec)


def test_shape_checks() -> None:
    spec = QuantSpec(method="awq", bits=4, group_size=128, format="awq")
    assert "multiple of the group size" in AWQFormat.check_shape(spec, 576, 576)
    assert "multiple of 8" in AWQFormat.check_shape(spec, 100, 256)
    assert AWQFormat.check_shape(spec, 1536, 512) is None


def test_decode_refuses_other_versions() -> None:
    tensors = AWQFormat.encode(random_result())
    with pytest.raises(ValueError, match="gemv"):
        AWQFormat.decode(tensors, {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemv"})
