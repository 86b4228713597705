"""GGUF, the single-file format llama.cpp (and Ollama, LM Studio) runs: what goes into one.

The container is written with the `gguf` package's GGUFWriter. What llama.cpp expects of it was
read from llama.cpp's own converter and quantizer (`convert_hf_to_gguf.py` and `conversion/`,
`src/llama-quant.cpp`, `src/llama-vocab.cpp`) and is restated here:

* Families: Llama and Mistral (architecture `llama`), Qwen2 (`qwen2`), Qwen3 (`qwen3`), Gemma
  (`gemma`), Gemma 2 (`gemma2`) and Gemma 3 (`gemma3`): its text models, and the language model of
  the multimodal ones (model_type gemma3: written as the text model it holds, config and tensor
  names as Gemma3ForCausalLM has them, the vision tower left out as llama.cpp's converter leaves it
  to a separate mmproj file). Other families are refused in one line.
* Gemma's RMSNorm scales by (1 + weight): the converter stores weight + 1 for every norm, and
  llama.cpp scales by the stored value. llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim)
  (1/sqrt(hidden / heads) for the 27B layer counts, 46 and 62 blocks), whatever the config's
  query_pre_attn_scalar says: a config that asks for another scale is refused. Gemma 2 writes
  both soft-cappings and the sliding window; Gemma 3 the final soft-capping where set, the sliding
  window, and the rotary bases of its full (`rope.freq_base`) and sliding (`rope.freq_base_swa`)
  layers; both write which layers slide (`attention.sliding_window_pattern`, one bool per layer,
  from the config's layer_types).
* Tensor names are the `gguf` package's map from the checkpoint's names (`blk.N.attn_q.weight`, ...).
  For the `llama` architecture the converter permutes the rows of q_proj and k_proj (within each
  head, the two rotary halves are interleaved: rows reshaped (heads, 2, head_dim/2) and the first
  two axes swapped) because llama.cpp applies rotary embeddings to adjacent pairs; Qwen2/Qwen3 are
  run with the NEOX rotation and keep the checkpoint's order.
* A tied output head is not written (llama.cpp then uses token_embd), as the converter does.
* Metadata: `{arch}.context_length`, `embedding_length`, `block_count`, `feed_forward_length`,
  `attention.head_count`, `attention.head_count_kv`, `rope.freq_base`,
  `attention.layer_norm_rms_epsilon`, `attention.key_length`/`value_length` when the config names a
  head_dim, `rope.dimension_count` and `vocab_size` for llama; `general.file_type` (llama.cpp's
  LLAMA_FTYPE) and `general.quantization_version` 2. The source config.json is kept under
  `quantize_llm.config` so our reader rebuilds the model exactly.
* Tokenizer: byte-level BPE tokenizers (tokenizer.json) as `tokenizer.ggml.model = gpt2`, with the
  token list padded to the config's vocab_size, token types (special added tokens are CONTROL),
  merges and special token ids (the `gguf` package's SpecialVocab), and `tokenizer.ggml.pre` chosen
  from the pre-tokenizer (gpt-2, llama-bpe, qwen2, smollm or default). SentencePiece models
  (tokenizer.model, where tokenizer.json is not byte-level BPE: Gemma, Llama 2, Mistral v0.1) as
  `tokenizer.ggml.model = llama`: every piece with its score and type (normal, unknown, control,
  unused, byte; added tokens user-defined or control), padded with unused `[PADn]` pieces, and
  `add_space_prefix` as the model's normalizer adds one (read with the sentencepiece package).
* Types: llama-quantize's per-tensor rules for the schemes (`tensor_type`): 1-D tensors (norms,
  biases) stay F32; the output head (or a tied token_embd) gets Q6_K, or Q8_0 when its rows do not
  fill 256-weight blocks; Q4_K_M puts attn_v and ffn_down of the `use_more_bits` layers in Q6_K;
  Q3_K_M puts attn_v in Q5_K for the first two layers and Q4_K after, attn_output in Q4_K, and
  ffn_down in Q5_K for the first sixteenth of the layers and Q4_K after. A matrix whose rows do not
  fill the type's blocks falls back as llama.cpp does (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0,
  Q3_K to Q4_0; F16 when not even 32-weight blocks fit).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core import ggml
from ..errors import SpecError

# scheme -> (the type of most matrices, llama.cpp's LLAMA_FTYPE number for general.file_type)
SCHEMES: dict[str, tuple[str, int]] = {
    "Q8_0": ("Q8_0", 7), "Q4_0": ("Q4_0", 2), "Q4_1": ("Q4_1", 3), "Q5_0": ("Q5_0", 8), "Q5_1": ("Q5_1", 9),
    "Q3_K": ("Q3_K", 11), "Q4_K": ("Q4_K", 14), "Q5_K": ("Q5_K", 16), "Q6_K": ("Q6_K", 18),
    "Q4_K_M": ("Q4_K", 15), "Q3_K_M": ("Q3_K", 12),
}
DEFAULT_SCHEME = "Q4_K_M"
CONFIG_KEY = "quantize_llm.config"
TOKENIZER_KEYS = {"quantize_llm.tokenizer_json": "tokenizer.json",
                  "quantize_llm.tokenizer_config_json": "tokenizer_config.json"}

# model_type -> (llama.cpp architecture, rows of q/k permuted for llama.cpp's rotation)
FAMILIES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
    "gemma": ("gemma", False), "gemma2": ("gemma2", False), "gemma3_text": ("gemma3", False),
}
# architectures whose norms are stored as weight + 1 (Gemma's RMSNorm scales by 1 + weight)
NORM_SHIFT = {"gemma", "gemma2", "gemma3"}
# llama.cpp's block counts of the 27B Gemmas, whose queries it scales by 1/sqrt(hidden / heads)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q3_K": "Q4_0"}


def parse_format(name: str) -> str | None:
    """The GGUF scheme a --format value names ("gguf" = Q4_K_M, "gguf:Q3_K_M", ...), None when it
    is not a GGUF format."""
    low = name.lower()
    if low != "gguf" and not low.startswith("gguf:"):
        return None
    scheme = name.split(":", 1)[1].upper() if ":" in name else DEFAULT_SCHEME
    if scheme not in SCHEMES:
        raise SpecError(f"--format {name}: {scheme} is not a GGUF type this tool writes",
                        f"choose one of {', '.join('gguf:' + s for s in SCHEMES)} (plain gguf is {DEFAULT_SCHEME})")
    return scheme


def family(config: dict) -> tuple[str, bool]:
    """(llama.cpp architecture, whether q/k rows are permuted); SpecError for other families."""
    model_type = str(config.get("model_type", ""))
    if model_type not in FAMILIES:
        raise SpecError(f"GGUF output is not supported for model_type {model_type!r}",
                        f"GGUF output covers {', '.join(sorted(FAMILIES))} (and the language model of a multimodal "
                        "gemma3); use another --format for this model")
    arch = FAMILIES[model_type][0]
    rope_scaling(config, arch)   # refuses what llama.cpp would not compute as transformers does
    if arch in GEMMA_27B_LAYERS and config.get("query_pre_attn_scalar") is not None:
        wide = int(config["num_hidden_layers"]) == GEMMA_27B_LAYERS[arch]
        used = config["hidden_size"] // config["num_attention_heads"] if wide else head_dim(config)
        if float(config["query_pre_attn_scalar"]) != float(used):
            raise SpecError(f"GGUF output: llama.cpp scales this model's queries by 1/sqrt({used}), its config by "
                            f"1/sqrt({config['query_pre_attn_scalar']}) (query_pre_attn_scalar)",
                            "llama.cpp would compute another model; use another --format for this model")
    return FAMILIES[model_type]


# multimodal model_type -> the model_type of its language model, which GGUF output writes alone
MULTIMODAL_TEXT = {"gemma3": "gemma3_text"}
# checkpoint name prefixes of a multimodal model's language model -> the text model's
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))


def text_model(config: dict, names: Iterable[str]) -> tuple[dict, dict[str, str]]:
    """(the config to write, {tensor name as the text model names it: checkpoint name}). A
    multimodal Gemma 3 gives its language model (model_type gemma3_text, the full text config
    transformers makes of it) and its tensors renamed; its vision tower and projector are left out
    (llama.cpp runs them from a separate mmproj file). Other models: as they are."""
    names = list(names)
    if config.get("model_type") not in MULTIMODAL_TEXT:
        return config, {n: n for n in names}
    from transformers import AutoConfig

    rest = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    text = AutoConfig.for_model(config["model_type"], **rest).get_text_config().to_dict()
    text["model_type"] = MULTIMODAL_TEXT[config["model_type"]]
    text["architectures"] = ["Gemma3ForCausalLM"]
    text.pop("transformers_version", None)
    if "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    sources: dict[str, str] = {}
    for name in names:
        for old, new in TEXT_PREFIXES:
            if name.startswith(old):
                sources[new + name[len(old):]] = name
                break
        else:
            if name == "lm_head.weight":
                sources[name] = name
    return text, sources


def _rope_sets(config: dict) -> dict[str, dict]:
    """The rotary settings per attention kind ("" when one set serves every layer; Gemma 3's
    "full_attention" and "sliding_attention")."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return dict(rope)
    return {"": rope}


