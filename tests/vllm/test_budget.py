"""A size-budget allocation (--target-bpw) served by vLLM: per-module settings written as GPTQ
`dynamic` overrides, which vLLM must apply module by module (its merged q/k/v and gate/up
included), holding exactly our weights."""
from __future__ import annotations

import json

import pytest
from vllm_support import compare_weights, mean_abs, ours, record, transformers_unquantized

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("target", [4.5, 4.7])
def test_an_allocated_checkpoint_is_served(target, quantized, serve, vllm_tiny):
    folder = quantized("llama", method="rtn", target_bpw=target, strict_vllm=True)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    settings = {(o.get("bits", config["bits"]), o.get("group_size", config["group_size"]))
                for o in config.get("dynamic", {}).values()} | {(config["bits"], config["group_size"])}
    assert len(settings) > 1, config   # the budget mixed settings
    served = serve(folder)
    assert compare_weights(served, folder) > 0
    got, want = served.logprobs, ours(folder)
    moved = mean_abs(want, transformers_unquantized(vllm_tiny("llama")))
    diff = mean_abs(got, want)
    record(test="budget", target_bpw=target, vllm_vs_ours=diff, quantization=moved)
    assert diff < 0.25 * moved, (diff, moved)
