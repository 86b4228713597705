#!/usr/bin/env python
"""Memory and time of self-generated calibration text: the whole float model against the model
offloaded to disk (--generation-memory).

The script builds a random-weight Llama checkpoint with save_pretrained, in bfloat16 with a byte
tokenizer (hidden 1024, MLP 2816, 16 query / 4 key-value heads, vocab 32000, 8 blocks by default:
155 M parameters, 311 MB on disk, 621 MB in float32), into WORKDIR/ckpt-L<layers>, reused by later
runs. Then each variant runs in a child process of its own, on the CPU, through the run's own code
(plan.self_text_plan, then execute.load_calibration_tokens): it plans the phase, loads the model and
writes --nsamples x --seqlen tokens (seed 0).

    whole      --generation-memory above the model's size: the whole float32 model in memory
    offloaded  --generation-memory --budget (default 100MB): what fits is kept, every other
               module is read from the checkpoint's files at every step

The parent takes each child's peak RSS from os.wait4 (that child alone). The child reports its
load-and-generate time and the anonymous memory (RssAnon, sampled every 5 ms) that loading (until
the first tokens are reported) and writing added to what imports and the plan held: the memory the
plan's phase predicts, and its share while the text is written. Peak RSS
also counts the checkpoint's pages mapped from the page cache, which the kernel can drop. The
parent imports no torch and builds the checkpoint in a child too: Linux carries a process's RSS
high-water mark across exec, so a forked child would start from the parent's. Each variant runs
--repeat times, alternating; the table gives the fastest run's time and the largest memory, the
ratios to the whole model's, and whether every run wrote the same tokens (SHA-256). Exit status 1
when they differ.

The checkpoint is small enough to stay in the page cache here, so the offloaded reads come from
memory: for a model larger than the machine's memory they come from the disk, and the offloaded
time is a lower bound.

Usage: python scripts/bench_self_text.py [--workdir DIR] [--layers N] [--budget 100MB]
       [--nsamples 4] [--seqlen 64] [--threads 1] [--repeat 2] [--clean]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

WHOLE = "whole"        # the variant that loads the whole model
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


class BenchError(Exception):
    """An expected failure: printed as one line, exit status 1."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def byte_tokenizer():
    """A 256-token byte-level tokenizer (ids below 256 of the model's vocabulary; no BOS, so every
    sequence starts from token 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def build(folder: Path, layers: int) -> None:
    """A random bfloat16 Llama of `layers` blocks (weights drawn with std 0.02, norms 1), saved with
    save_pretrained into a temporary sibling folder renamed into place when complete."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPE, num_hidden_layers=layers)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(staging)
        byte_tokenizer().save_pretrained(staging)
        del model
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_built(folder: Path, layers: int) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("num_hidden_layers") == layers and config.get("hidden_size") == SHAPE["hidden_size"]
            and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file())


def child(args: argparse.Namespace) -> int:
    """In a child process: the checkpoint ("build"), or one variant ("run", --generation-memory
    WHOLE for the whole model): plan the phase, load, generate; one JSON line on stdout."""
    import torch

    from quantize_llm.calibration.data import CalibrationSpec
    from quantize_llm.errors import QuantizeError
    from quantize_llm.models.load import CheckpointReader
    from quantize_llm.run.execute import load_calibration_tokens
    from quantize_llm.run.plan import self_text_plan

    torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt)
    if args.child == "build":
        build(ckpt, args.layers)
        return 0
    cpu = torch.device("cpu")
    whole = args.generation_memory == WHOLE
    try:
        spec = CalibrationSpec(nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                               generation_memory="1TB" if whole else args.generation_memory)
        with CheckpointReader(ckpt) as reader:
            config = reader.config
            text = self_text_plan(reader, config, spec, args.seqlen, cpu)
    except QuantizeError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 1
    if text.offloaded == whole:
        raise BenchError(f"the plan chose {'offloading' if text.offloaded else 'the whole model'} for "
                         f"--generation-memory {args.generation_memory}")
    before = rss_anon()
    peak = [before]
    loading = [0]                     # the peak until the first tokens are written: loading the model
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_anon())

    def event(kind: str, data: dict) -> None:
        if kind == "calibration_text" and not loading[0]:
            loading[0], peak[0] = max(peak[0], rss_anon()), rss_anon()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    cal = load_calibration_tokens(ckpt, config, spec, cpu, event, generation=text, output=ckpt.parent / "out")
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "sha256": cal.sha256, "loading": loading[0] - before,
                      "writing": max(peak[0], rss_anon()) - before, "predicted": text.work_bytes(cpu=True),
                      "running": text.work_bytes(cpu=True) if not text.offloaded else
                      text.resident_bytes + text.streamed_bytes + text.cache_bytes,
                      "weights": text.weights_bytes,
                      "resident": text.resident_bytes if text.offloaded else text.weights_bytes,
                      "streamed": text.streamed_bytes}), flush=True)
    return 0


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (/proc/self/status RssAnon)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise BenchError("/proc/self/status has no RssAnon line (Linux is needed)")


