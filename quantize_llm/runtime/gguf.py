"""GGUF files as models: ours rebuilt exactly from the config they carry, the weights dequantized
with the `gguf` package (the numbers llama.cpp computes from the blocks); other GGUF files (such as
llama.cpp's own quantizer's) through transformers' GGUF loader, which dequantizes the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """An eval-mode transformers model holding the GGUF file's weights, dequantized, in `dtype`
    (default float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..formats.gguf import read_gguf

    path = Path(path).expanduser()
    dtype = dtype or torch.float32
    try:
        config, tensors, _ = read_gguf(path)
    except ValueError:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        return model.to(torch.device(device)).eval()
    rest = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    cfg = AutoConfig.for_model(config["model_type"], **rest)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):   # buffers (rotary frequencies, embedding scales) made as usual
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = {name: torch.from_numpy(w).to(dtype) for name, w in tensors.items()}
    if "lm_head.weight" not in state and getattr(cfg, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    own = dict(model.state_dict())
    missing = sorted(set(own) - set(state))
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing:
        raise ModelError(f"{path}: the GGUF file lacks {len(missing)} of the model's tensors (e.g. {missing[0]})",
                         "the file is incomplete; write it again")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.get_submodule("lm_head").weight = model.get_submodule("model.embed_tokens").weight
    return model.to(torch.device(device)).eval()


def load_gguf_tokenizer(path: str | Path) -> Any:
    """Our files: the source's tokenizer.json and tokenizer_config.json they carry; others:
    transformers' GGUF tokenizer."""
    import tempfile

    from transformers import AutoTokenizer

    from ..formats.gguf import CONFIG_KEY, TOKENIZER_KEYS, read_string

    path = Path(path).expanduser()
    texts = {file: read_string(path, key) for key, file in {**TOKENIZER_KEYS, CONFIG_KEY: "config.json"}.items()}
    if texts["tokenizer.json"] is None:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as tmp:
        for file, text in texts.items():
            if text is not None:
                (Path(tmp) / file).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)
