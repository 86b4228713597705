#!/usr/bin/env python
"""Peak memory of `quantize-llm rtn` on a synthetic multi-GB checkpoint (BENCHMARKS.md §S).

Quantizing must not need memory proportional to the model. This script builds a random-weight
Llama-architecture checkpoint of at least --min-gb (default 4.0 GB = 4.0e9 bytes on disk: hidden
2048, MLP 8192, 16 query / 8 key-value heads, vocab 32000, untied lm_head, bf16, ~1 GB shards;
30 decoder blocks of 126 MB each by default), then runs

    /usr/bin/time -v quantize-llm rtn CKPT -o OUT --bits 4 --group-size 128 --overwrite

and prints the checkpoint size, the peak resident set size, their ratio, the wall time and the
verdict against the target: peak RSS < 1.5 GB. Exit status 1 on FAIL (or any error).

The checkpoint is written tensor by tensor, one shard at a time, so the builder never holds more
than one shard; it goes to WORKDIR/ckpt-L<layers> and is reused by later runs (building it takes
about a minute). The quantized output WORKDIR/out is deleted after the measurement unless --keep;
--clean deletes the whole work folder afterwards, checkpoint included.

Usage: python scripts/bench_memory.py [--workdir DIR] [--layers N | --min-gb GB] [--keep | --clean]
Needs GNU time at /usr/bin/time (Debian/Ubuntu: apt-get install time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GNU_TIME = Path("/usr/bin/time")
TARGET_PEAK_BYTES = 1.5e9
SHARD_BYTES = 1_000_000_000
BYTES_PER_PARAM = 2  # bf16


class BenchError(Exception):
    """An expected failure: printed as one line, exit status 1."""


@dataclass(frozen=True)
class Shape:
    """The synthetic model's dimensions (a Llama-style 2B-class layout)."""
    hidden: int = 2048
    intermediate: int = 8192
    heads: int = 16
    kv_heads: int = 8
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of decoder block i, in HF Llama naming; Linear weights are (out, in)."""
        h, m, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        p = f"model.layers.{i}."
        return [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (m, h)),
                (p + "mlp.up_proj.weight", (m, h)),
                (p + "mlp.down_proj.weight", (h, m))]

    def tensors(self, layers: int) -> list[tuple[str, tuple[int, ...]]]:
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(layers):
            out += self.block_tensors(i)
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def block_bytes(self) -> int:
        return sum(math.prod(s) for _, s in self.block_tensors(0)) * BYTES_PER_PARAM

    def total_bytes(self, layers: int) -> int:
        return sum(math.prod(s) for _, s in self.tensors(layers)) * BYTES_PER_PARAM

    def layers_for(self, min_bytes: float) -> int:
        fixed = self.total_bytes(0)
        return max(1, math.ceil((min_bytes - fixed) / self.block_bytes()))


SHAPES = {   # real layer shapes (Llama-3: GQA with 8 key-value heads of 128, vocab 128256)
    "llama3-8b": Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "llama3-405b": Shape(hidden=16384, intermediate=53248, heads=128, kv_heads=8, vocab=128256),
}

# The calibrated suite: (label, quantize-llm arguments). A small calibration set on purpose (the
# memory it needs is in the plan; its quality is not what this measures).
METHODS = {
    "rtn": ["rtn", "--group-size", "128"],
    "gptq-g128": ["gptq", "--group-size", "128"],
    "gptq-g128-act": ["gptq", "--group-size", "128", "--act-order"],
    "gptq-channel": ["gptq", "--group-size", "-1"],
    "gptq-channel-act": ["gptq", "--group-size", "-1", "--act-order"],
    "awq": ["awq", "--group-size", "128"],
    "outlier": ["outlier", "--group-size", "128", "--inner", "gptq"],
}
CALIBRATED = {"gptq", "awq", "outlier"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def config_dict(shape: Shape, layers: int) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_hidden_layers=layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    d = config.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    # transformers >= 4.56 writes "dtype", older versions "torch_dtype"; set whichever it uses.
    keys = [k for k in ("dtype", "torch_dtype") if k in d] or ["dtype"]
    for key in keys:
        d[key] = "bfloat16"
    return d


def is_complete(folder: Path, shape: Shape, layers: int) -> bool:
    """True when folder holds the checkpoint this run would build (same sizes, all shards)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        index = json.loads((folder / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    if (config.get("num_hidden_layers") != layers or config.get("hidden_size") != shape.hidden
            or index.get("metadata", {}).get("total_size") != shape.total_bytes(layers)):
        return False
    return all((folder / f).is_file() for f in set(index["weight_map"].values()))


def build_checkpoint(folder: Path, shape: Shape, layers: int, seed: int = 0) -> None:
    """Write random bf16 weights as ~1 GB safetensors shards plus index and config into folder.

    Tensors are generated one at a time and each shard is saved and dropped before the next one is
    filled, so this process holds at most one shard. Written to a temporary sibling folder and
    renamed when complete.
    """
    import torch
    from safetensors.torch import save_file

    plan = shape.tensors(layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, dims in plan:
        size = math.prod(dims) * BYTES_PER_PARAM
        if shards[-1] and filled + size > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append((name, dims))
        filled += size
    n = len(shards)
    total = shape.total_bytes(layers)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        generator = torch.Generator().manual_seed(seed)
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards, start=1):
            filename = f"model-{k:05d}-of-{n:05d}.safetensors"
            tensors = {}
            for name, dims in shard:
                if len(dims) == 1:  # RMSNorm gains
                    tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
                else:  # std 0.02, the usual Llama init; drawn in slices of rows (no float32 copy)
                    t = tensors[name] = torch.empty(dims, dtype=torch.bfloat16)
                    step = max(1, (1 << 26) // dims[1])
                    for r in range(0, dims[0], step):
                        rows = min(step, dims[0] - r)
                        t[r:r + rows] = (torch.randn(rows, dims[1], generator=generator) * 0.02).to(torch.bfloat16)
                weight_map[name] = filename
            save_file(tensors, str(staging / filename), metadata={"format": "pt"})
            os.chmod(staging / filename, 0o644)  # safetensors may create it 0600
            del tensors
            log(f"  wrote shard {k}/{n} ({filename})")
        byte_tokenizer().save_pretrained(staging)   # calibrated methods need a tokenizer beside the weights
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(config_dict(shape, layers), indent=2) + "\n")
        os.chmod(staging, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def byte_tokenizer():
    """A 256-token byte-level tokenizer (ids below 256 of the model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def calibration_text(path: Path, documents: int = 64) -> Path:
    """Plain text of blank-line separated documents (enough for a few hundred-token sequences)."""
    import random

    rng = random.Random(0)
    words = [
        "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
        "this", "be", "are", "have", "it", "not", "an", "model", "weight", "layer", "memory", "block",
        "group", "scale", "error", "token", "sequence", "matrix", "column", "row"
    ]
    docs = [" ".join(rng.choice(words) for _ in range(400)).capitalize() + "." for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def find_cli() -> str:
    """quantize-llm on PATH, else the one installed next to this interpreter (an unactivated venv)."""
    found = shutil.which("quantize-llm")
    if found:
        return found
    beside = Path(sys.executable).parent / "quantize-llm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise BenchError("quantize-llm is not on PATH; install the project first: pip install -e .")


def measure(cli: str, ckpt: Path, out: Path, device: str, stats_file: Path) -> tuple[int, float]:
    """Run quantize-llm rtn under GNU time; return (peak RSS in bytes, wall seconds)."""
    cmd = [str(GNU_TIME), "-v", "-o", str(stats_file), cli, "rtn", str(ckpt), "-o", str(out),
           "--bits", "4", "--group-size", "128", "--overwrite", "--device", device]
    log("running: " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - start
    stats = stats_file.read_text() if stats_file.is_file() else ""
    if proc.returncode != 0:
        raise BenchError(f"quantize-llm rtn exited with status {proc.returncode} "
                         f"(its output is above); command: {' '.join(cmd[4:])}")
    match = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", stats)
    if not match:
        raise BenchError(f"no 'Maximum resident set size' line in the output of {GNU_TIME} -v")
    return int(match.group(1)) * 1024, wall


def run_method(cli: str, ckpt: Path, out: Path, args: list[str], cal: list[str], device: str,
               work: Path, extra: list[str] | None = None) -> tuple[int, float, dict]:
    """One quantize-llm run under GNU time: (peak RSS bytes, wall seconds, the plan event)."""
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    stats_file = work / "time-v.txt"
    cmd = [str(GNU_TIME), "-v", "-o", str(stats_file), cli, args[0], str(ckpt), "-o", str(out), *args[1:],
           *(cal if args[0] in CALIBRATED else []), "--overwrite", "--device", device, "--log-json", str(events),
           *(extra or [])]
    log("running: " + " ".join(cmd[4:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stats = stats_file.read_text() if stats_file.is_file() else ""
    if proc.returncode != 0:
        raise BenchError(f"quantize-llm {args[0]} exited with status {proc.returncode}; command: {' '.join(cmd[4:])}")
    match = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", stats)
    if not match:
        raise BenchError(f"no 'Maximum resident set size' line in the output of {GNU_TIME} -v")
    events_read = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    plan = next((e for e in events_read if "host_peak_bytes" in e), {})
    return int(match.group(1)) * 1024, wall, plan


def reference_bytes(shape: Shape, nsamples: int, seqlen: int) -> int:
    """What the issue's target compares with: the process baseline, one block in float32, the
    block's Hessians (q/k/v, o, gate/up, down: hidden^2 x 3 + intermediate^2, float32) and the
    calibration activations (this block's inputs and the next one's, float32)."""
    h, m = shape.hidden, shape.intermediate
    baseline = 450 * 2 ** 20
    return (baseline + 2 * shape.block_bytes() + 4 * (3 * h * h + m * m)
            + 2 * 4 * nsamples * seqlen * h)


def suite(args: argparse.Namespace, shape: Shape, layers: int, work: Path) -> int:
    """The calibrated suite: every method of --methods on a real-shaped checkpoint; a table of
    peak RSS, the plan's prediction (printed at the start of the run) and their ratio."""
    if not GNU_TIME.is_file():
        raise BenchError(f"{GNU_TIME} not found; install GNU time: apt-get install time")
    cli = find_cli()
    ckpt = work / f"ckpt-{args.shape}-L{layers}"
    if is_complete(ckpt, shape, layers) and (ckpt / "tokenizer.json").is_file():
        log(f"reusing synthetic checkpoint {ckpt}")
    else:
        work.mkdir(parents=True, exist_ok=True)
        need = shape.total_bytes(layers) * 1.45
        if shutil.disk_usage(work).free < need:
            raise BenchError(f"not enough disk space in {work}: need about {need / 1e9:.1f} GB")
        log(f"building synthetic checkpoint {ckpt} ({layers} blocks, {shape.total_bytes(layers) / 1e9:.2f} GB)")
        build_checkpoint(ckpt, shape, layers)
    text = calibration_text(work / "calibration.txt")
    cal = ["--dataset", str(text), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--batch-size", str(args.nsamples)]
    reference = reference_bytes(shape, args.nsamples, args.seqlen)
    rows = []
    for label in args.methods.split(","):
        if label not in METHODS:
            raise BenchError(f"unknown method {label!r}; choose from {', '.join(METHODS)}")
        out = work / f"out-{label}"
        try:
            extra = ["--max-memory", args.max_memory] if args.max_memory and METHODS[label][0] in CALIBRATED else []
            peak, wall, plan = run_method(cli, ckpt, out, METHODS[label], cal, args.device, work, extra)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        predicted = int(plan.get("host_peak_bytes") or 0)
        phases = plan.get("host_phases") or {}
        top = max(phases, key=phases.get) if phases else "?"
        if plan.get("narrow"):
            top += ", block held narrow"
        calibrated = METHODS[label][0] in CALIBRATED
        rows.append((label, peak, predicted, wall, top, calibrated))
        print(f"{label:<18} peak {peak / 1e9:6.2f} GB  predicted {predicted / 1e9:6.2f} GB  "
              f"ratio {peak / max(predicted, 1):.2f}  wall {wall:6.0f} s  (plan's largest phase: {top})", flush=True)
    print(f"\nquantize-llm memory suite: {args.shape} shapes, {layers} blocks, calibration {args.nsamples} x "
          f"{args.seqlen} tokens (1 GB = 1e9 bytes)")
    print(f"one block + Hessians + activations + process: {reference / 1e9:.2f} GB"
          + (f"; calibrated runs capped at --max-memory {args.max_memory}" if args.max_memory else ""))
    print("| method | peak RSS | predicted | measured / predicted | peak / (block + H + act) | wall | plan |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for label, peak, predicted, wall, top, calibrated in rows:
        ratio = peak / max(predicted, 1)
        bound = peak / reference
        ok &= 0.75 <= ratio <= 1.25 and (bound <= 1.5 or not calibrated)
        print(f"| {label} | {peak / 1e9:.2f} GB | {predicted / 1e9:.2f} GB | {ratio:.2f} | {bound:.2f} | "
              f"{wall:.0f} s | {top} |")
    print(f"targets (prediction within 25%, calibrated peak within 1.5x): {'PASS' if ok else 'FAIL'}")
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Peak RSS of `quantize-llm rtn` on a synthetic >= 4 GB Llama checkpoint.",
        epilog="Target: peak RSS < 1.5 GB (1 GB = 1e9 bytes). Exit status 1 on FAIL.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/quantize-llm-bench-memory"),
                        help="where the checkpoint (reused across runs) and the output go "
                             "(default %(default)s)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--layers", type=int, help="decoder blocks (default: enough for --min-gb)")
    size.add_argument("--min-gb", type=float, default=4.0,
                      help="smallest checkpoint size in GB (default %(default)s)")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep", action="store_true",
                      help="keep the quantized output too (default: delete it, keep the checkpoint)")
    keep.add_argument("--clean", action="store_true",
                      help="delete the whole work folder afterwards, synthetic checkpoint included")
    parser.add_argument("--device", default="auto", help="passed to quantize-llm (default auto)")
    parser.add_argument("--build-only", action="store_true",
                        help="build (or reuse) the checkpoint, print its path and stop")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="run the calibrated suite on real layer shapes instead (e.g. llama3-8b "
                             "with --layers 4, llama3-405b with --layers 1)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="with --shape: comma-separated labels (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=4, help="with --shape: calibration sequences")
    parser.add_argument("--seqlen", type=int, default=128, help="with --shape: tokens per sequence")
    parser.add_argument("--max-memory", default=None,
                        help="with --shape: passed to the calibrated runs (the plan fits it; e.g. 2.5GB at "
                             "8B shapes holds the block narrow)")
    args = parser.parse_args(argv)
    if args.shape:
        try:
            return suite(args, SHAPES[args.shape], args.layers or 1, args.workdir.expanduser().resolve())
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    shape = Shape()
    layers = args.layers if args.layers is not None else shape.layers_for(args.min_gb * 1e9)
    if layers < 1:
        parser.error("--layers must be at least 1")
    work = args.workdir.expanduser().resolve()
    ckpt = work / f"ckpt-L{layers}"
    out = work / "out"
    try:
        cli = None
        if not args.build_only:
            if not GNU_TIME.is_file():
                raise BenchError(f"{GNU_TIME} not found; install GNU time: apt-get install time")
            cli = find_cli()
        expected = shape.total_bytes(layers)
        if is_complete(ckpt, shape, layers):
            log(f"reusing synthetic checkpoint {ckpt}")
        else:
            work.mkdir(parents=True, exist_ok=True)
            # The 4-bit output is about a third of the bf16 input; ask for both plus 10%.
            need = (expected if not ckpt.exists() else 0) + (0 if args.build_only else expected // 3)
            free = shutil.disk_usage(work).free
            if free < need * 1.1:
                raise BenchError(f"not enough disk space in {work}: need about {need / 1e9:.1f} GB, "
                                 f"{free / 1e9:.1f} GB free; use --workdir elsewhere")
            log(f"building synthetic checkpoint {ckpt} ({layers} blocks, {expected / 1e9:.2f} GB)")
            start = time.perf_counter()
            build_checkpoint(ckpt, shape, layers)
            log(f"built in {time.perf_counter() - start:.0f} s")
        if args.build_only:
            print(ckpt)
            return 0

        peak, wall = measure(cli, ckpt, out, args.device, work / "time-v.txt")
        on_disk = folder_bytes(ckpt)
        out_size = folder_bytes(out) if out.is_dir() else 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.clean:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    ok = peak < TARGET_PEAK_BYTES
    rows = [("checkpoint on disk", f"{on_disk / 1e9:.2f} GB ({layers} blocks of "
                                   f"{shape.block_bytes() / 1e6:.0f} MB, bf16)"),
            ("quantized output", f"{out_size / 1e9:.2f} GB (w4 g128)"),
            ("peak RSS", f"{peak / 1e9:.2f} GB"),
            ("peak RSS / checkpoint", f"{peak / on_disk:.3f}"),
            ("wall time", f"{wall:.1f} s"),
            ("target", f"peak RSS < {TARGET_PEAK_BYTES / 1e9:.1f} GB: {'PASS' if ok else 'FAIL'}")]
    width = max(len(k) for k, _ in rows)
    print("\nquantize-llm rtn memory benchmark (1 GB = 1e9 bytes)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if on_disk < 4e9:
        print("  note: checkpoint below 4 GB; use the default size for the §S figure")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
