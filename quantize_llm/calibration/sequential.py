"""The block-by-block runner: one decoder block in memory at a time, results streamed out.

`run()` yields, for each block in order, the quantized results of its Linears and the block's
other tensors, so the caller can encode and write them and drop them before the next block is read.
Algorithms that need calibration statistics hook into the same loop (block inputs captured, hooks
on the Linears, quantized outputs propagated to the next block); the runner asks each algorithm
what it needs through `needs_calibration`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..algorithms.base import Algorithm, LayerContext
from ..errors import RunError
from ..qweight import QuantizedWeight


@dataclass(frozen=True)
class LinearPlan:
    """One Linear of a block: its full name, shape, and whether it is quantized."""

    name: str                    # full module path, e.g. "model.layers.0.self_attn.q_proj"
    local: str                   # path inside the block, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int
    quantize: bool


@dataclass(frozen=True)
class BlockPlan:
    index: int
    prefix: str                  # e.g. "model.layers.0."
    linears: tuple[LinearPlan, ...]
    tensors: tuple[str, ...]     # every tensor name stored under the prefix


@dataclass
class LayerReport:
    """What happened to one Linear: rel_error = ||W - W'||_F / ||W||_F of the weight."""

    name: str
    shape: tuple[int, int]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class BlockResult:
    index: int
    quantized: dict[str, tuple[QuantizedWeight, Tensor | None]]   # full name -> (result, bias)
    passthrough: dict[str, Tensor]                                 # tensor name -> unchanged tensor
    reports: list[LayerReport]
    seconds: float


def run(blocks: list[BlockPlan], algorithm: Algorithm, read: Callable[[str], Tensor],
        device: torch.device) -> Iterator[BlockResult]:
    """Quantize block after block; `read(name)` returns a checkpoint tensor (checked finite)."""
    if algorithm.needs_calibration:
        raise RunError(f"the {algorithm.name} algorithm needs calibration, which this runner "
                       "does not provide yet")
    for plan in blocks:
        start = time.perf_counter()
        todo = [lp for lp in plan.linears if lp.quantize]
        weight_names = {f"{lp.name}.weight" for lp in todo}
        bias_names = {f"{lp.name}.bias" for lp in todo}
        weights = {lp.local: read(f"{lp.name}.weight").to(device) for lp in todo}
        reports: list[LayerReport] = []
        extra: dict[str, dict] = {lp.local: {} for lp in todo}

        def report(local: str, metrics: dict) -> None:
            extra[local].update(metrics)

        with torch.no_grad():
            results = algorithm.quantize_layer(LayerContext(index=plan.index, weights=weights,
                                                            report=report))
        quantized: dict[str, tuple[QuantizedWeight, Tensor | None]] = {}
        for lp in todo:
            qw = results[lp.local]
            w = weights[lp.local].float()
            err = torch.linalg.norm(w - qw.dequantize(torch.float32)) / torch.linalg.norm(w).clamp_min(1e-30)
            bias_name = f"{lp.name}.bias"
            bias = read(bias_name) if bias_name in plan.tensors else None
            quantized[lp.name] = (qw.to("cpu"), bias)
            metrics = {"rel_error": float(err), **extra[lp.local]}
            reports.append(LayerReport(lp.name, (lp.out_features, lp.in_features),
                                       float(metrics.pop("seconds", 0.0)), metrics))
        del weights, results
        passthrough = {name: read(name) for name in plan.tensors
                       if name not in weight_names and name not in bias_names}
        yield BlockResult(plan.index, quantized, passthrough, reports, time.perf_counter() - start)
