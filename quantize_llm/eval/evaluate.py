"""Perplexity and KL divergence against the unquantized model (BENCHMARKS.md, protocol Q).

The text file is read as one string and tokenized once (no special tokens), cut into
non-overlapping windows of `seqlen` tokens; each window is scored on its own (no context carried
over). Perplexity = exp(mean over windows of the window's mean token NLL), logits in float32.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError, UsageError
from ..models.load import CheckpointReader, build_skeleton, check_against_config, resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """One evaluation; the baseline fields are None when no baseline model was given."""

    perplexity: float                     # exp(nll)
    nll: float                            # mean over windows of the mean token NLL, nats
    windows: int                          # number of windows scored
    seqlen: int                           # tokens per window
    tokens: int                           # predicted tokens: windows * (seqlen - 1)
    baseline_perplexity: float | None     # the baseline model's perplexity on the same windows
    kl: float | None                      # mean per-token KL(P_baseline || P_model), nats
    ppl_ratio: float | None               # perplexity / baseline_perplexity
    seconds: float                        # wall time of the whole evaluation


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (BENCHMARKS.md quotes it for wiki.test.raw)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenize_text(path: Path, tokenizer: Any) -> Tensor:
    """The whole file as one UTF-8 string, tokenized once without special tokens: int64 (n,).

    Logs the file's SHA-256 and the token count, so a run records exactly what it scored.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read evaluation text {path}: {exc}") from None
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.int64)
    logger.info("%s: sha256 %s, %d tokens", path, file_sha256(path), ids.numel())
    return ids


def make_windows(ids: Tensor, seqlen: int, n_windows: int | None = None) -> Tensor:
    """Non-overlapping windows (n, seqlen) int64 from token ids (total,): the first n_windows of them.

    n_windows None or 0 takes every whole window; the tail shorter than `seqlen` is dropped.
    """
    if seqlen < 2:
        raise UsageError(f"--seqlen {seqlen} is too short", "a window needs at least 2 tokens; 512 is usual")
    available = ids.numel() // seqlen
    if available == 0:
        raise UsageError(f"the text has {ids.numel()} tokens, shorter than one window of {seqlen}",
                         "use a longer text or a smaller --seqlen")
    if n_windows is not None and n_windows < 0:
        raise UsageError(f"--windows {n_windows} is negative", "use 0 for all windows")
    n = n_windows or available
    if n > available:
        raise UsageError(f"--windows {n} asks for more than the {available} windows of {seqlen} "
                         "tokens the text holds", f"use --windows {available} or 0 for all")
    return ids[: n * seqlen].reshape(n, seqlen).to(torch.int64)       # (n, seqlen)


def _log_probs(model: nn.Module, window: Tensor) -> Tensor:
    """Log-probabilities of the next token at positions 0..L-2: float32 (L-1, vocab)."""
    device = next(model.parameters()).device
    logits = model(input_ids=window.to(device)[None], use_cache=False).logits[0]  # (L, vocab)
    return F.log_softmax(logits[:-1].float(), dim=-1)                             # (L-1, vocab)


def _mean_nll(logp: Tensor, window: Tensor) -> float:
    """Mean NLL of tokens 1..L-1 given logp (L-1, vocab) and the window (L,)."""
    target = window[1:].to(logp.device)                                   # (L-1,)
    return float(-logp.gather(1, target[:, None]).double().mean())


