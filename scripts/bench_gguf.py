#!/usr/bin/env python3
"""GGUF files of SmolLM2-135M-Instruct: ours (rtn, gptq, awq) against llama.cpp's own `llama-quantize`
(with and without an importance matrix from the same calibration text), BENCHMARKS.md protocol Q.

    python scripts/bench_gguf.py --llama-cpp PATH/TO/llama.cpp [--schemes Q4_K_M Q3_K_M Q4_0] [--act-order]
    python scripts/bench_quality.py --gguf --llama-cpp PATH/TO/llama.cpp     (the same)

PATH/TO/llama.cpp is a llama.cpp source tree with `llama-quantize` and `llama-imatrix` built
(build/bin/; e.g. `cmake -B build -DGGML_NATIVE=OFF && cmake --build build --target llama-quantize
llama-imatrix`; the llama-cpp-python source distribution carries the tree under vendor/llama.cpp).
Steps, all in one temporary folder:
  1. llama.cpp's converter (convert_hf_to_gguf.py, with the tree's own gguf-py) writes the bf16
     checkpoint as a BF16 GGUF, the input llama-quantize takes (bf16 to BF16 is exact).
  2. llama-imatrix computes an importance matrix on the calibration text: the same 64 x 512 C4
     tokens our gptq calibrates on (decoded to text; llama-imatrix re-tokenizes it, -c 512).
  3. For each scheme: llama-quantize without and with the importance matrix; ours: rtn (which
     rounds as llama.cpp's reference quantizer does) and gptq (the same grids, codes chosen with
     error feedback on the calibration tokens), with the same per-tensor types.
  4. Every file is evaluated by the same code (weights dequantized with the gguf package's
     dequantizers into the float model): perplexity on WikiText-2, 40 x 512 tokens.
Printed per scheme: perplexity, ratio to the unquantized model, bits per weight of the decoder
blocks' matrices (their bytes over their weights; every file of a scheme has the same types), the
file size, llama.cpp's own `llama-perplexity` of the file where the tree has it built (its protocol:
the second half of each 512-token chunk scored; so llama.cpp itself loads and runs every file), and
for our rtn file the share of tensors byte-identical to llama-quantize's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def run(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} ... exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def block_bits(path: Path) -> float:
    """Bits per weight of the decoder blocks' matrices in a GGUF file."""
    import gguf

    nbytes = weights = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2 and t.name.endswith(".weight"):
            nbytes += int(t.n_bytes)
            weights += int(t.n_elements)
    return 8 * nbytes / max(weights, 1)


def llama_perplexity(tool: Path, model: Path, text: Path, windows: int) -> str:
    """llama.cpp's own perplexity of a file (its protocol: 512-token chunks, the second half of
    each scored), or '-' without the tool."""
    import re

    if not tool.exists():
        return "-"
    proc = subprocess.run([str(tool), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(windows),
                           "-t", str(os.cpu_count() or 1)], capture_output=True, text=True)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not match:
        sys.exit(f"error: llama-perplexity failed on {model}:\n{(proc.stdout + proc.stderr)[-1500:]}")
    return match.group(1)


def identical_share(ours: Path, theirs: Path) -> str:
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    common = sorted(set(a) & set(b))
    same = sum(a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))
               for n in common)
    return f"{same}/{len(common)}"


