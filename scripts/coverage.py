#!/usr/bin/env python3
"""Measured coverage: which architectures of the installed transformers this tool quantizes.

For every causal-LM and image-text-to-text architecture transformers knows
(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, deduplicated):

1. build a tiny random model from the default config of its config class, shrunk by the rules in
   RULES (few layers keeping the pattern of per-layer types, width 64, 4 heads, 4 experts, vocab
   512, small vision/audio towers), float32, seed 0, and run one text-only forward pass;
2. save it with a byte-level tokenizer into the cache folder (reused by later runs);
3. quantize it with each method (`rtn` and `gptq` in the GPTQ layout, `rtn-ct` in the
   compressed-tensors layout; group 32; gptq on a tiny calibration text), load the result with
   `load_quantized` and compare its logits with the reference: the same model whose quantized
   Linear weights are replaced by the dequantized values read back from the written checkpoint;
   compressed-tensors results are also loaded with stock transformers and compared;
4. print one row per (architecture, method) and a summary, and write everything as JSON.

    python scripts/coverage.py --cache ~/.cache/quantize-llm-coverage --json coverage.json
    python scripts/coverage.py --only LlamaForCausalLM Qwen3MoeForCausalLM --methods rtn
    python scripts/coverage.py --kind moe --build-only

Each architecture runs in a forked child with a time limit, so a crash, a hang or a failure in one
never stops the sweep. Built models are cached under CACHE/models/ (keyed by the shrunk config);
results under CACHE/results/ are reused while the tool's sources and this script are unchanged, so
an interrupted sweep continues where it stopped (`--fresh` recomputes them).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: import this checkout's package
    sys.path.insert(0, str(ROOT))

SCRIPT_VERSION = 3  # bump when the shrinking or the checks change: cached builds and results are keyed by it

# ---------------------------------------------------------------------------------------------
# Tiny sizes
# ---------------------------------------------------------------------------------------------

WIDTH = 64          # hidden size of every tower (text, vision, audio, projector)
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16       # HEADS * HEAD_DIM == WIDTH
FFN = 128
EXPERT_FFN = 64
EXPERTS = 4
TOP_K = 2
VOCAB = 512         # bytes 0..255 for text, special tokens from the top down
BYTES = 256
POSITIONS = 512
WINDOW = 16         # sliding windows and attention chunks shorter than the calibration sequences
STATE = 16          # state-space state size
IMAGE = 64
PATCH = 8
IMAGE_TOKENS = 16   # a square number that divides the (IMAGE / PATCH)^2 patches
MAX_LAYERS = 12     # the text stack: enough for interleaving patterns with a period up to 12
MAX_TOWER_LAYERS = 4  # vision / audio / other encoder stacks
MIN_LAYERS = 2

METHODS = {
    "rtn": ["rtn", "--group-size", "32"],
    "gptq": ["gptq", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"],
    "rtn-ct": ["rtn", "--group-size", "32", "--format", "compressed-tensors"],
    "awq": ["awq", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"],
}
DEFAULT_METHODS = ("rtn", "gptq", "rtn-ct")
CALIBRATION_TEXT = "\n\n".join(
    f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50} and some more text" for j in range(40)) for i in range(16))
PROMPT = "The quick brown fox jumps over the lazy dog, 0123456789."


# ---------------------------------------------------------------------------------------------
# Shrinking rules: config attribute name (full match) -> what to do with its value
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cap:
    """Integers above `limit` become `limit` (lists: each element); 0, negatives and smaller stay."""

    limit: int

    def __call__(self, value: Any, ctx: dict) -> Any:
        return _map_ints(value, lambda v: self.limit if v > self.limit else v)


def _width(value: Any, ctx: dict) -> Any:
    """A width: a small multiple (1-4x) of the config's hidden size stays that multiple of WIDTH
    (a doubled residual stream, a concatenation), anything else is capped at WIDTH."""
    hidden = _first_int(ctx["orig"], ("hidden_size", "d_model", "n_embd"))

    def one(v: int) -> int:
        if hidden and v > 0 and v % hidden == 0 and 1 <= v // hidden <= 4:
            return WIDTH * (v // hidden)
        return min(v, WIDTH)
    return _map_ints(value, one)


def _kv_heads(value: Any, ctx: dict) -> Any:
    """Multi-query stays multi-query, full multi-head stays full, grouped becomes 2 groups."""
    heads = _first_int(ctx["orig"], HEAD_KEYS)

    def one(v: int) -> int:
        if v <= 1:
            return v
        if heads is not None and v == heads:
            return min(HEADS, v)
        return min(KV_HEADS, v)
    return _map_ints(value, one)


HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads")

RULES: list[tuple[str, Callable[[Any, dict], Any]]] = [
    # vocabulary and positions
    (r"(.*_)?vocab_size(_.*)?|codebook_size|num_embeddings|encoder_hash_byte_group_vocab", Cap(VOCAB)),
    (r"max_position_embeddings|n_positions|n_ctx|max_seq_len|seq_len|context_length|max_(source|target)_positions"
     r"|model_max_length|position_embedding_size|max_2d_position_embeddings|max_vit_seq_len", Cap(POSITIONS)),
    (r"sliding_window(_size)?|attention_window_size|local_attention(_window_len)?|attention_chunk_size"
     r"|keep_window_size|(local|lsh)_attn_chunk_length", Cap(WINDOW)),
    # mixture of experts
    (r"num_experts_per_(tok|token)|moe_top_?k|moe_k|top_k|top_k_experts|n_activated_experts|num_selected_experts"
     r"|router_top_k",
     Cap(TOP_K)),
    (r"(n|num|moe_num)_shared_experts", Cap(1)),
    (r"num_experts|num_local_experts|n_routed_experts|moe_num_experts|n_experts|zero_expert_num", Cap(EXPERTS)),
    (r"n_group|num_expert_group", Cap(2)),
    (r"topk_group", Cap(1)),
    (r"first_k_dense_replace|num_dense_layers", Cap(1)),
    (r".*(moe|expert|experts)_(intermediate|hidden|ffn_hidden)_size|share_expert_dim|shared_intermediate_size"
     r"|expert_ffn_hidden_size|moe_hidden_size|shared_experts?_intermediate_size", Cap(EXPERT_FFN)),
    # state-space and linear-attention layers
    (r"(mamba_)?d_state|state_size|ssm_state_size|max_state_dim", Cap(STATE)),
    (r"mamba_n_heads|mamba_num_heads|n_mamba_heads", Cap(4)),
    (r"mamba_d_head|mamba_head_dim|mamba_headdim", Cap(32)),
    (r"mamba_d_ssm", Cap(2 * WIDTH)),
    (r"n_groups|mamba_n_groups|mamba_ngroups", Cap(1)),
    (r"time_step_rank|mamba_dt_rank", Cap(8)),
    (r"linear_num_key_heads", Cap(KV_HEADS)),
    (r"linear_num_(value_)?heads", Cap(HEADS)),
    (r"lru_width|attention_hidden_size", _width),
    # multi-head latent attention: q/k/v widths stay multiples of 32
    (r"q_lora_rank", Cap(64)),
    (r"kv_lora_rank|o_lora_rank", Cap(32)),
    (r"qk_nope_head_dim|qk_rope_head_dim|v_head_dim|index_head_dim", Cap(32)),
    # attention
    (r"num_key_value_heads|.*kv_heads|num_query_groups|multi_query_group_num|kv_n_heads", _kv_heads),
    (r".*head_dim|.*head_size|d_head|dim_head|d_kv|kv_channels|query_pre_attn_scalar", Cap(HEAD_DIM)),
    (r"rotary_dim|rotary_ndims|rope_dim", Cap(8)),
    (r".*num_attention_heads(_per_layer)?|.*num_heads|n_heads?|.*attention_heads|num_.*_heads|heads"
     r"|.*_n_heads|resampler_heads|heads_per_ngram", Cap(HEADS)),
    # feed-forward
    (r".*intermediate_size(_mlp)?|.*ffn_dim|.*ffn_hidden_size|d_ff|dff|dim_ff|d_inner|n_inner|mlp_dim"
     r"|feed_forward_size|projection_hidden_dim|projector_hidden_size", Cap(FFN)),
    # widths
    (r"hidden_size|d_model|n_embd|n_embed|embed_dim|emb_dim|embedding_dim|embedding_size|model_dim|dim"
     r"|.*_hidden_size|.*hidden_dim|hidden_sizes|word_embed_proj_dim|projection_dim|.*_output_dim|output_dim"
     r"|.*_input_dim|.*_embed_dim|input_embedding_size|hidden_size_.*|adapter_.*_(dim|size)|.*_out_dim|.*_in_dim"
     r"|codebook_dim",
     _width),
    # vision towers
    (r"image_size|crop_size|max_image_size|min_image_size|max_img_size", Cap(IMAGE)),
    (r"patch_size|.*_patch_size|patch_sizes", Cap(PATCH)),
    (r"mm_tokens_per_image|image_seq_length|num_image_tokens|vision_soft_tokens_per_image|num_query_tokens"
     r"|latent_query_num|resampler_n_latents|resampler_num_latents", Cap(IMAGE_TOKENS)),
    (r"num_position_embeddings|num_patches", Cap((IMAGE // PATCH) ** 2)),
    (r"window_size", Cap(32)),
]
_COMPILED = [(re.compile(p), action) for p, action in RULES]

# Stack depth: the first of these in a config is its layer count L; lists of length L are per-layer.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "depth",
                    "num_blocks", "layers")
OTHER_LAYER_COUNTS = re.compile(r"(encoder|decoder)_layers|num_(encoder|decoder)_layers|decoder_num_layers"
                                r"|n_recurrent_layers|conf_num_hidden_layers|resampler_depth|num_global_layers"
                                r"|num_layers_per_stack|n_(input|output)_layers|aligner_num_add_layers")
# An integer that repeats a layer kind every v layers (need >= v layers to see the pattern).
PERIODIC = re.compile(r".*(period|_step|interval|every_n_layers|pattern|frequency|_freq|_every|_per_.*block)")
OFFSET = re.compile(r".*_offset")
# Sub-configs of towers other than the text decoder.
TOWER = re.compile(r".*(vision|visual|audio|speech|image|video|encoder|vq|perceiver|resampler|conformer).*")
# Token ids: remapped into the vocabulary; media tokens always above the byte range.
TOKEN_KEY = re.compile(r".*token.*(id|ids|index)|im_(start|end|newline)_id|image_patch_id|.*_token")
MEDIA_TOKEN = re.compile(r".*(image|video|audio|vision|visual|boi|eoi|boa|eoa|frame|patch|im_|media|speech"
                         r"|indicator|placeholder).*")
DTYPE_KEYS = ("dtype", "torch_dtype")


def _map_ints(value: Any, fn: Callable[[int], int]) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return fn(value)
    if isinstance(value, list):
        return [_map_ints(v, fn) for v in value]
    return value


def _first_int(d: dict, keys: Iterable[str]) -> int | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def rule_for(key: str) -> Callable[[Any, dict], Any] | None:
    """The shrinking action for a config attribute name, or None (left as it is)."""
    for pattern, action in _COMPILED:
        if pattern.fullmatch(key):
            return action
    return None


def _first_cover(values: list) -> int:
    """The shortest prefix of a per-layer list holding every distinct value of the whole list."""
    seen, want = set(), {json.dumps(v, sort_keys=True) for v in values}
    for i, v in enumerate(values):
        seen.add(json.dumps(v, sort_keys=True))
        if seen == want:
            return i + 1
    return len(values)


def _is_index_list(value: Any, layers: int) -> bool:
    return (isinstance(value, list) and 0 < len(value) < layers
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < layers for x in value)
            and value == sorted(set(value)))


def _layer_keyed(value: Any, layers: int) -> list[int] | None:
    """The layer indices of a dict keyed by layer ("05": {...}, "11": {...}), else None."""
    if not isinstance(value, dict) or not value:
        return None
    try:
        keys = [int(k) for k in value]
    except (TypeError, ValueError):
        return None
    return sorted(keys) if all(0 <= k < layers for k in keys) else None


def layers_needed(d: dict, layers: int) -> int:
    """How many layers keep the pattern of a stack of `layers` layers described by config dict `d`:
    every value of every per-layer list, every member and non-member of every layer-index list,
    one full period of every periodic setting and the layer an offset names."""
    need = MIN_LAYERS
    for key, value in d.items():
        key = str(key)
        if key in ("id2label", "label2id"):
            continue
        if isinstance(value, list) and len(value) == layers and layers > 1:
            need = max(need, _first_cover(value))
        elif _is_index_list(value, layers) or _layer_keyed(value, layers):
            members = set(value if isinstance(value, list) else _layer_keyed(value, layers))
            need = max(need, _first_cover([i in members for i in range(layers)]))
        elif isinstance(value, int) and not isinstance(value, bool) and key not in LAYER_COUNT_KEYS:
            if PERIODIC.fullmatch(key) and 1 < value <= layers:
                need = max(need, value)
            elif (OFFSET.fullmatch(key) and "layer" in key and 0 <= value < layers) \
                    or (key in ("first_k_dense_replace", "num_dense_layers") and 0 < value < layers):
                need = max(need, value + 1)
    return need


def _shrink_layers(d: dict, orig: dict, cap: int) -> None:
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(orig.get(k), int) and not isinstance(orig.get(k), bool)
                and orig[k] > 0), None)
    for k, v in list(d.items()):
        if OTHER_LAYER_COUNTS.fullmatch(str(k)) and isinstance(v, int) and not isinstance(v, bool):
            d[k] = min(v, MIN_LAYERS)
    if key is None:
        return
    layers = orig[key]
    n = min(layers, max(MIN_LAYERS, min(cap, layers_needed(d, layers))))
    d[key] = n
    for k, v in list(d.items()):
        if k == key or k in ("id2label", "label2id"):
            continue
        if isinstance(v, list) and len(v) == layers and layers > 1:
            d[k] = v[:n]
        elif _is_index_list(v, layers):
            kept = [x for x in v if x < n]
            d[k] = kept or [n - 1]
        elif _layer_keyed(v, layers):
            kept = {key: sub for key, sub in v.items() if int(key) < n}
            d[k] = kept or {str(n - 1): next(iter(v.values()))}
        elif isinstance(v, int) and not isinstance(v, bool) and isinstance(k, str) and "layer" in k \
                and k not in LAYER_COUNT_KEYS and rule_for(k) is None \
                and not OTHER_LAYER_COUNTS.fullmatch(k) and not PERIODIC.fullmatch(k):
            # a count of layers (num_kv_shared_layers) keeps its share of the stack; a layer index
            # (max_window_layers, moe_layer_end_index, ...) stays inside it
            if re.fullmatch(r"(num|n)_.*layers", k):
                d[k] = 0 if v <= 0 else min(n - 1, max(1, round(v * n / layers)))
            elif v == layers:
                d[k] = n
            elif v >= n:
                d[k] = n - 1


def _fill_missing(d: dict) -> None:
    """Defaults some configs leave None although their model needs a number (head_dim, kv heads,
    routing): stated as the tiny model's value."""
    heads = d.get("num_attention_heads")
    if isinstance(heads, int) and heads > 0:
        if "head_dim" in d and d["head_dim"] is None and isinstance(d.get("hidden_size"), int):
            d["head_dim"] = d["hidden_size"] // heads
        if "num_key_value_heads" in d and d["num_key_value_heads"] is None:
            d["num_key_value_heads"] = heads
    if "sliding_window" in d and d["sliding_window"] is None and any(
            isinstance(v, list) and any(isinstance(x, str) and "sliding" in x for x in v) for v in d.values()):
        d["sliding_window"] = WINDOW
    experts = [k for k in ("num_experts", "n_routed_experts", "num_local_experts") if k in d]
    for top_k in ("num_experts_per_tok", "top_k_experts"):
        if top_k not in d or not experts:
            continue
        if d[top_k] is None and any(d[k] is None or (isinstance(d[k], int) and d[k] > 1) for k in experts):
            d[top_k] = TOP_K
        if isinstance(d[top_k], int) and d[top_k] > 0:
            for k in experts:
                if d[k] is None:
                    d[k] = EXPERTS


