"""Per-family knowledge, as data: where the decoder blocks are and which Linears they hold.

Keyed by `config.architectures[0]`. Supporting a family means adding an entry here (or pointing
a new architecture name at an existing map), never code elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelError


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the decoder blocks live and how their Linears are grouped.

    layers      module path of the ModuleList of decoder blocks, e.g. "model.layers"
    sequential  Linears (paths relative to a block) quantized together because they share an
                input, in execution order; together they are every Linear of the block
    """

    layers: str
    sequential: tuple[tuple[str, ...], ...]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable Linear of a block, in execution order."""
        return tuple(name for group in self.sequential for name in group)


LLAMA = ArchitectureMap(
    layers="model.layers",
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"),
                ("mlp.down_proj",)),
)

# Phi-3 fuses q/k/v into one Linear and gate/up into another.
PHI3 = ArchitectureMap(
    layers="model.layers",
    sequential=(("self_attn.qkv_proj",),
                ("self_attn.o_proj",),
                ("mlp.gate_up_proj",),
                ("mlp.down_proj",)),
)

OPT = ArchitectureMap(
    layers="model.decoder.layers",
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.out_proj",),
                ("fc1",),
                ("fc2",)),
)

ARCHITECTURES: dict[str, ArchitectureMap] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
    "GemmaForCausalLM": LLAMA,
    "Gemma2ForCausalLM": LLAMA,
    "Gemma3ForCausalLM": LLAMA,
    "Phi3ForCausalLM": PHI3,
    "OPTForCausalLM": OPT,
}


def architecture_name(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise ModelError("config.json has no 'architectures' entry, so the model family is unknown",
                         f"add e.g. \"architectures\": [\"LlamaForCausalLM\"]; known: {known_list()}")
    return archs[0]


def get_architecture(config: Mapping[str, Any]) -> ArchitectureMap:
    """The map for a model's config.json contents; an unknown family is a ModelError."""
    name = architecture_name(config)
    if name not in ARCHITECTURES:
        raise ModelError(f"architecture {name} is not supported",
                         f"known architectures: {known_list()}")
    return ARCHITECTURES[name]


def known_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))
