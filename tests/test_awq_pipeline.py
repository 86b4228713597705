"""AWQ through the CLI and the pipeline: quality against RTN on the same inputs, the two formats,
the folded tensors written, and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import cli, expect_error

from quantize_llm.calibration.data import read_documents, select_samples

CAL = ["--nsamples", 8, "--seqlen", 64]


def calib_tokens(src: Path, calib: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokens, _ = select_samples(read_documents(str(calib)), AutoTokenizer.from_pretrained(src), 8, 64)
    return tokens


def hidden_errors(src: Path, quantized: Path, tokens: torch.Tensor) -> tuple[float, float]:
    """Relative error of block 0's output (same embedded inputs: embeddings are not quantized) and
    of the logits, against the unquantized model."""
    from transformers import AutoModelForCausalLM

    from quantize_llm import load_quantized

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = load_quantized(quantized, dtype=torch.float32)
    with torch.no_grad():
        ref = base(tokens, output_hidden_states=True)
        got = model(tokens, output_hidden_states=True)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return rel(got.hidden_states[1], ref.hidden_states[1]), rel(got.logits, ref.logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "opt"])
def test_awq_beats_rtn_on_the_same_inputs(tiny_model, tmp_path, calib_file, arch):
    src = tiny_model(arch)
    assert cli("rtn", src, "-o", tmp_path / "rtn", "--bits", 3, "--group-size", 32, "--asym") == 0
    assert cli("awq", src, "-o", tmp_path / "awq", "--bits", 3, "--group-size", 32, "--dataset", calib_file, *CAL) == 0
    tokens = calib_tokens(src, calib_file)
    rtn_block, rtn_logits = hidden_errors(src, tmp_path / "rtn", tokens)
    awq_block, awq_logits = hidden_errors(src, tmp_path / "awq", tokens)
    assert awq_block < rtn_block
    assert awq_logits < rtn_logits


def test_then_gptq_and_the_report(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    log = tmp_path / "log.jsonl"
    capsys.readouterr()
    assert cli("awq", src, "-o", tmp_path / "rtn", "--bits", 3, "--group-size", 32, "--dataset", calib_file, *CAL,
               "--log-json", log) == 0
    stdout = capsys.readouterr().out
    assert "AWQ scale search" in stdout and "model.layers.*.mlp.gate_proj (x2)" in stdout
    blocks = [json.loads(line) for line in log.read_text().splitlines() if '"block"' in line]
    layers = {r["name"]: r["metrics"] for b in blocks for r in b["layers"]}
    gate = layers["model.layers.1.mlp.gate_proj"]
    assert 0 <= gate["alpha"] < 1 and gate["search_error_after"] <= gate["search_error_before"]
    assert "grouped-query" in layers["model.layers.0.self_attn.o_proj"]["awq_skipped"]
    assert "clip" not in layers["model.layers.0.self_attn.q_proj"]     # queries and keys are not clipped
    assert 0.5 <= layers["model.layers.0.mlp.down_proj"]["clip"] <= 1

    assert cli("awq", src, "-o", tmp_path / "gptq", "--bits", 3, "--group-size", 32, "--dataset", calib_file, *CAL,
               "--then", "gptq") == 0
    meta = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["method"] == "awq" and meta["options"]["then"] == "gptq"
    tokens = calib_tokens(src, calib_file)
    assert hidden_errors(src, tmp_path / "gptq", tokens)[1] < hidden_errors(src, tmp_path / "rtn", tokens)[1]


def test_awq_format_holds_the_same_result_as_gptq_format(tiny_model, tmp_path, calib_file):
    from safetensors import safe_open

    from quantize_llm import load_quantized

    src = tiny_model("llama")
    for fmt in ("gptq", "awq"):
        assert cli("awq", src, "-o", tmp_path / fmt, "--format", fmt, "--sym", "--group-size", 32,
                   "--dataset", calib_file, *CAL) == 0
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    assert config["modules_to_not_convert"] == ["lm_head"]
    assert not (tmp_path / "awq" / "quantize_config.json").exists()
    with safe_open(str(tmp_path / "awq" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.qweight").shape == (64, 128 // 8)
        assert f.get_tensor("model.layers.0.mlp.up_proj.scales").shape == (2, 128)
        assert "model.layers.0.mlp.up_proj.g_idx" not in f.keys()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_quantized(tmp_path / "gptq", dtype=torch.float32)(ids).logits
        b = load_quantized(tmp_path / "awq", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inspect_reads_the_awq_format(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    assert cli("awq", src, "-o", tmp_path / "awq", "--format", "awq", "--group-size", 32,
               "--dataset", calib_file, *CAL) == 0
    capsys.readouterr()
    assert cli("inspect", tmp_path / "awq") == 0
    stdout = capsys.readouterr().out
    # codes 4 bits + per 32 weights one float16 scale and one packed 4-bit zero: 4 + 16/32 + 4/32
    assert "(awq)" in stdout and "bits per weight: 4.625" in stdout
    assert "128 x 64" in stdout


def test_folded_dense_tensors_are_written(tiny_model, tmp_path, calib_file):
    """Only down_proj is quantized: its scale is folded into up_proj, which stays dense and must be
    written rescaled (else the checkpoint computes a different function)."""
    src = tiny_model("llama")
    dense = ["--keep-dense", r"self_attn\.", "--keep-dense", r"gate_proj|up_proj"]
    assert cli("rtn", src, "-o", tmp_path / "rtn", "--bits", 3, "--group-size", 32, "--asym", *dense) == 0
    assert cli("awq", src, "-o", tmp_path / "awq", "--bits", 3, "--group-size", 32, "--dataset", calib_file, *CAL,
               *dense) == 0
    tokens = calib_tokens(src, calib_file)
    assert hidden_errors(src, tmp_path / "awq", tokens)[0] < hidden_errors(src, tmp_path / "rtn", tokens)[0]


def test_folded_norms_are_written_and_function_kept(tiny_model, tmp_path, calib_file):
    """At 8 bits quantization barely matters, so AWQ's checkpoint must be as close to the source
    model as RTN's: the rewritten norms and the scaled weights agree."""
    from safetensors import safe_open

    src = tiny_model("gemma")
    assert cli("rtn", src, "-o", tmp_path / "rtn", "--bits", 8, "--group-size", 32, "--asym") == 0
    assert cli("awq", src, "-o", tmp_path / "awq", "--bits", 8, "--group-size", 32, "--dataset", calib_file, *CAL) == 0
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "awq" / "model.safetensors"), "pt") as b:
        name = "model.layers.0.input_layernorm.weight"
        assert not torch.equal(a.get_tensor(name), b.get_tensor(name))
    tokens = calib_tokens(src, calib_file)
    rtn_block, rtn_logits = hidden_errors(src, tmp_path / "rtn", tokens)
    block, logits = hidden_errors(src, tmp_path / "awq", tokens)
    assert block < 1.2 * rtn_block and logits < 1.2 * rtn_logits


