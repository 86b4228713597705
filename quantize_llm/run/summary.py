"""What a run did: the Summary behind the summary table, the JSON log's `done` event and the model card."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..calibration.sequential import LayerReport


@dataclass
class Summary:
    """What a run did, for the summary table, the JSON log and the model card."""

    model: str
    output: str
    spec: dict
    blocks: int
    seconds: float
    input_bytes: int
    output_bytes: int
    quantized_params: int
    quantized_bytes: int          # bytes of the quantized Linears' packed tensors (no bias)
    bits_per_weight: float        # 8 * quantized_bytes / quantized_params
    peak_rss_mb: float
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    calibration: dict[str, Any] | None = None                 # source, sha256, samples, rule
    evaluation: dict[str, Any] | None = None                  # perplexity/KL after writing (--eval)
    pushed_to: str | None = None                              # hub URL (--push-to-hub)
    verification: dict[str, Any] | None = None                # modules read back, last block's difference
    allocation: list[str] | None = None                       # --target-bpw: the allocation, as the plan prints it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