def _fix_consistency(d: dict, orig: dict) -> None:
    """Values other values are derived from, after the rules."""
    _fill_missing(d)
    nope, rope = d.get("qk_nope_head_dim"), d.get("qk_rope_head_dim")
    if isinstance(nope, int) and isinstance(rope, int):
        for k in ("qk_head_dim", "swa_head_dim"):
            if k in d:
                d[k] = nope + rope
        # head_dim keeps whichever latent-attention width it was (the rotary part, q/k, or v)
        relations = {orig.get("qk_rope_head_dim"): rope, orig.get("v_head_dim"): d.get("v_head_dim"),
                     (orig.get("qk_nope_head_dim") or 0) + (orig.get("qk_rope_head_dim") or 0): nope + rope}
        if isinstance(d.get("head_dim"), int) and orig.get("head_dim") in relations:
            d["head_dim"] = relations[orig["head_dim"]]
    # Mamba mixers with explicit head counts: heads * head_dim == inner width (d_ssm or expand * hidden)
    heads_key = next((k for k in ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads")
                      if isinstance(d.get(k), int)), None)
    dim_key = next((k for k in ("mamba_d_head", "mamba_head_dim", "mamba_headdim") if isinstance(d.get(k), int)), None)
    if heads_key and dim_key:
        expand = d.get("mamba_expand") if isinstance(d.get("mamba_expand"), int) else 2
        inner = d.get("mamba_d_ssm") if isinstance(d.get("mamba_d_ssm"), int) else expand * d.get("hidden_size", WIDTH)
        d[dim_key] = max(1, inner // d[heads_key])
    # Mamba-2 style mixers: heads * head_dim == expand * hidden
    if all(isinstance(d.get(k), int) for k in ("expand", "num_heads", "head_dim", "hidden_size")) \
            and ("state_size" in d or "ssm_state_size" in d) and "num_attention_heads" not in d:
        d["head_dim"] = max(1, d["expand"] * d["hidden_size"] // d["num_heads"])
    # multimodal rotary sections split head_dim / 2 in the original proportions
    for holder in (d, d.get("rope_parameters"), d.get("rope_scaling")):
        if isinstance(holder, dict) and isinstance(holder.get("mrope_section"), list):
            holder["mrope_section"] = _split_like(holder["mrope_section"], _rotary_half(d, d.get("rope_parameters")))
    # a vision tower whose output concatenates several of its layers
    if isinstance(d.get("intermediate_layers_indices"), list) and isinstance(d.get("vision_output_dim"), int):
        d["vision_output_dim"] = d.get("hidden_size", WIDTH) * (1 + len(d["intermediate_layers_indices"]))


def _split_like(parts: list, total: int) -> list:
    """`total` split into len(parts) integers in the proportions of `parts` (largest remainders)."""
    weights = [max(0, int(p)) for p in parts]
    s = sum(weights) or len(weights)
    exact = [total * w / s for w in weights]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(parts)), key=lambda i: exact[i] - out[i], reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _vision_feature_layers(d: dict, depth: int | None) -> None:
    """Layer indices into another stack (vision_feature_layer = -2, [-2, -5, ...]) clamped into it."""
    if depth is None:
        return
    for k, v in d.items():
        if k in ("vision_feature_layer", "feature_layer", "spatial_vision_layer"):
            d[k] = _map_ints(v, lambda i: max(i, -depth) if i < 0 else min(i, depth - 1))
        elif isinstance(v, dict) and "vision_config" not in str(k):
            _vision_feature_layers(v, depth)


def shrink_dict(orig: dict, *, path: str = "", max_layers: int = MAX_LAYERS) -> dict:
    """A shrunk copy of a config's to_dict(): the RULES on every attribute, the layer count cut to
    what keeps the per-layer pattern, sub-configs (nested dicts) shrunk the same way."""
    d: dict = {}
    for key, value in orig.items():
        if isinstance(value, dict) and key not in ("id2label", "label2id"):
            sub_is_tower = bool(TOWER.fullmatch(str(key))) and key != "text_config"
            d[key] = shrink_dict(value, path=f"{path}.{key}" if path else key,
                                 max_layers=MAX_TOWER_LAYERS if sub_is_tower else max_layers)
            continue
        if key in DTYPE_KEYS and value is not None:
            d[key] = "float32"
            continue
        action = rule_for(str(key))
        d[key] = action(value, {"orig": orig, "key": key, "path": path}) if action else value
    _shrink_layers(d, orig, max_layers)
    _fix_consistency(d, orig)
    if not path:  # indices into the vision tower, wherever they are held
        depth = next((_first_int(v, LAYER_COUNT_KEYS) for k, v in d.items()
                      if isinstance(v, dict) and "vision" in str(k) and _first_int(v, LAYER_COUNT_KEYS)), None)
        _vision_feature_layers(d, depth)
    return d


def remap_token_ids(d: dict, vocab: int = VOCAB) -> dict[int, int]:
    """Every token-id attribute (nested included) inside [0, vocab): media tokens and ids beyond the
    vocabulary get distinct ids from the top down (never a byte, so text never holds them), the same
    original id the same new id everywhere. Returns original -> new."""
    mapping: dict[int, int] = {}
    free = iter(range(vocab - 1, BYTES - 1, -1))

    def new_id(v: int, media: bool) -> int:
        if v is None or v < 0 or (not media and v < vocab):
            return v
        if v not in mapping:
            mapping[v] = next(free)
        return mapping[v]

    def walk(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(key, str) and TOKEN_KEY.fullmatch(key):
                media = bool(MEDIA_TOKEN.fullmatch(key))
                node[key] = _map_ints(value, lambda v, m=media: new_id(v, m))
    walk(d)
    return mapping


def modeling_defaults(model_cls: Any, config: Any | None = None) -> dict[str, Any]:
    """Values a modeling file assumes when the config lacks them (read from its source, or from the
    modeling files of its sub-configs' model types), which the tiny config must then state at its own
    size: today the multimodal rotary sections (`rope_parameters.get("mrope_section", [16, 24, 24])`)."""
    import importlib
    import inspect

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    modules = [sys.modules.get(model_cls.__module__)]
    for cfg in sub_configs(config).values() if config is not None else []:
        name = model_type_to_module_name(getattr(cfg, "model_type", "") or "")
        with contextlib.suppress(Exception):
            modules.append(importlib.import_module(f"transformers.models.{name}.modeling_{name}"))
    for module in modules:
        try:
            src = inspect.getsource(module)
        except (OSError, TypeError):
            continue
        m = re.search(r"[\"']mrope_section[\"']\s*,\s*\[([\d,\s]+)\]", src)
        if m:
            return {"mrope_section": [int(x) for x in m.group(1).split(",") if x.strip()]}
    return {}


def _rotary_half(d: dict, rope: dict | None) -> int:
    """Half the rotary width of an attention config dict: head_dim * partial_rotary_factor / 2."""
    head_dim = d.get("head_dim") or d.get("hidden_size", WIDTH) // max(1, d.get("num_attention_heads") or HEADS)
    factor = (rope or {}).get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0
    return int(head_dim * factor) // 2


def _state_defaults(d: dict, defaults: dict[str, Any], tower: bool = False) -> None:
    section = defaults.get("mrope_section")
    for key, value in d.items():
        if isinstance(value, dict) and key not in ("rope_parameters", "rope_scaling"):
            _state_defaults(value, defaults, tower or bool(TOWER.fullmatch(str(key))) and key != "text_config")
    rope = d.get("rope_parameters")
    if section and not tower and isinstance(rope, dict) and "mrope_section" not in rope \
            and ("rope_type" in rope or "rope_theta" in rope):
        rope["mrope_section"] = _split_like(section, _rotary_half(d, rope))


def shrink_config(config: Any, max_layers: int = MAX_LAYERS, defaults: dict[str, Any] | None = None) -> Any:
    """A tiny config of the same class as `config` (a transformers PreTrainedConfig); `defaults`
    (see modeling_defaults) are stated explicitly at the tiny size."""
    d = shrink_dict(config.to_dict(), max_layers=max_layers)
    _state_defaults(d, defaults or {})
    remap_token_ids(d)
    d["dtype"] = "float32"
    d.pop("transformers_version", None)
    return type(config).from_dict(d)


def per_layer_lists(config: Any) -> dict[str, list]:
    """Attribute -> value of every per-layer list of a config and its sub-configs (properties too),
    e.g. {"layer_types": [...], "text_config.layers_block_type": [...]}."""
    out: dict[str, list] = {}

    def visit(cfg: Any, prefix: str) -> None:
        layers = _first_int(vars(cfg) | {k: getattr(cfg, k, None) for k in LAYER_COUNT_KEYS}, LAYER_COUNT_KEYS)
        for name in dir(cfg):
            if name.startswith("_"):
                continue
            try:
                value = getattr(cfg, name)
            except Exception:  # noqa: BLE001  (a property that does not apply to this config)
                continue
            if _is_config(value):
                if name not in ("base_config_key",):
                    visit(value, f"{prefix}{name}.")
            elif layers and layers > 1 and isinstance(value, (list, tuple)) and len(value) == layers:
                out[f"{prefix}{name}"] = list(value)
    visit(config, "")
    return out


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def sub_configs(config: Any, prefix: str = "") -> dict[str, Any]:
    """Path -> every nested config (the config itself at "")."""
    out = {prefix: config}
    for name, value in vars(config).items():
        if _is_config(value):
            out.update(sub_configs(value, f"{prefix}.{name}" if prefix else name))
    return out


# ---------------------------------------------------------------------------------------------
# Architectures and kinds
# ---------------------------------------------------------------------------------------------

@dataclass
class Architecture:
    name: str               # the model class, e.g. "LlamaForCausalLM"
    model_types: list[str]  # every model_type the mappings list it under
    tasks: list[str]        # "causal-lm", "image-text-to-text"


def architectures() -> list[Architecture]:
    """Every architecture class of the two mappings, once, in mapping order."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    found: dict[str, Architecture] = {}
    for task, mapping in (("causal-lm", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("image-text-to-text", MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)):
        for model_type, names in mapping.items():
            for name in names if isinstance(names, (list, tuple)) else [names]:
                arch = found.setdefault(name, Architecture(name, [], []))
                if model_type not in arch.model_types:
                    arch.model_types.append(model_type)
                if task not in arch.tasks:
                    arch.tasks.append(task)
    return list(found.values())


MOE_CONFIG = re.compile(r"num_experts|num_local_experts|n_routed_experts|moe_num_experts|n_experts")
MOE_MODULE = re.compile(r"MoE|Moe|Expert|SparseMlp|SparseMLP|TopKRouter|Router")
HYBRID_VALUE = re.compile(r".*(mamba|ssm|linear|conv|recurren|rwkv|lstm|delta|hybrid|lightning|rglru|lru|state).*",
                          re.IGNORECASE)
HYBRID_CONFIG = re.compile(r"mamba_.*|.*ssm_.*|linear_(num|key|value|conv).*|.*conv_kernel.*|d_conv|lru_width"
                           r"|short_conv.*|rescale_every|.*recurrent.*|state_size|ssm_state_size")
HYBRID_MODULE = re.compile(r"Mamba|Ssm|SSM|GatedDeltaNet|DeltaNet|LinearAttention|LinearAttn|ShortConv|Recurrent"
                           r"|Rwkv|RWKV|Lstm|LSTM|Rglru|RgLru|Lightning|CausalConv|Conv1d|xLSTM|Mlstm|Slstm")
# Sub-configs that make a model multimodal (a byte-level encoder or a perceiver alone does not).
MEDIA_CONFIG = re.compile(r".*(vision|visual|audio|speech|image|video|vq).*")
TOWER_MODULE = re.compile(r".*(vision|visual|audio|image|video|speech|multi_modal|mm_projector|vqmodel|vq_model"
                          r"|patch_embed|encoder|merger|resampler|connector|projector).*", re.IGNORECASE)


def kinds(arch: Architecture, config: Any | None, model: Any | None = None) -> dict[str, bool]:
    """moe / multimodal / hybrid flags (a row may have several; dense = none of them)."""
    moe = multimodal = hybrid = False
    if "image-text-to-text" in arch.tasks:
        multimodal = True
    if config is not None:
        for path, cfg in sub_configs(config).items():
            last = path.split(".")[-1]
            tower = bool(path) and bool(TOWER.fullmatch(last)) and last != "text_config"
            multimodal |= bool(path) and bool(MEDIA_CONFIG.fullmatch(last))
            if tower:
                continue
            for key, value in vars(cfg).items():
                if MOE_CONFIG.fullmatch(key) and isinstance(value, int) and not isinstance(value, bool) and value > 1:
                    moe = True
                if HYBRID_CONFIG.fullmatch(key) and value not in (None, False, 0):
                    hybrid = True
        for name, values in per_layer_lists(config).items():
            if not TOWER.fullmatch(name.split(".")[0]) and any(isinstance(v, str) and HYBRID_VALUE.fullmatch(v)
                                                               for v in values):
                hybrid = True
    if model is not None:
        for name, module in model.named_modules():
            if TOWER_MODULE.fullmatch(name):
                continue
            cls = type(module).__name__
            moe |= bool(MOE_MODULE.search(cls))
            hybrid |= bool(HYBRID_MODULE.search(cls))
    return {"moe": moe, "multimodal": multimodal, "hybrid": hybrid}


def kind_label(flags: dict[str, bool]) -> str:
    return "+".join(k for k in ("moe", "hybrid", "multimodal") if flags.get(k)) or "dense"


# ---------------------------------------------------------------------------------------------
# Building a tiny model
# ---------------------------------------------------------------------------------------------

def byte_tokenizer() -> Any:
    """A 256-token byte-level tokenizer (no merges): ids 0..255, inside any vocabulary of 256 or more."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def prompt_ids() -> Any:
    import torch

    return torch.tensor([list(PROMPT.encode())[:24]], dtype=torch.long)


def model_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def tiny_config(arch: Architecture, max_layers: int = MAX_LAYERS) -> Any:
    cls = model_class(arch.name)
    config_cls = cls.config_class
    if config_cls is None:
        raise TypeError(f"{arch.name} names no config_class")
    default = config_cls()
    config = shrink_config(default, max_layers=max_layers, defaults=modeling_defaults(cls, default))
    if "causal-lm" in arch.tasks and getattr(config, "is_decoder", None) is False:
        config.is_decoder = True  # encoder families' causal-LM heads (Bert, Reformer, ...) as decoders
    return config


def config_key(config: Any) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(f"{SCRIPT_VERSION}:{text}".encode()).hexdigest()[:16]


def build(arch: Architecture, folder: Path, max_layers: int = MAX_LAYERS) -> dict:
    """Build, run and save the tiny model of `arch` into `folder` (reused when its config matches).
    Returns the build record: config_key, params, layers, kinds, forward logits shape."""
    import torch

    config = tiny_config(arch, max_layers)
    key = config_key(config)
    marker = folder / "coverage-build.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("config_key") == key and (folder / "config.json").is_file():
            return record
    if folder.exists():
        shutil.rmtree(folder)
    torch.manual_seed(0)
    model = model_class(arch.name)(config).to(torch.float32).eval()
    with torch.no_grad():  # wider than the default init, so quantization visibly changes the logits
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dim() == 2:
                module.weight.normal_(0, 0.08)
    record = {"config_key": key, "params": sum(p.numel() for p in model.parameters()),
              "kinds": kinds(arch, config, model), "per_layer": per_layer_lists(config),
              "linears": sum(isinstance(m, torch.nn.Linear) for m in model.modules())}
    record["forward"] = forward(model)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    marker.write_text(json.dumps(record, indent=1, default=str))
    return record


def default_config_note(arch: Architecture) -> str:
    """" (the default config fails too: ...)" when the untouched default config cannot build the model
    either (on the meta device, no memory): the failure is then transformers' default, not the shrinking."""
    import torch

    try:
        cls = model_class(arch.name)
        with torch.device("meta"):
            cls(cls.config_class())
    except Exception as exc:  # noqa: BLE001
        return f" (the default config fails too: {type(exc).__name__})"
    return ""


def forward(model: Any) -> dict:
    """One text-only forward pass; the record says whether it ran and gave finite logits."""
    import torch

    try:
        with torch.no_grad():
            logits = logits_of(model)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "reason": crash_reason(exc)}
    if not torch.isfinite(logits).all():
        return {"ok": False, "reason": "the logits are not finite"}
    return {"ok": True, "shape": list(logits.shape)}


def logits_of(model: Any) -> Any:
    import torch

    ids = prompt_ids()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return logits.float()


# ---------------------------------------------------------------------------------------------
# Quantizing and checking
# ---------------------------------------------------------------------------------------------

def crash_reason(exc: BaseException) -> str:
    """"Type: message" of an exception, one line, with the innermost frame of transformers/torch/ours."""
    message = " ".join(str(exc).split())[:300]
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "site-packages" in frame.filename or "quantize_llm" in frame.filename:
            where = f" [{Path(frame.filename).name}:{frame.lineno}]"
            break
    return f"{type(exc).__name__}: {message}{where}"


def run_cli(args: list[str]) -> tuple[int, str]:
    """`quantize-llm ARGS` in this process: (exit code, stderr). The one-line error is its last line."""
    from quantize_llm.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("error:")]
    if lines:
        return lines[-1][len("error:"):].strip()
    tail = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return tail[-1][:300] if tail else "no error line"


