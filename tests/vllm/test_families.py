"""A tiny model of each family this package quantizes, written as GPTQ int4 and served by vLLM.

vLLM's log-probabilities must match our loader's far more closely than quantization moves them
(transformers on the unquantized model), and the unquantized model must match transformers: the
second check separates a family vLLM implements differently from a checkpoint it misreads.
"""
from __future__ import annotations

import pytest
from vllm_support import compare_weights, mean_abs, ours, record, transformers_unquantized

pytestmark = pytest.mark.vllm

SERVED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt"]
RATIO = 0.25


@pytest.mark.parametrize("arch", SERVED)
def test_family_int4_agrees_with_our_loader(arch, quantized, serve, vllm_tiny):
    folder = quantized(arch, bits=4, group_size=32)
    served = serve(folder)
    assert compare_weights(served, folder) > 0
    got, want = served.logprobs, ours(folder)
    base = transformers_unquantized(vllm_tiny(arch))
    diff, moved = mean_abs(got, want), mean_abs(want, base)
    record(test="family", family=arch, vllm_vs_ours=diff, quantization=moved)
    assert diff < RATIO * moved, (diff, moved)


def test_unquantized_llama_agrees_with_transformers(serve, vllm_tiny):
    """The noise floor the figures above are read against: bfloat16 vLLM against float32 transformers."""
    folder = vllm_tiny("llama")
    diff = mean_abs(serve(folder).logprobs, transformers_unquantized(folder))
    record(test="floor", family="llama", vllm_vs_transformers=diff)
    assert diff < 0.05
