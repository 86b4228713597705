"""scripts/coverage.py: its shrinking rules on real default configs (fast), and a fixed sample of
architectures built, run and, for those the tool supports today, quantized and matched (slow)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _load_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "coverage.py"
    spec = importlib.util.spec_from_file_location("quantize_llm_coverage_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cov = _load_script()


def tiny(config_cls_name: str, **overrides):
    config = getattr(transformers, config_cls_name)(**overrides)
    return config, cov.shrink_config(config)


def widths_fit_gptq(cfg) -> None:
    """Every Linear width the attention and MLP take from the config is a multiple of 32."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for width in (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * head_dim, kv * head_dim):
        assert width % 32 == 0, width


# ---------------------------------------------------------------------------------------------
# the rules, on their own


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("hidden_size", 4096, cov.WIDTH), ("d_model", 1024, cov.WIDTH), ("n_embd", 768, cov.WIDTH),
    ("intermediate_size", 14336, cov.FFN), ("moe_intermediate_size", 1408, cov.EXPERT_FFN),
    ("num_attention_heads", 32, cov.HEADS), ("num_experts", 128, cov.EXPERTS), ("n_routed_experts", 256, cov.EXPERTS),
    ("num_experts_per_tok", 8, cov.TOP_K), ("num_experts_per_tok", 1, 1), ("vocab_size", 151936, cov.VOCAB),
    ("max_position_embeddings", 131072, cov.POSITIONS), ("sliding_window", 4096, cov.WINDOW),
    ("sliding_window", 0, 0), ("head_dim", 128, cov.HEAD_DIM), ("image_size", 896, cov.IMAGE),
    ("patch_size", [14, 14], [cov.PATCH, cov.PATCH]), ("intermediate_size", [8192, 16384], [cov.FFN, cov.FFN]),
    ("rope_theta", 1000000, 1000000), ("initializer_range", 0.02, 0.02),
])
def test_rule_for_a_key(key, value, expected):
    action = cov.rule_for(key)
    got = value if action is None else action(value, {"orig": {}, "key": key, "path": ""})
    assert got == expected


def test_kv_heads_keep_their_kind():
    for heads, kv, expected in [(32, 32, cov.HEADS), (32, 1, 1), (32, 8, cov.KV_HEADS)]:
        d = cov.shrink_dict({"num_attention_heads": heads, "num_key_value_heads": kv, "num_hidden_layers": 4})
        assert d["num_key_value_heads"] == expected


def test_first_cover_and_split():
    assert cov._first_cover(["a", "a", "b", "a", "c", "a"]) == 5
    assert cov._first_cover([1, 1, 1]) == 1
    assert cov._split_like([16, 24, 24], 8) == [2, 3, 3]
    assert sum(cov._split_like([24, 20, 20], 8)) == 8


def test_layer_keyed_dict_and_index_list_keep_their_pattern():
    per_layer = {"05": {"head_dim": 512}, "11": {"head_dim": 512}}
    d = cov.shrink_dict({"num_hidden_layers": 30, "per_layer_config": per_layer,
                         "cross_attention_layers": [3, 8, 13], "layer_types": ["a"] * 30})
    assert d["num_hidden_layers"] == 6
    assert d["per_layer_config"] == {"05": {"head_dim": cov.HEAD_DIM}}
    assert d["cross_attention_layers"] == [3]
    assert d["layer_types"] == ["a"] * 6


def test_token_ids_are_remapped_above_the_bytes_consistently():
    d = {"image_token_id": 151655, "eos_token_id": [151645, 2], "pad_token_id": 0, "vision_start_token_id": 20,
         "text_config": {"image_token_id": 151655, "bos_token_id": 151643}}
    cov.remap_token_ids(d)
    assert d["text_config"]["image_token_id"] == d["image_token_id"]
    assert cov.BYTES <= d["image_token_id"] < cov.VOCAB and cov.BYTES <= d["vision_start_token_id"] < cov.VOCAB
    assert d["eos_token_id"][1] == 2 and d["pad_token_id"] == 0  # small text specials stay
    ids = [d["image_token_id"], d["vision_start_token_id"], d["eos_token_id"][0], d["text_config"]["bos_token_id"]]
    assert len(set(ids)) == len(ids) and all(i < cov.VOCAB for i in ids)


# ---------------------------------------------------------------------------------------------
# the rules on real default configs


def test_llama_is_small_and_fits_the_gptq_layout():
    _, cfg = tiny("LlamaConfig")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (cov.WIDTH, cov.HEADS, cov.FFN)
    assert cfg.num_hidden_layers == cov.MIN_LAYERS and cfg.vocab_size == cov.VOCAB
    assert cfg.dtype in ("float32", torch.float32)
    widths_fit_gptq(cfg)


