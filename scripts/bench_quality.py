#!/usr/bin/env python3
"""Quality and speed of each method on a real model, BENCHMARKS.md protocol Q.

For every setting: perplexity on WikiText-2 (40 x 512 tokens by default), its ratio to the
unquantized model, the real bits per weight stored, the quantization wall time, and that time
divided by one plain forward pass of the calibration set through the unquantized model measured
in the same run (the unavoidable cost). Calibration: the first 64 C4 documents of at least 512
tokens, first 512 tokens each (--nsamples 64 --seqlen 512 over the parquet, in file order).

    python scripts/bench_quality.py                      # every setting
    python scripts/bench_quality.py --only rtn-w4g128 gptq-w4g128
    python scripts/bench_quality.py --budget             # issue 19: uniform curve against --target-bpw
    python scripts/bench_quality.py --budget --only gptq-w4g128 budget-4.25

--budget runs its own list (BUDGET_SETTINGS): uniform GPTQ settings (w3/w4 at groups 32/64/128,
with and without act-order) and `gptq --target-bpw B` (`budget-B`). Bits per weight there are
exact: every tensor the checkpoint stores for the block Linears (packed codes, float16 scales,
packed zeros and the int32 g_idx, which the gptq layout always writes), divided by the number of
their weights; embeddings, norms and the (tied) head are not counted. Each allocated row is
printed beside the best uniform row of no more bits from the same run, and its time beside the
plain gptq-w4g128 run of the same run. The per-module measurement of the first budgeted row is
reused (copied beside each later output) by the others of the same proxy, so only the first
pays for it; pass --measurement FILE to start from a measurement saved by an earlier run (--json
X saves it as X.budget.pt, or X.gptq-proxy.budget.pt for `-gptq-proxy` rows, which --measurement
does not seed). With --only, settings run in the order given.

The model defaults to SmolLM2-135M-Instruct built by scripts/build_smollm2.py; the data default to
../shared/data beside the repository (pass --calib/--eval elsewhere).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Setting:
    name: str
    method: str
    bits: int
    group_size: int
    sym: bool = False
    act_order: bool = False
    calibration: str = "c4"           # c4 | self
    options: dict = field(default_factory=dict)
    codebook: str = "int"             # int | nf4 | fp4 (nf4/fp4: the bitsandbytes format)
    blocksize: int = 64               # nf4/fp4: weights per absmax
    rounding: str = "nearest"         # nf4/fp4: nearest | gptq
    target_bpw: float | None = None   # --target-bpw: bits/group/sym chosen per module within this budget
    budget_proxy: str = "rtn"         # Budget.proxy: each module's error rounded to nearest, or GPTQ's estimated


SETTINGS = [
    Setting("rtn-w4g128", "rtn", 4, 128),
    Setting("rtn-w3g128", "rtn", 3, 128),
    Setting("rtn-w4-channel", "rtn", 4, -1),
    Setting("gptq-w4g128", "gptq", 4, 128),
    Setting("gptq-w3g128", "gptq", 3, 128),
    Setting("gptq-w4-channel", "gptq", 4, -1),
    Setting("gptq-w4g128-actorder", "gptq", 4, 128, act_order=True),
    Setting("gptq-w4g128-self", "gptq", 4, 128, calibration="self"),
    # The group range by min-max, as the GPTQ authors' code does by default: what --clip mse buys.
    Setting("gptq-w4g128-minmax", "gptq", 4, 128, options={"clip": "minmax"}),
    # --clip feedback (each group's range chosen with GPTQ's feedback inside the group), and the
    # act-order variants the default is chosen among (static groups: act-order, trivial g_idx)
    Setting("gptq-w4g128-feedback", "gptq", 4, 128, options={"clip": "feedback"}),
    Setting("gptq-w3g128-feedback", "gptq", 3, 128, options={"clip": "feedback"}),
    Setting("gptq-w3g128-actorder", "gptq", 3, 128, act_order=True),
    Setting("gptq-w4g128-static", "gptq", 4, 128, options={"static_groups": True}),
    Setting("gptq-w3g128-static", "gptq", 3, 128, options={"static_groups": True}),
    Setting("gptq-w4g128-actorder-feedback", "gptq", 4, 128, act_order=True, options={"clip": "feedback"}),
    Setting("gptq-w3g128-actorder-feedback", "gptq", 3, 128, act_order=True, options={"clip": "feedback"}),
    # --qep: fitted to the float model's outputs (1: GPTAQ's objective; 0.5: a tempered QEP correction)
    *[Setting(f"gptq-w{bits}g128-qep{'' if alpha == 1 else alpha}", "gptq", bits, 128, options={"qep": alpha})
      for alpha in (1.0, 0.5) for bits in (4, 3)],
    # NF4 (bitsandbytes layout, double-quantized absmax per 64 weights) with bitsandbytes' own
    # nearest rounding, then with GPTQ rounding on the same absmax, beside GPTQ int4 at group 64:
    # the bits/weight column counts every stored byte (absmax and nested statistics included).
    Setting("nf4-b64", "nf4", 4, -1, codebook="nf4"),
    Setting("nf4-b64-gptq", "nf4", 4, -1, codebook="nf4", rounding="gptq"),
    Setting("gptq-w4g64", "gptq", 4, 64),
    Setting("rtn-w8g128", "rtn", 8, 128),
    Setting("awq-w4g128", "awq", 4, 128),
    Setting("awq-w3g128", "awq", 3, 128),
    Setting("awq-gptq-w4g128", "awq", 4, 128, options={"then": "gptq"}),
    Setting("awq-gptq-w3g128", "awq", 3, 128, options={"then": "gptq"}),
    Setting("awq-duo-w3g128", "awq", 3, 128, options={"duo_scaling": True}),
    # the outlier split: RTN inner scores by magnitude (no calibration), GPTQ inner by w^2 / [H^-1]_jj
    *[Setting(f"outlier-{inner}-w{bits}g128-{pct}%", "outlier", bits, 128,
              options={"inner": inner, "fraction": pct / 100, **({"clip": "mse"} if inner == "gptq" else {})})
      for inner in ("rtn", "gptq") for bits in (4, 3) for pct in (0.25, 0.5, 1)],
    Setting("outlier-rtn-calibrated-w3g128-0.5%", "outlier", 3, 128,
            options={"inner": "rtn", "fraction": 0.005, "calibrated": True}),
]


# --budget (issue 19): the uniform curve, then the allocated one (2.5 last: with a generated sample)
BUDGET_SETTINGS = [
    *[Setting(f"gptq-w{bits}g{group}{'-actorder' if act else ''}", "gptq", bits, group, act_order=act)
      for act in (False, True) for bits, group in ((4, 128), (4, 64), (3, 128), (3, 64), (4, 32), (3, 32))],
    *[Setting(f"budget-{b:g}", "gptq", 4, 128, target_bpw=b) for b in (4.25, 3.25, 3.5, 4.0, 4.5, 2.5)],
    # the allocation solved with --qep (the measurement is the same: it does not depend on the options)
    *[Setting(f"budget-{b:g}-qep", "gptq", 4, 128, target_bpw=b, options={"qep": 1.0}) for b in (4.25, 3.25)],
    # the same budgets, each module's cost GPTQ's estimated error (run/budget.gptq_error_estimate)
    *[Setting(f"budget-{b:g}-gptq-proxy", "gptq", 4, 128, target_bpw=b, budget_proxy="gptq")
      for b in (4.25, 3.25, 3.5, 4.0, 4.5, 2.5)],
]
SAMPLE_PROMPT = "Write two sentences about the sea."
SAMPLE_BELOW = 3.0                    # allocated rows below this many bits per weight show a sample


def default_model() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_smollm2.py")], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return Path(out)


def forward_seconds(model_dir: Path, tokens: torch.Tensor, batch_size: int) -> float:
    """One plain forward pass of the calibration set through the unquantized model (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tokens.split(batch_size):
            model(batch, use_cache=False)
    return time.perf_counter() - start


def protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Protocol Q's inputs: the model, the calibration and evaluation text, how much of each."""
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--calib", type=Path, default=SHARED / "c4" / "c4_validation_2k.parquet")
    parser.add_argument("--eval", type=Path, default=SHARED / "wikitext-2-raw" / "wiki.test.raw")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON (after every row)")
    parser.add_argument("--tables", type=Path, default=None,
                        help="--budget: print the tables of the rows a run wrote with --json, and stop")
    parser.add_argument("--budget", action="store_true", help="the size-budget benchmark (BUDGET_SETTINGS)")
    parser.add_argument("--measurement", type=Path, default=None,
                        help="--budget: a per-module measurement saved by an earlier run (its --json X.budget.pt)")
    parser.add_argument("--gguf", action="store_true",
                        help="the GGUF benchmark against llama.cpp (scripts/bench_gguf.py; its options follow)")
    if "--gguf" in sys.argv[1:]:   # every other argument is bench_gguf.py's
        argv = [a for a in sys.argv[1:] if a != "--gguf"]
        sys.exit(subprocess.call([sys.executable, str(ROOT / "scripts" / "bench_gguf.py"), *argv]))
    args = parser.parse_args()
    if args.tables is not None:
        print_budget_tables(json.loads(args.tables.read_text()))
        return

    from transformers import AutoTokenizer

    from quantize_llm.algorithms.awq import AWQOptions
    from quantize_llm.algorithms.gptq import GPTQOptions
    from quantize_llm.algorithms.nf4 import NF4Options
    from quantize_llm.algorithms.outlier import OutlierOptions
    from quantize_llm.calibration.data import CalibrationSpec, load_calibration
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.eval.evaluate import evaluate, load_for_eval, make_windows, tokenize_text
    from quantize_llm.eval.generate import generate
    from quantize_llm.run.budget import Budget, cache_path
    from quantize_llm.run.execute import quantize

    for path in (args.calib, args.eval):
        if not path.is_file():
            sys.exit(f"error: {path} not found (pass --calib / --eval)")
    model_dir = args.model or default_model()
    pool = BUDGET_SETTINGS if args.budget else SETTINGS
    if args.only is None:
        settings = pool
    else:
        named = {s.name: s for s in pool}
        unknown = [n for n in args.only if n not in named]
        if unknown:
            sys.exit(f"error: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(named)}")
        settings = [named[n] for n in args.only]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = make_windows(tokenize_text(args.eval, tokenizer), 512, args.windows)
    c4 = CalibrationSpec(source=str(args.calib), nsamples=args.nsamples, seqlen=args.seqlen)
    cal_tokens = load_calibration(c4, tokenizer).tokens
    fwd = forward_seconds(model_dir, cal_tokens, args.batch_size)
    base_model, _ = load_for_eval(str(model_dir))
    base = evaluate(base_model, windows)
    del base_model
    rows = [{"setting": "unquantized", "ppl": base.perplexity, "ratio": 1.0, "bpw": 16.0, "seconds": 0.0,
             "fwd_ratio": 0.0}]
    print(f"plain forward pass of the calibration set ({args.nsamples} x {args.seqlen}): {fwd:.1f} s")
    print(f"unquantized perplexity: {base.perplexity:.3f}", flush=True)
    measurements: dict[str, Path] = {}       # Budget.proxy -> its measurement, once made
    if args.measurement is not None:
        if not args.measurement.is_file():
            sys.exit(f"error: {args.measurement} not found")
        measurements["rtn"] = args.measurement
    if args.budget and any(s.target_bpw is not None and s.target_bpw < SAMPLE_BELOW for s in settings):
        rows[0]["sample"] = generate(str(model_dir), SAMPLE_PROMPT, max_new_tokens=40, chat=True, device="cpu").text
        print(f"unquantized sample: {rows[0]['sample']!r}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for s in settings:
            out = Path(tmp) / s.name
            if s.codebook != "int":
                spec = QuantSpec(method=s.method, format="bnb", codebook=s.codebook, blocksize=s.blocksize)
                options = NF4Options(rounding=s.rounding, **s.options)
            else:
                spec = QuantSpec(method=s.method, bits=s.bits, group_size=s.group_size, sym=s.sym,
                                 act_order=s.act_order, format="outlier" if s.method == "outlier" else "gptq")
                kinds = {"gptq": GPTQOptions, "awq": AWQOptions, "outlier": OutlierOptions}
                options = kinds[s.method](**s.options) if s.method in kinds else None
            cal = (CalibrationSpec(source="self", nsamples=args.nsamples, seqlen=args.seqlen)
                   if s.calibration == "self" else c4)
            if s.method == "outlier" and not options.needs_calibration:
                cal = None
            budget = Budget(bpw=s.target_bpw, proxy=s.budget_proxy) if s.target_bpw is not None else None
            known = measurements.get(s.budget_proxy)
            measured = budget is not None and known is None
            if budget is not None and known is not None:     # the per-module costs, measured once
                shutil.copyfile(known, cache_path(out))
            t = time.perf_counter()
            # the algorithm's own cost: no resume state, no read-back verification
            summary = quantize(str(model_dir), out, spec, options=options, calibration=cal, device="cpu",
                               batch_size=args.batch_size, resume=False, verify=False, budget=budget)
            seconds = time.perf_counter() - t
            if measured:
                suffix = "" if s.budget_proxy == "rtn" else f".{s.budget_proxy}-proxy"
                measurements[s.budget_proxy] = Path(tmp) / f"measurement{suffix}.budget.pt"
                shutil.copyfile(cache_path(out), measurements[s.budget_proxy])
                if args.json:
                    shutil.copyfile(cache_path(out), args.json.with_suffix(f"{suffix}.budget.pt"))
            model, _ = load_for_eval(str(out))
            result = evaluate(model, windows)
            del model
            row = {"setting": s.name, "ppl": result.perplexity, "ratio": result.perplexity / base.perplexity,
                   "bpw": summary.bits_per_weight, "seconds": seconds, "fwd_ratio": seconds / fwd,
                   "timings": summary.timings, "target_bpw": s.target_bpw, "measured": measured,
                   "allocation": summary.allocation,
                   "layers": {r.name: r.metrics.get("rel_error") for r in summary.layers}}
            if s.target_bpw is not None and s.target_bpw < SAMPLE_BELOW:
                row["sample"] = generate(str(out), SAMPLE_PROMPT, max_new_tokens=40, chat=True, device="cpu").text
            rows.append(row)
            if args.json:        # a run stopped early keeps the rows it finished
                args.json.write_text(json.dumps(rows, indent=2))
            for line in summary.allocation or []:
                print(f"    {line}")
            if "sample" in row:
                print(f"    sample: {row['sample']!r}")
            stages = ", ".join(f"{k} {v:.0f}s" for k, v in sorted(summary.timings.items(), key=lambda kv: -kv[1]))
            print(f"{s.name:24s} ppl {row['ppl']:8.3f}  x{row['ratio']:.3f}  {row['bpw']:.3f} bpw  "
                  f"{seconds:6.1f} s = {row['fwd_ratio']:.2f} forward passes  [{stages}]", flush=True)
    print()
    if args.budget:
        print_budget_tables(rows)
    else:
        print("| setting | perplexity | ratio to unquantized | bits/weight | time | time / forward pass |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['ppl']:.2f} | {r['ratio']:.3f} | {r['bpw']:.3f} | {r['seconds']:.0f} s | "
                  f"{r['fwd_ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def best_uniform(rows: list[dict], bpw: float) -> dict | None:
    """The uniform row of least perplexity among those storing at most `bpw` bits per weight."""
    fits = [r for r in rows if r.get("target_bpw") is None and r["setting"] != "unquantized" and r["bpw"] <= bpw]
    return min(fits, key=lambda r: r["ppl"]) if fits else None


def print_budget_tables(rows: list[dict]) -> None:
    """The uniform curve sorted by size, then each allocated row beside the best uniform row of no
    more bits and its quantization time beside the plain gptq-w4g128 run, all from this run."""
    base = rows[0]
    uniform = sorted((r for r in rows[1:] if r.get("target_bpw") is None), key=lambda r: r["bpw"])
    print("Uniform curve (exact bits per weight of the block Linears: codes + scales + zeros + g_idx)")
    print("| setting | bits/weight | perplexity | x unquantized | time / forward pass |")
    print("|---|---|---|---|---|")
    print(f"| unquantized | 16 | {base['ppl']:.2f} | 1.000 | - |")
    for r in uniform:
        print(f"| {r['setting']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {r['ratio']:.3f} | {r['fwd_ratio']:.2f} |")
    allocated = [r for r in rows[1:] if r.get("target_bpw") is not None]
    if not allocated:
        return
    plain = next((r for r in rows if r["setting"] == "gptq-w4g128"), None)
    print()
    print("Allocated curve (gptq --target-bpw B), beside the best uniform setting of no more bits in this run")
    print("| budget | bits/weight | perplexity | x unquantized | best uniform <= bits (ppl, bpw) | ppl / that | "
          "time | time / gptq-w4g128 | measurement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in allocated:
        u = best_uniform(rows, r["bpw"])
        than = f"{u['setting']} ({u['ppl']:.2f}, {u['bpw']:.3f}) | {r['ppl'] / u['ppl']:.3f}" if u else "none | -"
        time_ratio = f"{r['seconds'] / plain['seconds']:.2f}" if plain else "- (no gptq-w4g128 row)"
        print(f"| {r['target_bpw']:g} | {r['bpw']:.3f} | {r['ppl']:.2f} | {r['ratio']:.3f} | {than} | "
              f"{r['seconds']:.0f} s | {time_ratio} | {'measured in this row' if r['measured'] else 'reused'} |")
    samples = [r for r in rows if "sample" in r]
    if samples:
        print()
        print(f"Greedy samples (chat prompt {SAMPLE_PROMPT!r}, 40 new tokens)")
        for r in samples:
            print(f"- {r['setting']}: {r['sample']!r}")


if __name__ == "__main__":
    main()
