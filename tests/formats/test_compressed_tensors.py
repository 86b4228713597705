"""compressed-tensors pack-quantized: FORMATS.md §4's worked examples, round trips, and stock
transformers + compressed-tensors loading our files on CPU to the same logits as our loader."""
from __future__ import annotations

import json

import pytest
import torch
from test_cli import cli, expect_error

from quantize_llm.core.qweight import QuantizedWeight
from quantize_llm.core.spec import QuantSpec
from quantize_llm.formats.base import ConfigFacts
from quantize_llm.formats.compressed_tensors import CompressedTensorsFormat as CT


def u32(x: torch.Tensor) -> int:
    return int(x) & 0xFFFFFFFF


def result(codes, zero, bits, sym, group_size=-1, scale=None):
    codes = torch.as_tensor(codes, dtype=torch.uint8)
    zero = torch.as_tensor(zero, dtype=torch.int32)
    scale = scale if scale is not None else torch.full(zero.shape, 0.01).half()
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, g_idx=None,
                           spec=QuantSpec(bits=bits, group_size=group_size, sym=sym, format="compressed-tensors"))


def test_worked_examples():
    signed4 = torch.tensor([[-8, -7, -1, 0, 1, 2, 6, 7]])
    t = CT.encode(result(signed4 + 8, [[8]], 4, True))
    assert t["weight_packed"].shape == (1, 1) and u32(t["weight_packed"][0, 0]) == 0xFEA98710
    assert t["weight_shape"].tolist() == [1, 8] and t["weight_shape"].dtype == torch.int64
    assert "weight_zero_point" not in t
    t = CT.encode(result(torch.tensor([[-128, -1, 0, 127]]) + 128, [[128]], 8, True))
    assert u32(t["weight_packed"][0, 0]) == 0xFF807F00
    zeros = (torch.arange(-8, 8) + 8).view(16, 1)                     # 16 output rows, one group
    t = CT.encode(result(torch.zeros(16, 8, dtype=torch.uint8), zeros, 4, False))
    assert t["weight_zero_point"].shape == (2, 1)
    assert [u32(w) for w in t["weight_zero_point"][:, 0]] == [0x76543210, 0xFEDCBA98]


@pytest.mark.parametrize("bits,sym,group_size", [(4, True, 32), (4, False, 32), (8, False, -1), (2, True, 16)])
def test_round_trip(bits, sym, group_size):
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 48, 64
    n_groups = 1 if group_size == -1 else in_f // group_size
    zero = torch.full((out_f, n_groups), 2 ** (bits - 1)) if sym else torch.randint(0, 2 ** bits, (out_f, n_groups), generator=g)
    qw = result(torch.randint(0, 2 ** bits, (out_f, in_f), generator=g), zero, bits, sym, group_size,
                (torch.rand(out_f, n_groups, generator=g) * 0.01 + 1e-3).half())
    spec = qw.spec
    config = CT.quantization_config(ConfigFacts(spec, [], dense_modules=["lm_head"]))
    back = CT.decode(CT.encode(qw), config)
    for field in ("codes", "scale", "zero"):
        assert torch.equal(getattr(back, field), getattr(qw, field)), field
    assert (back.spec.bits, back.spec.sym, back.spec.group_size) == (bits, sym, group_size)


def test_config_validates_with_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    for spec, group_size, strategy in ((QuantSpec(bits=4, group_size=128, sym=True), 128, "group"),
                                       (QuantSpec(bits=8, group_size=-1, sym=False), None, "channel")):
        config = CT.quantization_config(ConfigFacts(spec, [], meta={"x": 1}, dense_modules=["lm_head"]))
        assert config["ignore"] == ["lm_head"] and "meta" in config
        parsed = QuantizationConfig.model_validate({k: v for k, v in config.items() if k not in ("meta", "version", "sparsity_config", "transform_config")})
        assert parsed.format == "pack-quantized" and parsed.config_groups["group_0"].targets == ["Linear"]
        weights = parsed.config_groups["group_0"].weights
        assert (weights.num_bits, weights.symmetric) == (spec.bits, spec.sym)
        assert (weights.type, weights.group_size, weights.strategy) == ("int", group_size, strategy)