def test_gemma3_keeps_its_sliding_and_full_layers():
    orig, cfg = tiny("Gemma3TextConfig")
    assert set(cfg.layer_types) == set(orig.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.num_hidden_layers == 6 == len(cfg.layer_types)  # one full period of 5 sliding + 1 full
    assert cfg.sliding_window == cov.WINDOW
    widths_fit_gptq(cfg)


def test_qwen3_moe_experts_and_dense_layers():
    orig, cfg = tiny("Qwen3MoeConfig", decoder_sparse_step=2, mlp_only_layers=[0])
    assert cfg.num_experts == cov.EXPERTS and cfg.num_experts_per_tok <= cfg.num_experts
    assert cfg.moe_intermediate_size == cov.EXPERT_FFN
    assert cfg.decoder_sparse_step == 2 and cfg.mlp_only_layers == [0] and cfg.num_hidden_layers >= 2
    assert cov.kinds(cov.Architecture("Qwen3MoeForCausalLM", ["qwen3_moe"], ["causal-lm"]), cfg)["moe"]


def test_jamba_keeps_attention_mamba_and_expert_layers():
    orig, cfg = tiny("JambaConfig")
    before, after = cov.per_layer_lists(orig), cov.per_layer_lists(cfg)
    assert set(after["layers_block_type"]) == set(before["layers_block_type"]) == {"attention", "mamba"}
    assert set(after["layers_num_experts"]) == {1, cfg.num_experts} and cfg.num_experts == cov.EXPERTS
    flags = cov.kinds(cov.Architecture("JambaForCausalLM", ["jamba"], ["causal-lm"]), cfg)
    assert flags == {"moe": True, "multimodal": False, "hybrid": True}


def test_deepseek_v3_latent_attention_and_routing_stay_consistent():
    _, cfg = tiny("DeepseekV3Config")
    assert cfg.first_k_dense_replace == 1 and cfg.num_hidden_layers >= 2
    assert cfg.qk_head_dim == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert cfg.n_routed_experts % cfg.n_group == 0 and cfg.topk_group <= cfg.n_group
    assert cfg.num_experts_per_tok <= cfg.n_routed_experts // cfg.n_group * cfg.topk_group


def test_qwen3_next_keeps_linear_and_full_attention():
    orig, cfg = tiny("Qwen3NextConfig")
    assert set(cfg.layer_types) == set(orig.layer_types) and cfg.num_hidden_layers == 4
    flags = cov.kinds(cov.Architecture("Qwen3NextForCausalLM", ["qwen3_next"], ["causal-lm"]), cfg)
    assert flags["hybrid"] and flags["moe"] and not flags["multimodal"]


def test_qwen2_5_vl_vision_tower_and_rotary_sections():
    cls = transformers.Qwen2_5_VLForConditionalGeneration
    cfg = cov.shrink_config(cls.config_class(), defaults=cov.modeling_defaults(cls))
    vision, text = cfg.vision_config, cfg.text_config
    assert vision.depth <= cov.MAX_TOWER_LAYERS and vision.hidden_size == cov.WIDTH and vision.patch_size == cov.PATCH
    assert all(i < vision.depth for i in vision.fullatt_block_indexes)
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert cov.BYTES <= cfg.image_token_id < cov.VOCAB and cfg.image_token_id != cfg.video_token_id
    arch = cov.Architecture("Qwen2_5_VLForConditionalGeneration", ["qwen2_5_vl"], ["image-text-to-text"])
    assert cov.kinds(arch, cfg) == {"moe": False, "multimodal": True, "hybrid": False}


def test_gemma3_multimodal_tokens_fit_the_patches():
    _, cfg = tiny("Gemma3Config")
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    side = int(cfg.mm_tokens_per_image ** 0.5)
    assert side * side == cfg.mm_tokens_per_image and patches % cfg.mm_tokens_per_image == 0
    assert cfg.image_token_id < cfg.text_config.vocab_size


def test_every_architecture_is_listed_once():
    archs = cov.architectures()
    names = [a.name for a in archs]
    assert len(names) == len(set(names))
    assert {"LlamaForCausalLM", "Gemma3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"} <= set(names)
    llama = next(a for a in archs if a.name == "LlamaForCausalLM")
    assert "llama" in llama.model_types


def test_failure_reasons_are_grouped_and_exits_classified():
    assert cov.classify_exit(2, "architecture X is not supported") == "refused"
    assert cov.classify_exit(1, "internal error: KeyError: 'x' (rerun ...)") == "crash"
    assert cov.classify_exit(1, "checkpoint damaged: ...") == "error"
    a = cov._reason_shape("architecture Qwen3MoeForCausalLM is not supported (known architectures: A, B)")
    assert a == cov._reason_shape("architecture MixtralForCausalLM is not supported (known architectures: A, B)")
    assert cov.error_line("progress\nerror: the thing failed; do this\n") == "the thing failed; do this"
    assert cov.innermost_frame('  File "/x/a.py", line 3, in f\n  File "/x/b.py", line 7, in g\n') == " [b.py:7]"


# ---------------------------------------------------------------------------------------------
# a fixed sample, end to end

SAMPLE = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM",
          "MixtralForCausalLM", "Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration",
          "Qwen2_5_VLForConditionalGeneration", "GraniteForCausalLM", "Olmo2ForCausalLM", "FalconH1ForCausalLM"]
# Every one of them passes every method (README, Which models); the sample spans dense, MoE (experts
# fused in memory, stored one matrix each), multimodal (renamed language blocks) and hybrid.
SUPPORTED_TODAY = set(SAMPLE)


@pytest.mark.slow
def test_sample_builds_runs_and_supported_ones_match(tmp_path):
    archs = cov.select(cov.architectures(), SAMPLE)
    assert [a.name for a in archs] == [a for a in [x.name for x in cov.architectures()] if a in SAMPLE]
    records = cov.sweep(archs, tmp_path / "cache", list(cov.DEFAULT_METHODS), cov.MAX_LAYERS, False, 600,
                        True, lambda s: None)
    by_name = {r.architecture: r for r in records}
    assert set(by_name) == set(SAMPLE)
    for name, rec in by_name.items():
        assert rec.built, (name, rec.build_reason)
        assert rec.forward, (name, rec.forward_reason)
        if name in SUPPORTED_TODAY:
            for method, m in rec.methods.items():
                assert m["result"] == "pass", (name, method, m["result"], m["reason"])
                assert m["match"]["max_abs_diff"] <= m["match"]["tol"]
                assert m["quant_error"] and m["quant_error"] > m["match"]["tol"]  # quantization did change the model
            assert rec.methods["rtn-ct"]["stock"]["ok"]
