"""Shared fixtures: tiny random checkpoints per architecture, built from transformers configs."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Every width is a multiple of 32 (the GPTQ layout needs it); two blocks keep tests fast.
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(COMMON, tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(COMMON, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(COMMON)),
    "qwen2": ("Qwen2Config", dict(COMMON)),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=16)),
    "gemma": ("GemmaConfig", dict(COMMON, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(COMMON, head_dim=16, sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", dict(COMMON, head_dim=16, sliding_window=64)),
    "phi3": ("Phi3Config", dict(COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=256,
                              word_embed_proj_dim=64, pad_token_id=1)),
}
ARCHS = [a for a in TINY_CONFIGS if a != "llama-tied"]


def build_tiny(arch: str, folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               max_shard_size: str | None = None, tokenizer: bool = True, config: dict | None = None,
               stable: bool = False) -> Path:
    """Save a randomly initialised tiny model of `arch` (with a byte tokenizer) into `folder`;
    `config` overrides entries of the architecture's tiny config (e.g. num_hidden_layers).
    stable: every matrix (embeddings too) drawn from a generator of its own, so the weights do not
    depend on how the installed transformers initialises them (pinned digests need that)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = TINY_CONFIGS[arch]
    config = getattr(transformers, cls_name)(**{**kwargs, **(config or {})})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    generator = torch.Generator().manual_seed(seed) if stable else None
    with torch.no_grad():  # random init is tiny; widen it so quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08, generator=generator)
            elif p.dim() == 2 and stable:
                p.normal_(0, 0.02, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return folder


def byte_tokenizer():
    """A 256-token byte-level tokenizer (no merges), enough to run eval on tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


CALIB_TEXT = "\n\n".join(f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50} and more text" for j in range(40))
                         for i in range(30))


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    """30 blank-line separated documents of plain text, for calibration."""
    path = tmp_path / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """tiny_model(arch, **kw) -> folder of a saved tiny checkpoint (see build_tiny)."""
    counter = iter(range(1000))

    def make(arch: str = "llama", **kw) -> Path:
        return build_tiny(arch, tmp_path / f"{arch}-src{next(counter)}", **kw)

    return make


@pytest.fixture
def sentencepiece_model(tmp_path: Path) -> Callable[[Path, int], Path]:
    """sentencepiece_model(folder, vocab_size) -> folder/tokenizer.model: a SentencePiece BPE model
    with byte fallback trained on the calibration text (Gemma's kind: no dummy prefix; pad 0,
    eos 1, bos 2, unk 3)."""
    spm = pytest.importorskip("sentencepiece")

    def make(folder: Path, vocab_size: int) -> Path:
        text = tmp_path / "sp-train.txt"
        text.write_text(CALIB_TEXT)
        prefix = tmp_path / "sp"
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=vocab_size,
                                       model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                       pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False,
                                       minloglevel=2)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "tokenizer.model"
        target.write_bytes(prefix.with_suffix(".model").read_bytes())
        return target

    return make


def build_gemma3_multimodal(folder: Path, layers: int = 2) -> torch.nn.Module:
    """A tiny Gemma3ForConditionalGeneration (a SigLIP tower, 256-wide language model) saved into
    `folder` without a tokenizer; returns the model (eval mode)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=64, max_position_embeddings=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    model.save_pretrained(folder)
    return model.eval()


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: waking a second thread costs more than the work (and CI has two cores)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
