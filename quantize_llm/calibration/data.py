"""Calibration tokens: real text from a file or hub dataset, or text the model writes itself.

`load_calibration` is the entry point: `read_documents` -> `select_samples` (one deterministic rule,
BENCHMARKS.md protocol Q), or `generate_self` (seeded); each result has its SHA-256 and a card rule.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, SpecError, UsageError

FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet")
ACCEPTED = "a .txt, .jsonl, .json or .parquet file, hf:ID[:CONFIG[:SPLIT]], or self"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(?::[\w.-]*){0,2}")   # org/name[:config[:split]]
TOP_P = 0.95
FIRST_TEMPERATURE = 1.5
GENERATION_BATCH = 32     # sequences `self` generation writes at once (the plan sizes its KV cache by it)


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration text comes from and how much of it is used."""

    source: str = "self"        # file (.txt/.jsonl/.json/.parquet), hf:ID[:CONFIG[:SPLIT]], org/name, or "self"
    nsamples: int = 128         # sequences
    seqlen: int = 2048          # tokens per sequence (capped by the model's context by the caller)
    seed: int = 0               # seeds `self` generation (file sources are read in file order)
    text_column: str = "text"   # parquet/jsonl/datasets column holding the text
    # `self` only: the most bytes of the float model's weights held in memory at once while it
    # writes, e.g. "4GB" (the rest is read from the checkpoint's files at every step); None: the
    # whole model when it fits in the free memory, else offloaded to what fits
    generation_memory: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise SpecError("the calibration source is empty", f"pass {ACCEPTED}")
        for flag, value, low, hint in (("--nsamples", self.nsamples, 1, "128 is typical"),
                                       ("--seqlen", self.seqlen, 8, "2048 is typical"),
                                       ("--seed", self.seed, 0, "0 is the default")):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SpecError(f"{flag} must be an integer >= {low}, got {value!r}", hint)
        if not isinstance(self.text_column, str) or not self.text_column:
            raise SpecError("--text-column is empty", "name the column that holds the text, e.g. text")
        if self.generation_bytes is not None and self.source != "self":   # parsing it refuses a bad size
            raise SpecError(f"--generation-memory applies to text the model writes itself, not to the calibration "
                            f"source {self.source}", "drop --generation-memory, or --dataset")

    @property
    def generation_bytes(self) -> int | None:
        """--generation-memory in bytes, or None when it is not given."""
        from ..run.job import parse_size

        if self.generation_memory is None:
            return None
        if not isinstance(self.generation_memory, str):
            raise SpecError(f"--generation-memory must be a size such as 4GB, not {self.generation_memory!r}")
        try:
            return parse_size(self.generation_memory, "--generation-memory")
        except UsageError as exc:
            raise SpecError(exc.message, exc.hint) from None


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration tokens and what the model card says about them."""

    tokens: Tensor   # int64 (nsamples, seqlen), CPU
    source: str      # what was read, e.g. "c4_validation_2k.parquet (text column)" or "self-generated (seed 0)"
    sha256: str      # SHA-256 of tokens as little-endian int64 bytes, C order
    rule: str        # one sentence describing the selection


def tokens_sha256(tokens: Tensor) -> str:
    """Hex SHA-256 of `tokens` as little-endian int64 bytes in C order (any shape)."""
    array = tokens.detach().cpu().contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` are existing files and the same one (os.path.samefile)."""
    return os.path.isfile(a) and os.path.isfile(b) and os.path.samefile(a, b)


def read_documents(source: str, text_column: str = "text", tokenizer: Any = None) -> list[str]:
    """The documents of `source`, in order; empty ones and nulls dropped.

    .txt: blank-line separated, each stripped. .jsonl (an object per line) / .json (a list of
    objects, or one with a list under "data"/"rows"): field `text_column`, else chat `messages`
    rendered with tokenizer.apply_chat_template(messages, tokenize=False). .parquet: column
    `text_column`. "hf:ID[:CONFIG[:SPLIT]]", or org/name[:config[:split]] that is no existing path:
    column `text_column` of load_dataset(ID, CONFIG, split=SPLIT or "train") (optional `datasets`).
    """
    return _read(source, text_column, tokenizer)[0]