@pytest.mark.parametrize("spec, reason", [(QuantSpec(bits=3), "use 4 or 8 bits"),
                                          (QuantSpec(bits=4, act_order=True), "act-order groups cannot be stored")])
def test_unsupported_specs(spec, reason):
    assert reason in CT.supports(spec)
    assert CT.supports(spec.replace(bits=4, act_order=False)) is None


def test_shape_checks():
    assert "multiple of the group size" in CT.check_shape(QuantSpec(bits=4, group_size=128), 64, 576)
    assert CT.check_shape(QuantSpec(bits=4, group_size=64), 64, 576) is None


@pytest.mark.parametrize("args", [
    ["rtn", "--bits", 4, "--sym"],
    ["rtn", "--bits", 8, "--asym", "--group-size", -1],
    ["gptq", "--bits", 4, "--asym"],
    ["awq", "--bits", 4, "--sym"],
])
def test_transformers_loads_it_on_cpu(tiny_model, tmp_path, calib_file, args):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quantize_llm import load_quantized

    src = tiny_model("llama", dtype=torch.bfloat16)
    cal = ["--dataset", calib_file, "--nsamples", 4, "--seqlen", 32] if args[0] != "rtn" else []
    group = [] if "--group-size" in args else ["--group-size", 32]
    out = tmp_path / "ct"
    assert cli(*args[:1], src, "-o", out, *args[1:], *group, *cal, "--format", "compressed-tensors") == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    # transformers 5.23 + CT 0.20 need dequantize=True for asymmetric checkpoints (FORMATS.md §4.6 pitfall 8)
    kwargs = {} if "--sym" in args else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs).eval()
    ours = load_quantized(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=2e-5)
    assert cli("inspect", out) == 0


def test_cli_refuses_3_bits_before_touching_the_model(tmp_path, capsys):
    expect_error(capsys, ["rtn", tmp_path / "none", "-o", tmp_path / "o", "--bits", 3, "--format", "compressed-tensors"],
                 "use 4 or 8 bits")


RECIPE = """[[jobs]]
model = "{src}"
output = "{out}"
method = "rtn"
group_size = 32
format = "{fmt}"
[[jobs.overrides]]
match = 'mlp\\.up_proj$'
bits = 8
[[jobs.overrides]]
match = 'layers\\.1\\.self_attn\\.[qkv]_proj$'
group_size = -1
"""


def test_per_module_settings_are_config_groups_transformers_reads(tiny_model, tmp_path):
    """Overrides written as config groups of their own (q/k/v of block 1 also under vLLM's merged
    name): stock transformers + compressed-tensors loads the checkpoint to our logits, and every
    module holds what the gptq format holds for the same recipe."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from quantize_llm import load_quantized
    from quantize_llm.formats import module_qconfig

    src = tiny_model("llama", dtype=torch.bfloat16)
    for fmt in ("compressed-tensors", "gptq"):
        recipe = tmp_path / f"{fmt}.toml"
        recipe.write_text(RECIPE.format(src=src, out=tmp_path / fmt, fmt=fmt))
        assert cli("run", recipe) == 0
    out = tmp_path / "compressed-tensors"
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = qconfig["config_groups"]
    assert len(groups) == 3 and groups["group_0"]["targets"] == ["Linear"]
    targets = {t for g in groups.values() for t in g["targets"]}
    assert "model.layers.1.self_attn.qkv_proj" in targets and "model.layers.0.mlp.up_proj" in targets
    assert module_qconfig(qconfig, "model.layers.0.mlp.up_proj")["config_groups"].popitem()[1]["weights"][
        "num_bits"] == 8
    assert module_qconfig(qconfig, "model.layers.0.mlp.down_proj")["config_groups"] == {"group_0": groups["group_0"]}
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, same = load_quantized(out, dtype=torch.float32), load_quantized(tmp_path / "gptq", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=2e-5)
        torch.testing.assert_close(same(ids).logits, ours(ids).logits, rtol=0, atol=2e-5)
    assert cli("inspect", out) == 0
