#!/usr/bin/env python3
"""Which statistics an expert that receives few calibration tokens should be quantized with.

No real MoE fits this machine, so the benchmark makes one from a real model: SmolLM2-135M
(scripts/build_smollm2.py) upcycled into a Mixtral-layout MoE: every layer's MLP copied into
--experts experts (each perturbed by --noise relative Gaussian noise, so they differ), a random
router picking --top-k of them per token. Its perplexity stays close to the dense model's, its
experts see real activations, and a small calibration set leaves some experts with few tokens.

GPTQ (4-bit, group 128) is then run with each rule for an expert under the threshold:
- routed:  its own routed tokens only, however few (threshold 1; an expert with none has to fall
           back to every token anyway);
- default: every token into the layer when it received fewer than 32 (MIN_EXPERT_TOKENS);
- all:     every token into the layer for every expert (routing ignored for statistics);
and RTN for scale. Each row: WikiText-2 perplexity, its ratio to the unquantized MoE, and how
many experts took every token's statistics. Calibration: C4 (--nsamples x --seqlen); evaluation:
--windows windows of 512 WikiText-2 tokens. Everything in one process, one run.

    python scripts/bench_moe_fallback.py --nsamples 8 --seqlen 256 --windows 16
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def upcycle(dense_dir: Path, out: Path, experts: int, top_k: int, noise: float, seed: int) -> None:
    """A Mixtral-layout MoE whose experts are noisy copies of the dense model's MLPs."""
    import shutil

    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    c = dense.config
    config = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           rope_parameters=getattr(c, "rope_parameters", None),
                           tie_word_embeddings=c.tie_word_embeddings,
                           num_local_experts=experts, num_experts_per_tok=top_k, bos_token_id=c.bos_token_id,
                           eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None))
    moe = MixtralForCausalLM(config).to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    state = moe.state_dict()
    with torch.no_grad():
        for name, value in dense.state_dict().items():
            if name in state and ".mlp." not in name:
                state[name].copy_(value)
        for i, layer in enumerate(dense.model.layers):
            gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
            experts_module = moe.model.layers[i].mlp.experts
            for e in range(experts):
                def jitter(w: torch.Tensor) -> torch.Tensor:
                    return w + noise * w.std() * torch.randn(w.shape, generator=g)
                experts_module.gate_up_proj[e].copy_(torch.cat([jitter(gate), jitter(up)], dim=0))
                experts_module.down_proj[e].copy_(jitter(down))
            router = moe.model.layers[i].mlp.gate.weight
            router.copy_(torch.randn(router.shape, generator=g) / c.hidden_size ** 0.5)
    moe.to(torch.bfloat16).save_pretrained(out)
    for f in dense_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
            shutil.copy(f, out / f.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="the dense SmolLM2 folder (default: build it)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--calib", type=Path, default=SHARED / "c4" / "c4_validation_2k.parquet")
    p.add_argument("--eval", type=Path, default=SHARED / "wikitext-2-raw" / "wiki.test.raw")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    for path in (args.calib, args.eval):
        if not path.is_file():
            sys.exit(f"error: {path} not found (pass --calib / --eval)")

    from transformers import AutoTokenizer

    import quantize_llm.calibration.sequential as sequential
    from quantize_llm.algorithms.gptq import GPTQOptions
    from quantize_llm.calibration.data import CalibrationSpec
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.eval.evaluate import evaluate, load_for_eval, make_windows, tokenize_text
    from quantize_llm.run.execute import quantize

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_quality import default_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        moe_dir = Path(tmp) / "moe"
        upcycle(args.model or default_model(), moe_dir, args.experts, args.top_k, args.noise, seed=0)
        tokenizer = AutoTokenizer.from_pretrained(moe_dir)
        windows = make_windows(tokenize_text(args.eval, tokenizer), 512, args.windows)
        base_model, _ = load_for_eval(str(moe_dir))
        base = evaluate(base_model, windows).perplexity
        del base_model
        print(f"unquantized MoE ({args.experts} experts, top {args.top_k}): perplexity {base:.3f}", flush=True)
        rows.append({"rule": "unquantized", "ppl": base, "ratio": 1.0, "all_tokens": 0})
        cal = CalibrationSpec(source=str(args.calib), nsamples=args.nsamples, seqlen=args.seqlen)
        rules = [("rtn", None), ("routed", 1), ("default", sequential.MIN_EXPERT_TOKENS), ("all", 1 << 60)]
        default = sequential.MIN_EXPERT_TOKENS
        for rule, threshold in rules:
            out = Path(tmp) / rule
            t = time.perf_counter()
            if threshold is None:
                spec = QuantSpec(method="rtn", bits=4, group_size=128, sym=True)
                summary = quantize(str(moe_dir), out, spec, device="cpu", resume=False, verify=False)
            else:
                sequential.MIN_EXPERT_TOKENS = threshold
                spec = QuantSpec(method="gptq", bits=4, group_size=128, sym=True)
                summary = quantize(str(moe_dir), out, spec, options=GPTQOptions(), calibration=cal, device="cpu",
                                   resume=False, verify=False)
                sequential.MIN_EXPERT_TOKENS = default
            seconds = time.perf_counter() - t
            scarce = sum(1 for layer in summary.layers if layer.metrics.get("all_tokens") and "gate_proj" in layer.name)
            model, _ = load_for_eval(str(out))
            ppl = evaluate(model, windows).perplexity
            del model
            rows.append({"rule": rule, "ppl": ppl, "ratio": ppl / base, "all_tokens": scarce, "seconds": seconds})
            print(f"{rule:8s} perplexity {ppl:8.3f}  x{ppl / base:.4f}  experts on every token's statistics: "
                  f"{scarce}  ({seconds:.0f} s)", flush=True)
    print()
    print("| rule for an expert with few tokens | perplexity | ratio to unquantized | experts using every token |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['ppl']:.3f} | {r['ratio']:.4f} | {r['all_tokens']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