def run_child(args: argparse.Namespace, what: str, ckpt: Path, generation_memory: str = WHOLE) -> dict:
    """One child process: its JSON line, with its peak RSS (bytes) from os.wait4."""
    cmd = [sys.executable, __file__, "--child", what, "--ckpt", str(ckpt), "--generation-memory", generation_memory,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--threads", str(args.threads),
           "--layers", str(args.layers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchError(f"the {what} child exited with status {proc.returncode}; command: {' '.join(cmd)}")
    result = json.loads(out.strip().splitlines()[-1]) if what == "run" else {}
    result["peak"] = usage.ru_maxrss * 1024          # Linux reports KiB
    return result


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak RSS and time of self-generated calibration text, "
                                                 "whole model against offloaded.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/quantize-llm-bench-self-text"),
                        help="where the checkpoint goes (reused across runs; default %(default)s)")
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks (default %(default)s)")
    parser.add_argument("--budgets", default="150MB,400MB",
                        help="--generation-memory of each offloaded variant, comma-separated (default %(default)s: "
                             "every module read at every step; the embeddings and three blocks kept)")
    parser.add_argument("--nsamples", type=int, default=4, help="sequences (default %(default)s)")
    parser.add_argument("--seqlen", type=int, default=64, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant, alternating (default %(default)s)")
    parser.add_argument("--clean", action="store_true", help="delete the work folder afterwards")
    parser.add_argument("--child", choices=("build", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--generation-memory", default=WHOLE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.child:
            return child(args)
        work = args.workdir.expanduser().resolve()
        ckpt = work / f"ckpt-L{args.layers}"
        if is_built(ckpt, args.layers):
            log(f"reusing checkpoint {ckpt}")
        else:
            work.mkdir(parents=True, exist_ok=True)
            log(f"building checkpoint {ckpt}")
            run_child(args, "build", ckpt)
        variants = [WHOLE, *(b.strip() for b in args.budgets.split(",") if b.strip())]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for i in range(args.repeat):
            for variant in variants if i % 2 == 0 else variants[::-1]:
                log(f"run {i + 1}/{args.repeat}: {variant}")
                runs[variant].append(run_child(args, "run", ckpt, variant))
        best = {v: {**rs[0], "seconds": min(r["seconds"] for r in rs), "peak": max(r["peak"] for r in rs),
                    "loading": max(r["loading"] for r in rs), "writing": max(r["writing"] for r in rs)}
                for v, rs in runs.items()}
        same = len({r["sha256"] for rs in runs.values() for r in rs}) == 1
        size = sum(p.stat().st_size for p in ckpt.iterdir() if p.suffix == ".safetensors")
        base = best[WHOLE]
        print(f"self-generated calibration text, {args.nsamples} x {args.seqlen} tokens on the CPU "
              f"({args.threads} thread{'s' if args.threads > 1 else ''}), random Llama of {args.layers} blocks: "
              f"{size / 1e6:.0f} MB bfloat16 on disk, {mb(base['weights'])} of float32 weights; memory is the "
              f"largest and time the fastest of {args.repeat} runs; 1 MB = 1e6 bytes")
        print("| --generation-memory | weights kept + read at a time | peak RSS (/ whole) | memory added: loading, "
              "writing (/ whole) | the plan's phase, writing | load + generate (/ whole) |")
        print("|---|---|---|---|---|---|")
        for v in variants:
            r = best[v]
            added = max(r["loading"], r["writing"])
            whole_added = max(base["loading"], base["writing"])
            print(f"| {v} | {mb(r['resident'])} + {mb(r['streamed'])} | {mb(r['peak'])} "
                  f"({r['peak'] / base['peak']:.2f}) | {mb(r['loading'])}, {mb(r['writing'])} "
                  f"({added / whole_added:.2f}) | {mb(r['predicted'])}, {mb(r['running'])} | {r['seconds']:.1f} s "
                  f"({r['seconds'] / base['seconds']:.2f}) |")
        print("offloaded reads came from the page cache (the checkpoint fits in this machine's memory); from a disk "
              "they are slower")
        print(f"tokens identical in every run: {'yes' if same else 'NO'}")
        if args.clean:
            shutil.rmtree(work, ignore_errors=True)
        return 0 if same else 1
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
