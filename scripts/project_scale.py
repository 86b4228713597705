#!/usr/bin/env python
"""What a GPTQ run of Llama-3-70B or Llama-3-405B needs, projected from the plan's formulas.

The plan (quantize_llm/run/resources.py) predicts a run's memory per phase and, since it counts
them, the floating-point operations of its matrix products per phase. This script builds
header-only checkpoints of the two models' shapes (safetensors files whose data region is a
sparse hole: the real reader and planner run on them, no weights exist) and prints, for one H200,
eight 80 GB GPUs and one 24 GB GPU:

  * the plan's device and host memory peaks and the disk for the output and the resume state;
  * the compute per block by phase and the time it takes at a sustained rate of --tflops
    (an assumption, not a measurement: no GPU was measured for it). On several GPUs the forward
    passes are spread over them; the Hessian sums, factorizations and solves run on the first.

--measured EVENTS (a finished run's --log-json file) checks the compute model where a run was
measured: each phase's operations (the plan's formula for that run) over its measured seconds,
next to a float32 matrix product timed on this machine in the same run (the baseline), so the
ratio says how much of the phase's time the formula explains.

Usage: python scripts/project_scale.py [--tflops 50] [--nsamples 128] [--seqlen 2048]
                                       [--measured EVENTS ...]
"""
from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import Shape, config_dict  # noqa: E402

MODELS = {   # public Llama-3 configs: width, MLP width, heads, key-value heads, vocabulary, blocks
    "Llama-3-70B": (Shape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256), 80),
    "Llama-3-405B": (Shape(hidden=16384, intermediate=53248, heads=128, kv_heads=8, vocab=128256), 126),
}
GPUS = {   # name: (device memory in bytes, devices)
    "one H200 (141 GB)": (141e9, 1),
    "8 x H100 (80 GB)": (80e9, 8),
    "one 24 GB GPU": (24e9, 1),
}


