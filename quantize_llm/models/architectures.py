"""Per-family knowledge, as data: where the decoder blocks are and which Linears they hold.

Keyed by `config.architectures[0]`. Supporting a family means adding an entry here (or pointing
a new architecture name at an existing map), never code elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelError


@dataclass(frozen=True)
class AWQScale:
    """One AWQ scaling group: a per-channel scale s is multiplied into the input columns of
    `layers` and divided out of the operation `prev` that produces their input, so the block
    computes the same function (paths relative to a block).

    prev        a norm (its weight, and bias if any, are divided by s) or a Linear (the rows of
                its output chunk `prev_chunk` are divided by s)
    layers      every Linear that reads prev's output (one sequential group)
    inspect     the module whose output the scale search compares: the smallest module that
                contains `layers` and whose output does not depend on anything else unquantized
    norm_offset the norm multiplies by (offset + weight): 1.0 for Gemma's RMSNorm, else 0.0
    prev_chunk  (chunks, index): prev's output splits into `chunks` equal parts and part `index`
                feeds `layers` (Phi-3's fused qkv and gate_up); the group is skipped when the
                sizes do not match (grouped-query attention between v_proj and o_proj)
    """

    prev: str
    layers: tuple[str, ...]
    inspect: str
    norm_offset: float = 0.0
    prev_chunk: tuple[int, int] = (1, 0)


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the decoder blocks live and how their Linears are grouped.

    layers      module path of the ModuleList of decoder blocks, e.g. "model.layers"
    sequential  Linears (paths relative to a block) quantized together because they share an
                input, in execution order; together they are every Linear of the block
    awq         AWQ scaling groups, in execution order (empty: AWQ does not support the family)
    awq_no_clip Linears whose range AWQ's clip search leaves alone (queries and keys: their error
                is amplified by the softmax, which the per-Linear clip objective does not see)
    """

    layers: str
    sequential: tuple[tuple[str, ...], ...]
    awq: tuple[AWQScale, ...] = ()
    awq_no_clip: tuple[str, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable Linear of a block, in execution order."""
        return tuple(name for group in self.sequential for name in group)


_LLAMA_SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"),
                     ("mlp.down_proj",))
_QK = ("self_attn.q_proj", "self_attn.k_proj")


def _llama_awq(mlp_norm: str, offset: float = 0.0) -> tuple[AWQScale, ...]:
    return (AWQScale("input_layernorm", _LLAMA_SEQUENTIAL[0], "self_attn", offset),
            AWQScale("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
            AWQScale(mlp_norm, _LLAMA_SEQUENTIAL[2], "mlp", offset),
            AWQScale("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))


LLAMA = ArchitectureMap(layers="model.layers", sequential=_LLAMA_SEQUENTIAL,
                        awq=_llama_awq("post_attention_layernorm"), awq_no_clip=_QK)

# Gemma's RMSNorm multiplies by (1 + weight); Gemma 2 and 3 also normalize the attention output
# (post_attention_layernorm), so their MLP input comes from pre_feedforward_layernorm.
GEMMA = ArchitectureMap(layers="model.layers", sequential=_LLAMA_SEQUENTIAL,
                        awq=_llama_awq("post_attention_layernorm", 1.0), awq_no_clip=_QK)
GEMMA2 = ArchitectureMap(layers="model.layers", sequential=_LLAMA_SEQUENTIAL,
                         awq=_llama_awq("pre_feedforward_layernorm", 1.0), awq_no_clip=_QK)

# Phi-3 fuses q/k/v into one Linear and gate/up into another.
PHI3 = ArchitectureMap(
    layers="model.layers",
    sequential=(("self_attn.qkv_proj",),
                ("self_attn.o_proj",),
                ("mlp.gate_up_proj",),
                ("mlp.down_proj",)),
    awq=(AWQScale("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
         AWQScale("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_chunk=(3, 2)),
         AWQScale("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
         AWQScale("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_chunk=(2, 1))),
    awq_no_clip=("self_attn.qkv_proj",),
)

OPT = ArchitectureMap(
    layers="model.decoder.layers",
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.out_proj",),
                ("fc1",),
                ("fc2",)),
    # fc1 -> fc2 passes through ReLU, which commutes with a positive scale.
    awq=(AWQScale("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
         AWQScale("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
         AWQScale("final_layer_norm", ("fc1",), "fc1"),
         AWQScale("fc1", ("fc2",), "fc2")),
    awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

ARCHITECTURES: dict[str, ArchitectureMap] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
    "GemmaForCausalLM": GEMMA,
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": GEMMA2,
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
