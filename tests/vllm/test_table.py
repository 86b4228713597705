"""Every row of the vLLM table (quantize_llm/formats/vllm.py) against vLLM 0.32 on this CPU.

For each rule, the checkpoint its `example` describes is written for a tiny Llama and loaded into
vLLM's LLM. A rule whose CPU cell names a kernel must load, use that kernel, hold exactly our
weights after vLLM's repacking (read independently, conftest.cpu_wna16_dequantize) and give the
log-probabilities of our loader, far closer than quantization moves them. A rule whose CPU cell
says refused must make vLLM refuse it, for the reason the test names.
"""
from __future__ import annotations

import re

import pytest
from vllm_support import compare_weights, cpu_gemm_wna16_reference, mean_abs, ours, record, transformers_unquantized

from quantize_llm.core.spec import QuantSpec
from quantize_llm.formats.vllm import REFUSED, RULES, preflight

pytestmark = pytest.mark.vllm

# What vLLM 0.32 says when it refuses each refused rule (a fragment of its exception text).
REFUSALS = {
    ("gptq", "8-bit sym, g -1/32/64/128"): "Marlin does not support weight_bits = uint8b128",
    ("gptq", "2/3-bit, any g"): "Unsupported quantization config: bits=3, sym=True",
    ("gptq", "4/8-bit asym, any g"): "Unsupported quantization config: bits=4, sym=False",
    ("gptq", "4/8-bit sym, g -1/32/64/128, act-order"): "desc_act=True) is no longer supported",
    ("gptq", "4/8-bit sym, other g"): "Marlin does not support group_size = 16",
    ("compressed-tensors", "8-bit sym, g -1/32/64/128"): "Failed to find a kernel",
    ("compressed-tensors", "8-bit asym, any g"): "Failed to find a kernel",
    ("compressed-tensors", "2-bit, any g"): "Failed to find a kernel",
    ("bnb", "NF4/FP4 codebooks"): "bitsandbytes",
    ("outlier", "any (float16 outliers)"): "quantize_llm_outlier",
}
# Logprob agreement: vLLM computes in bfloat16, our reference in float32; quantization must move
# the log-probabilities several times more than the two implementations differ.
RATIO = 0.25


def _id(rule) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{rule.format} {rule.settings}".lower()).strip("-")


@pytest.mark.parametrize("rule", RULES, ids=_id)
def test_rule(rule, quantized, serve, vllm_tiny, supplied_op):
    folder = quantized("llama", **rule.example)
    example = {k: v for k, v in rule.example.items() if k in ("bits", "group_size", "sym", "act_order")}
    if rule.cpu == REFUSED:
        with pytest.raises(Exception, match=re.escape(REFUSALS[(rule.format, rule.settings)])):
            serve(folder)
        return
    served = serve(folder)
    assert {t["_kernel"] for t in served.linears.values() if "_kernel" in t} >= {rule.cpu + "LinearKernel"}
    assert compare_weights(served, folder) == 2 * 4          # qkv, o, gate_up, down in each of two blocks
    if not supplied_op:                                      # vLLM's own kernel computes x @ (what we read).T
        check_kernel_against_reading(served.linears["model.layers.1.mlp.gate_up_proj"])
    got, want = served.logprobs, ours(folder)
    base = transformers_unquantized(vllm_tiny("llama"))
    diff, moved = mean_abs(got, want), mean_abs(want, base)
    record(test="table", format=rule.format, settings=rule.settings, vllm_vs_ours=diff, quantization=moved)
    assert diff < RATIO * moved, (diff, moved)
    # and the preflight has nothing to say about a checkpoint vLLM serves with Marlin on a GPU
    if rule.gpu == "Marlin":
        spec = QuantSpec(**{**example, "format": rule.format})
        assert preflight(spec, rule.format, [("m", 256, 128, None)]) == []


def check_kernel_against_reading(tensors: dict) -> None:
    """vLLM's `_C::cpu_gemm_wna16` on its own repacked tensors equals the reading the tests supply
    where that op is missing (to bfloat16 rounding of the float32 sums)."""
    import torch

    q = tensors.get("qweight", tensors.get("weight_packed"))
    s = tensors.get("scales", tensors.get("weight_scale"))
    z = tensors.get("qzeros", tensors.get("weight_zero_point"))
    x = torch.randn(5, q.shape[1] // 2, generator=torch.Generator().manual_seed(0)).bfloat16()
    got = torch.empty(5, s.shape[1], dtype=torch.bfloat16)
    torch.ops._C.cpu_gemm_wna16(x, q, got, s, z, None, 8, tensors["_isa_hint"])
    torch.testing.assert_close(got.float(), cpu_gemm_wna16_reference(x, q, s, z, None).float(),
                               rtol=1.6e-2, atol=1e-3)


def test_every_refusal_is_tested():
    refused = {(r.format, r.settings) for r in RULES if r.cpu == REFUSED}
    assert refused == set(REFUSALS)


def test_partial_last_group_is_refused_or_misread(quantized, serve):
    """vLLM sizes scales as in // group. Width 192 at group 128 in q/k/v: the merged module's loader
    asserts. Width 320 at group 128 in down_proj alone: vLLM loads 2 of the 3 groups of scales and
    its kernel spreads them over groups of 160, so the weights it holds are not ours."""
    merged = quantized("llama", model_config={"hidden_size": 192, "num_attention_heads": 6}, bits=4, group_size=128)
    with pytest.raises(AssertionError):
        serve(merged)
    single = quantized("llama", model_config={"intermediate_size": 320}, bits=4, group_size=128)
    with pytest.raises(AssertionError, match="max difference"):
        compare_weights(serve(single), single)
    spec = QuantSpec(bits=4, group_size=128)
    reasons = preflight(spec, "gptq", [("mlp.down_proj", 128, 320, None)])
    assert any("mlp.down_proj" in r and "320" in r and "wrong weights" in r for r in reasons)


def test_width_not_a_multiple_of_32_is_refused_on_cpu(quantized, serve):
    """intermediate 240: CPUWNA16 needs multiples of 32 and no other CPU kernel takes int4."""
    folder = quantized("llama", model_config={"intermediate_size": 240}, bits=4, group_size=16,
                       format="compressed-tensors")
    with pytest.raises(Exception, match="Failed to find a kernel"):
        serve(folder)
    spec = QuantSpec(bits=4, group_size=16, format="compressed-tensors")
    assert any("240" in r and "CPU" in r for r in preflight(spec, "compressed-tensors", [("up", 240, 128, None)]))
