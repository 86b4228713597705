"""Checkpoint tensor names <-> the names of the model in memory, as transformers itself maps them.

transformers 5 renames many checkpoints while loading (a multimodal model's `language_model.model.`
becomes `model.language_model.`) and fuses others (a MoE layer's per-expert `experts.3.gate_proj.weight`
tensors become one 3-D `experts.gate_up_proj`), reverting both when it saves. A `WeightMap` records,
for every tensor of the checkpoint, the parameter it becomes, using transformers' own conversion
rules for the model (`conversion_mapping`), so that:

- the calibrated runner materializes a block's parameters from the checkpoint (`assemble`, running
  the conversion's own operations on the stored tensors), and puts quantized experts back the same way;
- every quantized matrix is a tensor of the checkpoint (one expert's gate, up or down projection),
  quantized and written under the checkpoint's own name, which is what vLLM's fused-MoE loader and
  transformers' loader expect to find.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..errors import CheckpointError


@dataclass
class Fused:
    """One parameter in memory made of several checkpoint tensors (a MoE layer's fused experts)."""

    target: str                              # memory name, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    converter: Any                           # transformers' WeightConverter that builds it
    pieces: dict[str, list[str]] = field(default_factory=dict)   # source pattern -> stored names by expert

    def names(self) -> list[str]:
        return [n for names in self.pieces.values() for n in names]


@dataclass
class WeightMap:
    """Stored names and memory names of one model (see the module docstring)."""

    to_disk: dict[str, str]                  # memory name -> stored name (1:1, renamed or not)
    fused: dict[str, Fused]                  # memory name -> its stored pieces
    config: Any = None
    model: Any = None                        # the model (on meta) the names belong to; operations read shapes

    @property
    def identity(self) -> bool:
        return not self.fused and all(k == v for k, v in self.to_disk.items())

    def disk_name(self, memory: str) -> str:
        return self.to_disk.get(memory, memory)

    def memory_of(self) -> dict[str, str]:
        """Stored name -> memory name, for every stored tensor (pieces map to their fused parameter)."""
        out = {disk: mem for mem, disk in self.to_disk.items()}
        for mem, fused in self.fused.items():
            out.update({n: mem for n in fused.names()})
        return out

    def assemble(self, memory: str, read: Callable[[str], Tensor]) -> Tensor:
        """The memory parameter `memory`, from the stored tensors `read` returns (1:1 or fused)."""
        if memory not in self.fused:
            return read(self.disk_name(memory))
        fused = self.fused[memory]
        conv = fused.converter
        values: dict[str, Any] = {pattern: [read(n) for n in names] for pattern, names in fused.pieces.items()}
        for op in conv.operations:
            values = op.convert(values, source_patterns=list(fused.pieces), target_patterns=conv.target_patterns,
                                config=self.config, full_layer_name=memory, model=self.model)
        if len(values) != 1:
            raise CheckpointError(f"cannot rebuild {memory} from the checkpoint's tensors {fused.names()[:2]}...",
                                  "a newer or older transformers may know this layout")
        return next(iter(values.values()))


def _expert_index(pattern: str, name: str) -> int:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, name)
    return int(found.group(1)) if found and found.groups() else 0


def build(skeleton: nn.Module, stored: list[str]) -> WeightMap:
    """The WeightMap of `skeleton` (models.load.build_skeleton) for a checkpoint with tensors `stored`.

    Stored names that transformers does not convert map to themselves; those it renames map to the
    renamed parameter; those a converter merges are grouped per memory parameter, in expert order.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:   # an older transformers: no conversions, names as stored
        return WeightMap({n: n for n in stored}, {})
    try:
        transforms = get_model_conversion_mapping(skeleton)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a model transformers cannot map is read as stored
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict(skeleton.state_dict(keep_vars=True))
    prefix = getattr(skeleton, "base_model_prefix", None)
    to_disk: dict[str, str] = {}
    fused: dict[str, Fused] = {}
    owner = {id(c): c for c in converters}
    for name in stored:
        if not renamings and not converters:
            to_disk[name] = name
            continue
        memory, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if pattern is None:
            to_disk[memory] = name
            continue
        conv = next((c for c in owner.values() if pattern in c.source_patterns), None)
        entry = fused.setdefault(memory, Fused(memory, conv))
        entry.pieces.setdefault(pattern, []).append(name)
    for entry in fused.values():
        ordered = {p: sorted(names, key=functools.partial(_expert_index, p)) for p, names in entry.pieces.items()}
        entry.pieces = {p: ordered[p] for p in entry.converter.source_patterns if p in ordered}
    return WeightMap(to_disk, fused, getattr(skeleton, "config", None), skeleton)


def _meta(shape: tuple[int, int], name: str) -> Tensor:
    import torch

    return torch.empty(shape, device="meta")


def piece_shape(weights: WeightMap, target: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) of one stored matrix of fused parameter `target` (of `shape` in memory),
    found by rebuilding it from meta tensors of each candidate shape with the conversion's own
    operations (merging the experts, concatenating gate and up, transposing where the family does)."""

    fused = weights.fused[target]
    k = max(1, len(fused.pieces))
    rows, cols = shape[-2], shape[-1]
    candidates = [(rows, cols), (cols, rows)]
    if k > 1:
        candidates += [(rows // k, cols), (cols // k, rows), (rows, cols // k), (cols, rows // k)]
    for candidate in dict.fromkeys(candidates):
        try:
            built = weights.assemble(target, functools.partial(_meta, candidate))
        except Exception:  # noqa: BLE001 - a candidate the operations cannot combine
            continue
        if tuple(built.shape) == tuple(shape):
            return candidate
    raise CheckpointError(f"cannot tell the shape of one stored matrix of {target} {list(shape)}",
                          "a newer or older transformers may know this layout")
