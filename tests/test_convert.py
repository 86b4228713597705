"""convert: exact re-encoding between formats, refused where the target cannot represent a module."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import cli, expect_error

GPTQ = ("qweight", "qzeros", "scales", "g_idx")


def logits(path, ids):
    from quantize_llm import load_quantized

    with torch.no_grad():
        return load_quantized(path, dtype=torch.float32)(ids).logits


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("via", ["awq", "compressed-tensors"])
def test_round_trip_through_another_format_is_exact(tiny_model, tmp_path, via):
    src = tiny_model("qwen2")                                     # q/k/v biases too
    assert cli("rtn", src, "-o", tmp_path / "gptq", "--bits", 4, "--group-size", 32, "--sym") == 0
    assert cli("convert", tmp_path / "gptq", "-o", tmp_path / "mid", "--format", via) == 0
    assert cli("convert", tmp_path / "mid", "-o", tmp_path / "back", "--format", "gptq") == 0
    a, b = load_file(tmp_path / "gptq" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    torch.testing.assert_close(logits(tmp_path / "mid", IDS), logits(tmp_path / "gptq", IDS), rtol=0, atol=0)
    qconfig = json.loads((tmp_path / "mid" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == ("awq" if via == "awq" else "compressed-tensors")
    assert qconfig["meta"]["converted"]["from"] == "gptq"
    assert "## Conversion" in (tmp_path / "mid" / "README.md").read_text()


def test_a_gptq_v2_checkpoint_from_another_tool(tiny_model, tmp_path):
    """Another tool's v2 zeros (stored as is) convert to our v1 files exactly."""
    src = tiny_model("llama")
    assert cli("rtn", src, "-o", tmp_path / "v1", "--bits", 4, "--group-size", 32, "--asym") == 0
    v2 = tmp_path / "v2"
    v2.mkdir()
    tensors = load_file(tmp_path / "v1" / "model.safetensors")
    from quantize_llm.core.packing import pack_int32, unpack_int32

    for name in [n for n in tensors if n.endswith(".qzeros")]:
        out_f = tensors[name.replace("qzeros", "scales")].shape[1]
        zeros = unpack_int32(tensors[name], 4, out_f, dim=1).to(torch.int32) + 1     # v1 field + 1 = true zero
        tensors[name] = pack_int32(zeros.to(torch.uint8), 4, dim=1)
    save_file(tensors, v2 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = config["quantization_config"]["format"] = "gptq_v2"
    (v2 / "config.json").write_text(json.dumps(config))
    assert cli("convert", v2, "-o", tmp_path / "out", "--format", "gptq") == 0
    a, b = load_file(tmp_path / "v1" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("make,target,needle", [
    (["rtn", "--bits", 3, "--group-size", 32], "awq", "4-bit codes only"),
    (["rtn", "--bits", 4, "--group-size", 32, "--asym"], "compressed-tensors", None),
    (["nf4"], "gptq", "integer grids"),
    (["outlier", "--bits", 4, "--group-size", 32, "--outlier-fraction", 0.01], "gptq", "float16 outlier weights"),
])
def test_conversions_that_cannot_be_exact_are_refused(tiny_model, tmp_path, capsys, make, target, needle):
    src = tiny_model("llama")
    assert cli(make[0], src, "-o", tmp_path / "q", *make[1:]) == 0
    if needle is None:                                             # representable: it works
        assert cli("convert", tmp_path / "q", "-o", tmp_path / "out", "--format", target) == 0
        return
    expect_error(capsys, ["convert", tmp_path / "q", "-o", tmp_path / "out", "--format", target],
                 f"cannot be converted to {target}: .*{needle}")
    assert not (tmp_path / "out").exists()


def test_a_zero_point_of_zero_cannot_go_to_gptq_v1(tiny_model, tmp_path, capsys):
    """AWQ stores raw zero points; GPTQ v1 stores zero - 1 and so cannot hold a zero of 0."""
    src = tiny_model("llama")
    assert cli("rtn", src, "-o", tmp_path / "gptq", "--bits", 4, "--group-size", 32, "--asym") == 0
    assert cli("convert", tmp_path / "gptq", "-o", tmp_path / "awq", "--format", "awq") == 0
    tensors = load_file(tmp_path / "awq" / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.qzeros"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = 0                                      # eight zero points of 0, as AutoAWQ may write
    save_file(tensors, tmp_path / "awq" / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, ["convert", tmp_path / "awq", "-o", tmp_path / "out", "--format", "gptq"],
                 "model.layers.1.mlp.up_proj cannot be converted to gptq: .*zero point of 0")
    assert not (tmp_path / "out").exists()
    assert cli("convert", tmp_path / "awq", "-o", tmp_path / "ct", "--format", "compressed-tensors") == 0
    torch.testing.assert_close(logits(tmp_path / "ct", IDS), logits(tmp_path / "awq", IDS), rtol=0, atol=0)


def test_unquantized_input_is_refused(tiny_model, tmp_path, capsys):
    expect_error(capsys, ["convert", tiny_model("llama"), "-o", tmp_path / "out", "--format", "gptq"], "not quantized")