# rotary scalings written, per llama.cpp architecture: "linear" (positions divided by the factor:
# rope.scaling.type/factor) and Llama 3's "llama3" (a rope_freqs tensor of per-frequency divisors)
ROPE_SCALINGS = {"llama": ("linear", "llama3"), "qwen2": ("linear",), "qwen3": ("linear",), "gemma": ("linear",),
                 "gemma2": ("linear",), "gemma3": ("linear",)}


@dataclass(frozen=True)
class RopeScaling:
    kind: str                       # "linear" or "llama3"
    factor: float
    freq_factors: np.ndarray | None = None   # llama3: (head_dim/2,) float32, rope_freqs.weight


def rope_scaling(config: dict, arch: str) -> RopeScaling | None:
    """The rotary scaling to write for `config` (None: none), or SpecError for one llama.cpp would
    compute otherwise. Gemma 3 scales its full-attention layers only, which is what llama.cpp does
    with rope.scaling.* (its sliding layers keep scale 1 and base 10000): the sliding layers' set
    must be unscaled. Llama 3's frequency-dependent scaling goes into rope_freqs: each frequency
    of the rotation is divided by its factor (1 for short wavelengths, `factor` for long ones,
    a smooth blend between), the divisors transformers' llama3 rotation applies. (A Gemma 3 config
    with one set, rope_scaling beside rope_local_base_freq, scales the full-attention layers too.)"""
    sets = _rope_sets(config)
    found = None
    for kind, rope in sets.items():
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type == "default":
            continue
        if rope_type not in ROPE_SCALINGS.get(arch, ()) or (arch == "gemma3" and kind == "sliding_attention"):
            where = f" on its {kind} layers" if kind else ""
            raise SpecError(f"GGUF output does not write rope scaling {rope_type!r}{where} for {arch}",
                            "use another --format for this model")
        factor = float(rope.get("factor") or 1.0)
        if rope_type == "linear":
            found = RopeScaling("linear", factor)
            continue
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        old = float(rope.get("original_max_position_embeddings") or config.get("max_position_embeddings", 8192))
        dim = head_dim(config)
        inv_freq = 1.0 / rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        wavelen = 2 * np.pi / inv_freq
        smooth = (old / wavelen - low) / (high - low)
        divisor = np.where(wavelen < old / high, 1.0,
                           np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        found = RopeScaling("llama3", factor, divisor.astype(np.float32))
    return found


def write_rope_scaling(writer: Any, config: dict, arch: str) -> None:
    """rope.scaling.* and, for llama3 scaling, the rope_freqs tensor (written before the model's)."""
    import gguf

    scaling = rope_scaling(config, arch)
    if scaling is None:
        return
    if scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    else:
        writer.add_tensor("rope_freqs.weight", scaling.freq_factors)


def rope_theta(config: dict, kind: str = "full_attention") -> float:
    """The rotary base of the layers of `kind` ("full_attention" or "sliding_attention" where the
    config has one set per kind; else the one set)."""
    sets = _rope_sets(config)
    rope = sets.get(kind, sets.get("", {}))
    if rope.get("rope_theta") is not None:
        return float(rope["rope_theta"])
    if kind == "sliding_attention" and config.get("rope_local_base_freq") is not None:
        return float(config["rope_local_base_freq"])
    return float(config.get("rope_theta", 10000.0))


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows reordered as llama.cpp's converter does for the llama architecture (module
    docstring); works on weights (rows, cols) and biases (rows,)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's layers that get more bits in the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(scheme: str, name: str, shape: tuple[int, ...], n_layer: int, tied: bool) -> str:
    """The ggml type llama-quantize gives tensor `name` (GGUF name) of `shape` (numpy order) in
    `scheme`: "F32", "F16" or a block type."""
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return "F32"
    base = SCHEMES[scheme][0]
    kind = name.split(".")[-2]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    t = base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = "Q8_0" if shape[-1] % ggml.QK_K else ("Q6_K" if base != "Q8_0" else base)
    elif kind == "attn_v":
        if scheme == "Q4_K_M" and use_more_bits(layer, n_layer):
            t = "Q6_K"
        elif scheme == "Q3_K_M":
            t = "Q5_K" if layer < 2 else "Q4_K"
    elif kind == "ffn_down":
        if scheme == "Q4_K_M" and use_more_bits(layer, n_layer):
            t = "Q6_K"
        elif scheme == "Q3_K_M":
            t = "Q5_K" if layer < n_layer // 16 else "Q4_K"
    elif kind == "attn_output" and scheme == "Q3_K_M":
        t = "Q4_K"
    if shape[-1] % ggml.TYPES[t].block:
        t = FALLBACK.get(t, t)
        if shape[-1] % ggml.TYPES[t].block:
            t = "F16"
    return t