def sparse_checkpoint(folder: Path, shape: Shape, layers: int) -> Path:
    """A bf16 checkpoint of `shape` whose files hold real safetensors headers and no data (one
    shard per block, the data region a hole): enough for the reader and the planner."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict(shape, layers)))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", (shape.vocab, shape.hidden))]]
    groups += [shape.block_tensors(i) for i in range(layers)]
    groups.append([("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))])
    weight_map, total = {}, 0
    for k, tensors in enumerate(groups, start=1):
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for tensor, dims in tensors:
            size = 2
            for d in dims:
                size *= d
            header[tensor] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)   # a hole: no disk used
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def plan_for(folder: Path, method: str, nsamples: int, seqlen: int, device_type: str, room: float | None,
             devices: int, batch_size: int = 8):
    """(the plan's ResourcePlan, its block plans) of `method` w4 g128 on the checkpoint in `folder`."""
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.models.architectures import get_architecture
    from quantize_llm.models.load import CheckpointReader, build_skeleton
    from quantize_llm.models.structure import discover
    from quantize_llm.run.plan import estimate_output_bytes, plan_blocks
    from quantize_llm.run.resources import estimate

    spec = QuantSpec(bits=4, group_size=128, method=method)
    with CheckpointReader(folder) as reader:
        skeleton = build_skeleton(folder, reader.config)
        plans = plan_blocks(reader, discover(skeleton), get_architecture(reader.config), skeleton, spec)
        plan = estimate(reader, plans, reader.config, output_bytes=estimate_output_bytes(reader, plans, spec),
                        calibrated=method != "rtn", nsamples=nsamples, seqlen=seqlen, batch_size=batch_size,
                        device_type=device_type, resume=True, devices=devices, solver=method != "awq",
                        search=method == "awq", room=None if room is None else int(room))
    return plan, plans


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def project(args: argparse.Namespace, work: Path) -> None:
    rate = args.tflops * 1e12
    print(f"GPTQ w4 g128, calibration {args.nsamples} x {args.seqlen} tokens in batches of 8; "
          f"matrix products at an assumed {args.tflops:g} TFLOP/s sustained per GPU (1 GB = 1e9 bytes)\n")
    for model, (shape, layers) in MODELS.items():
        folder = sparse_checkpoint(work / model, shape, layers)
        print(f"## {model} ({layers} blocks)")
        print("| | " + " | ".join(GPUS) + " |")
        print("|---" * (len(GPUS) + 1) + "|")
        rows: dict[str, list[str]] = {k: [] for k in ("device peak", "host peak", "disk (output + resume)",
                                                       "time per block", "time in all")}
        compute = ""
        for room, devices in GPUS.values():
            plan, _ = plan_for(folder, "gptq", args.nsamples, args.seqlen, "cuda", room, devices)
            flops = plan.flops or {}
            spread = flops.get("forward", 0) / devices
            alone = sum(v for k, v in flops.items() if k != "forward")
            per_block = (spread + alone) / rate / layers
            fits = (plan.device_peak_bytes or 0) <= room
            rows["device peak"].append(f"{(plan.device_peak_bytes or 0) / 1e9:.0f} GB"
                                       + ("" if fits else ": does not fit")
                                       + (", activations on the host" if plan.activations == "host" else "")
                                       + (", block narrow" if plan.narrow else ""))
            rows["host peak"].append(f"{plan.host_peak_bytes / 1e9:.0f} GB")
            rows["disk (output + resume)"].append(f"{plan.output_bytes / 1e9:.0f} + {plan.resume_bytes / 1e9:.0f} GB")
            compute = ", ".join(f"{k} {v / layers / 1e15:.2f}" for k, v in flops.items() if v) + " PFLOP"
            each = {k: v / rate / layers for k, v in flops.items()}
            forward, hessians = each.get("forward", 0) / devices, each.get("hessians", 0)
            rows["time per block"].append(f"{per_block:.0f} s (forward {forward:.0f}, Hessians {hessians:.0f}, "
                                          f"the rest {per_block - forward - hessians:.0f})")
            rows["time in all"].append(hours(per_block * layers))
        for label, cells in rows.items():
            print(f"| {label} | " + " | ".join(cells) + " |")
        print(f"\ncompute per block: {compute} (reading the weights and writing the output not counted)\n")


def sgemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matrix product on this machine (the best of `repeats`)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def measured(args: argparse.Namespace) -> None:
    """Each phase's operations (the plan's formula for that run) over its measured seconds, next
    to a float32 matrix product timed here."""
    import torch

    base = sgemm_rate()
    print(f"float32 2048^3 matrix product on this machine ({torch.get_num_threads()} threads): "
          f"{base / 1e9:.0f} GFLOP/s (the baseline)")
    print("| run | phase | operations | measured seconds | GFLOP/s | / baseline |")
    print("|---|---|---|---|---|---|")
    for path in args.measured:
        events = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        start = next(e for e in events if e.get("event") == "start")
        lines = next(e for e in events if e.get("event") == "plan")["lines"]
        found = next(re.search(r"(\d+) x (\d+) tokens", line) for line in lines if line.startswith("calibration:"))
        nsamples, seqlen = int(found.group(1)), int(found.group(2))
        timings: dict[str, float] = {}
        for e in events:
            if e.get("event") == "block":
                for k, v in e["timings"].items():
                    timings[k] = timings.get(k, 0.0) + v
        plan, _ = plan_for(Path(start["model"]), start["spec"]["method"], nsamples, seqlen, "cpu", None, 1)
        flops = plan.flops or {}
        phases = {"forward": flops.get("forward", 0), "hessian": flops.get("hessians", 0),
                  "solve": flops.get("factorizations", 0) + flops.get("solves", 0), "search": flops.get("search", 0)}
        for phase, ops in phases.items():
            seconds = timings.get(phase, 0.0)
            if ops and seconds:
                rate = ops / seconds
                print(f"| {Path(start['model']).name} {start['spec']['method']} | {phase} | {ops / 1e12:.1f} TFLOP | "
                      f"{seconds:.0f} | {rate / 1e9:.0f} | {rate / base:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Project a GPTQ run of Llama-3-70B / 405B from the plan's formulas.")
    parser.add_argument("--tflops", type=float, default=50.0,
                        help="sustained float32 matrix-product rate per GPU, TFLOP/s (default %(default)s: about "
                             "three quarters of an H100's or H200's 67 TFLOP/s float32 peak)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--measured", nargs="*", default=[], help="finished runs' --log-json files to check against")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="quantize-llm-projection-") as tmp:
        project(args, Path(tmp))
    if args.measured:
        measured(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
