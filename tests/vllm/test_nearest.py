"""What the preflight names as the nearest servable setting is served by vLLM after `convert`.

asymmetric int4 in the GPTQ layout -> compressed-tensors (and AWQ), exactly; 3-bit GPTQ and 2-bit
compressed-tensors -> 4-bit by widening the codes, exactly. The converted checkpoint must give
vLLM the log-probabilities our loader gives for the source checkpoint.
"""
from __future__ import annotations

import pytest
from vllm_support import compare_weights, mean_abs, ours, record, transformers_unquantized

from quantize_llm.core.spec import QuantSpec
from quantize_llm.formats.vllm import preflight
from quantize_llm.run.convert import convert

pytestmark = pytest.mark.vllm

CASES = [
    # (source recipe keys, target format, bits for convert, a fragment of the preflight's advice)
    (dict(bits=4, group_size=32, sym=False), "compressed-tensors", None, "--format compressed-tensors"),
    (dict(bits=4, group_size=32, sym=False), "awq", None, "--format awq"),
    (dict(bits=3, group_size=32, sym=True), "gptq", 4, "--bits 4 --format gptq"),
    (dict(bits=2, group_size=32, sym=False, format="compressed-tensors"), "compressed-tensors", 4,
     "--bits 4 --format compressed-tensors"),
]


@pytest.mark.parametrize("keys,target,bits,advice", CASES, ids=lambda v: str(v))
def test_nearest_setting_is_served(keys, target, bits, advice, quantized, serve, vllm_tiny, tmp_path):
    source = quantized("llama", **keys)
    spec = QuantSpec(**keys)
    assert any(advice in r for r in preflight(spec, spec.format, [("m", 256, 128, None)]))
    out = tmp_path / "converted"
    convert(str(source), out, target, bits=bits)
    served = serve(out)
    assert compare_weights(served, out) == 2 * 4
    got, want = served.logprobs, ours(source)
    moved = mean_abs(want, transformers_unquantized(vllm_tiny("llama")))
    diff = mean_abs(got, want)
    record(test="nearest", source=f"{spec.format} {spec.bits}-bit {'sym' if spec.sym else 'asym'}",
           target=f"{target} {bits or spec.bits}-bit", vllm_vs_ours=diff, quantization=moved)
    assert diff < 0.25 * moved, (diff, moved)