def main() -> None:
    from bench_quality import protocol_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin tools")
    parser.add_argument("--schemes", nargs="*", default=["Q4_K_M", "Q3_K_M"])
    parser.add_argument("--act-order", action="store_true", help="also a gptq --act-order row per scheme")
    parser.add_argument("--rows", nargs="*", default=["llama-quantize", "imatrix", "rtn", "gptq"],
                        choices=["llama-quantize", "imatrix", "rtn", "gptq", "gptq-feedback", "awq", "awq-gptq"],
                        help="which files to make per scheme (gptq-feedback: gptq --clip feedback; awq: AWQ's "
                             "scales, then each Linear's fields searched under diag(H); awq-gptq: then GPTQ on "
                             "the grid)")
    protocol_arguments(parser)
    parser.add_argument("--keep", type=Path, default=None, help="write the files here and keep them")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: reuse the BF16 conversion and the importance matrix found there")
    args = parser.parse_args()

    from bench_quality import default_model
    from transformers import AutoTokenizer

    from quantize_llm.calibration.data import CalibrationSpec, load_calibration
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.eval.evaluate import evaluate, load_for_eval, make_windows, tokenize_text
    from quantize_llm.run.execute import quantize

    tree = args.llama_cpp.expanduser().resolve()
    tools = {name: tree / "build" / "bin" / name for name in ("llama-quantize", "llama-imatrix")}
    for path in [*tools.values(), tree / "convert_hf_to_gguf.py", args.calib, args.eval]:
        if not path.exists():
            sys.exit(f"error: {path} not found")
    model_dir = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = make_windows(tokenize_text(args.eval, tokenizer), 512, args.windows)
    c4 = CalibrationSpec(source=str(args.calib), nsamples=args.nsamples, seqlen=args.seqlen)
    cal_tokens = load_calibration(c4, tokenizer).tokens
    base_model, _ = load_for_eval(str(model_dir))
    base = evaluate(base_model, windows).perplexity
    del base_model
    print(f"unquantized perplexity: {base:.3f}", flush=True)
    rows: list[tuple[str, str, float, float, float, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    source = work / "src-bf16.gguf"
    text = work / "calibration.txt"
    imatrix = work / "imatrix.gguf"
    if args.reuse and source.is_file() and imatrix.is_file():   # an earlier run's, kept with --keep
        print(f"reusing {source} and {imatrix}", flush=True)
    else:
        run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16",
             "--outfile", str(source)], env)
        text.write_text("\n\n".join(tokenizer.decode(row) for row in cal_tokens))
        t_imatrix = run([str(tools["llama-imatrix"]), "-m", str(source), "-f", str(text), "-o", str(imatrix),
                         "-c", str(args.seqlen), "--chunks", str(args.nsamples), "-t", str(os.cpu_count() or 1)])
        print(f"llama-imatrix: {t_imatrix:.0f} s", flush=True)

    perplexity_tool = tree / "build" / "bin" / "llama-perplexity"

    def score(name: str, scheme: str, path: Path, seconds: float, note: str = "") -> None:
        model, _ = load_for_eval(str(path))
        ppl = evaluate(model, windows).perplexity
        del model
        theirs = llama_perplexity(perplexity_tool, path, args.eval, args.windows)
        rows.append((scheme, name, ppl, block_bits(path), path.stat().st_size / 1e6, theirs,
                     f"{seconds:.0f} s {note}"))
        print(f"{scheme:7s} {name:28s} ppl {ppl:8.3f}  x{ppl / base:.3f}  {rows[-1][3]:.3f} bpw  "
              f"llama-perplexity {theirs}  {seconds:6.0f} s {note}", flush=True)

    for scheme in args.schemes:
        plain = work / f"llama-quantize-{scheme}.gguf"
        if "llama-quantize" in args.rows or ("rtn" in args.rows and not plain.is_file()):
            seconds = run([str(tools["llama-quantize"]), str(source), str(plain), scheme])
            if "llama-quantize" in args.rows:
                score("llama-quantize", scheme, plain, seconds)
        if "imatrix" in args.rows:
            weighted = work / f"llama-quantize-imatrix-{scheme}.gguf"
            score("llama-quantize --imatrix", scheme, weighted,
                  run([str(tools["llama-quantize"]), "--imatrix", str(imatrix), str(source), str(weighted), scheme]))
        if "rtn" in args.rows:
            ours = work / f"rtn-{scheme}.gguf"
            t = time.perf_counter()
            quantize(str(model_dir), ours, QuantSpec(method="rtn", format=f"gguf:{scheme}"), overwrite=True)
            score("quantize-llm rtn", scheme, ours, time.perf_counter() - t,
                  f"(tensors byte-identical to llama-quantize's: {identical_share(ours, plain)})")
        for act_order in ((False, True) if args.act_order else (False,)) if "gptq" in args.rows else ():
            solved = work / f"gptq{'-act' if act_order else ''}-{scheme}.gguf"
            t = time.perf_counter()
            quantize(str(model_dir), solved, QuantSpec(method="gptq", act_order=act_order, format=f"gguf:{scheme}"),
                     calibration=c4, device="cpu", overwrite=True)
            score(f"quantize-llm gptq{' --act-order' if act_order else ''}", scheme, solved,
                  time.perf_counter() - t)
        if "gptq-feedback" in args.rows:
            from quantize_llm.algorithms.gptq import GPTQOptions

            searched = work / f"gptq-feedback-{scheme}.gguf"
            t = time.perf_counter()
            quantize(str(model_dir), searched, QuantSpec(method="gptq", format=f"gguf:{scheme}"),
                     options=GPTQOptions(clip="feedback"), calibration=c4, device="cpu", overwrite=True)
            score("quantize-llm gptq --clip feedback", scheme, searched, time.perf_counter() - t)
        for then in [t for t in ("rtn", "gptq") if ("awq" if t == "rtn" else "awq-gptq") in args.rows]:
            from quantize_llm.algorithms.awq import AWQOptions

            scaled = work / f"awq{'-gptq' if then == 'gptq' else ''}-{scheme}.gguf"
            t = time.perf_counter()
            quantize(str(model_dir), scaled, QuantSpec(method="awq", format=f"gguf:{scheme}"),
                     options=AWQOptions(then=then), calibration=c4, device="cpu", overwrite=True)
            score(f"quantize-llm awq{' --then gptq' if then == 'gptq' else ''}", scheme, scaled,
                  time.perf_counter() - t)
    print()
    print(f"| scheme | file | perplexity | x unquantized ({base:.2f}) | bits/weight (blocks) | size | "
          "llama-perplexity (llama.cpp's protocol) | time |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, name, ppl, bpw, mb, theirs, seconds in rows:
        print(f"| {scheme} | {name} | {ppl:.2f} | {ppl / base:.3f} | {bpw:.3f} | {mb:.1f} MB | {theirs} | {seconds} |")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
