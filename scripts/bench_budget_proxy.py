#!/usr/bin/env python3
"""Does the size budget's cost proxy predict GPTQ's own error? (issue 19, protocol Q model)

`--target-bpw` ranks each module's candidate settings by E(s) = tr(D H D^T), D = W - Q, with Q
rounded to nearest on the min-max grid (run/budget.py), and GPTQ then quantizes with its own
rounding and the diag(H)-weighted MSE clip. This script measures, for the Linears of the first
blocks of SmolLM2-135M-Instruct (block 0's inputs are the same in the float and the quantized
model, so its H is the one GPTQ sees; later blocks use the float model's inputs), three errors
per module and setting, all tr(D H D^T) / ||W X||^2 on the same calibration tokens:

- minmax: the current proxy (round to nearest, min-max range);
- mse: round to nearest with GPTQ's clip search (diag(H)-weighted), the same scale and zero GPTQ
  would choose before its error feedback;
- chol: a solve-free estimate of GPTQ's error, sum_j ||D[:, j]||^2 / U_jj^2 with D the min-max
  rounding error and U the upper Cholesky factor of the damped H^-1: GPTQ pays (w_j - q_j)^2 / U_jj^2
  for column j after the earlier columns' feedback, where the proxy pays ||D[:, j]||^2 H_jj plus
  the cross terms; rounding errors of the updated weights are about as large as the originals';
- gptq: GPTQ's result (default options: clip mse, damp, block size).

It prints them per module, then per setting the geometric mean of proxy / gptq over modules and
the spread of that ratio (a proxy that is off by one factor everywhere ranks settings right; one
whose ratio moves with the setting misleads the knapsack), and the rank correlation of each proxy
with gptq over all (module, setting) pairs.

    python scripts/bench_budget_proxy.py --blocks 2 --nsamples 16
    python scripts/bench_budget_proxy.py --blocks 2 --settings w3g128 w4g128 w4g32
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SETTINGS = [(b, g) for b in (2, 3, 4) for g in (32, 64, 128, -1)]


class _Stop(Exception):
    """Raised after the last block of interest: the rest of the forward pass is not needed."""


def label(bits: int, group: int) -> str:
    return f"w{bits}{'g' + str(group) if group != -1 else '-ch'}"


def rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    for r, i in enumerate(order):
        out[i] = float(r)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = rank(a), rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--calib", type=Path, default=SHARED / "c4" / "c4_validation_2k.parquet")
    parser.add_argument("--blocks", type=int, default=2, help="the first N decoder blocks")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="*", default=None, help="e.g. w3g128 w4-ch (default: all 12)")
    args = parser.parse_args()
    settings = [s for s in SETTINGS if args.settings is None or label(*s) in args.settings]
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize
    from quantize_llm.algorithms.solve import energy
    from quantize_llm.calibration.data import CalibrationSpec, load_calibration
    from quantize_llm.core.primitives import row_params
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.eval.evaluate import load_for_eval
    from quantize_llm.run.budget import _rtn

    if args.model is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_quality import default_model
        model_dir = default_model()
    else:
        model_dir = args.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = load_calibration(CalibrationSpec(source=str(args.calib), nsamples=args.nsamples, seqlen=args.seqlen),
                              tokenizer).tokens
    model, _ = load_for_eval(str(model_dir))
    layers = model.model.layers[:args.blocks]
    linears = {f"{i}.{n}": m for i, layer in enumerate(layers) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    hessians: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            hessians[name] = hessians.get(name, torch.zeros(x.shape[1], x.shape[1])) + x.t() @ x
        return fn

    def stop(module, inputs, output):
        raise _Stop

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    handles.append(layers[-1].register_forward_hook(stop))
    with torch.no_grad():
        for batch in tokens.split(4):
            try:
                model(batch, use_cache=False)
            except _Stop:
                pass
    for h in handles:
        h.remove()

    def mse_rtn(w: torch.Tensor, spec: QuantSpec, hdiag: torch.Tensor) -> torch.Tensor:
        gs = spec.effective_group_size(w.shape[1])
        q = torch.empty_like(w)
        for c in range(0, w.shape[1], gs):
            cols = w[:, c:c + gs]
            scale, zero = row_params(cols, spec.bits, spec.sym, spec.min_zero, "mse", hdiag[c:c + gs])
            s, z = scale.float()[:, None], zero.float()[:, None]
            q[:, c:c + gs] = s * (torch.round(cols / s) + z).clamp_(0, spec.maxq).sub_(z)
        return q

    def chol_weights(h: torch.Tensor) -> torch.Tensor:
        """1 / U_jj^2 for the upper Cholesky factor U of (H + damp)^-1, GPTQ's damping."""
        damped = h + GPTQOptions().damp * torch.diag(h).mean() * torch.eye(h.shape[0])
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        return 1.0 / torch.diag(u) ** 2

    rows = []   # (module, setting, minmax, mse, gptq, chol)
    start = time.perf_counter()
    print(f"{'module':28s} {'setting':8s} {'minmax':>10s} {'mse':>10s} {'chol':>10s} {'gptq':>10s} "
          f"{'minmax/gptq':>12s} {'mse/gptq':>9s} {'chol/gptq':>10s}")
    for name, lin in linears.items():
        w = lin.weight.detach().float()
        h = hessians[name]
        whole = energy(w, h)
        cw = chol_weights(h)
        for bits, group in settings:
            spec = QuantSpec(method="gptq", bits=bits, group_size=group, sym=False, min_zero=1)
            d = w - _rtn(w, spec)
            e_minmax = energy(d, h) / whole
            e_chol = float(((d ** 2).sum(0) * cw).sum()) / whole
            e_mse = energy(w - mse_rtn(w, spec, torch.diag(h)), h) / whole
            qw, _ = gptq_quantize(w.clone(), h.clone(), spec, GPTQOptions())
            e_gptq = energy(w - qw.dequantize(torch.float32), h) / whole
            rows.append((name, (bits, group), e_minmax, e_mse, e_gptq, e_chol))
            print(f"{name:28s} {label(bits, group):8s} {e_minmax:10.3e} {e_mse:10.3e} {e_chol:10.3e} {e_gptq:10.3e} "
                  f"{e_minmax / e_gptq:12.2f} {e_mse / e_gptq:9.2f} {e_chol / e_gptq:10.2f}", flush=True)
    print(f"\n{len(linears)} modules x {len(settings)} settings in {time.perf_counter() - start:.0f} s "
          f"({args.nsamples} x {args.seqlen} calibration tokens, first {args.blocks} blocks)")
    print("\nper setting: geometric mean over modules of proxy / gptq [min, max]")
    print("| setting | minmax / gptq | mse / gptq | chol / gptq |")
    print("|---|---|---|---|")
    for s in settings:
        sel = [r for r in rows if r[1] == s]
        cells = []
        for k in (2, 3, 5):
            ratios = [r[k] / r[4] for r in sel]
            gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            cells.append(f"{gm:.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")
        print(f"| {label(*s)} | {' | '.join(cells)} |")
    logs = {k: [math.log(r[k]) for r in rows] for k in (2, 3, 4, 5)}
    print(f"\nrank correlation with gptq over all (module, setting) pairs: minmax {spearman(logs[2], logs[4]):.3f}, "
          f"mse {spearman(logs[3], logs[4]):.3f}, chol {spearman(logs[5], logs[4]):.3f}")
    # what the knapsack trades: within a module, which settings cost more error than which
    within = []
    for n, k in (("minmax", 2), ("mse", 3), ("chol", 5)):
        per = [spearman([r[k] for r in rows if r[0] == m], [r[4] for r in rows if r[0] == m]) for m in linears]
        within.append(f"{n} {sum(per) / len(per):.3f}")
    print("within a module, rank correlation of the settings' errors with gptq's (mean over modules): "
          + ", ".join(within))

if __name__ == "__main__":
    main()
