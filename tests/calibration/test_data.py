"""Calibration data: every source type, the selection rule against hand computations, self text."""
from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import SHARED, byte_tokenizer

from quantize_llm.calibration.data import (
    CalibrationSet,
    CalibrationSpec,
    generate_self,
    load_calibration,
    read_documents,
    same_file,
    select_samples,
)
from quantize_llm.errors import SpecError, UsageError

C4 = SHARED / "data" / "c4" / "c4_validation_2k.parquet"
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"


def byte_ids(text: str) -> list[int]:
    """Independent byte-tokenizer reference for text made of ASCII letters (each maps to itself)."""
    vocab = byte_tokenizer().get_vocab()
    assert text.isascii() and text.isalpha()
    return [vocab[c] for c in text]


def tokenizer_with(eos: str | None = None, bos: str | None = None):
    tok = byte_tokenizer()
    if eos:
        tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    return tok


def one_line(err: pytest.ExceptionInfo) -> str:
    text = err.value.one_line()
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------- sources

def test_txt_documents_are_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("  first doc\nstill first  \n\n\nsecond\n \t \nthird\n\n\n", encoding="utf-8")
    assert read_documents(str(path)) == ["first doc\nstill first", "second", "third"]


def test_jsonl_text_field_and_custom_column(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "alpha", "body": "A"}\n\n{"text": "beta", "body": "B"}\n{"text": ""}\n',
                    encoding="utf-8")
    assert read_documents(str(path)) == ["alpha", "beta"]
    with pytest.raises(UsageError, match="row 2 has no 'body' or 'messages' field"):
        read_documents(str(path), text_column="body")


def test_jsonl_messages_use_the_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "bye"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    assert read_documents(str(path), tokenizer=tok) == ["<user>hi\n<assistant>yo\n", "<user>bye\n"]
    for no_template in (None, byte_tokenizer()):
        with pytest.raises(UsageError, match="no chat template") as err:
            read_documents(str(path), tokenizer=no_template)
        one_line(err)


def test_json_list_and_data_object(tmp_path: Path) -> None:
    listed, wrapped, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    listed.write_text(json.dumps([{"text": "one"}, {"text": "two"}]), encoding="utf-8")
    wrapped.write_text(json.dumps({"rows": [{"text": "three"}]}), encoding="utf-8")
    bad.write_text(json.dumps({"text": "not a list"}), encoding="utf-8")
    assert read_documents(str(listed)) == ["one", "two"]
    assert read_documents(str(wrapped)) == ["three"]
    with pytest.raises(UsageError, match="JSON list of objects"):
        read_documents(str(bad))


def test_parquet_text_column_and_missing_column(tmp_path: Path) -> None:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b"], "content": ["x", "y", "z"]}), path)
    assert read_documents(str(path)) == ["a", "b"]
    assert read_documents(str(path), text_column="content") == ["x", "y", "z"]
    with pytest.raises(UsageError, match="no column 'body'; its columns are text, content") as err:
        read_documents(str(path), text_column="body")
    assert "--text-column" in one_line(err)


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found: .*missing.txt"):
        read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="not found"):        # no extension, not hub-shaped
        read_documents(str(tmp_path / "nothing"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "spaces.txt").write_text(" \n\n \n")
    for name in ("empty.txt", "blank.jsonl", "spaces.txt"):
        with pytest.raises(UsageError, match="holds no documents"):
            read_documents(str(tmp_path / name))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(UsageError, match="unknown extension '.csv'") as err:
        read_documents(str(tmp_path / "data.csv"))
    assert ".txt, .jsonl, .json, .parquet" in one_line(err)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UsageError, match="broken.jsonl:2 is not valid JSON"):
        read_documents(str(tmp_path / "broken.jsonl"))


def test_hub_dataset_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)      # import datasets -> ImportError
    for source in ("hf:allenai/c4:en:validation", "allenai/c4"):
        with pytest.raises(UsageError, match="needs the optional datasets package") as err:
            read_documents(source)
        assert "pip install datasets" in one_line(err)


def test_hub_dataset_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Rows:
        column_names = ["text", "url"]

        def __getitem__(self, column: str) -> list[str]:
            return {"text": ["doc one", "doc two"], "url": ["u", "v"]}[column]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "org/offline":
            raise ConnectionError("Couldn't reach 'org/offline' on the Hub (LocalEntryNotFoundError)\nmore")
        return Rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert read_documents("hf:allenai/c4:en:validation") == ["doc one", "doc two"]
    assert read_documents("org/name") == ["doc one", "doc two"]
    assert read_documents("hf:wikitext::test", text_column="url") == ["u", "v"]
    assert calls == [("allenai/c4", "en", "validation"), ("org/name", None, "train"),
                     ("wikitext", None, "test")]
    with pytest.raises(UsageError, match="cannot load hub dataset org/offline .*Couldn't reach") as err:
        read_documents("org/offline")
    assert "HF_DATASETS_OFFLINE" in one_line(err)
    with pytest.raises(UsageError, match="no column 'body'; its columns are text, url"):
        read_documents("org/name", text_column="body")


