"""`quantize-llm generate`: greedy output against a hand-written greedy loop, sampling, timing line
and bad input."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import build_tiny, byte_tokenizer
from test_cli import cli, expect_error

from quantize_llm.eval.generate import generate
from quantize_llm.runtime.load import load_quantized


@pytest.fixture
def quantized(tiny_model, tmp_path):
    assert cli("rtn", tiny_model("llama"), "-o", tmp_path / "q", "--group-size", 32) == 0
    return tmp_path / "q"


def test_greedy_matches_a_hand_written_greedy_loop(quantized):
    result = generate(str(quantized), "Hello world", max_new_tokens=6, ignore_eos=True, device="cpu")
    model, tok = load_quantized(quantized), byte_tokenizer()
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert result.text == tok.decode(ids[0, -6:], skip_special_tokens=True)
    assert result.new_tokens == 6 and result.prompt_tokens == 11
    assert result.backend == "pytorch" and result.tokens_per_second > 0


def test_sampling_follows_the_seed(quantized):
    runs = [generate(str(quantized), "Hi", max_new_tokens=12, temperature=1.5, seed=s, ignore_eos=True,
                     device="cpu").text for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_the_cli_prints_text_and_tokens_per_second(quantized, tiny_model, capsys):
    assert cli("generate", quantized, "Hello", "--max-new-tokens", 4, "--ignore-eos") == 0
    captured = capsys.readouterr()
    assert re.search(r"4 new tokens in [\d.]+ s: [\d.]+ tokens/s \(prompt 5 tokens; cpu, float32, pytorch\)",
                     captured.err)
    assert cli("generate", tiny_model("llama"), "Hello", "--max-new-tokens", 2, "--ignore-eos") == 0
    assert "float32, dense)" in capsys.readouterr().err                     # an unquantized model runs too


@pytest.mark.parametrize("args,message", [
    (["--temperature", -1], "--temperature -1.0 is negative"),
    (["--top-p", 0], r"--top-p 0.0 must be in \(0, 1\]"),
    (["--max-new-tokens", 0], "--max-new-tokens 0 must be at least 1"),
    (["--dtype", "int8"], "--dtype int8 is not supported"),
    (["--chat"], "has no chat template"),
    (["--backend", "cuda"], "backend 'cuda' runs on a CUDA device"),
    (["--backend", "tpu"], "unknown backend 'tpu'"),
])
def test_bad_input_is_one_line(quantized, capsys, args, message):
    expect_error(capsys, ["generate", quantized, "Hello", "--device", "cpu", *args], message)


def test_a_checkpoint_without_tokenizer_is_named(tmp_path, capsys):
    src = build_tiny("llama", tmp_path / "src", tokenizer=False)
    assert cli("rtn", src, "-o", tmp_path / "q", "--group-size", 32) == 0
    expect_error(capsys, ["generate", tmp_path / "q", "Hello"], "no usable tokenizer", code=2)
