"""Publishing a written checkpoint: its measured quality in the model card, and the upload.

`evaluate_into_card` measures perplexity and KL divergence against the source model after the
checkpoint is written and adds them, with the exact protocol, to its README.md. `check_hub` runs
before any work when an upload was asked for (offline, not logged in or unreachable: a clear error
now, not after hours); `push` uploads the finished folder with huggingface_hub.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import RunError, UsageError


@dataclass(frozen=True)
class EvalSpec:
    dataset: str                 # a UTF-8 text file, read as one string
    windows: int = 40            # 0: the whole text
    seqlen: int = 512

    def __post_init__(self) -> None:
        if not Path(self.dataset).expanduser().is_file():
            raise UsageError(f"--eval {self.dataset} is not a file", "pass a UTF-8 text file, e.g. wiki.test.raw")
        if self.windows < 0:
            raise UsageError(f"--eval-windows {self.windows} must be 0 (the whole text) or more", "40 is typical")
        if self.seqlen < 8:
            raise UsageError(f"the eval window of {self.seqlen} tokens is too short: it must be at least 8",
                             "512 is typical")


def evaluate_into_card(output: Path, source: Path, spec: EvalSpec, device: str,
                       emit: Callable[[str, dict], None], trust_remote_code: bool = False) -> dict[str, Any]:
    """Perplexity and KL of OUT against SOURCE on spec.dataset; appended to OUT/README.md."""
    from ..eval.evaluate import file_sha256, run_eval

    dataset = Path(spec.dataset).expanduser()
    result = run_eval(str(output), dataset, seqlen=spec.seqlen, windows=spec.windows or None,
                      baseline=str(source), device=device, trust_remote_code=trust_remote_code,
                      on_event=lambda kind, data: emit("warning", data) if kind == "warning" else None)
    record = {"dataset": dataset.name, "dataset_sha256": file_sha256(dataset), **asdict(result)}
    section = ["", "## Evaluation", "",
               f"Measured by quantize-llm {__version__} after writing: `{dataset.name}` (SHA-256 "
               f"{record['dataset_sha256']}) read as one string, tokenized once with this model's tokenizer, cut "
               f"into {result.windows} non-overlapping windows of {result.seqlen} tokens; perplexity = exp(mean over "
               f"windows of the mean token NLL), float32; KL = mean per-token KL(source || quantized).", "",
               "| model | perplexity | ratio | KL to source |", "|---|---|---|---|",
               f"| source (unquantized) | {result.baseline_perplexity:.3f} | 1.000 | - |",
               f"| this checkpoint | {result.perplexity:.3f} | {result.ppl_ratio:.4f} | {result.kl:.5f} |", ""]
    card = output / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    tmp = card.with_name(".README.md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n" + "\n".join(section), encoding="utf-8")
    os.replace(tmp, card)
    return record


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def check_hub(repo: str) -> None:
    """Before any work: a hub upload to `repo` can be attempted (online, logged in, reachable)."""
    from huggingface_hub import get_token

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UsageError(f"--push-to-hub {repo!r} is not a repository id", "write it as user/name or org/name")
    if _offline():
        raise UsageError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set",
                         "unset HF_HUB_OFFLINE, or drop --push-to-hub and upload later with `hf upload`")
    if not get_token():
        raise UsageError("--push-to-hub needs a Hugging Face token, and none is set",
                         "run `hf auth login` or set HF_TOKEN")
    try:
        _api().whoami()
    except Exception as exc:  # noqa: BLE001  (network, HTTP and auth errors all end here)
        raise UsageError(f"--push-to-hub: the hub cannot be reached or refuses the token "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                         "check the network and HF_TOKEN, or drop --push-to-hub and upload later") from None


def push(output: Path, repo: str, private: bool = True) -> str:
    """Upload the finished folder; returns the repository URL."""
    api = _api()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(output),
                          commit_message=f"Upload {output.name} quantized with quantize-llm {__version__}")
    except Exception as exc:  # noqa: BLE001
        raise RunError(f"{output} is written, but uploading it to {repo} failed "
                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                       f"upload it later with `hf upload {repo} {output}`") from None
    return f"{api.endpoint.rstrip('/')}/{repo}"
