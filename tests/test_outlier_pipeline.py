"""The outlier split through the CLI: round trips, the inner algorithms reproduced at fraction 0,
loading, honest sizes and bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_awq_pipeline import calib_tokens, hidden_errors
from test_cli import cli, expect_error

from quantize_llm.formats.outlier import OutlierFormat

CAL = ["--nsamples", 8, "--seqlen", 64]


def decoded(out: Path) -> dict:
    """Every quantized module of a checkpoint decoded with the format's reader."""
    tensors = load_file(out / "model.safetensors")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    prefixes = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    return {p: OutlierFormat.decode({t: tensors[f"{p}.{t}"] for t in OutlierFormat.tensor_names
                                     if f"{p}.{t}" in tensors}, qconfig) for p in prefixes}


def test_outliers_are_exactly_preserved(tiny_model, tmp_path):
    src = tiny_model("llama", dtype=torch.bfloat16)
    assert cli("outlier", src, "-o", tmp_path / "out", "--bits", 3, "--group-size", 32, "--outlier-fraction", 0.01) == 0
    original = load_file(src / "model.safetensors")
    for prefix, qw in decoded(tmp_path / "out").items():
        w = original[f"{prefix}.weight"].float()
        mask = qw.outliers.mask(qw.shape)
        assert int(mask.sum()) == round(0.01 * w.numel())
        assert torch.equal(qw.dequantize(torch.float32)[mask], w[mask])     # bf16 -> fp16 is exact here
        assert bool(w[mask].abs().min() >= w[~mask].abs().max())          # magnitude: the largest kept


@pytest.mark.parametrize("inner", ["rtn", "gptq"])
def test_fraction_zero_reproduces_the_inner_algorithm(tiny_model, tmp_path, calib_file, inner):
    src = tiny_model("qwen2")
    common = ["--bits", 4, "--group-size", 32, "--asym"]
    cal = ["--dataset", calib_file, *CAL] if inner == "gptq" else []
    assert cli(inner, src, "-o", tmp_path / "plain", *common, *cal) == 0
    assert cli("outlier", src, "-o", tmp_path / "split", "--inner", inner, "--outlier-fraction", 0, *common, *cal) == 0
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    extra = {n for n in b if ".outlier_" in n}
    assert set(b) - extra == set(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert all(b[n].numel() == 0 for n in extra if n.endswith(("outlier_values", "outlier_col_idx")))


@pytest.mark.parametrize("args", [
    ["--outlier-fraction", 0.02],
    ["--inner", "gptq", "--outlier-fraction", 0.02, "--act-order"],
    ["--mode", "channel", "--outlier-fraction", 0.1],
    ["--mode", "channel", "--bits", 8],
])
def test_checkpoint_loads_to_the_decoded_weights(tiny_model, tmp_path, calib_file, args):
    from transformers import AutoModelForCausalLM

    from quantize_llm import load_quantized

    src = tiny_model("llama")
    needs_data = "gptq" in args or "channel" in args
    cal = ["--dataset", calib_file, *CAL] if needs_data else []
    bits = [] if "--bits" in args else ["--bits", 3]
    assert cli("outlier", src, "-o", tmp_path / "out", "--group-size", 32, *bits, *args, *cal) == 0
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for prefix, qw in decoded(tmp_path / "out").items():
        reference.get_submodule(prefix).weight.data = qw.dequantize(torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = load_quantized(tmp_path / "out", dtype=torch.float32)(ids).logits
        torch.testing.assert_close(got, reference(ids).logits, rtol=1e-4, atol=1e-4)
    qconfig = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "quantize_llm_outlier"
    assert qconfig["outlier_mode"] == ("channel" if "channel" in args else "weight")


def test_channel_mode_int8_defaults_to_per_row_absmax(tiny_model, tmp_path, calib_file):
    src = tiny_model("llama")
    assert cli("outlier", src, "-o", tmp_path / "out", "--mode", "channel", "--bits", 8, "--dataset", calib_file,
               *CAL, "--outlier-threshold", 3.0) == 0
    qconfig = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"]) == (8, -1, True)
    assert qconfig["outlier_threshold"] == 3.0
    kept = [qw.outliers.columns.numel() for qw in decoded(tmp_path / "out").values()]
    assert any(kept)                                             # some inputs reach 3.0 after the norms


def test_inspect_counts_the_outliers(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    assert cli("outlier", src, "-o", tmp_path / "out", "--bits", 4, "--group-size", 32, "--outlier-fraction", 0.01) == 0
    total = params = 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if re.search(r"\.(qweight|qzeros|scales|g_idx|outlier_\w+)$", name):
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
            if name.endswith(".qweight"):
                params += f.get_tensor(name).shape[0] * 32 // 4 * f.get_tensor(name).shape[1]
    capsys.readouterr()
    assert cli("inspect", tmp_path / "out") == 0
    stdout = capsys.readouterr().out
    assert f"bits per weight: {8 * total / params:.3f}" in stdout and "outliers" in stdout


def test_outliers_beat_plain_rtn_at_3_bits(tiny_model, tmp_path, calib_file):
    src = tiny_model("llama")
    assert cli("rtn", src, "-o", tmp_path / "rtn", "--bits", 3, "--group-size", 32, "--asym") == 0
    assert cli("outlier", src, "-o", tmp_path / "split", "--bits", 3, "--group-size", 32,
               "--outlier-fraction", 0.01) == 0
    tokens = calib_tokens(src, calib_file)
    assert hidden_errors(src, tmp_path / "split", tokens)[1] < hidden_errors(src, tmp_path / "rtn", tokens)[1]


@pytest.mark.parametrize("args,needle", [
    (["--outlier-fraction", "-0.1"], "outside \\[0, 0.5\\]"),
    (["--outlier-fraction", "1.5"], "outside \\[0, 0.5\\]"),
    (["--outlier-fraction", "0.01", "--outlier-threshold", "3"], "both"),
    (["--act-order"], "--inner gptq"),
    (["--mode", "rows"], "--mode"),
])
def test_outlier_bad_input(tiny_model, tmp_path, capsys, args, needle):
    expect_error(capsys, ["outlier", tiny_model("llama"), "-o", tmp_path / "out", *args], needle)
    assert not (tmp_path / "out").exists()
