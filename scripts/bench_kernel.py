#!/usr/bin/env python3
"""The dequant-matmul kernels against fp16 cuBLAS, BENCHMARKS.md protocol K (GPU only).

For every shape (out x in), batch and quantization setting, in one run:
  kernel     the quantize_llm::dequant_matmul op as QuantLinear calls it (CUDA graph replays, so
             Python launch overhead is out of the figure; `eager` gives the same call without graphs)
  fp16       torch.nn.functional.linear with an fp16 weight (cuBLAS), the baseline
  deq+cuBLAS the kernel's own dequantize-to-fp16 then cuBLAS (what the op must never lose to)
Times are medians over rounds of replays, after warm-up, with enough weight copies in rotation
that nothing sits in L2. Bandwidth: bytes of packed weight, scales, zeros, g_idx, activations
and output, over the time, as a fraction of the device-to-device copy bandwidth measured at the
start (bytes read plus written).

    python scripts/bench_kernel.py                       # protocol K, 4-bit g128 sym
    python scripts/bench_kernel.py --settings w4g128-asym w4g128-actorder w8g128 nf4-b64
    python scripts/bench_kernel.py --generate            # end-to-end tokens/s, w4g128 vs bf16
    python scripts/bench_kernel.py --smoke               # tiny shapes; runs on CPU too (timing meaningless)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_llm.core.packing import pack_int32  # noqa: E402
from quantize_llm.runtime import ops as _ops  # noqa: E402,F401  (defines torch.ops.quantize_llm)
from quantize_llm.runtime import reference as _reference  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192), (28672, 8192)]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]
SETTINGS = {"w4g128": (4, 128, True, False), "w4g128-asym": (4, 128, False, False),
            "w4g128-actorder": (4, 128, True, True), "w8g128": (8, 128, True, False),
            "nf4-b64": ("nf4", 64, None, None)}   # bitsandbytes layout, blocksize 64


def packed_weight(out_f: int, in_f: int, bits: int, group: int, sym: bool, act_order: bool, device, gen):
    """Random codes, scales and zeros in the runtime layout (runtime/ops.py), and the input
    permutation (None without act-order). Act-order is stored as QuantLinear stores it: columns
    sorted by group, the activations permuted on every call (timed with the kernel)."""
    groups = in_f // group
    codes = torch.randint(0, 2 ** bits, (in_f, out_f), generator=gen, dtype=torch.int32)
    zeros = torch.full((groups, out_f), 2 ** (bits - 1), dtype=torch.int32) if sym else \
        torch.randint(0, 2 ** bits, (groups, out_f), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, out_f, generator=gen) * 0.01 + 0.001).half()
    g_idx = torch.arange(in_f, dtype=torch.int32) // group
    perm = torch.randperm(in_f, generator=gen).to(torch.int32).to(device) if act_order else None
    tensors = [t.to(device) for t in (pack_int32(codes, bits, dim=0), scales, pack_int32(zeros, bits, dim=1), g_idx)]
    return tensors + [perm]


def nf4_weight(out_f: int, in_f: int, blocksize: int, device, gen):
    """Random NF4 codes and absmax in the NF4Linear layout (runtime/qlinear.py)."""
    from quantize_llm.core import nf4codes

    n = out_f * in_f
    wp = torch.randint(0, 256, (n // 2,), generator=gen, dtype=torch.int32).to(torch.uint8)
    absmax = torch.rand(n // blocksize, generator=gen) * 0.1 + 0.01
    return [t.to(device) for t in (wp, absmax, nf4codes.code_table("nf4", "cpu"))]


class Clock:
    """Median seconds of a callable: CUDA graphs and events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, rounds: int) -> None:
        self.device, self.rounds = device, rounds

    def __call__(self, fns: list, graph: bool = True) -> float:
        """fns: calls rotating over different weight copies; one replay runs each once."""
        for fn in fns:                       # warm-up (kernel build, cuBLAS handles, autotuning)
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.rounds):
                t = time.perf_counter()
                for fn in fns:
                    fn()
                times.append((time.perf_counter() - t) / len(fns))
            return statistics.median(times)
        torch.cuda.synchronize()
        run = lambda: [fn() for fn in fns]  # noqa: E731
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            run = g.replay
        times = []
        for _ in range(self.rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / len(fns))
        return statistics.median(times)


def copy_bandwidth(device: torch.device, clock: Clock) -> float:
    """Bytes per second of a large device-to-device copy, counting read plus written."""
    n = 1 << 28 if device.type == "cuda" else 1 << 22
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    a.random_(0, 255)
    return 2 * n / clock([lambda: b.copy_(a)], graph=False)