# ---------------------------------------------------------------------------- selection rule

def test_selection_takes_long_documents_then_windows_of_the_short_ones() -> None:
    docs = ["abcdefghij", "xy", "ABCDEFGH", "pqrstu", "", "klm", "long"]
    tok = tokenizer_with(eos="Ā")
    eos = tok.eos_token_id
    tokens, rule = select_samples(docs, tok, nsamples=3, seqlen=8)
    pool = byte_ids("xy") + [eos] + byte_ids("pqrstu") + [eos] + byte_ids("klm") + [eos] + byte_ids("long")
    want = [byte_ids("abcdefgh"), byte_ids("ABCDEFGH"), pool[:8]]
    assert tokens.dtype == torch.int64 and tokens.tolist() == want
    assert "first 2 documents" in rule and "1 consecutive 8-token windows of the 4 shorter" in rule

    tokens, _ = select_samples(docs, byte_tokenizer(), nsamples=5, seqlen=4)   # no EOS: plain concat
    assert tokens.tolist() == [byte_ids("abcd"), byte_ids("ABCD"), byte_ids("pqrs"), byte_ids("long"),
                               byte_ids("xykl")]


def test_selection_stops_tokenizing_once_enough_long_documents() -> None:
    tok, seen = byte_tokenizer(), []

    def counting(text, **kw):
        seen.append(text)
        return tok(text, **kw)

    docs = ["short", "abcdefgh", "ijklmnop", "qrstuvwx", "never tokenized"]
    tokens, rule = select_samples(docs, counting, nsamples=2, seqlen=8)
    assert seen == docs[:3] and tokens.tolist() == [byte_ids("abcdefgh"), byte_ids("ijklmnop")]
    assert rule == ("The first 8 tokens (no special tokens added) of each of the first 2 documents, in "
                    "order, with at least 8 tokens.")


def test_too_little_text_names_the_numbers() -> None:
    docs = ["abcdefgh", "xyz", "uvw"]                 # 1 long + 7-token pool (3 + EOS + 3)
    with pytest.raises(UsageError) as err:
        select_samples(docs, tokenizer_with(eos="Ā"), nsamples=3, seqlen=8, source="tiny.txt")
    text = one_line(err)
    assert "tiny.txt holds only 1 samples of 8 tokens (14 tokens)" in text
    assert "lower --nsamples or --seqlen" in text


def test_load_calibration_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(["abcdefghijklmnop", "qrstuvwxyzabcdef", "ghij"]), encoding="utf-8")
    warnings: list[str] = []
    calib = load_calibration(CalibrationSpec(source=str(path), nsamples=2, seqlen=16), byte_tokenizer(),
                             max_context=12, warn=warnings.append)
    assert isinstance(calib, CalibrationSet)
    assert calib.tokens.tolist() == [byte_ids("abcdefghijkl"), byte_ids("qrstuvwxyzab")]
    assert calib.source == "calib.txt (blank-line separated documents)"
    assert calib.rule.startswith("The first 12 tokens")
    assert warnings == ["--seqlen 16 exceeds the model's context of 12 tokens; using 12"]
    want = hashlib.sha256(calib.tokens.numpy().astype("<i8").tobytes()).hexdigest()
    assert calib.sha256 == want


@pytest.mark.parametrize("kwargs,match", [
    (dict(nsamples=0), "--nsamples must be an integer >= 1"),
    (dict(seqlen=4), "--seqlen must be an integer >= 8"),
    (dict(seed=-1), "--seed must be an integer >= 0"),
    (dict(source=" "), "source is empty"),
    (dict(text_column=""), "--text-column is empty"),
])
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match) as err:
        CalibrationSpec(**kwargs)
    assert err.value.hint


def test_same_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x")
    b.write_text("x")
    (tmp_path / "link.txt").symlink_to(a)
    assert same_file(a, str(tmp_path / "link.txt")) and same_file(a, tmp_path / "." / "a.txt")
    assert not same_file(a, b) and not same_file(a, tmp_path / "missing.txt")
    assert not same_file(tmp_path, tmp_path)                  # folders are not files