def innermost_frame(stderr: str) -> str:
    """" [file.py:line]" of the last frame of a traceback printed in debug mode, or ""."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', stderr)
    return f" [{Path(frames[-1][0]).name}:{frames[-1][1]}]" if frames else ""


def dequantized_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of a written checkpoint as a dense model holds it: each quantized module's weight
    dequantized (float32) from what the file stores, everything else as stored. (The one place that
    uses the package's checkpoint readers.)"""
    from quantize_llm.formats.reading import QuantizedModules
    from quantize_llm.models.load import CheckpointReader

    out: dict[str, Any] = {}
    with CheckpointReader(folder) as reader:
        modules = QuantizedModules(reader)
        used: set[str] = set()
        for prefix in modules.prefixes:
            used.update(modules.tensors(prefix).values())
            out[f"{prefix}.weight"] = modules.decode(prefix).dequantize().float()
        for name in reader.names():
            if name not in used:
                out[name] = reader.read(name)
    return out


def reference_model(source: Path, quantized: Path, work: Path, arch: str) -> Any:
    """The source model with the written checkpoint's tensors, quantized weights dequantized:
    saved as a dense checkpoint (the source's config) and loaded by transformers."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().clone() for k, v in dequantized_tensors(quantized).items()}
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copy(source / "config.json", work / "config.json")
    save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
    return model_class(arch).from_pretrained(work, dtype=torch.float32).eval()


def stock_model(quantized: Path, arch: str) -> Any:
    """The compressed-tensors checkpoint loaded by stock transformers (dequantizing on load where an
    asymmetric grid needs it)."""
    import torch
    from transformers import CompressedTensorsConfig

    qconfig = json.loads((quantized / "config.json").read_text()).get("quantization_config", {})
    groups = qconfig.get("config_groups") or {}
    asym = any((g.get("weights") or {}).get("symmetric") is False for g in groups.values() if isinstance(g, dict))
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    return model_class(arch).from_pretrained(quantized, dtype=torch.float32, **kwargs).eval()


def compare(a: Any, b: Any) -> dict:
    diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    tol = 1e-4 * max(1.0, scale)
    return {"max_abs_diff": diff, "tol": tol, "ok": bool(diff <= tol)}


@dataclass
class MethodResult:
    method: str
    result: str = "skipped"      # pass, refused, error, crash, timeout, load-fail, mismatch, stock-fail, ...
    reason: str = ""
    exit_code: int | None = None
    quantized: bool = False
    loaded: bool = False
    match: dict | None = None    # our loader vs the dequantized reference
    stock: dict | None = None    # stock transformers vs the reference (compressed-tensors only)
    quant_error: float | None = None  # max |logits| change of the reference against the float model
    seconds: float = 0.0


def classify_exit(code: int, line: str) -> str:
    if code == 0:
        return "ok"
    if line.startswith("internal error:"):
        return "crash"
    return "refused" if code == 2 else "error"


def run_method(method: str, source: Path, work: Path, arch: str, float_logits: Any, calib: Path,
               progress: Callable[[str], None]) -> MethodResult:
    r = MethodResult(method)
    start = time.monotonic()
    out = work / method
    if out.exists():
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    args = list(METHODS[method])
    args[1:1] = [str(source), "-o", str(out)]
    args += ["--no-resume"]
    if args[0] in ("gptq", "awq"):
        args += ["--dataset", str(calib)]
    progress(f"{method}: quantize")
    code, stderr = run_cli(args)
    r.exit_code = code
    status = classify_exit(code, error_line(stderr) if code else "")
    if status != "ok":
        r.result, r.reason = status, error_line(stderr) + (innermost_frame(stderr) if status == "crash" else "")
        r.seconds = time.monotonic() - start
        return r
    r.quantized = True
    try:
        progress(f"{method}: load")
        from quantize_llm import load_quantized

        ours = logits_of(load_quantized(out, dtype=None))
        r.loaded = True
    except Exception as exc:  # noqa: BLE001
        r.result, r.reason = "load-fail", crash_reason(exc)
        r.seconds = time.monotonic() - start
        return r
    try:
        progress(f"{method}: reference")
        ref = logits_of(reference_model(source, out, work / f"{method}-reference", arch))
    except Exception as exc:  # noqa: BLE001
        r.result, r.reason = "reference-fail", crash_reason(exc)
        r.seconds = time.monotonic() - start
        return r
    r.quant_error = float((ref - float_logits).abs().max()) if float_logits is not None else None
    r.match = compare(ours, ref)
    r.result = "pass" if r.match["ok"] else "mismatch"
    if not r.match["ok"]:
        r.reason = f"logits differ from the dequantized reference by {r.match['max_abs_diff']:.3g} " \
                   f"(tolerance {r.match['tol']:.3g})"
    if "compressed-tensors" in METHODS[method]:
        progress(f"{method}: stock transformers")
        try:
            r.stock = compare(logits_of(stock_model(out, arch)), ref)
        except Exception as exc:  # noqa: BLE001
            r.stock = {"ok": False, "reason": crash_reason(exc)}
        if r.result == "pass" and not r.stock["ok"]:
            r.result = "stock-fail" if "reason" in r.stock else "stock-mismatch"
            r.reason = r.stock.get("reason") or \
                f"stock transformers' logits differ by {r.stock['max_abs_diff']:.3g} (tolerance {r.stock['tol']:.3g})"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f"{method}-reference", ignore_errors=True)
    r.seconds = time.monotonic() - start
    return r


# ---------------------------------------------------------------------------------------------
# One architecture (in a forked child) and the sweep
# ---------------------------------------------------------------------------------------------

@dataclass
class Record:
    architecture: str
    model_types: list[str]
    tasks: list[str]
    kinds: dict[str, bool] = field(default_factory=dict)
    kind: str = "?"
    built: bool = False
    build_reason: str = ""
    forward: bool = False
    forward_reason: str = ""
    params: int | None = None
    layers: dict | None = None   # per-layer lists of the tiny config
    methods: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    stage: str = ""              # the last stage started (where a timeout or a crash of the child hit)


def check_architecture(arch: Architecture, cache: Path, methods: list[str], max_layers: int, build_only: bool,
                       save: Callable[[Record], None]) -> Record:
    import torch

    rec = Record(arch.name, arch.model_types, arch.tasks)
    start = time.monotonic()

    def progress(stage: str) -> None:
        rec.stage = stage
        rec.seconds = time.monotonic() - start
        save(rec)

    progress("build")
    folder = cache / "models" / arch.name
    try:
        info = build(arch, folder, max_layers)
    except Exception as exc:  # noqa: BLE001
        rec.build_reason = crash_reason(exc) + default_config_note(arch)
        try:
            rec.kinds = kinds(arch, tiny_config(arch, max_layers))
        except Exception:  # noqa: BLE001
            rec.kinds = kinds(arch, None)
        rec.kind = kind_label(rec.kinds)
        rec.stage = "done"
        rec.seconds = time.monotonic() - start
        return rec
    rec.built, rec.kinds, rec.params = True, info["kinds"], info["params"]
    rec.kind, rec.layers = kind_label(rec.kinds), info.get("per_layer")
    rec.forward = info["forward"]["ok"]
    rec.forward_reason = info["forward"].get("reason", "")
    if rec.forward and not build_only:
        float_logits = None
        with contextlib.suppress(Exception):
            float_logits = logits_of(model_class(arch.name).from_pretrained(folder, dtype=torch.float32).eval())
        calib = cache / "calibration.txt"
        work = cache / "work" / arch.name
        for method in methods:
            r = run_method(method, folder, work, arch.name, float_logits, calib, progress)
            rec.methods[method] = asdict(r)
            save(rec)
        shutil.rmtree(work, ignore_errors=True)
    rec.stage = "done"
    rec.seconds = time.monotonic() - start
    return rec


def source_key(methods: list[str], max_layers: int, build_only: bool) -> str:
    """Identity of what a result depends on: the package sources, this script, the options."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "quantize_llm").rglob("*")):
        if path.suffix in (".py", ".cu") and path.is_file():
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps([methods, max_layers, build_only]).encode())
    return h.hexdigest()[:16]


