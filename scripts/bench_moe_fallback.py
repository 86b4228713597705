#!/usr/bin/env python3
"""Which statistics an expert that receives few calibration tokens should be quantized with.

No real MoE fits this machine, so the experts are made from a real model's MLPs: at a few layers of
SmolLM2-135M (scripts/build_smollm2.py), the MLP is copied into --experts experts (each perturbed by
--noise relative Gaussian noise) behind a random router picking --top-k per token; the experts'
inputs are the real hidden states of that layer (after its post-attention norm) on C4 text for
calibration (--tokens, deliberately few, so many experts are under-served) and on WikiText-2 for
the evaluation (--eval-tokens, never used for calibration).

For every expert, GPTQ (4-bit, group 128, the package's gptq_quantize) quantizes its gate, up and
down projections with the Hessians of:
- routed:  the calibration tokens routed to it (with none, nothing to calibrate on: RTN);
- all:     every calibration token of the layer (the expert's own weights make the down
           projection's inputs), routing ignored for statistics;
- default: the package's rule: routed when at least MIN_EXPERT_TOKENS tokens reached it, else all;
- all-under-32: routed when at least 32 tokens reached it, else all (the rule first chosen);
and RTN for scale. The figure is the expert's output error on the evaluation tokens routed to it,
||E_q(x) - E(x)||^2 / ||E(x)||^2, averaged over experts, separately for the experts that fewer than
32 calibration tokens reached and the others. One process, one run; lower is better; the ratio column compares each
rule with the default on the same experts.

    python scripts/bench_moe_fallback.py --experts 32 --tokens 512 --eval-tokens 8192
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FEW = 32   # experts with fewer calibration tokens than this are reported apart
SHARED = ROOT.parent / "shared" / "data"


def layer_inputs(model: torch.nn.Module, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The inputs of each listed layer's MLP (post-attention-norm outputs), (tokens, hidden), float32."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float())) for i in layers]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def expert_forward(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="the SmolLM2 folder (default: build it)")
    p.add_argument("--layers", type=int, nargs="+", default=[5, 15, 25])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (C4)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens (WikiText-2)")
    p.add_argument("--calib", type=Path, default=SHARED / "c4" / "c4_validation_2k.parquet")
    p.add_argument("--eval", type=Path, default=SHARED / "wikitext-2-raw" / "wiki.test.raw")
    args = p.parse_args()
    for path in (args.calib, args.eval):
        if not path.is_file():
            sys.exit(f"error: {path} not found (pass --calib / --eval)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize
    from quantize_llm.algorithms.rtn import rtn_quantize
    from quantize_llm.calibration.data import CalibrationSpec, load_calibration
    from quantize_llm.calibration.experts import MIN_EXPERT_TOKENS
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.eval.evaluate import make_windows, tokenize_text

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_quality import default_model

    model_dir = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = 128
    cal_ids = load_calibration(CalibrationSpec(source=str(args.calib), nsamples=max(1, args.tokens // seq),
                                               seqlen=seq), tokenizer).tokens
    eval_ids = make_windows(tokenize_text(args.eval, tokenizer), seq, max(1, args.eval_tokens // seq))
    cal_x, eval_x = layer_inputs(model, cal_ids, args.layers), layer_inputs(model, eval_ids, args.layers)
    spec = QuantSpec(method="gptq", bits=4, group_size=128, sym=True)
    g = torch.Generator().manual_seed(0)
    errors: dict[str, dict[str, list[float]]] = {r: {"few": [], "enough": []}
                                                 for r in ("rtn", "routed", "all", "all-under-32", "default")}
    counts = []
    for layer in args.layers:
        mlp = model.model.layers[layer].mlp
        dense = {"gate": mlp.gate_proj.weight.detach(), "up": mlp.up_proj.weight.detach(),
                 "down": mlp.down_proj.weight.detach()}
        hidden = dense["gate"].shape[1]
        router = torch.randn(args.experts, hidden, generator=g) / hidden ** 0.5

        def route(x: torch.Tensor, router: torch.Tensor = router) -> torch.Tensor:
            return (x @ router.T).topk(args.top_k, dim=-1).indices          # (tokens, k)

        cal_route, eval_route = route(cal_x[layer]), route(eval_x[layer])
        for e in range(args.experts):
            w = {k: v + args.noise * v.std() * torch.randn(v.shape, generator=g) for k, v in dense.items()}
            routed = cal_x[layer][(cal_route == e).any(-1)]
            held = eval_x[layer][(eval_route == e).any(-1)]
            if not len(held):
                continue
            counts.append(len(routed))
            kind = "few" if len(routed) < FEW else "enough"
            reference = expert_forward(w, held)

            def quantized(x_stat: torch.Tensor | None, w: dict[str, torch.Tensor] = w) -> dict[str, torch.Tensor]:
                if x_stat is None or not len(x_stat):
                    return {k: rtn_quantize(v, spec).dequantize(torch.float32) for k, v in w.items()}
                out = {}
                h_in = x_stat.T @ x_stat
                for k in ("gate", "up"):
                    out[k] = gptq_quantize(w[k].clone(), h_in.clone(), spec, GPTQOptions())[0].dequantize(torch.float32)
                mid = torch.nn.functional.silu(x_stat @ out["gate"].T) * (x_stat @ out["up"].T)
                out["down"] = gptq_quantize(w["down"].clone(), mid.T @ mid, spec, GPTQOptions())[0].dequantize(
                    torch.float32)
                return out

            every = cal_x[layer]
            results = {"rtn": quantized(None), "routed": quantized(routed), "all": quantized(every)}
            results["default"] = results["routed"] if len(routed) >= MIN_EXPERT_TOKENS else results["all"]
            results["all-under-32"] = results["routed"] if len(routed) >= FEW else results["all"]
            for rule, q in results.items():
                err = float(((expert_forward(q, held) - reference) ** 2).sum() / (reference ** 2).sum())
                errors[rule][kind].append(err)
    few = sum(c < FEW for c in counts)
    print(f"SmolLM2-135M layers {args.layers}, {args.experts} experts (top {args.top_k}) per layer, "
          f"{cal_ids.numel()} calibration tokens (C4), {eval_ids.numel()} evaluation tokens (WikiText-2)")
    print(f"routed calibration tokens per expert: min {min(counts)}, median {sorted(counts)[len(counts) // 2]}, "
          f"max {max(counts)}; {few} of {len(counts)} experts under {FEW}, {counts.count(0)} with none; "
          f"the package's threshold (MIN_EXPERT_TOKENS): {MIN_EXPERT_TOKENS}")
    print()
    print("| rule | output error, experts under 32 tokens | ratio to default | output error, the others | "
          "ratio to default |")
    print("|---|---|---|---|---|")
    for rule in ("rtn", "routed", "all", "all-under-32", "default"):
        cells = []
        for kind in ("few", "enough"):
            values, base = errors[rule][kind], errors["default"][kind]
            mean = sum(values) / max(len(values), 1)
            ratio = mean / max(sum(base) / max(len(base), 1), 1e-30)
            cells += [f"{mean:.5f}", f"{ratio:.3f}"]
        print(f"| {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
