"""The commands around a quantized checkpoint: convert, inspect, eval, generate and env."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .._version import __version__
from ..run.recipe import parse_size
from .app import app, click
from .options import DeviceOpt, LogJsonOpt, ModelArg, OutputOpt, OverwriteOpt, ShardOpt, TrustRemoteCodeOpt
from .report import Results, human, out, print_evaluation, print_inspection

CheckpointArg = Annotated[str, typer.Argument(help="A quantized checkpoint folder or hub id.", show_default=False)]


@app.command(name="convert", help="Re-encode a quantized checkpoint (ours, or a GPTQ, AWQ or compressed-tensors "
             "checkpoint made by another tool) into another format without requantizing. Refused, naming the "
             "module and the reason, where the target cannot represent it exactly.\n\n"
             "Example: quantize-llm convert smol-gptq -o smol-ct --format compressed-tensors")
def convert_(path: CheckpointArg, output: OutputOpt,
             format: Annotated[str, typer.Option("--format", help="Target: gptq, awq, compressed-tensors (or outlier, "
                                                 "bnb for their own results), or gguf (one llama.cpp file: 4/8-bit "
                                                 "symmetric groups of 32 as Q4_0/Q8_0).", show_default=False)],
             bits: Annotated[int | None, typer.Option("--bits", help="Widen the integer codes to this many bits "
                                                      "(exact: e.g. 3-bit to 4-bit, which vLLM serves).",
                                                      show_default=False)] = None,
             overwrite: OverwriteOpt = False, max_shard_size: ShardOpt = "2GB", log_json: LogJsonOpt = None) -> None:
    from ..run.convert import convert
    from .progress import Reporter

    argv = click.globals.get_current_context().find_root().obj or sys.argv[1:]
    if format.lower().startswith("gguf"):
        _convert_gguf(path, output, format, bits, overwrite, log_json)
        return
    with Reporter(log_json, label="convert") as reporter:
        summary = convert(path, output, format, overwrite=overwrite, max_shard_bytes=parse_size(max_shard_size),
                          on_event=reporter, command="quantize-llm " + " ".join(shlex.quote(str(a)) for a in argv),
                          bits=bits)
    Results(log_json).print(f"converted {summary.modules} modules from {summary.source_format} to "
                            f"{summary.target_format} in {summary.seconds:.1f} s: wrote {summary.output} "
                            f"({human(summary.output_bytes)})")


def _convert_gguf(path: str, output: str, format: str, bits: int | None, overwrite: bool, log_json: Any) -> None:
    from ..errors import SpecError
    from ..run.gguf import convert_gguf
    from .progress import Reporter

    if format.lower() != "gguf":
        raise SpecError(f"convert --format {format}: converting writes each module's exact GGUF type (Q4_0 for "
                        "4-bit, Q8_0 for 8-bit symmetric groups of 32), not a chosen one",
                        "pass --format gguf, or requantize the float checkpoint with --format " + format)
    if bits is not None:
        raise SpecError("convert --bits does not apply to GGUF output", "leave out --bits")
    with Reporter(log_json, label="convert") as reporter:
        summary = convert_gguf(path, output, overwrite=overwrite, on_event=reporter)
    Results(log_json).print(f"converted {path} to {summary.spec['format']} in {summary.seconds:.1f} s: wrote "
                            f"{summary.output} ({human(summary.output_bytes)}, {summary.bits_per_weight:.2f} bits "
                            "per quantized weight)")


@app.command(help="List the quantized modules of a checkpoint, its size and its real bits per weight.\n\n"
             "Example: quantize-llm inspect smol-w4g128")
def inspect(path: Annotated[str, typer.Argument(help="A quantized checkpoint folder or hub id.")],
            all_modules: Annotated[bool, typer.Option("--all", help="List every module, not a summary by "
                                                      "name.")] = False) -> None:
    from ..eval.inspection import inspect_checkpoint

    print_inspection(inspect_checkpoint(path), all_modules, out)


@app.command(name="eval", help="Perplexity on a text file (BENCHMARKS.md protocol Q); with --baseline, "
             "also the KL divergence to the unquantized model.\n\n"
             "Example: quantize-llm eval smol-w4g128 --dataset wiki.test.raw --baseline ./SmolLM2-135M-Instruct")
def eval_(model: ModelArg,
          dataset: Annotated[Path, typer.Option("--dataset", help="UTF-8 text file, read as one string.",
                                                show_default=False)],
          seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window.")] = 512,
          windows: Annotated[int, typer.Option("--windows", help="Number of windows; 0 = the whole text.")] = 40,
          baseline: Annotated[str | None, typer.Option("--baseline", help="Unquantized model for KL and the "
                                                          "perplexity ratio.", show_default=False)] = None,
          device: DeviceOpt = "auto", trust_remote_code: TrustRemoteCodeOpt = False,
          log_json: LogJsonOpt = None) -> None:
    from ..eval.evaluate import run_eval
    from ..models.load import remote_code_warning
    from .progress import Reporter

    with Reporter(log_json, label="eval") as reporter:
        if trust_remote_code:
            reporter("warning", {"message": remote_code_warning(model)})
        result = run_eval(model, dataset, seqlen=seqlen, windows=windows, baseline=baseline, device=device,
                          on_event=reporter, trust_remote_code=trust_remote_code)
    print_evaluation(result, model, dataset, baseline, Results(log_json))


@app.command(help="Generate text from MODEL (a quantized checkpoint through our loader and its CUDA kernels, or an "
                  "unquantized one through transformers) and report tokens per second.\n\n"
                  "Example: quantize-llm generate ./smol-w4g128 \"The capital of France is\" --max-new-tokens 32")
def generate(model: ModelArg,
             prompt: Annotated[str, typer.Argument(help="The prompt text.", show_default=False)],
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="New tokens to generate.")] = 64,
             temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; above 0, sampling.")] = 0.0,
             top_p: Annotated[float, typer.Option("--top-p", help="Sampling: nucleus probability mass.")] = 1.0,
             seed: Annotated[int, typer.Option("--seed", help="Sampling: random seed.")] = 0,
             chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat "
                                                "template.")] = False,
             ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Always generate --max-new-tokens tokens "
                                                      "(for timing).")] = False,
             backend: Annotated[str, typer.Option("--backend", help="auto (CUDA kernels where they load), cuda "
                                                  "(insist), torch (PyTorch path).")] = "auto",
             dtype: Annotated[str, typer.Option("--dtype", help="Activations: auto (bfloat16 on CUDA, float32 on "
                                                "CPU), float32, bfloat16, float16.")] = "auto",
             device: DeviceOpt = "auto", trust_remote_code: TrustRemoteCodeOpt = False) -> None:
    from ..eval.generate import generate as run_generate
    from ..models.load import remote_code_warning
    from .progress import quiet_transformers

    if trust_remote_code:
        Console(stderr=True, highlight=False).print(f"warning: {remote_code_warning(model)}", markup=False)
    with quiet_transformers():
        result = run_generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, chat=chat, device=device, backend=backend, dtype=dtype,
                              ignore_eos=ignore_eos, trust_remote_code=trust_remote_code)
    out.print(result.text)
    Console(stderr=True, highlight=False).print(
        f"{result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
        f"(prompt {result.prompt_tokens} tokens; {result.device}, {result.dtype}, {result.backend})", markup=False)


@app.command(help="Versions and the state of the CUDA kernel.")
def env() -> None:
    import torch
    import transformers

    from ..runtime.ops import kernel_status

    status = kernel_status()
    cuda = torch.cuda.is_available()
    out.print(f"quantize-llm {__version__}")
    out.print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    out.print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
    out.print(f"dequant-matmul kernel: {'available' if status.available else 'not available'} ({status.reason})")