def run_isolated(arch: Architecture, cache: Path, methods: list[str], max_layers: int, build_only: bool,
                 timeout: float, key: str) -> Record:
    """check_architecture in a forked child with a time limit; the child saves its record after every
    stage, so a timeout or a dead child still says where it stopped."""
    path = cache / "results" / f"{arch.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)

    def save(rec: Record) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "record": asdict(rec)}, default=str))
        os.replace(tmp, path)

    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.environ["QUANTIZE_LLM_DEBUG"] = "1"  # crashes print their traceback: the innermost frame is kept
            rec = check_architecture(arch, cache, methods, max_layers, build_only, save)
            save(rec)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    deadline = start + timeout
    status = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
            break
        time.sleep(0.2)
    try:
        rec = Record(**json.loads(path.read_text())["record"])
    except (OSError, ValueError, TypeError):
        rec = Record(arch.name, arch.model_types, arch.tasks)
    if rec.stage != "done":
        what = "timeout" if status == "timeout" else "crash"
        reason = (f"no result after {timeout:g} s" if status == "timeout"
                  else f"the child process died ({_status_text(status)})")
        stage = rec.stage or "build"
        if stage == "build":
            rec.build_reason = f"{what}: {reason} while building"
        else:
            method = stage.split(":")[0]
            rec.methods[method] = asdict(MethodResult(method, result=what, reason=f"{reason} at {stage}"))
            for later in methods:
                if later not in rec.methods:
                    rec.methods[later] = asdict(MethodResult(later, reason=f"not run: {what} at {method}"))
        rec.stage = "done"
        rec.seconds = time.monotonic() - start
        save(rec)
    return rec


