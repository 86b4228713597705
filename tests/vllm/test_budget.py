"""A size-budget allocation (--target-bpw) served by vLLM: per-module settings written as GPTQ
`dynamic` overrides or compressed-tensors config groups, which vLLM must apply module by module
(its merged q/k/v and gate/up included), holding exactly our weights."""
from __future__ import annotations

import json

import pytest
from vllm_support import compare_weights, mean_abs, ours, record, transformers_unquantized

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("fmt, target", [("gptq", 4.5), ("gptq", 4.7), ("compressed-tensors", 4.5)])
def test_an_allocated_checkpoint_is_served(fmt, target, quantized, serve, vllm_tiny):
    folder = quantized("llama", method="rtn", target_bpw=target, strict_vllm=True, format=fmt)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        settings = {(o.get("bits", config["bits"]), o.get("group_size", config["group_size"]))
                    for o in config.get("dynamic", {}).values()} | {(config["bits"], config["group_size"])}
    else:
        settings = {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in config["config_groups"].values()}
    assert len(settings) > 1, config   # the budget mixed settings
    served = serve(folder)
    assert compare_weights(served, folder) > 0
    got, want = served.logprobs, ours(folder)
    moved = mean_abs(want, transformers_unquantized(vllm_tiny("llama")))
    diff = mean_abs(got, want)
    record(test="budget", format=fmt, target_bpw=target, vllm_vs_ours=diff, quantization=moved)
    assert diff < 0.25 * moved, (diff, moved)
