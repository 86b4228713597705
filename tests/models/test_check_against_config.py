"""models/load.py's check_against_config: a checkpoint's tensors against the model its config.json
describes (transformers' own skeleton of that config is the reference)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS
from safetensors.torch import load_file, save_file

from quantize_llm.errors import CheckpointError, ModelError
from quantize_llm.models.load import CheckpointReader, build_skeleton, check_against_config


def check(folder: Path) -> None:
    with CheckpointReader(folder) as reader:
        check_against_config(reader, build_skeleton(folder, reader.config))


def rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("arch", [*ARCHS, "llama-tied"])
def test_what_save_pretrained_wrote_passes_and_one_tensor_less_does_not(tiny_model, arch) -> None:
    folder = tiny_model(arch)
    check(folder)
    tensors = load_file(folder / "model.safetensors")
    norm = next(n for n in tensors if "norm" in n and n.endswith(".weight"))
    rewrite(folder, lambda t: t.pop(norm))
    with pytest.raises(CheckpointError, match=rf"{norm}, which .* needs, is missing"):
        check(folder)


def test_a_tied_head_may_be_absent_an_untied_one_may_not(tiny_model) -> None:
    tied, untied = tiny_model("llama-tied"), tiny_model("llama")
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    check(tied)
    rewrite(untied, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight, which config\.json's LlamaForCausalLM needs"):
        check(untied)


def test_every_mismatch_is_counted_and_the_first_named(tiny_model) -> None:
    folder = tiny_model("llama")
    rewrite(folder, lambda t: t.update({
        "model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"].to(torch.int8),
        "model.layers.0.extra": torch.zeros(2)}))
    rewrite(folder, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError) as info:
        check(folder)
    message = info.value.message
    # a wrong tensor is named before a missing or an unexpected one
    assert "tensor model.layers.1.mlp.up_proj.weight is int8 [128, 64] in model.safetensors, but config.json's " \
           "model expects floating [128, 64] (and 2 other tensors do not match)" in message


def test_ignored_unexpected_tensors_pass(tiny_model, monkeypatch) -> None:
    folder = tiny_model("llama")
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    with pytest.raises(CheckpointError, match="rotary_emb.inv_freq is in the checkpoint"):
        check(folder)
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"rotary_emb\.inv_freq"])
    check(folder)


def test_quantized_modules_are_left_to_their_format(tiny_model) -> None:
    folder = tiny_model("llama")
    prefix = "model.layers.0.self_attn.q_proj"
    rewrite(folder, lambda t: t.update({f"{prefix}.qweight": torch.zeros(8, 64, dtype=torch.int32),
                                        f"{prefix}.weight": t.pop(f"{prefix}.weight")[:, :3].clone()}))
    with CheckpointReader(folder) as reader:
        check_against_config(reader, build_skeleton(folder, reader.config), quantized=[prefix])
        with pytest.raises(CheckpointError, match="holds quantized tensors .*q_proj.qweight.* no quantization_config"):
            check_against_config(reader, build_skeleton(folder, reader.config))


@pytest.mark.parametrize("change,reason", [
    ({"num_hidden_layers": "two"}, "num_hidden_layers"),
    ({"hidden_size": -64}, "negative"),
    ({"num_attention_heads": 0}, ""),
    ({"vocab_size": None}, ""),
])
def test_configs_transformers_cannot_build_are_model_errors(tiny_model, change, reason) -> None:
    folder = tiny_model("llama")
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ModelError, match=f"config.json does not describe a model transformers can build: .*{reason}"):
        build_skeleton(folder, {**config, **change})
