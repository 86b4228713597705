"""Publishing: figures measured after writing go into the model card; hub uploads fail early and clearly."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from test_cli import cli, expect_error, fake_quantized_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "\n".join(f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}." for i in range(400))


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


def test_eval_figures_go_into_the_card(tiny_model, tmp_path, eval_file, capsys):
    src = tiny_model("llama")
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--group-size", 32, "--bits", 3, "--eval", eval_file, "--eval-windows", 4) == 0
    stdout = capsys.readouterr().out
    assert "evaluation on eval.txt (4 x 512 tokens)" in stdout
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "eval.txt" in card and "4 non-overlapping windows of 512 tokens" in card
    got = re.search(r"\| this checkpoint \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card)
    base = re.search(r"\| source \(unquantized\) \| ([\d.]+) \|", card)
    ppl, ratio, kl = map(float, got.groups())
    # The protocol computed here on its own: the first 4 windows of 512 tokens of the text, the
    # quantized model as the float64 RTN reference of every block Linear, perplexity from
    # transformers' loss, KL(source || quantized) from torch's kl_div in float64.
    ids = AutoTokenizer.from_pretrained(src)(TEXT, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[:4 * 512]).view(4, 512)
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantized = fake_quantized_model(src, bits=3, group_size=32, sym=True)
    with torch.no_grad():
        want_ppl, want_base = (math.exp(sum(float(m(w[None], labels=w[None]).loss) for w in windows) / 4)
                               for m in (quantized, source))
        kl_sum = sum(F.kl_div(F.log_softmax(quantized(w[None]).logits[0, :-1].double(), -1),
                              F.log_softmax(source(w[None]).logits[0, :-1].double(), -1),
                              log_target=True, reduction="sum") for w in windows)
    want_kl = float(kl_sum) / (4 * 511)
    assert want_kl > 1e-3                                         # 3 bits: a difference worth measuring
    assert ppl == pytest.approx(want_ppl, abs=5e-4 + 1e-5 * want_ppl)            # the card rounds to 3 places
    assert float(base.group(1)) == pytest.approx(want_base, abs=5e-4 + 1e-5 * want_base)
    assert ratio == pytest.approx(want_ppl / want_base, abs=5e-5 + 1e-5)
    assert kl == pytest.approx(want_kl, abs=5e-6 + 1e-4 * want_kl)


def test_eval_file_must_exist(tiny_model, tmp_path, capsys):
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", tmp_path / "out", "--eval", tmp_path / "none.txt"],
                 "--eval .*none.txt is not a file")
    assert not (tmp_path / "out").exists()


def test_push_refused_offline_before_any_work(tiny_model, tmp_path, capsys):
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", tmp_path / "out", "--push-to-hub", "me/model"],
                 "HF_HUB_OFFLINE is set")
    assert not (tmp_path / "out").exists()


def test_push_without_a_token(tiny_model, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", tmp_path / "out", "--push-to-hub", "me/model"],
                 "needs a Hugging Face token.*HF_TOKEN")
    assert not (tmp_path / "out").exists()


def test_push_to_an_unreachable_hub(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")             # nothing listens there
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", tmp_path / "out", "--push-to-hub", "me/model"],
                 "hub cannot be reached")
    assert not (tmp_path / "out").exists()


def test_push_repo_id_is_checked(tiny_model, tmp_path, capsys):
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", tmp_path / "out", "--push-to-hub", "no-slash"],
                 "not a repository id")