def bench_ops(args, device: torch.device) -> list[dict]:
    from quantize_llm.runtime import cuda

    clock = Clock(device, args.rounds)
    bandwidth = copy_bandwidth(device, clock)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    if device.type == "cuda":
        print(f"kernels: {cuda.status().reason}")
    gen = torch.Generator().manual_seed(0)
    op = torch.ops.quantize_llm.dequant_matmul
    rows = []
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1 << 20
    nf4_op = torch.ops.quantize_llm.nf4_matmul
    for setting in args.settings:
        bits, group, sym, act_order = SETTINGS[setting]
        nf4 = bits == "nf4"
        for out_f, in_f in args.shapes:
            fp16_bytes = out_f * in_f * 2
            packed_bytes = out_f * in_f // 2 if nf4 else out_f * in_f * bits // 8
            copies = max(2, min(16, -(-4 * l2 // packed_bytes)))   # the rotation outgrows L2 4x
            packs = [nf4_weight(out_f, in_f, group, device, gen) if nf4 else
                     packed_weight(out_f, in_f, bits, group, sym, act_order, device, gen) for _ in range(copies)]
            dense = [torch.randn(out_f, in_f, generator=gen).half().to(device)
                     for _ in range(max(2, min(copies, -(-4 * l2 // fp16_bytes))))]
            for m in args.batches:
                x = torch.randn(m, in_f, generator=gen).half().to(device)
                if nf4:
                    kern = [lambda p=p: nf4_op(x, *p, out_f, group) for p in packs]
                else:
                    kern = [lambda p=p: op(x if p[4] is None else x.index_select(1, p[4]), *p[:4], bits, group)
                            for p in packs]
                base = [lambda w=w: F.linear(x, w) for w in dense]
                t_k, t_fp16 = clock(kern), clock(base)
                t_eager = clock(kern, graph=False)
                row = {"setting": setting, "out": out_f, "in": in_f, "batch": m, "kernel_s": t_k,
                       "eager_s": t_eager, "fp16_s": t_fp16, "speedup": t_fp16 / t_k}
                if device.type == "cuda":
                    k_ = cuda.kernels(device)
                    if nf4:   # the PyTorch dequantization (there is no NF4 dequantize kernel), then cuBLAS
                        deq = [lambda p=p: F.linear(x, _reference.nf4_dequantize(p[0], p[1], p[2], out_f, in_f, group,
                                                                           x.dtype)) for p in packs]
                    else:
                        deq = [lambda p=p: (x if p[4] is None else x.index_select(1, p[4]))
                               @ cuda.dequantize(k_, p[0], p[1], p[2], p[3], bits, x.dtype) for p in packs]
                    row["deq_cublas_s"] = clock(deq)
                    row["vs_deq"] = row["deq_cublas_s"] / t_k
                moved = sum(t.numel() * t.element_size() for t in packs[0] if t is not None) + x.numel() * 2 \
                    + m * out_f * 2
                row["bandwidth_fraction"] = moved / t_k / bandwidth
                rows.append(row)
                print(_line(row), flush=True)
            del packs, dense
    return rows


def _line(r: dict) -> str:
    deq = f"{r['deq_cublas_s'] * 1e6:9.1f} {r['vs_deq']:6.2f}x" if "deq_cublas_s" in r else f"{'-':>9} {'-':>7}"
    return (f"{r['setting']:16} {r['out']:>6}x{r['in']:<6} {r['batch']:>4} {r['kernel_s'] * 1e6:9.1f} "
            f"{r['eager_s'] * 1e6:9.1f} {r['fp16_s'] * 1e6:9.1f} {r['speedup']:6.2f}x {deq} "
            f"{r['bandwidth_fraction']:6.1%}")


HEADER = (f"{'setting':16} {'out x in':>13} {'tok':>4} {'kernel us':>9} {'eager us':>9} {'fp16 us':>9} "
          f"{'vs fp16':>7} {'deq+cuBLAS':>9} {'vs deq':>7} {'bandw.':>7}")


def bench_generate(args, device: torch.device) -> list[dict]:
    """Tokens per second of `generate` for a random-weight Llama of the given size, bf16 against
    our 4-bit g128 checkpoint of it (speed does not depend on the weights' values)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.eval.generate import generate
    from quantize_llm.run.execute import quantize

    sizes = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8),
             "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8),
             "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "bf16", Path(tmp) / "w4g128"
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **sizes[args.model_size])
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model.save_pretrained(src)
        del model
        vocab = {chr(65 + i % 26) + str(i): i for i in range(32000)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="A0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="A0").save_pretrained(src)
        quantize(str(src), dst, QuantSpec(bits=4, group_size=128, method="rtn"), device=str(device), verify=False,
                 resume=False)
        for f in src.glob("tokenizer*"):
            (dst / f.name).write_bytes(f.read_bytes())
        prompt = " ".join(f"B{i}" for i in range(1, 33))
        for name, path in (("bf16", src), ("w4g128", dst)):
            r = generate(str(path), prompt, max_new_tokens=args.new_tokens, ignore_eos=True, device=str(device),
                         dtype="bfloat16" if device.type == "cuda" else "float32")
            rows.append({"model": name, "tokens_per_second": r.tokens_per_second, "backend": r.backend,
                         "new_tokens": r.new_tokens})
            print(f"generate {args.model_size} {name:7} {r.tokens_per_second:8.1f} tokens/s ({r.backend})", flush=True)
    print(f"generate speed-up w4g128 / bf16: {rows[1]['tokens_per_second'] / rows[0]['tokens_per_second']:.2f}x")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["w4g128"], choices=list(SETTINGS))
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--shapes", nargs="+", default=None, help="OUTxIN, e.g. 4096x4096")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--generate", action="store_true", help="also time end-to-end generation")
    p.add_argument("--model-size", default="1b", choices=["tiny", "1b", "8b"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few rounds (checks the script)")
    p.add_argument("--json", type=Path, help="write every row here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("error: no CUDA GPU here; protocol K runs on a GPU (use --smoke to check the script on CPU)")
    args.shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes] if args.shapes else SHAPES
    if args.smoke:
        args.shapes, args.batches, args.rounds = [(256, 512)], [1, 16, 32], 3
        args.model_size, args.new_tokens = "tiny", 8
    print(HEADER)
    rows = bench_ops(args, device)
    result = {"ops": rows}
    if args.generate:
        result["generate"] = bench_generate(args, device)
    print("\n" + HEADER)
    for r in rows:
        print(_line(r))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