def _status_text(status: Any) -> str:
    if isinstance(status, int):
        if os.WIFSIGNALED(status):
            return f"signal {os.WTERMSIG(status)}"
        return f"exit {os.WEXITSTATUS(status)}"
    return str(status)


def row_result(rec: Record, method: str | None) -> tuple[str, str]:
    """(result, reason) of one table row: the first stage that failed."""
    if not rec.built:
        return "build-fail", rec.build_reason
    if not rec.forward:
        return "forward-fail", rec.forward_reason
    if method is None:
        return "built", ""
    m = rec.methods.get(method)
    if m is None:
        return "skipped", ""
    return m["result"], m["reason"]


def sweep(archs: list[Architecture], cache: Path, methods: list[str], max_layers: int, build_only: bool,
          timeout: float, fresh: bool, log: Callable[[str], None]) -> list[Record]:
    key = source_key(methods, max_layers, build_only)
    (cache / "calibration.txt").parent.mkdir(parents=True, exist_ok=True)
    (cache / "calibration.txt").write_text(CALIBRATION_TEXT)
    records = []
    for i, arch in enumerate(archs, 1):
        path = cache / "results" / f"{arch.name}.json"
        rec = None
        if not fresh and path.is_file():
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                saved = json.loads(path.read_text())
                if saved["key"] == key and saved["record"]["stage"] == "done":
                    rec = Record(**saved["record"])
        if rec is None:
            rec = run_isolated(arch, cache, methods, max_layers, build_only, timeout, key)
        records.append(rec)
        cells = [f"{m}={row_result(rec, m)[0]}" for m in (methods if not build_only else [None])]
        log(f"[{i}/{len(archs)}] {arch.name} ({rec.kind}, {rec.seconds:.1f} s): {' '.join(map(str, cells))}")
    return records


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def table_rows(records: list[Record], methods: list[str], build_only: bool) -> list[dict]:
    rows = []
    for rec in records:
        for method in ([None] if build_only else methods):
            result, reason = row_result(rec, method)
            m = rec.methods.get(method or "", {})
            diff = m.get("match") or {}
            rows.append({
                "architecture": rec.architecture, "kind": rec.kind,
                "moe": rec.kinds.get("moe", False), "hybrid": rec.kinds.get("hybrid", False),
                "multimodal": rec.kinds.get("multimodal", False), "method": method or "-",
                "built": rec.built, "forward": rec.forward, "quantized": m.get("quantized", False),
                "loaded": m.get("loaded", False),
                "diff": diff.get("max_abs_diff"), "tol": diff.get("tol"), "quant_error": m.get("quant_error"),
                "stock": None if m.get("stock") is None else m["stock"].get("ok"),
                "result": result, "reason": reason})
    return rows


