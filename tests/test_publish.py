"""Publishing: figures measured after writing go into the model card; hub uploads fail early and clearly."""
from __future__ import annotations

import pytest
from test_cli import cli, expect_error

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
    # the same figures as an independent evaluation of the written checkpoint
    from quantize_llm.eval.evaluate import run_eval

    r = run_eval(str(out), eval_file, seqlen=512, windows=4, baseline=str(src), device="cpu")
    assert f"| this checkpoint | {r.perplexity:.3f} | {r.ppl_ratio:.4f} | {r.kl:.5f} |" in card
    assert f"| source (unquantized) | {r.baseline_perplexity:.3f} |" in card


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