def _read(source: str, column: str, tokenizer: Any) -> tuple[list[str], str]:
    """(documents, a description of what was read)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if source.startswith("hf:"):
        docs, what = _read_hub(source[3:], column)
    elif path.is_file():
        if suffix not in FILE_TYPES:
            raise UsageError(f"calibration file {source} has an unknown extension {suffix or '(none)'!r}",
                             f"accepted: {', '.join(FILE_TYPES)}")
        docs, what = _read_file(path, suffix, column, tokenizer)
        what = f"{path.name} ({what})"
    elif path.exists():
        raise UsageError(f"calibration source {source} is not a file", f"pass {ACCEPTED}")
    elif suffix not in FILE_TYPES and not source.startswith((".", "/", "~")) and HUB_ID.fullmatch(source):
        docs, what = _read_hub(source, column)
    else:
        raise UsageError(f"calibration file not found: {source}", f"check the path; pass {ACCEPTED}")
    if not docs:
        raise UsageError(f"calibration source {source} holds no documents (it is empty or blank)",
                         "give a source with text in it")
    return docs, what


def _read_file(path: Path, suffix: str, column: str, tokenizer: Any) -> tuple[list[str], str]:
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            names = pq.read_schema(path).names
            return _from_column(names, lambda c: pq.read_table(path, columns=[c]).column(c).to_pylist(),
                                column, str(path))
        except ImportError:
            raise UsageError(f"reading {path} needs the pyarrow package", "pip install pyarrow") from None
        except (OSError, ValueError) as e:   # pyarrow.ArrowInvalid derives from ValueError
            raise UsageError(f"cannot read parquet file {path}: {e}", "is it a parquet file?") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read calibration file {path}: {e}", "it must be UTF-8 text") from None
    if suffix == ".txt":
        docs = re.split(r"\n[ \t\r\f\v]*\n", text)   # a blank line holds spaces at most
        return [d.strip() for d in docs if d.strip()], "blank-line separated documents"
    if suffix == ".jsonl":
        rows: Any = [_parse_json(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        return _from_records(rows, column, tokenizer, str(path))
    rows = _parse_json(text, str(path))
    if isinstance(rows, dict):
        rows = next((rows[k] for k in ("data", "rows") if isinstance(rows.get(k), list)), rows)
    if not isinstance(rows, list):
        raise UsageError(f"{path} must hold a JSON list of objects, or an object with a list under "
                         '"data" or "rows"', "or put one object per line in a .jsonl file")
    return _from_records(rows, column, tokenizer, str(path))


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{where} is not valid JSON ({e})", "fix the file or use .txt") from None


def _from_records(records: Any, column: str, tokenizer: Any, where: str) -> tuple[list[str], str]:
    """Documents from dict rows: field `column`, else chat `messages` rendered with the tokenizer."""
    docs, chat = [], False
    for i, row in enumerate(records):
        if not isinstance(row, dict) or (column not in row and "messages" not in row):
            fields = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
            raise UsageError(f"{where}: row {i} has no {column!r} or 'messages' field ({fields})",
                             "name the text field with --text-column")
        value = row[column] if column in row else _render_chat(row["messages"], tokenizer, f"{where} row {i}")
        chat |= column not in row
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{where}: row {i} field {column!r} is a {type(value).__name__}, not text",
                             "name the text field with --text-column")
        if value:
            docs.append(value)
    return docs, ("chat messages rendered with the chat template" if chat else f"{column} column")


def _render_chat(messages: Any, tokenizer: Any, where: str) -> str:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UsageError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{where} holds chat 'messages' but the tokenizer has no chat template to render "
                         "them", "use a model whose tokenizer has a chat template, or give plain text")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _from_column(names: list[str], read: Callable[[str], Any], column: str,
                 where: str) -> tuple[list[str], str]:
    """Documents from column `column` of a table (parquet, datasets) whose columns are `names`."""
    if column not in names:
        raise UsageError(f"{where} has no column {column!r}; its columns are {', '.join(names)}",
                         "name the text column with --text-column")
    return _from_records(({column: v} for v in read(column)), column, None, where)


def _read_hub(ref: str, column: str) -> tuple[list[str], str]:
    """A hub dataset ID[:CONFIG[:SPLIT]] through the optional `datasets` package."""
    name, config_id, split = (ref.split(":") + ["", ""])[:3]
    config, split = config_id or None, split or "train"
    try:
        import datasets
    except ImportError:
        raise UsageError(f"reading the hub dataset {name} needs the optional datasets package",
                         "pip install datasets, or pass a local .txt/.jsonl/.json/.parquet file") from None
    try:   # offline (HF_DATASETS_OFFLINE=1, or no network) datasets answers from its own cache
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:   # datasets raises many unrelated types; all mean "cannot read it"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot load hub dataset {name} (config {config}, split {split}): {reason}",
                         "check the id, config and split; offline, it must be in the datasets cache "
                         "(HF_DATASETS_OFFLINE=1, HF_HOME)") from None
    docs, what = _from_column(rows.column_names, lambda c: rows[c], column, f"{name} {split} split")
    return docs, f"{name} {split} split ({what})"


def select_samples(documents: list[str], tokenizer: Any, nsamples: int, seqlen: int, *,
                   source: str = "the calibration text") -> tuple[Tensor, str]:
    """`nsamples` sequences of `seqlen` tokens: (int64 (nsamples, seqlen), one-sentence rule).

    The rule: walk the documents in order, tokenized one at a time without special tokens; each
    with at least `seqlen` tokens gives its first `seqlen`; stop at `nsamples` (64 x 512 on the C4
    parquet is BENCHMARKS.md protocol Q). If fewer qualify, the rest are consecutive windows of
    the shorter documents (empty ones skipped) concatenated in order, joined by the tokenizer's EOS
    when it has one (the pool keeps at most nsamples * seqlen tokens). Too little text: UsageError.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    joiner = [eos] if isinstance(eos, int) else []
    samples: list[list[int]] = []
    pool: list[int] = []            # the short documents, concatenated
    short = total = 0
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        total += len(ids)
        if len(ids) >= seqlen:
            samples.append(ids[:seqlen])
            if len(samples) == nsamples:
                break
        elif ids:
            short += 1
            if len(pool) < nsamples * seqlen:   # more could never be used
                pool.extend((joiner if pool else []) + ids)
    long = len(samples)
    samples += [pool[i:i + seqlen] for i in range(0, len(pool) - seqlen + 1, seqlen)][:nsamples - long]
    if len(samples) < nsamples:
        raise UsageError(f"{source} holds only {len(samples)} samples of {seqlen} tokens ({total} tokens)",
                         "lower --nsamples or --seqlen, or give more text")
    rule = (f"The first {seqlen} tokens (no special tokens added) of each of the first {long} "
            f"documents, in order, with at least {seqlen} tokens")
    if long < nsamples:
        rule += (f", then {nsamples - long} consecutive {seqlen}-token windows of the {short} shorter "
                 f"documents {'joined by EOS' if joiner else 'concatenated'}")
    return torch.tensor(samples, dtype=torch.int64), rule + "."


