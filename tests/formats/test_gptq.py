"""The GPTQ format: encode against an independent decoder written from FORMATS.md §1, and back."""
import pytest
import torch
from reference import decode_gptq

from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.spec import QuantSpec
from quantize_llm.formats.gptq import GPTQFormat


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 64, False), (3, 32, False),
                                                 (2, 32, True), (8, -1, True), (8, 32, False), (3, 48, True)])
def test_encode_matches_independent_decoder(bits, group_size, sym):
    torch.manual_seed(bits + group_size)
    w = torch.randn(32, 96) * 0.1
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=group_size, sym=sym, min_zero=0 if sym else 1))
    t = GPTQFormat.encode(qw)
    n_groups = qw.spec.n_groups(96)
    assert t["qweight"].shape == (96 * bits // 32, 32) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (n_groups, 32 * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (n_groups, 32) and t["scales"].dtype == torch.float16
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [i // (96 if group_size == -1 else group_size)
                                                                       for i in range(96)]
    want = decode_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert torch.equal(qw.dequantize(torch.float64), want)
    back = GPTQFormat.decode(t, {"bits": bits, "group_size": group_size, "sym": sym})
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale)


def test_sym_4bit_zero_words_are_0x77777777():
    qw = rtn_quantize(torch.randn(64, 64), QuantSpec(bits=4, group_size=32, sym=True))
    assert (GPTQFormat.encode(qw)["qzeros"] == 0x77777777).all()


def test_v2_and_v1_read_the_same_weight():
    qw = rtn_quantize(torch.randn(32, 64), QuantSpec(bits=4, group_size=32, sym=False, min_zero=1))
    t = GPTQFormat.encode(qw)
    v2 = dict(t, qzeros=GPTQFormat.encode(qw)["qzeros"] + 0x11111111)   # +1 per 4-bit field (no carry: fields <= 14)
    a = GPTQFormat.decode(t, {"bits": 4, "group_size": 32, "sym": False, "checkpoint_format": "gptq"})
    b = GPTQFormat.decode(v2, {"bits": 4, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"})
    assert torch.equal(a.dequantize(), b.dequantize())
    assert torch.equal(b.dequantize(torch.float64), decode_gptq(v2["qweight"], v2["qzeros"], v2["scales"],
                                                                v2["g_idx"], 4, v2=True))


def test_act_order_g_idx_is_honoured():
    torch.manual_seed(0)
    in_f, gs = 64, 16
    perm = torch.randperm(in_f)
    invperm = torch.argsort(perm)
    w = torch.randn(32, in_f)
    qp = rtn_quantize(w[:, perm], QuantSpec(bits=4, group_size=gs, sym=True))  # groups over permuted order
    g_idx = (torch.arange(in_f) // gs)[invperm].to(torch.int32)
    t = {"qweight": GPTQFormat.encode(qp)["qweight"], "scales": qp.scale.t().contiguous(),
         "qzeros": GPTQFormat.encode(qp)["qzeros"], "g_idx": g_idx}
    # codes must be stored in the original input order
    from quantize_llm.core.packing import pack_int32
    t["qweight"] = pack_int32(qp.codes[:, invperm].t().contiguous(), 4)
    back = GPTQFormat.decode(t, {"bits": 4, "group_size": gs, "sym": True, "desc_act": True})
    assert back.g_idx is not None
    assert torch.equal(back.dequantize(), qp.dequantize()[:, invperm])
    assert torch.equal(back.dequantize(torch.float64), decode_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, 4))


def test_encode_refuses_zero_zero_point():
    qw = rtn_quantize(torch.rand(32, 32), QuantSpec(bits=4, group_size=32, sym=False, min_zero=0))
    with pytest.raises(ValueError, match="zero point of 0"):
        GPTQFormat.encode(qw)


def test_shape_check():
    spec = QuantSpec()
    assert GPTQFormat.check_shape(spec, 64, 576) is None
    assert "multiples of 32" in GPTQFormat.check_shape(spec, 64, 100)


def test_dynamic_names_the_module_vllm_merges_when_its_parts_agree():
    """vLLM looks `dynamic` up under the merged name (qkv_proj, gate_up_proj): a rule for it is
    written where every part has the same own setting, none where they differ (which the vLLM
    preflight refuses)."""
    import re

    from quantize_llm.core.spec import MethodRecord
    from quantize_llm.formats.base import ConfigFacts
    from quantize_llm.formats.gptq import GPTQFormat
    from quantize_llm.formats.vllm import preflight

    spec = QuantSpec(method="gptq", bits=4, group_size=128)
    g32 = spec.replace(group_size=32)
    p = "model.layers.0."
    overrides = {p + "self_attn.q_proj": g32, p + "self_attn.k_proj": g32, p + "self_attn.v_proj": g32,
                 p + "mlp.gate_proj": g32, p + "mlp.up_proj": spec.replace(group_size=64)}
    config = GPTQFormat.quantization_config(ConfigFacts(spec, [], overrides=overrides, record=MethodRecord()))
    rules = config["dynamic"]

    def lookup(name):   # vLLM's get_dynamic_override: the first rule whose pattern matches
        return next((v for k, v in rules.items() if re.match(k.removeprefix("+:"), name)), None)
    assert lookup(p + "self_attn.qkv_proj") == {"bits": 4, "group_size": 32, "sym": True}
    assert lookup(p + "mlp.gate_up_proj") is None
    assert lookup(p + "self_attn.q_proj") == {"bits": 4, "group_size": 32, "sym": True}
    shapes = [(n, 256, 256, s) for n, s in overrides.items()]
    reasons = preflight(spec, "gptq", shapes)
    assert any(r.startswith(p + "mlp.gate_up_proj: vLLM runs gate_proj, up_proj as one module") for r in reasons)
    assert not any("qkv_proj" in r for r in reasons)
