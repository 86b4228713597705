"""The bnb format against bitsandbytes' own serialization (QuantState.as_dict) and transformers'
BitsAndBytesConfig; round trips on odd shapes."""
import json

import pytest
import torch

from quantize_llm.algorithms.nf4 import nf4_quantize
from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.qweight import NestedAbsmax
from quantize_llm.core.spec import QuantSpec
from quantize_llm.formats import format_for_config, get_format
from quantize_llm.formats.base import ConfigFacts
from quantize_llm.formats.bnb import BnbFormat
from quantize_llm.formats.gptq import GPTQFormat

F = pytest.importorskip("bitsandbytes.functional")


def spec(codebook: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> QuantSpec:
    return QuantSpec(method="nf4", format="bnb", codebook=codebook, blocksize=blocksize, double_quant=double_quant)


def bnb_tensors(w: torch.Tensor, codebook: str, blocksize: int, double_quant: bool) -> dict[str, torch.Tensor]:
    """What Linear4bit._save_to_state_dict writes for `w` (local names, `weight.` prefix)."""
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=codebook)
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,dtype,blocksize", [((64, 128), torch.bfloat16, 64), ((33, 65), torch.float32, 128),
                                                   ((576, 1536), torch.float16, 64)])
def test_encode_is_bitsandbytes_serialization(codebook, double_quant, shape, dtype, blocksize):
    """Same keys, dtypes, shapes and bytes (the JSON blob included) as bitsandbytes writes."""
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.04).to(dtype)
    got = BnbFormat.encode(nf4_quantize(w, spec(codebook, blocksize, double_quant)))
    want = bnb_tensors(w, codebook, blocksize, double_quant)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
    blob = json.loads(bytes(got[f"weight.quant_state.bitsandbytes__{codebook}"].tolist()))
    assert list(blob)[:4] == ["quant_type", "blocksize", "dtype", "shape"]
    assert blob["dtype"] == str(dtype).removeprefix("torch.") and blob["shape"] == list(shape)
    assert got["weight"].shape == ((shape[0] * shape[1] + 1) // 2, 1)


def test_blob_bytes_match_formats_md_example():
    """FORMATS.md §3.1 prints the blob of a [128, 256] bf16 NF4 weight: same separators and key order."""
    w = torch.randn(128, 256).to(torch.bfloat16)
    qw = nf4_quantize(w, spec())
    text = bytes(BnbFormat.encode(qw)["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    assert text == ('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 256], '
                    f'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {qw.scale.offset!r}}}')


@pytest.mark.parametrize("codebook,double_quant,shape", [("nf4", True, (33, 65)), ("fp4", False, (7, 9)),
                                                         ("nf4", False, (1, 1)), ("fp4", True, (300, 70))])
def test_round_trip(codebook, double_quant, shape):
    qw = nf4_quantize(torch.randn(shape), spec(codebook, 64, double_quant))
    back = BnbFormat.decode(BnbFormat.encode(qw), {"quant_method": "bitsandbytes"})
    assert torch.equal(back.codes, qw.codes) and back.spec.codebook == codebook
    assert back.spec.double_quant == double_quant and back.source_dtype == torch.float32
    if double_quant:
        assert isinstance(back.scale, NestedAbsmax)
        for field in ("codes", "absmax", "code_map"):
            assert torch.equal(getattr(back.scale, field), getattr(qw.scale, field))
        assert back.scale.offset == qw.scale.offset
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_decode_reads_what_bitsandbytes_writes(double_quant):
    """Decoding bitsandbytes' own tensors gives the weight bitsandbytes dequantizes (a width that is
    a multiple of the block size, where its CPU reader is right)."""
    w = torch.randn(40, 128) * 0.1
    tensors = bnb_tensors(w, "nf4", 64, double_quant)
    qw = BnbFormat.decode(tensors, {"quant_method": "bitsandbytes"})
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(qw.dequantize(), F.dequantize_4bit(packed, state))


def test_decode_refuses_inconsistent_tensors():
    tensors = BnbFormat.encode(nf4_quantize(torch.randn(8, 64), spec()))
    bad_map = dict(tensors, **{"weight.quant_map": tensors["weight.quant_map"].flip(0)})
    with pytest.raises(ValueError, match="quant_map"):
        BnbFormat.decode(bad_map, {})
    two = dict(tensors, **{"weight.quant_state.bitsandbytes__fp4": tensors["weight.quant_state.bitsandbytes__nf4"]})
    with pytest.raises(ValueError, match="exactly one"):
        BnbFormat.decode(two, {})
    renamed = {("weight.quant_state.bitsandbytes__fp4" if "quant_state" in k else k): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match="does not match"):
        BnbFormat.decode(renamed, {})
    short = dict(tensors, weight=tensors["weight"][:-1])
    with pytest.raises(ValueError, match="bytes cannot hold"):
        BnbFormat.decode(short, {})


@pytest.mark.parametrize("codebook,double_quant,dtype", [("nf4", True, "bfloat16"), ("fp4", False, None)])
def test_quantization_config_is_transformers_own(codebook, double_quant, dtype):
    from transformers import BitsAndBytesConfig

    want = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=codebook, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, dtype or "float32"),
                              llm_int8_skip_modules=["lm_head"]).to_dict()
    got = BnbFormat.quantization_config(ConfigFacts(spec(codebook, 64, double_quant), [], meta={"method": "nf4"},
                                                    dense_modules=["lm_head"], dtype=dtype))
    assert got.pop("meta") == {"method": "nf4"}
    assert got == want
    assert format_for_config(got) is BnbFormat and get_format("bnb") is BnbFormat


def test_formats_refuse_each_others_specs():
    assert "integer grids" in BnbFormat.supports(QuantSpec(method="rtn", format="bnb"))
    assert "nf4" in GPTQFormat.supports(spec())
    assert BnbFormat.supports(spec("fp4")) is None
    with pytest.raises(ValueError):
        BnbFormat.encode(rtn_quantize(torch.randn(32, 32), QuantSpec(group_size=32)))