def evaluate(model: nn.Module, windows: Tensor, baseline: nn.Module | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Score `windows` (n, L) int64 with `model` (and `baseline`, for the KL and ppl ratio).

    progress(done, total) is called after each window. Models are not modified.
    """
    start = time.perf_counter()
    n, seqlen = windows.shape
    nll, base_nll, kl_sum = [], [], 0.0
    with torch.inference_mode():
        for i in range(n):
            logp = _log_probs(model, windows[i])                          # (L-1, vocab)
            nll.append(_mean_nll(logp, windows[i]))
            if baseline is not None:
                base = _log_probs(baseline, windows[i]).to(logp.device)   # (L-1, vocab)
                base_nll.append(_mean_nll(base, windows[i]))
                # KL(P_b || P_m) = sum_v p_b (log p_b - log p_m), accumulated in float64
                kl_sum += float((base.exp() * (base - logp)).sum(dtype=torch.float64))
            if progress is not None:
                progress(i + 1, n)
    mean_nll = sum(nll) / n
    ppl = math.exp(mean_nll)
    base_ppl = math.exp(sum(base_nll) / n) if baseline is not None else None
    return EvalResult(perplexity=ppl, nll=mean_nll, windows=n, seqlen=seqlen,
                      tokens=n * (seqlen - 1), baseline_perplexity=base_ppl,
                      kl=kl_sum / (n * (seqlen - 1)) if baseline is not None else None,
                      ppl_ratio=ppl / base_ppl if base_ppl is not None else None,
                      seconds=time.perf_counter() - start)


def load_for_eval(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  backend: str = "auto", trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """(eval-mode model in `dtype` on `device`, tokenizer) for MODEL, quantized or not.

    Quantized checkpoints load through `load_quantized` (with `backend`); others through
    transformers, safetensors only (our reader refuses pickle-only folders first), an FP8 source
    through our reader's bfloat16 view; the model's own code runs only with `trust_remote_code`.
    """
    from transformers import AutoTokenizer

    from ..formats.gguf import is_gguf
    from ..formats.reading import QuantizedModules
    from ..models.sources import load_float_model
    from ..runtime.load import load_quantized

    if is_gguf(Path(model).expanduser()):          # a GGUF file: its weights dequantized, its tokenizer
        from ..runtime.gguf import load_gguf, load_gguf_tokenizer

        return load_gguf(model, device=device, dtype=dtype), load_gguf_tokenizer(model)
    folder = resolve_model(model, trust_remote_code=trust_remote_code)
    # config.json and the weights first: the tokenizer reads config.json too, and says less about it
    with CheckpointReader(folder) as reader:
        quantized = bool(reader.config.get("quantization_config"))
        if quantized:
            QuantizedModules(reader)   # a quantization_config we cannot read; load_quantized checks the rest
        skeleton = build_skeleton(folder, reader.config, trust_remote_code=trust_remote_code)
        if not quantized:          # transformers would fill what is missing with random weights
            check_against_config(reader, skeleton)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelError(f"no usable tokenizer in {folder} ({reason})",
                         "copy the tokenizer files of the original model into the folder") from None
    if quantized:
        return (load_quantized(folder, device=device, dtype=dtype, backend=backend,
                               trust_remote_code=trust_remote_code), tokenizer)
    return load_float_model(folder, dtype, trust_remote_code).to(device).eval(), tokenizer


def run_eval(model: str, dataset: Path, *, seqlen: int = 512, windows: int | None = 40,
             baseline: str | None = None, device: str = "auto",
             on_event: Callable[[str, dict], None] | None = None, trust_remote_code: bool = False) -> EvalResult:
    """`quantize-llm eval`: load MODEL (and BASELINE), tokenize DATASET once, score the windows."""
    from ..core.devices import resolve_device

    emit = on_event or (lambda kind, data: None)
    dev = resolve_device(device)
    dataset = Path(dataset).expanduser()
    if not dataset.is_file():
        raise UsageError(f"--dataset {dataset} is not a file", "pass a UTF-8 text file, e.g. wiki.test.raw")
    _warn_if_calibrated_on(model, dataset, emit)
    net, tokenizer = load_for_eval(model, dev, trust_remote_code=trust_remote_code)
    ref = None
    if baseline is not None:
        ref, ref_tokenizer = load_for_eval(baseline, dev, trust_remote_code=trust_remote_code)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"--baseline {baseline} uses another vocabulary than {model}",
                             "compare a quantized model with the model it was made from")
    ids = tokenize_text(dataset, tokenizer)
    cut = make_windows(ids, seqlen, windows or None)
    emit("start", {"model": model, "output": str(dataset), "total": len(cut), "unit": "windows",
                   "device": str(dev), "dataset_sha256": file_sha256(dataset), "tokens": len(ids)})
    result = evaluate(net, cut, ref, progress=lambda done, total: emit("window", {"index": done - 1,
                                                                                 "total": total}))
    emit("done", {"model": model, "baseline": baseline, **result.__dict__})
    return result


def _warn_if_calibrated_on(model: str, dataset: Path, emit: Callable[[str, dict], None]) -> None:
    """Evaluating on the calibration text flatters the model: say so."""
    from ..calibration.data import same_file
    from ..formats.gguf import is_gguf

    if is_gguf(Path(model).expanduser()):
        return
    with CheckpointReader(resolve_model(model)) as reader:
        path: Any = reader.config.get("quantization_config")
    for key in ("meta", "calibration", "path"):   # a damaged config is refused when the model loads
        path = path.get(key) if isinstance(path, dict) else None
    if isinstance(path, str) and path and same_file(path, dataset):
        emit("warning", {"message": f"{dataset} is the text {model} was calibrated on; "
                                    "its perplexity here is not a fair measure"})