def test_one_alpha_and_no_clip_is_rtn_bit_for_bit(tiny_model, tmp_path, calib_file):
    """--grid 1 tries alpha = 0 only (all scales exactly 1); without the clip search that is RTN."""
    src = tiny_model("qwen2")
    assert cli("rtn", src, "-o", tmp_path / "rtn", "--bits", 4, "--group-size", 32, "--asym") == 0
    assert cli("awq", src, "-o", tmp_path / "awq", "--bits", 4, "--group-size", 32, "--dataset", calib_file, *CAL,
               "--grid", 1, "--no-clip") == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "rtn" / "model.safetensors"), load_file(tmp_path / "awq" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_awq_format_refuses_3_bits_before_touching_the_model(tmp_path, capsys):
    expect_error(capsys, ["awq", tmp_path / "no-model", "-o", tmp_path / "out", "--format", "awq", "--bits", "3"],
                 "4-bit codes only.*--format gptq")
    assert not (tmp_path / "out").exists()


def test_awq_format_refuses_shapes_it_cannot_hold(tiny_model, tmp_path, capsys, calib_file):
    expect_error(capsys, ["awq", tiny_model("llama"), "-o", tmp_path / "out", "--format", "awq", "--group-size", 48,
                          "--dataset", calib_file, *CAL], "multiple of the group size 48")
    assert not (tmp_path / "out").exists()


def test_a_family_without_written_groups_gets_measured_ones(tiny_model, tmp_path, calib_file, monkeypatch):
    """Without the Llama entry in models/architectures.py, the groups are measured on each block:
    the checkpoint is byte for byte the one the written groups give."""
    import dataclasses

    from quantize_llm.models import architectures

    src = tiny_model("llama")
    args = ["--group-size", 32, "--dataset", calib_file, *CAL]
    assert cli("awq", src, "-o", tmp_path / "written", *args) == 0
    monkeypatch.setitem(architectures.ARCHITECTURES, "LlamaForCausalLM", dataclasses.replace(architectures.LLAMA, awq=()))
    assert cli("awq", src, "-o", tmp_path / "measured", *args) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "written" / name).read_bytes() == (tmp_path / "measured" / name).read_bytes()