def _yn(v: Any) -> str:
    return "-" if v is None else "y" if v else "n"


def print_table(rows: list[dict], out: Any = sys.stdout, reason_width: int = 110) -> None:
    head = ["architecture", "kind", "moe", "hyb", "mm", "method", "bld", "fwd", "qnt", "load", "diff/tol", "stock",
            "result", "reason"]
    body = []
    for r in rows:
        dt = "-" if r["diff"] is None else f"{r['diff']:.1e}/{r['tol']:.0e}"
        reason = r["reason"] if len(r["reason"]) <= reason_width else r["reason"][: reason_width - 3] + "..."
        body.append([r["architecture"], r["kind"], _yn(r["moe"]), _yn(r["hybrid"]), _yn(r["multimodal"]), r["method"],
                     _yn(r["built"]), _yn(r["forward"]), _yn(r["quantized"]), _yn(r["loaded"]), dt, _yn(r["stock"]),
                     r["result"], reason])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    widths[-1] = len(head[-1])
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip(), file=out)


KIND_FLAGS = ("dense", "moe", "hybrid", "multimodal")
STAGE_RESULTS = ("build-fail", "forward-fail", "built", "skipped")


def _has_kind(kind: str, flags: dict[str, bool], label: str) -> bool:
    return label == "dense" if kind == "dense" else bool(flags.get(kind))