def generate_self(model: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int,
                  batch_size: int = GENERATION_BATCH,
                  progress: Callable[[int, int], None] | None = None) -> Tensor:
    """`nsamples` sequences the model samples itself: int64 (nsamples, seqlen) on CPU.

    Each starts from the tokenizer's BOS token (EOS without one, else 0), then tokens sampled at
    temperature 1.0, top-p 0.95, `batch_size` sequences at a time, in our own loop (model.generate
    takes defaults from generation_config): each step feeds only the newest token and the KV cache
    of the ones before. All uniforms come first from a CPU generator seeded with `seed`: on one
    device the seed alone decides, whatever the batch size. `progress(tokens, total)` is called
    about twenty times per batch with the tokens written so far.
    """
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = input_device(model)
    uniforms = torch.rand(nsamples, seqlen - 1, generator=torch.Generator().manual_seed(seed)).to(device)
    cache = _cache_name(model)
    every = max(1, (seqlen - 1) // 20)
    out = []
    with torch.inference_mode():
        for first in range(0, nsamples, batch_size):
            n = min(batch_size, nsamples - first)
            tokens = torch.full((n, seqlen), start, dtype=torch.int64, device=device)        # (n, seqlen)
            step = model(tokens[:, :1], use_cache=True)
            if not bool(torch.isfinite(step.logits).all()):   # NaN weights give NaN logits from the start
                raise CheckpointError("the model's logits are not finite while it writes its own calibration text, "
                                      "so its weights are damaged", "re-download the checkpoint, or use another "
                                      "revision")
            for i in range(seqlen - 1):
                # The first sampled token is drawn hotter (1.5) so sequences that all start from
                # the same token spread over topics instead of repeating the likeliest opening.
                temperature = FIRST_TEMPERATURE if i == 0 else 1.0
                u = uniforms[first:first + n, i:i + 1]                                        # (n, 1)
                tokens[:, i + 1:i + 2] = _sample_top_p(step.logits[:, -1].float() / temperature, u)
                if i < seqlen - 2:
                    step = model(tokens[:, i + 1:i + 2], use_cache=True, **{cache: getattr(step, cache)})
                if progress is not None and ((i + 1) % every == 0 or i == seqlen - 2):
                    progress(first * seqlen + n * (i + 2), nsamples * seqlen)
            out.append(tokens.cpu())
    return torch.cat(out)                                                                      # (nsamples, seqlen)


def input_device(model: Any) -> torch.device:
    """Where `model` takes its inputs: the device accelerate runs a dispatched model on (offloaded
    weights sit on the meta device between passes), else the device of its first parameter."""
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if device is None:
        return next(model.parameters()).device
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _cache_name(model: Any) -> str:
    """The name under which the model's forward takes, and its output returns, the KV cache:
    `cache` from transformers 5 on (where the old name warns), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# Candidates looked at, per row, before sorting the whole vocabulary. Sampling SmolLM2-135M at
# temperature 1.0, the top 512 held the nucleus in about 60% of the steps, the top 4096 in 93%;
# these two tiers sampled its steps about four times faster than one sort of all 49152 tokens.
NUCLEUS_CANDIDATES = (512, 4096)


def _sample_top_p(logits: Tensor, u: Tensor) -> Tensor:
    """One token per row of logits (n, V) from its top-p nucleus, inverse CDF at u (n, 1): int64 (n, 1).

    The nucleus is the shortest prefix, in descending probability with ties in vocabulary order,
    whose mass reaches TOP_P. Sorting the whole vocabulary would cost about as much as a small
    model's forward pass, so each row first sorts only its largest candidates, and looks further
    only when its nucleus may reach past them; the token is the one the whole sort would give.
    """
    probs = torch.softmax(logits, dim=-1)                                                   # (n, V)
    tokens = torch.empty(u.shape, dtype=torch.int64, device=probs.device)                  # (n, 1)
    rows = torch.arange(len(probs), device=probs.device)                                    # not yet sampled
    for k in (*NUCLEUS_CANDIDATES, probs.shape[-1]):
        picked, done = _nucleus_pick(probs[rows], u[rows], k)
        tokens[rows[done]] = picked[done]
        rows = rows[~done]
        if not len(rows):
            break
    return tokens


def _nucleus_pick(probs: Tensor, u: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sample rows of probs (n, V) among their k largest: (tokens int64 (n, 1), done bool (n,)); a
    row is done when its nucleus ends among candidates no token outside them could precede."""
    whole = k >= probs.shape[-1]
    if whole:
        values, order = probs.sort(dim=-1, descending=True, stable=True)                    # (n, V)
    else:
        values, order = probs.topk(k, dim=-1)          # the k largest; ties in no promised order
        order, by_index = order.sort(dim=-1)                                                # (n, k)
        values, by_value = values.gather(-1, by_index).sort(dim=-1, descending=True, stable=True)
        order = order.gather(-1, by_value)             # descending, ties in vocabulary order
    keep = values.cumsum(dim=-1) - values < TOP_P      # the mass before each token is below p
    # A token left out can only equal the smallest candidate, so only the candidates above it are
    # certainly in the whole sort's order; the nucleus must end among them.
    done = torch.ones_like(keep[:, 0]) if whole else (~keep & (values > values[:, -1:])).any(dim=-1)
    cdf = torch.where(keep, values, torch.zeros_like(values)).cumsum(dim=-1)                # (n, k)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)                             # (n, 1)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)   # in case u rounds up to the total
    return order.gather(-1, pick), done


def load_calibration(spec: CalibrationSpec, tokenizer: Any, *,
                     model_loader: Callable[[], Any] | None = None, max_context: int | None = None,
                     warn: Callable[[str], None] = lambda msg: None,
                     progress: Callable[[int, int], None] | None = None) -> CalibrationSet:
    """The set `spec` describes (seqlen capped at `max_context`); "self" samples `model_loader()`,
    reporting `progress(tokens, total)` as it writes."""
    seqlen = spec.seqlen
    if max_context is not None and seqlen > max_context:
        warn(f"--seqlen {seqlen} exceeds the model's context of {max_context} tokens; using {max_context}")
        seqlen = max_context
    if spec.source == "self":
        if model_loader is None:
            raise ValueError("source 'self' needs model_loader to generate calibration text")
        warn(f"no --dataset given: calibrating on text the model generates itself (seed {spec.seed}); "
             "pass --dataset for real text")
        tokens = generate_self(model_loader(), tokenizer, spec.nsamples, seqlen, spec.seed, progress=progress)
        source = f"self-generated (seed {spec.seed})"
        rule = (f"{spec.nsamples} sequences of {seqlen} tokens sampled by the model from its start token "
                f"(seed {spec.seed}, top-p {TOP_P}, temperature 1.0, {FIRST_TEMPERATURE} for the first).")
    else:
        docs, source = _read(spec.source, spec.text_column, tokenizer)
        tokens, rule = select_samples(docs, tokenizer, spec.nsamples, seqlen, source=spec.source)
    return CalibrationSet(tokens=tokens, source=source, sha256=tokens_sha256(tokens), rule=rule)