# ---------------------------------------------------------------------------- self-generated text

@pytest.fixture
def tiny_lm(tiny_model):
    from transformers import AutoModelForCausalLM

    # One thread: a tiny model's matmuls are too small to share, and on a busy machine waking
    # OpenMP workers costs ~15 ms per call (hundreds of calls here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield AutoModelForCausalLM.from_pretrained(tiny_model("llama")).eval()
    finally:
        torch.set_num_threads(threads)


def test_generate_self_shape_start_token_and_vocab(tiny_lm) -> None:
    tok = tokenizer_with(bos="ā", eos="Ā")
    tokens = generate_self(tiny_lm, tok, nsamples=3, seqlen=10, seed=0, batch_size=2)
    assert tokens.shape == (3, 10) and tokens.dtype == torch.int64 and tokens.device.type == "cpu"
    assert (tokens[:, 0] == tok.bos_token_id).all()
    assert tokens.min() >= 0 and tokens.max() < tiny_lm.config.vocab_size
    assert len({tuple(row) for row in tokens[:, 1:].tolist()}) == 3          # diverse samples
    # The seed alone decides: the batch size only changes how the work is split.
    again = generate_self(tiny_lm, tok, nsamples=3, seqlen=10, seed=0, batch_size=32)
    assert torch.equal(tokens, again)
    no_bos = generate_self(tiny_lm, tokenizer_with(eos="Ā"), nsamples=2, seqlen=8, seed=0)
    assert (no_bos[:, 0] == tok.eos_token_id).all()
    assert (generate_self(tiny_lm, byte_tokenizer(), nsamples=2, seqlen=8, seed=0)[:, 0] == 0).all()


def test_self_calibration_is_seeded(tiny_lm) -> None:
    tok, warnings = byte_tokenizer(), []

    def run(seed: int) -> CalibrationSet:
        spec = CalibrationSpec(source="self", nsamples=3, seqlen=10, seed=seed)
        return load_calibration(spec, tok, model_loader=lambda: tiny_lm, warn=warnings.append)

    first, second, other = run(0), run(0), run(1)
    assert torch.equal(first.tokens, second.tokens) and first.sha256 == second.sha256
    assert not torch.equal(first.tokens, other.tokens) and first.sha256 != other.sha256
    assert first.source == "self-generated (seed 0)" and "seed 0" in first.rule
    assert warnings[0] == ("no --dataset given: calibrating on text the model generates itself (seed 0); "
                           "pass --dataset for real text")
    with pytest.raises(ValueError, match="model_loader"):
        load_calibration(CalibrationSpec(source="self"), tok)


def test_top_p_sampling_matches_a_hand_computation() -> None:
    from quantize_llm.calibration.data import _sample_top_p

    # Probabilities 0.6, 0.3, 0.08, 0.02 (shuffled): the 0.95 nucleus is the first three (0.98),
    # so the cumulative distribution over tokens 1, 3, 0 is 0.6/0.98, 0.9/0.98, 1.
    probs = torch.tensor([[0.08, 0.6, 0.02, 0.3]])
    logits = probs.log()
    for u, want in [(0.0, 1), (0.61, 1), (0.62, 3), (0.91, 3), (0.92, 0), (0.999999, 0)]:
        assert _sample_top_p(logits, torch.tensor([[u]])).item() == want, u