def summary(records: list[Record], rows: list[dict]) -> dict:
    from collections import Counter

    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_kind: dict[str, dict] = {}
    for kind in KIND_FLAGS:
        recs = [rec for rec in records if _has_kind(kind, rec.kinds, rec.kind)]
        entry: dict[str, Any] = {"architectures": len(recs), "built": sum(rec.built for rec in recs),
                                 "forward": sum(rec.built and rec.forward for rec in recs)}
        for m in methods:
            entry[m] = dict(Counter(r["result"] for r in rows if r["method"] == m
                                    and _has_kind(kind, r, r["kind"]) and r["result"] not in STAGE_RESULTS))
        by_kind[kind] = entry
    reasons = Counter(_reason_shape(r["reason"]) for r in rows
                      if r["result"] not in ("pass", *STAGE_RESULTS))
    return {
        "architectures": len(records),
        "built": sum(rec.built for rec in records),
        "forward": sum(rec.built and rec.forward for rec in records),
        "kinds": dict(Counter(rec.kind for rec in records)),
        "by_method": {m: dict(Counter(r["result"] for r in rows if r["method"] == m)) for m in methods},
        "by_kind": by_kind,
        "build_failures": dict(Counter(_reason_shape(rec.build_reason or rec.forward_reason) for rec in records
                                       if not (rec.built and rec.forward)).most_common(15)),
        "tool_failures": dict(reasons.most_common(15)),
    }


