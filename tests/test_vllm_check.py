"""vLLM preflight: the reasons, and --strict-vllm turning them into errors before any work."""
from __future__ import annotations

import pytest
from test_cli import cli, expect_error

from quantize_llm.core.spec import QuantSpec
from quantize_llm.formats.vllm import preflight

BIG = [("model.layers.0.mlp.up_proj", 14336, 4096, None), ("model.layers.0.mlp.down_proj", 4096, 14336, None)]


def test_marlin_friendly_settings_pass():
    for fmt in ("gptq", "compressed-tensors"):
        assert preflight(QuantSpec(bits=4, group_size=128, sym=True), fmt, BIG) == []
    assert preflight(QuantSpec(bits=4, group_size=128, sym=False, format="awq"), "awq", BIG) == []
    assert preflight(QuantSpec(bits=8, group_size=-1, sym=True), "gptq", BIG) == []


@pytest.mark.parametrize("spec,fmt,needle", [
    (QuantSpec(bits=4, group_size=128, sym=False), "gptq", "use --sym for Marlin"),
    (QuantSpec(bits=3, group_size=128, sym=True), "gptq", "3-bit codes run on vLLM's slow gptq kernel"),
    (QuantSpec(bits=4, group_size=256, sym=True), "gptq", "group size 256 is not one of Marlin's"),
    (QuantSpec(bits=4, group_size=48, sym=True), "compressed-tensors", "not a multiple of the group size 48"),
    (QuantSpec(bits=4, group_size=128, sym=True), "outlier", "cannot load the outlier-split format"),
])
def test_reasons(spec, fmt, needle):
    assert any(needle in r for r in preflight(spec, fmt, BIG))


def test_odd_shapes_are_named():
    reasons = preflight(QuantSpec(bits=4, group_size=64, sym=True), "gptq", [("model.layers.3.mlp.up_proj", 1536, 576, None)])
    assert any("model.layers.3.mlp.up_proj" in r and "576" in r for r in reasons)


def test_overrides_are_checked_per_module():
    own = QuantSpec(bits=3, group_size=128, sym=True)
    reasons = preflight(QuantSpec(bits=4, group_size=128, sym=True), "gptq", [*BIG, ("m.down", 4096, 14336, own)])
    assert len(reasons) == 1 and "3-bit" in reasons[0]


def test_strict_vllm_refuses_before_any_work(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out", "--asym", "--group-size", 32, "--strict-vllm"],
                 "--strict-vllm: asymmetric GPTQ checkpoints run on vLLM's slow gptq kernel")
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert cli("rtn", src, "-o", tmp_path / "out", "--asym", "--group-size", 32) == 0
    assert "warning: vLLM: asymmetric GPTQ" in capsys.readouterr().err