def sample_by_sorting_everything(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The top-p sampler as first written: one stable sort of the whole vocabulary per row."""
    from quantize_llm.calibration.data import TOP_P

    probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True, stable=True)
    keep = probs.cumsum(dim=-1) - probs < TOP_P
    cdf = torch.where(keep, probs, torch.zeros_like(probs)).cumsum(dim=-1)
    pick = torch.minimum(torch.searchsorted(cdf, u * cdf[:, -1:], right=True), keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pick)


def test_top_p_sampling_picks_what_sorting_the_whole_vocabulary_picks() -> None:
    """Nuclei inside the first candidates, beyond them, beyond the second tier, and ties across the
    candidate boundaries (equal probabilities are ordered by token id)."""
    from quantize_llm.calibration.data import NUCLEUS_CANDIDATES, _sample_top_p

    g = torch.Generator().manual_seed(0)
    vocab = 3 * NUCLEUS_CANDIDATES[-1]
    cases = [torch.randn(16, vocab, generator=g) * scale for scale in (8.0, 3.0, 1.0, 0.1)]
    tied = torch.full((4, vocab), -30.0)
    for row, width in enumerate((NUCLEUS_CANDIDATES[0] - 1, NUCLEUS_CANDIDATES[0] + 7, NUCLEUS_CANDIDATES[1] + 3,
                                 vocab)):
        tied[row, torch.randperm(vocab, generator=g)[:width]] = 0.0      # `width` tokens of equal probability
    cases += [tied, torch.round(cases[1])]                               # and many ties everywhere
    for logits in cases:
        for _ in range(20):
            u = torch.rand(len(logits), 1, generator=g)
            assert torch.equal(_sample_top_p(logits, u), sample_by_sorting_everything(logits, u))


def sample_without_a_cache(model, tok, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Self-generated text as its rule says, re-running the whole prefix at every step (no KV cache)."""
    from quantize_llm.calibration.data import FIRST_TEMPERATURE

    uniforms = torch.rand(nsamples, seqlen - 1, generator=torch.Generator().manual_seed(seed))
    start = next((t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None), 0)
    ids = torch.full((nsamples, 1), start, dtype=torch.int64)
    with torch.no_grad():
        for i in range(seqlen - 1):
            logits = model(ids, use_cache=False).logits[:, -1].float() / (FIRST_TEMPERATURE if i == 0 else 1.0)
            ids = torch.cat([ids, sample_by_sorting_everything(logits, uniforms[:, i:i + 1])], dim=1)
    return ids


def test_generate_self_is_the_sampling_rule_run_without_a_cache(tiny_lm) -> None:
    tok = tokenizer_with(bos="ā")
    got = generate_self(tiny_lm, tok, nsamples=3, seqlen=12, seed=4, batch_size=2)
    assert torch.equal(got, sample_without_a_cache(tiny_lm, tok, nsamples=3, seqlen=12, seed=4))


def test_generate_self_feeds_one_new_token_per_step_with_the_cache(tiny_lm, monkeypatch) -> None:
    """After the start token, each forward pass gets one token per sequence and the cache the
    previous pass returned, under the name this transformers takes without a deprecation warning."""
    import functools
    import inspect
    import warnings

    forward, calls = tiny_lm.forward, []

    @functools.wraps(forward)
    def spy(input_ids, **kwargs):
        step = forward(input_ids, **kwargs)
        calls.append((tuple(input_ids.shape), {k: v for k, v in kwargs.items() if k in ("cache", "past_key_values")},
                      step))
        return step
    monkeypatch.setattr(tiny_lm, "forward", spy)
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a deprecated argument name would fail here
        generate_self(tiny_lm, byte_tokenizer(), nsamples=3, seqlen=9, seed=0, batch_size=2)
    shapes = [shape for shape, _, _ in calls]
    assert shapes == [(2, 1)] * 8 + [(1, 1)] * 8                 # 1 + 7 passes per batch, never the prefix
    for (_, passed, _), (_, _, before) in zip(calls[1:], calls[:-1], strict=True):
        if passed:                                                # not the first pass of a batch
            assert list(passed) == [name] and passed[name] is getattr(before, name)
    assert sum(1 for _, passed, _ in calls if passed) == 14


def test_generate_self_reports_the_tokens_written(tiny_lm) -> None:
    progress: list[tuple[int, int]] = []
    generate_self(tiny_lm, byte_tokenizer(), nsamples=3, seqlen=41, seed=0, batch_size=2,
                  progress=lambda done, total: progress.append((done, total)))
    done = [d for d, _ in progress]
    assert {t for _, t in progress} == {123} and done[-1] == 123 and done == sorted(set(done))
    assert 30 <= len(done) <= 50                         # about twenty reports per batch, not one per token
    assert done[19] == 2 * 41                            # the first batch (2 sequences of 41) ends at the 20th


# ---------------------------------------------------------------------------- real data

@pytest.mark.slow
@pytest.mark.skipif(not C4.is_file(), reason=f"{C4} is absent")
def test_c4_parquet_gives_64_samples_of_512() -> None:
    tok = byte_tokenizer()
    calib = load_calibration(CalibrationSpec(source=str(C4), nsamples=64, seqlen=512), tok)
    assert calib.tokens.shape == (64, 512) and calib.source == "c4_validation_2k.parquet (text column)"
    docs = read_documents(str(C4))
    # The byte tokenizer gives one token per UTF-8 byte, so the first document with >= 512 tokens
    # is the first with >= 512 bytes.
    first = next(d for d in docs if len(d.encode("utf-8")) >= 512)
    assert calib.tokens[0].tolist() == tok(first, add_special_tokens=False)["input_ids"][:512]
    assert tok.decode(calib.tokens[0]) == first.encode("utf-8")[:512].decode("utf-8", errors="replace")
    assert "first 64 documents" in calib.rule