def name_map(arch: str, n_blocks: int) -> Any:
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    return gguf.get_tensor_name_map(arch_enum, n_blocks)


def gguf_name(names: Any, hf_name: str) -> str | None:
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


# ---- tokenizer ------------------------------------------------------------------------------------------------

def _pre_tokenizer(tok: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    text = json.dumps(parts)
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if "Split" in kinds and r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "Split" in kinds and r"\\p{N}" in text and "{1,3}" not in text:
        return "qwen2"
    return "default"


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    pre: str


def _byte_level(folder: Path) -> dict | None:
    """The tokenizer.json of `folder` when it is a byte-level BPE one, else None."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tok.get("pre_tokenizer")):
        return None
    return tok


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """The token list and types of a byte-level BPE tokenizer.json, padded to vocab_size."""
    import gguf

    tok = _byte_level(folder)
    if tok is None:
        raise SpecError(f"GGUF output needs a byte-level BPE tokenizer.json or a SentencePiece tokenizer.model "
                        f"(neither in {folder})",
                        "other tokenizers (WordPiece, Unigram tokenizer.json) are not written to GGUF")
    model = tok["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: set[int] = set()
    user: set[int] = set()
    for added in tok.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        (special if added.get("special") else user).add(int(added["id"]))
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if i in user else gguf.TokenType.NORMAL)
    return Vocab(tokens, [int(t) for t in types], _pre_tokenizer(tok))


# ---- writing --------------------------------------------------------------------------------------------------

def write_metadata(writer: Any, arch: str, config: dict, scheme: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(SCHEMES[scheme][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim"):
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    if arch == "llama":
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim(config))
    if arch in ("gemma2", "gemma3"):
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        layer_types = config.get("layer_types")
        if config.get("sliding_window") and layer_types:
            writer.add_sliding_window(int(config["sliding_window"]))
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
            writer.add_rope_freq_base_swa(rope_theta(config, "sliding_attention"))
    writer.add_string(CONFIG_KEY, json.dumps(config, sort_keys=True))


@dataclass(frozen=True)
class PieceVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    space_prefix: bool            # the normalizer puts a space before the text


def read_pieces(folder: Path, vocab_size: int) -> PieceVocab:
    """A SentencePiece tokenizer.model's pieces, scores and types (added tokens of
    tokenizer_config.json / added_tokens.json after them), padded to vocab_size with unused
    pieces, as llama.cpp's converter lists them."""
    import gguf

    try:
        import sentencepiece
    except ImportError:
        raise SpecError("GGUF output of a SentencePiece tokenizer needs the sentencepiece package",
                        "pip install sentencepiece (a dependency of quantize-llm: reinstall it)") from None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                     else gguf.TokenType.NORMAL)
    added: dict[int, tuple[str, bool]] = {}
    extra = folder / "added_tokens.json"
    if extra.is_file():
        added.update({int(i): (t, False) for t, i in json.loads(extra.read_text(encoding="utf-8")).items()})
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        added.update({int(i): (d["content"], bool(d.get("special"))) for i, d in decoder.items()})
    size = max(vocab_size, len(tokens), max(added, default=-1) + 1)
    while len(tokens) < size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    for i, (text, special) in added.items():
        if i >= sp.vocab_size() or tokens[i] != text:
            tokens[i], scores[i] = text, -1000.0
        if i >= sp.vocab_size() or types[i] == gguf.TokenType.NORMAL:
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    space = sp.encode_as_pieces("a")
    return PieceVocab(tokens, scores, [int(t) for t in types], bool(space) and space[0].startswith("\u2581"))


