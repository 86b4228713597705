"""load_quantized on hand-made GPTQ checkpoints against the fake-quantized transformers model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.packing import pack_int32
from quantize_llm.core.qweight import QuantizedWeight
from quantize_llm.core.spec import QuantSpec
from quantize_llm.errors import CheckpointError, ModelError, UsageError
from quantize_llm.formats.base import ConfigFacts
from quantize_llm.formats.gptq import GPTQFormat
from quantize_llm.models.architectures import get_architecture
from quantize_llm.runtime.load import load_quantized
from quantize_llm.runtime.qlinear import QuantLinear

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 64, 255, 0, 42, 7, 7]])


def act_order_rtn(weight: torch.Tensor, spec: QuantSpec, seed: int) -> QuantizedWeight:
    """FORMATS.md §1.6: quantize the permuted columns, store codes in the original order."""
    in_features = weight.shape[1]
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    inv = torch.argsort(perm)
    qw = rtn_quantize(weight[:, perm], spec)
    g_idx = (torch.arange(in_features) // spec.group_size)[inv].to(torch.int32)
    return QuantizedWeight(codes=qw.codes[:, inv].contiguous(), scale=qw.scale, zero=qw.zero,
                           g_idx=g_idx, spec=spec)


def write_quantized(src: Path, dst: Path, spec: QuantSpec, *, v2: bool = False,
                    keep_dense: tuple[str, ...] = (), drop: str | None = None) -> torch.nn.Module:
    """Quantize every block Linear of `src` with RTN into a GPTQ checkpoint at `dst`.

    Returns the fake-quantized reference: the transformers model of `src` with each quantized
    weight replaced by qw.dequantize().
    """
    config = json.loads((src / "config.json").read_text())
    arch = get_architecture(config)
    tensors = load_file(src / "model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    n_layers = config["num_hidden_layers"]
    for i in range(n_layers):
        for k, name in enumerate(arch.linears):
            prefix = f"{arch.layers}.{i}.{name}"
            if prefix in keep_dense:
                continue
            weight = tensors.pop(f"{prefix}.weight")
            qw = (act_order_rtn(weight, spec, seed=10 * i + k) if spec.act_order
                  else rtn_quantize(weight, spec))
            encoded = GPTQFormat.encode(qw)
            if v2:  # FORMATS.md §1.5: gptq_v2 stores the true zero
                encoded["qzeros"] = pack_int32(qw.zero.t().contiguous(), spec.bits, dim=1)
            tensors.update({f"{prefix}.{t}": v for t, v in encoded.items()})
            with torch.no_grad():
                reference.get_submodule(prefix).weight.copy_(qw.dequantize())
    if drop is not None:
        del tensors[drop]
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    quantized = [list(arch.linears)]
    qconfig = GPTQFormat.quantization_config(ConfigFacts(spec, quantized))
    if v2:
        qconfig.update(checkpoint_format="gptq_v2", format="gptq_v2")
    config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config))
    return reference


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def asym(bits: int, group_size: int, **kw) -> QuantSpec:
    return QuantSpec(bits=bits, group_size=group_size, sym=False, min_zero=1, **kw)


@pytest.mark.parametrize("arch, spec", [
    ("llama", asym(4, 32)),
    ("llama-tied", QuantSpec(bits=3, group_size=64, sym=True)),
    ("qwen2", asym(8, -1)),
    ("phi3", asym(2, 32)),
    ("opt", QuantSpec(bits=4, group_size=-1, sym=True)),
])
def test_logits_match_the_fake_quantized_model(tiny_model, tmp_path: Path, arch: str,
                                               spec: QuantSpec) -> None:
    src = tiny_model(arch)
    reference = write_quantized(src, tmp_path / "q", spec)
    model = load_quantized(tmp_path / "q")
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 2 * len(get_architecture(model.config.to_dict()).linears)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)
    if arch == "llama-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_v2_zero_points_load_the_same(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    spec = QuantSpec(bits=4, group_size=32, sym=False)          # v2 can store a zero of 0
    reference = write_quantized(src, tmp_path / "q", spec, v2=True)
    torch.testing.assert_close(logits(load_quantized(tmp_path / "q")), logits(reference),
                               rtol=0, atol=1e-5)


def test_act_order_checkpoint(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("qwen2")
    reference = write_quantized(src, tmp_path / "q", asym(4, 32, act_order=True))
    model = load_quantized(tmp_path / "q")
    q_proj = model.model.layers[0].self_attn.q_proj
    stored = load_file(tmp_path / "q" / "model.safetensors")["model.layers.0.self_attn.q_proj.g_idx"]
    assert not torch.equal(stored, torch.arange(64, dtype=torch.int32) // 32)              # a real act-order
    # Loaded, the columns are sorted by group (one scale read per group) and x is permuted to match.
    assert torch.equal(q_proj.g_idx, torch.arange(64, dtype=torch.int32) // 32)
    assert torch.equal(stored[q_proj.perm.long()], q_proj.g_idx)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(load_quantized(tmp_path / "q", backend="torch")), logits(reference),
                               rtol=0, atol=1e-5)


def test_dense_linear_inside_a_block_and_dtype(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("qwen2")
    dense = "model.layers.1.mlp.down_proj"
    reference = write_quantized(src, tmp_path / "q", asym(4, 32), keep_dense=(dense,))
    model = load_quantized(tmp_path / "q")
    assert type(model.get_submodule(dense)) is torch.nn.Linear
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)
    half = load_quantized(tmp_path / "q", dtype=torch.bfloat16)
    q_proj = half.model.layers[0].self_attn.q_proj
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert q_proj.bias.dtype == torch.bfloat16 and q_proj.scales.dtype == torch.float16


def test_not_quantized_folder_is_refused(tiny_model) -> None:
    with pytest.raises(ModelError, match="not a quantized checkpoint"):
        load_quantized(tiny_model("llama"))


@pytest.mark.parametrize("drop", ["model.norm.weight", "model.layers.0.mlp.up_proj.qzeros",
                                  "model.layers.1.self_attn.k_proj.bias"])
def test_missing_tensor_is_named(tiny_model, tmp_path: Path, drop: str) -> None:
    write_quantized(tiny_model("qwen2"), tmp_path / "q", asym(4, 32), drop=drop)
    with pytest.raises(CheckpointError, match=f"{drop}.*missing"):
        load_quantized(tmp_path / "q")


def test_unexpected_tensor_and_cuda_backend(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "q"
    write_quantized(tiny_model("llama"), folder, asym(4, 32))
    with pytest.raises(UsageError, match="backend 'cuda' runs on a CUDA device, not cpu"):
        load_quantized(folder, backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA kernels cannot be used here: .*(no CUDA support|no CUDA GPU)"):
            load_quantized(folder, device="cuda", backend="cuda")
    torch_model = load_quantized(folder, backend="torch")
    quant = [m for m in torch_model.modules() if hasattr(m, "backend")]
    assert quant and {m.backend for m in quant} == {"torch"}
    assert {m.backend for m in load_quantized(folder).modules() if hasattr(m, "backend")} == {"auto"}
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.extra.weight"):
        load_quantized(folder)


def test_load_for_eval_dispatches_quantized_checkpoints(tiny_model, tmp_path: Path) -> None:
    from quantize_llm.eval.evaluate import evaluate, load_for_eval

    src = tiny_model("llama")
    reference = write_quantized(src, tmp_path / "q", QuantSpec(bits=4, group_size=32))
    for f in src.iterdir():
        if "token" in f.name:
            (tmp_path / "q" / f.name).write_bytes(f.read_bytes())
    model, tokenizer = load_for_eval(str(tmp_path / "q"))
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == tokenizer("ab")["input_ids"][-2:]
    windows = IDS.repeat(2, 1)
    got, want = evaluate(model, windows), evaluate(reference, windows)
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_of_a_quantized_linear_is_its_dequantized_matrix(dtype) -> None:
    """Model code that reads `linear.weight` (RWKV, some routers) gets the matrix the module applies,
    in the model's dtype: checked against a float64 dequantization of the codes."""
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.05
    qw = rtn_quantize(w, QuantSpec(bits=4, group_size=32, sym=False, min_zero=0))
    module = QuantLinear.from_quantized(qw, None, dtype)
    g = torch.arange(96) // 32
    expected = (qw.codes.double() - qw.zero.double()[:, g]) * qw.scale.double()[:, g]
    assert module.weight.dtype == dtype
    assert torch.allclose(module.weight.double(), expected, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    x = torch.randn(3, 96).to(dtype)
    assert torch.allclose(module(x).double(), x.double() @ module.weight.double().T, atol=5e-2)
