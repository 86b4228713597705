"""Per-family overrides, as data: what discovery from the model (models/structure.py) cannot know.

Keyed by `config.architectures[0]`. Any architecture transformers builds is quantized without an
entry here; an entry adds what has been measured for a family: AWQ's scaling groups (which norm or
Linear produces each group's input, and the norm's form), the Linears AWQ's clip search leaves
alone, and the order the family's Linears are listed in (its quantization_config). The blocks'
path is found by discovery unless `layers` names it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    layers      module path of the ModuleList of decoder blocks, e.g. "model.layers" (checked
                against discovery by the tests)
    sequential  Linears (paths relative to a block) that share an input, in execution order, as
                the family's quantization_config lists them (the calibrated runner traces the
                groups itself; the tests check that the trace finds these)
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
    """config.json's architectures[0]; a config without one is a ModelError (the family is unknown)."""
    archs = config.get("architectures") or []
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ModelError("config.json has no 'architectures' entry, so the model family is unknown",
                         "add the model class transformers saves, e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    return archs[0]


def get_architecture(config: Mapping[str, Any]) -> ArchitectureMap | None:
    """The override for a model's config.json contents, or None where discovery alone is used."""
    return ARCHITECTURES.get(architecture_name(config))