def write_tokenizer(writer: Any, folder: Path, config: dict) -> None:
    import gguf

    if _byte_level(folder) is None and (folder / "tokenizer.model").is_file():
        pieces = read_pieces(folder, int(config["vocab_size"]))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(pieces.tokens)
        writer.add_token_scores(pieces.scores)
        writer.add_token_types(pieces.types)
        writer.add_add_space_prefix(pieces.space_prefix)
        gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(pieces.tokens)).add_to_gguf(writer, quiet=True)
    else:
        vocab = read_vocab(folder, int(config["vocab_size"]))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(vocab.tokens))
        special.add_to_gguf(writer, quiet=True)
    for key, file in TOKENIZER_KEYS.items():     # verbatim, so our reader tokenizes exactly as the source
        if (folder / file).is_file():
            writer.add_string(key, (folder / file).read_text(encoding="utf-8"))


@dataclass
class TensorPlan:
    """One tensor of the GGUF file: its GGUF name, the checkpoint name it comes from, its type."""

    name: str
    source: str
    shape: tuple[int, ...]
    type: str
    permute_heads: int = 0        # rows permuted for llama's rotation (0: not)
    shift: float = 0.0            # added to the values (Gemma's norms: weight + 1)


def plan_tensors(config: dict, shapes: dict[str, tuple[int, ...]], scheme: str,
                 keep_dense: Iterable[str] = ()) -> list[TensorPlan]:
    """Every tensor of the GGUF file from the checkpoint's tensor shapes; SpecError for a tensor
    llama.cpp would not know."""
    arch, permute = family(config)
    n_layer = int(config["num_hidden_layers"])
    names = name_map(arch, n_layer)
    tied = "lm_head.weight" not in shapes or bool(config.get("tie_word_embeddings"))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    dense = [re.compile(p) for p in keep_dense]
    plans = []
    for source, shape in shapes.items():
        if source == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if source.endswith(("rotary_emb.inv_freq", ".inv_freq")):
            continue
        name = gguf_name(names, source)
        if name is None:
            raise SpecError(f"GGUF output: the checkpoint's tensor {source} has no name in llama.cpp's {arch} "
                            "architecture", "use another --format for this model")
        t = tensor_type(scheme, name, shape, n_layer, tied)
        if t not in ("F32", "F16") and any(p.search(source.removesuffix(".weight")) for p in dense):
            t = "F16"
        heads_of = 0
        if permute and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", source):
            heads_of = heads if ".q_proj." in source else kv_heads
        shift = 1.0 if arch in NORM_SHIFT and source.endswith("norm.weight") else 0.0
        plans.append(TensorPlan(name, source, tuple(shape), t, heads_of, shift))
    return plans