def test_a_block_without_any_scaling_group_is_refused(tiny_model, tmp_path, capsys, calib_file, monkeypatch):
    import dataclasses

    from quantize_llm.calibration import sequential
    from quantize_llm.models import architectures

    monkeypatch.setitem(architectures.ARCHITECTURES, "LlamaForCausalLM", dataclasses.replace(architectures.LLAMA, awq=()))
    monkeypatch.setattr(sequential, "awq_groups", lambda *a, **k: ())
    expect_error(capsys, ["awq", tiny_model("llama"), "-o", tmp_path / "out", "--group-size", 32,
                          "--dataset", calib_file, *CAL], "AWQ found no scaling group in block 0")
    assert not (tmp_path / "out").exists()


def test_a_fold_that_changes_the_function_stops_the_run(tmp_path, capsys, calib_file):
    """OPT-350m normalizes after attention (do_layer_norm_before=False): the map's groups do not fit,
    and the safety check says so instead of writing a broken checkpoint."""
    from conftest import build_tiny

    src = build_tiny("opt", tmp_path / "opt350", config={"do_layer_norm_before": False})
    expect_error(capsys, ["awq", src, "-o", tmp_path / "out", "--group-size", 32, "--dataset", calib_file, *CAL],
                 "folding the AWQ scales changed the block's output", code=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--then", "hqq"], "--then"),
    (["--grid", "0"], "--grid"),
    (["--max-shrink", "1.5"], "--max-shrink"),
])
def test_awq_bad_options(tiny_model, tmp_path, calib_file, capsys, args, needle):
    expect_error(capsys, ["awq", tiny_model("llama"), "-o", tmp_path / "out", "--dataset", calib_file, *args], needle)
    assert not (tmp_path / "out").exists()


def test_hessians_kept_in_files_during_the_search_give_the_same_checkpoint(tiny_model, tmp_path, calib_file,
                                                                          monkeypatch):
    """AWQ's captured Hessians wait in files until their group is searched (GPTQ's in-place solve
    keeps its copy there too); the bytes written do not change and no file is left behind."""
    import hashlib
    import tempfile

    import quantize_llm.algorithms.solve as solve

    src = tiny_model("llama")
    args = ["awq", src, "--dataset", calib_file, "--nsamples", 8, "--seqlen", 32, "--group-size", 32]
    assert cli(*args, "-o", tmp_path / "memory") == 0
    spills = tmp_path / "spills"
    spills.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spills))
    monkeypatch.setattr(solve, "SPILL_BYTES", 0)                      # every Hessian to a file
    written: list[str] = []
    real = solve.Spill.__init__

    def spy(self, t):
        real(self, t)
        written.append(self.path)
    monkeypatch.setattr(solve.Spill, "__init__", spy)
    assert cli(*args, "-o", tmp_path / "files") == 0
    assert written and all(p and p.startswith(str(spills)) for p in written)
    assert not list(spills.iterdir())

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")}
    assert digest(tmp_path / "files") == digest(tmp_path / "memory")
