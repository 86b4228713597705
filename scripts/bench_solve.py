#!/usr/bin/env python3
"""GPTQ's solve on one Linear of a real layer shape, timed against its baseline in the same run.

    python scripts/bench_solve.py                        # Llama-3-8B gate_proj: 14336 x 4096
    python scripts/bench_solve.py --shape 4096x14336     # down_proj
    python scripts/bench_solve.py --group-size -1 --repeat 2

The baseline is the clip search as it was before its trial slices were cut to 1 MiB and formed in
place (one 64 MiB (trials, rows, columns) temporary per elementwise step); the same Hessian and
weight go through `gptq_quantize` with each, the codes, scales and zeros must be identical, and
the script prints both times and their ratio (best of --repeat). Random weights (N(0, 0.02)) and
a Hessian X^T X of --tokens Gaussian inputs; 4-bit symmetric, group 128 unless told.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize  # noqa: E402
from quantize_llm.core import primitives  # noqa: E402
from quantize_llm.core.spec import QuantSpec  # noqa: E402


def baseline_clip_search(w: Tensor, bits: int, sym: bool, min_zero: int, score: Callable[[Tensor], Tensor],
                         grid: int, max_shrink: float) -> tuple[Tensor, Tensor, Tensor]:
    """The earlier formulation: the same trials and arithmetic, 64 MiB slices, a new tensor per step."""
    w = w.float()
    rows = w.shape[0]
    p = 1 - torch.arange(0, int(max_shrink * grid) + 1, device=w.device, dtype=torch.float64) / grid
    xmin = w.amin(dim=1).clamp(max=0).double()
    xmax = w.amax(dim=1).clamp(min=0).double()
    trials = torch.stack([(xmin[None] * p[:, None]).reshape(-1), (xmax[None] * p[:, None]).reshape(-1)], dim=1)
    s, z = primitives.minmax_params(trials, bits, sym, min_zero)
    s, z = s.view(len(p), rows), z.view(len(p), rows)
    sf, zf = s.float()[..., None], z.float()[..., None]
    step = max(1, (1 << 24) // max(1, len(p) * w.shape[1]))
    best = torch.empty(1, rows, dtype=torch.int64, device=w.device)
    for r in range(0, rows, step):
        sr, zr, wr = sf[:, r:r + step], zf[:, r:r + step], w[None, r:r + step]
        q = torch.clamp(torch.round(wr / sr) + zr, 0, 2 ** bits - 1)
        err = score((sr * (q - zr) - wr).clone())   # a fresh tensor, as the old score's d ** 2 made
        best[:, r:r + step] = err.argmin(dim=0, keepdim=True)
    return s.gather(0, best)[0], z.gather(0, best)[0], p.float()[best[0]]


def timed(w: Tensor, h: Tensor, spec: QuantSpec, repeat: int) -> tuple[float, Tensor, Tensor, Tensor]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        qw, _ = gptq_quantize(w, h, spec, GPTQOptions())
        best = min(best, time.perf_counter() - start)
    return best, qw.codes, qw.grid_scale, qw.grid_zero


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="14336x4096", help="OUTxIN of the Linear (default 14336x4096)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, help="inputs behind the Hessian (default 1024)")
    ap.add_argument("--repeat", type=int, default=1, help="timings per variant, the best is kept")
    args = ap.parse_args()
    try:
        out_features, in_features = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape {args.shape!r} is not OUTxIN, e.g. 14336x4096")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    x = torch.randn(args.tokens, in_features, generator=g)
    h = x.t() @ x
    del x
    spec = QuantSpec(bits=args.bits, group_size=args.group_size)
    print(f"gptq_quantize on {out_features} x {in_features}, {args.bits}-bit group {args.group_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    shipped = timed(w, h, spec, args.repeat)
    kept = primitives.clip_search
    primitives.clip_search = baseline_clip_search
    try:
        base = timed(w, h, spec, args.repeat)
    finally:
        primitives.clip_search = kept
    same = all(torch.equal(a, b) for a, b in zip(shipped[1:], base[1:], strict=True))
    print(f"baseline (64 MiB clip slices): {base[0]:8.1f} s")
    print(f"shipped  (1 MiB, in place)   : {shipped[0]:8.1f} s   {base[0] / shipped[0]:.2f}x faster")
    print(f"codes, scales and zeros identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