def encode_tensor(plan: TensorPlan, w: np.ndarray) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) for GGUFWriter.add_tensor, from the float32 source tensor
    (already permuted when the plan says so) rounded to nearest."""
    import gguf

    if plan.shift:
        w = w + np.float32(plan.shift)
    if plan.type == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), None
    if plan.type == "F16":
        return np.ascontiguousarray(w, dtype=np.float16), None
    return ggml.quantize_rtn(plan.type, w).pack(), gguf.GGMLQuantizationType[plan.type]


def packed_tensor(qw: ggml.GgmlWeight) -> tuple[np.ndarray, Any]:
    import gguf

    return qw.pack(), gguf.GGMLQuantizationType[qw.type]


# ---- reading --------------------------------------------------------------------------------------------------

def is_gguf(path: Path | str) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf(path: Path | str) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """A GGUF file this tool wrote: (config.json, the checkpoint's tensors dequantized to float32
    under their checkpoint names, the ggml type each was stored in). ValueError for GGUF files
    without our config record (llama.cpp's own: read them with transformers' GGUF loader)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(CONFIG_KEY)
    if field is None:
        raise ValueError(f"{path} was not written by quantize-llm (no {CONFIG_KEY} record)")
    config = json.loads(bytes(field.parts[field.data[0]]).decode("utf-8"))
    arch, permute = family(config)
    n_layer = int(config["num_hidden_layers"])
    names = name_map(arch, n_layer)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    wanted = _checkpoint_names(config)
    back = {gguf_name(names, hf): hf for hf in wanted}
    tensors: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":   # the rotation's, from config.json (rope_scaling)
            continue
        source = back.get(t.name)
        if source is None:
            raise ValueError(f"{path}: tensor {t.name} is not one of the {arch} model's")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        if permute and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", source):
            w = unpermute_rows(w, heads if ".q_proj." in source else kv_heads)
        if arch in NORM_SHIFT and source.endswith("norm.weight"):
            w = w - np.float32(1.0)
        tensors[source] = w
        types[source] = t.tensor_type.name
    return config, tensors, types


def read_string(path: Path | str, key: str) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _checkpoint_names(config: dict) -> list[str]:
    """The tensor names a checkpoint of this family can hold (for the reverse name map)."""
    n = int(config["num_hidden_layers"])
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    per = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
    for i in range(n):
        p = f"model.layers.{i}."
        names += [p + m + s for m in per for s in (".weight", ".bias")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight",
                  p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names