def _reason_shape(reason: str) -> str:
    """A failure reason with the names and numbers that differ per architecture taken out, to count alike."""
    s = re.sub(r"\[[^\]]*\.py:\d+\]", "", reason)
    s = re.sub(r"architecture \S+ is not supported.*", "architecture X is not supported", s)
    s = re.sub(r"\b[A-Z]\w*(ForCausalLM|ForConditionalGeneration|Model|Config)\w*\b", "X", s)
    s = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", s)
    s = re.sub(r"(/\S+)+", "PATH", s)
    return " ".join(s.split())[:160]


def print_summary(s: dict, seconds: float, out: Any = sys.stdout) -> None:
    print(f"\n{s['architectures']} architectures: {s['built']} built, {s['forward']} ran a forward pass "
          f"({seconds / 60:.1f} min)", file=out)
    print("kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items())), file=out)
    for method, counts in s["by_method"].items():
        print(f"{method}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])),
              file=out)
    print("by kind (a row can count under several kinds; results of the models that ran a forward pass):",
          file=out)
    for kind, e in s["by_kind"].items():
        if not e["architectures"]:
            continue
        results = "; ".join(f"{m} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))
                            for m, c in e.items() if isinstance(c, dict))
        print(f"  {kind:<10} {e['architectures']:4d} archs, {e['built']:4d} built, {e['forward']:4d} forward"
              f"{': ' + results if results else ''}", file=out)
    if s["build_failures"]:
        print("most common build/forward failures:", file=out)
        for reason, n in s["build_failures"].items():
            print(f"  {n:4d}  {reason}", file=out)
    if s["tool_failures"]:
        print("most common failures of the tool:", file=out)
        for reason, n in s["tool_failures"].items():
            print(f"  {n:4d}  {reason}", file=out)


def select(archs: list[Architecture], only: list[str] | None) -> list[Architecture]:
    if not only:
        return archs
    wanted = {o.lower() for o in only}
    chosen = [a for a in archs if a.name.lower() in wanted or wanted & {t.lower() for t in a.model_types}]
    missing = wanted - {a.name.lower() for a in chosen} - {t.lower() for a in chosen for t in a.model_types}
    if missing:
        raise SystemExit(f"unknown architecture or model type: {', '.join(sorted(missing))}")
    return chosen


def _config_kind_may_be(arch: Architecture, kind: str, max_layers: int) -> bool:
    try:
        flags = kinds(arch, tiny_config(arch, max_layers))
    except Exception:  # noqa: BLE001  (it will fail to build: keep it, the sweep says why)
        return True
    return kind == "dense" or flags[kind]  # a dense-looking config may still build expert modules


def preload() -> None:
    """Import what every child needs once, before forking (transformers' modeling machinery alone
    takes seconds to import)."""
    import importlib

    for name in ("transformers.modeling_utils", "transformers.masking_utils", "transformers.generation",
                 "transformers.integrations.sdpa_attention", "safetensors.torch", "tokenizers",
                 "quantize_llm.cli", "quantize_llm.run.execute", "quantize_llm.runtime.load",
                 "quantize_llm.formats.reading", "quantize_llm.models.load"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):
        model_class("LlamaForCausalLM")
        model_class("PreTrainedTokenizerFast")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "quantize-llm-coverage",
                   help="folder for the built models and per-architecture results (reused)")
    p.add_argument("--json", type=Path, help="write every record, the rows and the summary here")
    p.add_argument("--only", nargs="+", metavar="NAME", help="architecture class names or model types")
    p.add_argument("--kind", choices=["dense", "moe", "hybrid", "multimodal"],
                   help="only rows of this kind (decided after building)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(DEFAULT_METHODS))
    p.add_argument("--build-only", action="store_true", help="build and run forward passes, no quantization")
    p.add_argument("--max-layers", type=int, default=MAX_LAYERS)
    p.add_argument("--timeout", type=float, default=600, help="seconds per architecture (default 600)")
    p.add_argument("--fresh", action="store_true", help="recompute results already in the cache")
    p.add_argument("--quiet", action="store_true", help="no per-architecture progress lines")
    args = p.parse_args(argv)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    preload()

    start = time.monotonic()
    archs = select(architectures(), args.only)
    if args.kind:  # a first guess from the tiny config; the built model's modules decide below
        archs = [a for a in archs if _config_kind_may_be(a, args.kind, args.max_layers)]
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    records = sweep(archs, args.cache.expanduser(), args.methods, args.max_layers, args.build_only, args.timeout,
                    args.fresh, log)
    if args.kind:
        records = [r for r in records if _has_kind(args.kind, r.kinds, r.kind)]
    seconds = time.monotonic() - start
    rows = table_rows(records, args.methods, args.build_only)
    print_table(rows)
    s = summary(records, rows)
    print_summary(s, seconds)
    if args.json:
        import quantize_llm

        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "quantize_llm": quantize_llm.__version__, "script_version": SCRIPT_VERSION,
                "methods": {m: METHODS[m] for m in args.methods}, "seconds": round(seconds, 1),
                "max_layers": args.max_layers, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        args.json.write_text(json.dumps({"meta": meta, "summary": s, "rows": rows,
                                         "records": [asdict(r) for r in records]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
