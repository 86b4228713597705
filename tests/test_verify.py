"""Verification after writing: modules read back exactly, the loaded model reproduces the run, and a
corrupted write fails the run before anything reaches OUT."""
from __future__ import annotations

import json

from test_cli import cli, expect_error

import quantize_llm.run.execute as execute
from quantize_llm.formats.gptq import GPTQFormat

CAL = ["--nsamples", 8, "--seqlen", 32]


def test_calibrated_run_is_verified(tiny_model, tmp_path, calib_file, capsys):
    log = tmp_path / "log.jsonl"
    assert cli("gptq", tiny_model("qwen2"), "-o", tmp_path / "out", "--group-size", 32, "--dataset", calib_file, *CAL,
               "--log-json", log) == 0
    assert "verified: 14 modules read back exactly; last block matches the run to" in capsys.readouterr().out
    event = next(json.loads(line) for line in log.read_text().splitlines() if '"verified"' in line)
    assert event["modules"] == 14 and event["last_block_rel_diff"] < 1e-4


def test_a_module_that_does_not_read_back_fails_the_run(tiny_model, tmp_path, monkeypatch, capsys):
    real = GPTQFormat.encode

    def corrupt(qw):
        tensors = real(qw)
        if qw.shape == (128, 64):                                # gate/up projections: flip one code
            tensors["qweight"] = tensors["qweight"].clone()
            tensors["qweight"][0, 0] ^= 1
        return tensors
    monkeypatch.setattr(GPTQFormat, "encode", staticmethod(corrupt))
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", tmp_path / "out", "--group-size", 32],
                 "verification failed: model.layers.0.mlp.gate_proj does not read back", code=1)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_checkpoint_that_computes_something_else_fails_the_run(tiny_model, tmp_path, calib_file, monkeypatch, capsys):
    real = execute.CheckpointWriter.add

    def add(self, name, tensor):
        if name == "model.layers.1.post_attention_layernorm.weight":   # not a quantized module: only the model check sees it
            tensor = tensor * 1.5
        return real(self, name, tensor)
    monkeypatch.setattr(execute.CheckpointWriter, "add", add)
    expect_error(capsys, ["gptq", tiny_model("llama"), "-o", tmp_path / "out", "--group-size", 32,
                          "--dataset", calib_file, *CAL], "last block differs from the quantized model's", code=1)
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert cli("gptq", tiny_model("llama"), "-o", tmp_path / "out", "--group-size", 32, "--dataset", calib_file,
               *CAL, "--no-verify") == 0                          # the same write, unchecked, goes through
    assert "verified" not in capsys.readouterr().out


def test_verified_after_resume(tiny_model, tmp_path, calib_file, monkeypatch, capsys):
    """Blocks restored from the resume state carry their digests; the final block's outputs too."""
    from test_resume import fail_after

    src = tiny_model("llama")
    args = ["awq", src, "-o", tmp_path / "out", "--group-size", 32, "--dataset", calib_file, *CAL]
    fail_after(monkeypatch, 1)
    assert cli(*args) == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert cli(*args) == 0
    assert "verified: 14 modules read back exactly; last block matches" in capsys.readouterr().out
