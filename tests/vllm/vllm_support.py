"""Helpers for the tests marked `vllm`: running vLLM, our loader and transformers on one prompt, and an
independent reading of the weights vLLM holds. Fixtures are in conftest.py beside this file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# VLLM_CPU_INT4_W4A8=0: on CPUs with AMX, vLLM would otherwise quantize the activations to 8-bit
# for int4 weights (kernels/linear/mixed_precision/cpu.py); the weight-only path runs on every x86 CPU.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_INT4_W4A8": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
VOCAB = 256
PROMPT = [(7 * i + 3) % VOCAB for i in range(48)]   # token ids: no tokenizer in the way

# Per family: the tiny config's widths for vLLM (see conftest.py's docstring).
VLLM_TINY = {
    "llama": dict(hidden_size=128, intermediate_size=256),
    "mistral": dict(hidden_size=128, intermediate_size=256),
    "qwen2": dict(hidden_size=128, intermediate_size=256),
    "qwen3": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "gemma": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "gemma2": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "gemma3": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "phi3": dict(hidden_size=128, intermediate_size=256),
    "opt": dict(hidden_size=128, ffn_dim=256, word_embed_proj_dim=128),
}


def require_vllm() -> Any:
    """vLLM's module, or a skip (a failure under QUANTIZE_LLM_REQUIRE_VLLM=1)."""
    os.environ.update(VLLM_ENV)
    try:
        import vllm
        from vllm import LLM  # noqa: F401  (tests/vllm itself would import as an empty namespace)
    except ImportError as exc:
        if os.environ.get("QUANTIZE_LLM_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM cannot be imported ({exc}); install it as .ci/run does", pytrace=False)
        pytest.skip(f"vLLM is not installed ({exc})")
    return vllm


def cpu_wna16_dequantize(q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The (out, in) float32 weight that vLLM's CPUWNA16 kernel holds, read from its repacked tensors.

    Layout (vLLM csrc/cpu/cpu_wna16.cpp `cpu_gemm_wna16` and kernels/linear/mixed_precision/cpu.py
    `_process_gptq_weights_w4a16`), written from the description, not from vLLM's code:
    q_weight int32 (out/16, in*2): row b holds output channels 16b..16b+15; for input k, words 2k
             and 2k+1 hold channels 16b+0..7 and 16b+8..15, channel j of a word in bits 4j..4j+3.
    scales   (G, out) in the activation dtype; input k belongs to group k // (in / G).
    zeros    None (codes are offset by 8), or int32 (G, out/8): channel n in word n // 8, bits 4(n % 8).
    w[n, k] = (code - zero) * scale.
    """
    blocks, words = q_weight.shape
    in_features = words // 2
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)                              # (8,)
    nib = (q_weight.view(blocks, in_features, 2, 1) >> shifts) & 0xF                # (out/16, in, 2, 8)
    codes = nib.reshape(blocks, in_features, 16).permute(0, 2, 1).reshape(blocks * 16, in_features)  # (out, in)
    groups = scales.shape[0]
    group_of = torch.arange(in_features) // (in_features // groups)                 # (in,)
    scale = scales.float().t()[:, group_of]                                         # (out, in)
    if zeros is None:
        zero = torch.full_like(codes, 8)
    else:
        z = ((zeros.unsqueeze(-1) >> shifts) & 0xF).reshape(groups, -1)             # (G, out)
        zero = z.t()[:, group_of]                                                   # (out, in)
    return (codes - zero).float() * scale


def cpu_gemm_wna16_reference(x: torch.Tensor, q_weight: torch.Tensor, scales: torch.Tensor,
                             zeros: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + bias with w from `cpu_wna16_dequantize`, rounded to x's dtype like vLLM's kernel
    (which dequantizes into the activation dtype and accumulates in float32)."""
    w = cpu_wna16_dequantize(q_weight, scales, zeros).to(x.dtype).float()
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@dataclass
class Served:
    """What vLLM produced for PROMPT: full log-distributions for positions 1.. (len-1, VOCAB)."""

    logprobs: torch.Tensor
    linears: dict[str, dict[str, torch.Tensor]]    # vLLM module name -> its tensors after repacking


def collect_linears(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    from vllm.model_executor.layers.linear import LinearBase

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            found[name] = {k: v.detach().clone() for k, v in module.named_parameters(recurse=False)}
            method = getattr(module, "scheme", None) or module.quant_method     # compressed-tensors: its scheme
            found[name]["_kernel"] = type(getattr(method, "kernel", method)).__name__
            found[name]["_isa_hint"] = getattr(module, "isa_hint", None)
    return found


def reference_logprobs(model: torch.nn.Module) -> torch.Tensor:
    """log-softmax of a transformers-style model's logits on PROMPT, positions 1.., float32."""
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def ours(folder: Path) -> torch.Tensor:
    """Log-distributions from this package's loader (PyTorch path, float32 activations)."""
    from quantize_llm import load_quantized

    return reference_logprobs(load_quantized(folder, dtype=torch.float32, backend="torch"))


def transformers_unquantized(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return reference_logprobs(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


CALIBRATED = ("gptq", "awq")


VLLM_MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def our_weights(folder: Path) -> dict[str, Any]:
    """Every quantized module of our checkpoint, decoded by this package's readers."""
    from quantize_llm.formats.reading import QuantizedModules
    from quantize_llm.models.load import CheckpointReader

    with CheckpointReader(folder) as reader:
        modules = QuantizedModules(reader)
        return {prefix: modules.decode(prefix) for prefix in modules.prefixes}


def with_vllm_scales(qw: Any) -> torch.Tensor:
    """Our dequantized weight with the scale rounded to bfloat16, the dtype vLLM keeps it in."""
    g = qw.group_index().long()
    return (qw.codes.int() - qw.zero.int()[:, g]).float() * qw.scale.bfloat16().float()[:, g]


def held_by_vllm(tensors: dict[str, Any]) -> torch.Tensor:
    """The float32 weight of one vLLM CPUWNA16 module, read with `cpu_wna16_dequantize`."""
    q = tensors.get("qweight", tensors.get("weight_packed"))
    s = tensors.get("scales", tensors.get("weight_scale"))
    z = tensors.get("qzeros", tensors.get("weight_zero_point"))
    return cpu_wna16_dequantize(q, s, z)


def compare_weights(served: Served, folder: Path) -> int:
    """Assert every int4 module vLLM holds equals ours (merged q/k/v and gate/up included); the count."""
    mine = our_weights(folder)
    checked = 0
    for name, tensors in served.linears.items():
        if tensors["_kernel"] != "CPUWNA16LinearKernel":
            continue
        parent, leaf = name.rsplit(".", 1)
        parts = (leaf,) if name in mine else VLLM_MERGED.get(leaf, (leaf,))   # Phi-3 merges them itself
        want = torch.cat([with_vllm_scales(mine[f"{parent}.{part}"]) for part in parts])
        got = held_by_vllm(tensors)
        assert got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: max difference {float((got - want).abs().max())}"
        checked += 1
    return checked


FIGURES: list[dict[str, Any]] = []


def record(**figure: Any) -> None:
    """Keep an agreement figure for the end-of-session summary (and QUANTIZE_LLM_VLLM_FIGURES, a JSON file)."""
    FIGURES.append(figure)
