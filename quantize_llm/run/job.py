"""A Job: one quantization run, as a command or a recipe entry describes it (validated by recipe.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.spec import QuantSpec
from ..errors import UsageError


@dataclass(frozen=True)
class Job:
    """One quantization run: what `quantize()` needs, validated."""

    name: str
    model: str
    output: Path
    spec: QuantSpec
    options: Any = None
    calibration: Any = None          # CalibrationSpec, or None for methods that need no data
    device: str = "auto"
    overwrite: bool = False
    max_shard_size: str = "2GB"
    batch_size: int = 8
    resume: bool = True
    strict_vllm: bool = False        # vLLM preflight findings are errors, not warnings
    verify: bool = True              # read the written checkpoint back and check it before the rename
    trust_remote_code: bool = False  # run the model folder's own code where its config.json names some
    max_memory: str | None = None    # the most memory a calibrated run may plan for on its work device
    evaluation: Any = None           # publish.EvalSpec: measure the written checkpoint into its card
    push_to_hub: str | None = None   # hub repository to upload to
    budget: Any = None               # budget.Budget: --target-bpw / --target-size, per-module settings chosen
    source: dict = field(default_factory=dict)   # the job's keys as given (for the model card)


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'2GB' -> 2*1000^3 bytes, '500MiB' -> 500*1024^2; a plain number is bytes. `flag` names the
    option in the error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{flag} {text!r} is not a size", "write it like 2GB or 500MB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    try:
        size = int(float(m.group(1)) * base ** power)
    except OverflowError:
        raise UsageError(f"{flag} {text[:40]!r} is too large", "write it like 2GB or 500MB") from None
    if size <= 0:
        raise UsageError(f"{flag} {text!r} must be positive", "write it like 2GB or 500MB")
    return size
