#!/usr/bin/env python3
"""How RTN's float16 scale and its zero point are chosen, measured: perplexity of SmolLM2-135M
(BENCHMARKS.md protocol Q: WikiText-2, 40 x 512 tokens) with every decoder Linear rounded to
nearest, asymmetric, group 128, under each rule, all in one run.

    python scripts/bench_scale_rounding.py --bits 3            # every rule
    python scripts/bench_scale_rounding.py --bits 4 --rules shipped up

Rules (min-max range with 0 inside it; s = (max - min) / maxq computed in float64):
  shipped      what quantize-llm writes: zero = round(-min / s) clamped to >= 1 (the gptq format's
               v1 zero; the scale recomputed when the clamp raises it), then s rounded to the
               nearest float16
  shipped0     the same with zeros down to 0 (the AWQ and compressed-tensors layouts)
  float32      s kept in float32, zero = round(-min / s), no clamp (the reference of BENCHMARKS.md)
  consistent   s rounded to the nearest float16 first, the zero chosen for that stored scale
  up           s rounded up to the next float16 (the range stays representable), the zero for it
  up0          `up` with zeros down to 0
The weights are rounded with the stored scale and zero (code = clamp(round(w / s) + zero)).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
RULES = ("shipped", "shipped0", "float32", "consistent", "up", "up0")


def up16(s: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= s (float64 in, float64 out)."""
    h = s.to(torch.float16)
    return torch.where(h.double() < s, torch.nextafter(h, torch.full_like(h, 65504.0)), h).double()


def params(rows: torch.Tensor, maxq: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    xmin = rows.amin(1).clamp(max=0).double()
    xmax = rows.amax(1).clamp(min=0).double()
    s = (xmax - xmin) / maxq
    s = torch.where(s == 0, torch.ones_like(s), s)
    min_zero = 0 if rule.endswith("0") else 1
    if rule == "float32":
        return s.float().double(), torch.round(-xmin / s)
    if rule.startswith("shipped"):
        z = torch.round(-xmin / s)
        raised = z < min_zero
        z = z.clamp(min_zero, maxq)
        return torch.where(raised, xmax / (maxq - z), s).to(torch.float16).double(), z
    store = up16 if rule.startswith("up") else (lambda v: v.to(torch.float16).double())
    s16 = store(s)
    z = torch.round(-xmin / s16)
    raised = z < min_zero
    z = z.clamp(min_zero, maxq)
    return torch.where(raised, store(xmax / (maxq - z)), s16), z


def fake_quantize(w: torch.Tensor, bits: int, group: int, rule: str) -> torch.Tensor:
    maxq = 2 ** bits - 1
    rows = w.double().reshape(-1, group)
    s, z = params(rows, maxq, rule)
    q = torch.clamp(torch.round(rows / s[:, None]) + z[:, None], 0, maxq)
    return ((q - z[:, None]) * s[:, None]).reshape(w.shape).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=RULES)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--eval", type=Path,
                        default=ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    if not args.eval.is_file():
        sys.exit(f"error: {args.eval} not found (pass --eval)")

    from bench_quality import default_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize_llm.eval.evaluate import evaluate, make_windows, tokenize_text

    model_dir = args.model or default_model()
    windows = make_windows(tokenize_text(args.eval, AutoTokenizer.from_pretrained(model_dir)), 512, args.windows)
    results = {}
    for rule in args.rules:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        t = time.perf_counter()
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in name:
                    module.weight.copy_(fake_quantize(module.weight, args.bits, args.group_size, rule))
        results[rule] = evaluate(model, windows).perplexity
        print(f"w{args.bits} g{args.group_size} {rule:<11} ppl {results[rule]:.3f}  ({time.perf_counter() - t:.0f} s)",
              flush=True)
    first = args.rules[0]
    print(f"\n| rule | perplexity | / {first} |\n|---|---|---|")
    for rule, ppl in results.items():
        print(f"| {rule} | {ppl:.2f} | {ppl / results[first]:.4f} |")


if __name__ == "__main__":
    main()
