"""Perplexity and KL (BENCHMARKS.md protocol Q) against independent computations."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer
from transformers import AutoModelForCausalLM

from quantize_llm.errors import ModelError, UsageError
from quantize_llm.eval.evaluate import evaluate, file_sha256, load_for_eval, make_windows, tokenize_text

TEXT = ("The quick brown fox jumps over the lazy dog. Grüße aus Zürich! " * 12)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_tokenize_text_is_one_pass_without_special_tokens(text_file: Path) -> None:
    ids = tokenize_text(text_file, byte_tokenizer())
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.numel() == len(TEXT.encode("utf-8"))      # byte tokenizer: one token per byte
    import hashlib
    assert file_sha256(text_file) == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()


def test_make_windows() -> None:
    ids = torch.arange(100)
    assert torch.equal(make_windows(ids, 32, None), ids[:96].view(3, 32))
    assert torch.equal(make_windows(ids, 32, 0), ids[:96].view(3, 32))
    assert torch.equal(make_windows(ids, 32, 2), ids[:64].view(2, 32))
    with pytest.raises(UsageError, match="shorter than one window"):
        make_windows(ids, 128, None)
    with pytest.raises(UsageError, match="more than the 3 windows"):
        make_windows(ids, 32, 4)


def test_perplexity_matches_transformers_loss(tiny_model, text_file: Path) -> None:
    model, tokenizer = load_for_eval(str(tiny_model("llama")))
    windows = make_windows(tokenize_text(text_file, tokenizer), 64, 4)
    seen = []
    result = evaluate(model, windows, progress=lambda done, total: seen.append((done, total)))
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert (result.windows, result.seqlen, result.tokens) == (4, 64, 4 * 63)
    assert result.kl is None and result.baseline_perplexity is None and result.ppl_ratio is None
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_kl_against_itself_and_a_perturbed_copy(tiny_model, text_file: Path) -> None:
    folder = tiny_model("qwen2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = make_windows(tokenize_text(text_file, byte_tokenizer()), 48, 3)
    same = evaluate(model, windows, baseline=model)
    assert same.kl == pytest.approx(0.0, abs=1e-9)
    assert same.ppl_ratio == pytest.approx(1.0, abs=1e-12)
    assert same.baseline_perplexity == pytest.approx(same.perplexity, rel=1e-12)

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn(64, 128))
    got = evaluate(perturbed, windows, baseline=model)
    # Independent KL(P_base || P_pert): torch's kl_div on float64 log-probabilities.
    kls = []
    with torch.no_grad():
        for w in windows:
            base = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            pert = torch.log_softmax(perturbed(w[None]).logits[0, :-1].double(), -1)
            kls.append(torch.nn.functional.kl_div(pert, base, log_target=True,
                                                  reduction="batchmean"))
    assert got.kl > 0
    assert got.kl == pytest.approx(float(sum(kls) / len(kls)), rel=1e-4)
    assert got.ppl_ratio == pytest.approx(got.perplexity / same.perplexity, rel=1e-9)


def test_load_for_eval_refuses_missing_tokenizer_and_pickles(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="tokenizer"):
        load_for_eval(str(tiny_model("llama", tokenizer=False)))
    folder = tmp_path / "pickled"
    folder.mkdir()
    src = tiny_model("llama")
    (folder / "config.json").write_text((src / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not a real pickle")
    with pytest.raises(UsageError, match="safetensors"):
        load_for_eval(str(folder))
