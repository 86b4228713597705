"""The command line: one thin function per subcommand; `main()` is the one error boundary.

Exit codes: 0 done, 1 the run failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer vendors its own copy of click from 0.2x on; its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer
    import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._version import __version__
from ..errors import QuantizeError, UsageError
from ..run.recipe import Job, job_from_dict, load_recipe, parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Quantize LLM weights into checkpoints that transformers "
                  "and vLLM load.")


class _Stdout:
    """Results go to stdout; wide enough off a terminal that names are never cut. Strings are text,
    never rich markup (they hold paths and names: `[/x]` must print as it is); styles come as Text."""

    def print(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 200).print(*args, **kwargs)


out = _Stdout()

ModelArg = Annotated[str, typer.Argument(help="A local checkpoint folder, a Hugging Face hub id, or a hub cache entry.",
                                         show_default=False)]
def _not_empty(value: str | None) -> str | None:
    """-o "" (or an unset variable) would name the current folder: refused before anything."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty; name the folder to write, e.g. -o model-w4")
    return value


OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Folder to write (created atomically).",
                                        show_default=False, callback=_not_empty)]
BitsOpt = Annotated[int, typer.Option("--bits", "-b", help="Bits per weight: 2, 3, 4 or 8.")]
GroupSizeOpt = Annotated[int, typer.Option("--group-size", "-g", help="Weights per scale along in_features; -1 = per output channel.")]
SymOpt = Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid (zero fixed; vLLM's fast kernels) or asymmetric (per-group zero).")]
KeepDenseOpt = Annotated[Optional[list[str]], typer.Option("--keep-dense", help="Regex of Linear names to leave unquantized (repeatable).", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N; quantizing commands also take a list such as cuda:0,cuda:1 and spread calibrated runs over it (same checkpoint as one device).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 2GB or 500MB.")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Record each finished block beside OUT and, when an interrupted run of the same job left some, continue from there.")]
EvalOpt = Annotated[Optional[Path], typer.Option("--eval", help="After writing, measure perplexity and KL divergence against the source model on this text file and put them in the model card.", show_default=False)]
EvalWindowsOpt = Annotated[int, typer.Option("--eval-windows", help="With --eval: windows of 512 tokens (0 = the whole text).")]
StrictVllmOpt = Annotated[bool, typer.Option("--strict-vllm", help="Refuse combinations that vLLM would serve without its fast kernels (or not at all), instead of warning.")]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="Read the written checkpoint back before renaming it into place: every module must decode to its result, and (calibrated runs) the loaded model must reproduce the run's last-block outputs.")]
PushOpt = Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload the finished checkpoint to this hub repository (user/name; private when created).", show_default=False)]
LogJsonOpt = Annotated[Optional[Path], typer.Option("--log-json", help="Append one JSON event per line to this file ('-' = stdout).", show_default=False)]


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return str(nbytes)


DatasetOpt = Annotated[str, typer.Option("--dataset", help="Calibration text: a .txt/.jsonl/.json/.parquet file, "
                                          "a datasets hub id (org/name[:config[:split]]), or 'self' (the model "
                                          "writes its own).")]
NSamplesOpt = Annotated[int, typer.Option("--nsamples", help="Calibration sequences.")]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", help="Tokens per calibration sequence (capped by the model's context).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for self-generated calibration text.")]
TextColumnOpt = Annotated[str, typer.Option("--text-column", help="Column or field holding the text.")]
ClipOpt = Annotated[str, typer.Option("--clip", help="Group range: minmax, or mse (shrink the range where it lowers the rounding error).")]
DampOpt = Annotated[float, typer.Option("--damp", help="Where GPTQ runs (gptq, --then gptq, --inner gptq, --rounding gptq) or the inverse Hessian is used: added to diag(H) as a fraction of its mean.")]
BlockSizeOpt = Annotated[int, typer.Option("--block-size", help="Where GPTQ runs: columns per lazy-update block.")]
TrueSequentialOpt = Annotated[bool, typer.Option("--true-sequential/--no-true-sequential", help="Calibrated runs: re-run the block between q/k/v, o, gate/up and down.")]
FormatOpt = Annotated[str, typer.Option("--format", help="gptq (GPTQ layout), awq (AutoAWQ GEMM, 4-bit only) or compressed-tensors (pack-quantized, 2/4/8-bit).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Calibration sequences per forward pass.")]


def _run_keys(args: dict) -> dict:
    """The run settings of a command's arguments, as recipe keys."""
    keys = {k: args[k] for k in ("device", "overwrite", "max_shard_size", "batch_size", "resume", "push_to_hub",
                                 "strict_vllm", "verify")
            if args.get(k) is not None}
    if args.get("eval_file") is not None:
        keys["eval"] = {"dataset": str(args["eval_file"]), "windows": args.get("eval_windows", 40)}
    return keys


def _calibration(args: dict) -> dict:
    """The calibration settings of a command's arguments, as a recipe's calibration table."""
    return {k: args[k] for k in ("dataset", "nsamples", "seqlen", "seed", "text_column")}


def _run_job(job: "Job", log_json: Path | None, command: str | None = None) -> None:
    """Run one job with progress on stderr and the summary on stdout (every command comes here)."""
    from ..run.execute import quantize
    from .progress import Reporter

    if command is None:
        argv = click.globals.get_current_context().find_root().obj or sys.argv[1:]
        command = "quantize-llm " + " ".join(shlex.quote(str(a)) for a in argv)
    spec = job.spec
    with Reporter(log_json, label=spec.method, job=job.name) as reporter:
        summary = quantize(job.model, job.output, spec, options=job.options, calibration=job.calibration,
                           device=job.device, overwrite=job.overwrite, max_shard_bytes=parse_size(job.max_shard_size),
                           batch_size=job.batch_size, on_event=reporter, command=command, resume=job.resume,
                           evaluation=job.evaluation, push_to_hub=job.push_to_hub, strict_vllm=job.strict_vllm,
                           verify=job.verify)
    grid = (f"{spec.codebook} b{spec.blocksize}{' double-quant' if spec.double_quant else ''}" if spec.codebook != "int"
            else f"w{spec.bits}g{spec.group_size} {'sym' if spec.sym else 'asym'}")
    table = Table(title=f"{spec.method} {grid}")
    table.add_column("blocks", justify="right")
    table.add_column("wall time", justify="right")
    table.add_column("input size", justify="right")
    table.add_column("output size", justify="right")
    table.add_column("bits/weight", justify="right")
    table.add_column("peak RSS", justify="right")
    table.add_row(str(summary.blocks), f"{summary.seconds:.1f} s", _human(summary.input_bytes),
                  _human(summary.output_bytes), f"{summary.bits_per_weight:.3f}", f"{summary.peak_rss_mb:.0f} MiB")
    out.print(table)
    if summary.timings:
        total = sum(summary.timings.values())
        out.print("time by stage: " + ", ".join(f"{k} {v:.1f} s ({100 * v / max(total, 1e-9):.0f}%)"
                                                 for k, v in sorted(summary.timings.items(), key=lambda kv: -kv[1])))
    if summary.calibration:
        c = summary.calibration
        out.print(f"calibration: {c['source']}, {c['nsamples']} x {c['seqlen']} tokens, sha256 {c['sha256'][:16]}...")
    worst = sorted(summary.layers, key=lambda r: -r.metrics.get("rel_error", 0))[:5]
    if worst:
        what = "output error ||WX - QX|| / ||WX||" if summary.calibration else "weight error ||W - W'|| / ||W||"
        layers = Table(title=f"largest relative {what}")
        layers.add_column("layer")
        layers.add_column("shape")
        layers.add_column("rel. error", justify="right")
        damp = any("damp" in r.metrics for r in worst)
        if damp:
            layers.add_column("damp", justify="right")
        if summary.calibration:
            layers.add_column("seconds", justify="right")
        for r in worst:
            cells = [r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.metrics['rel_error']:.4f}"]
            if damp:
                cells.append(f"{r.metrics.get('damp', 0):g}")
            if summary.calibration:
                cells.append(f"{r.seconds:.2f}")
            layers.add_row(*cells)
        out.print(layers)
    if summary.verification:
        v = summary.verification
        diff = f"; last block matches the run to {v['last_block_rel_diff']:.1e}" if "last_block_rel_diff" in v else ""
        out.print(f"verified: {v['modules']} modules read back exactly{diff}")
    if summary.evaluation:
        e = summary.evaluation
        out.print(f"evaluation on {e['dataset']} ({e['windows']} x {e['seqlen']} tokens): perplexity "
                  f"{e['perplexity']:.3f} (source {e['baseline_perplexity']:.3f}, ratio {e['ppl_ratio']:.4f}), "
                  f"KL {e['kl']:.5f}; added to the model card")
    if summary.pushed_to:
        out.print(f"uploaded to {summary.pushed_to}")
    scaled = [r for r in summary.layers if "alpha" in r.metrics]
    if scaled:
        _print_awq_groups(scaled)
    out.print(f"wrote {summary.output}")


def _print_awq_groups(reports: list) -> None:
    """AWQ's scale search, per Linear name over all blocks (every block's figures are in --log-json)."""
    rows: dict[str, list] = {}
    for r in reports:
        key = re.sub(r"\.\d+\.", ".*.", r.name)
        rows.setdefault(key, []).append(r.metrics)
    table = Table(title="AWQ scale search (mean over blocks; error of the inspected module, relative)")
    for col in ("layer", "alpha", "error at alpha 0", "error at chosen alpha"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for key, ms in rows.items():
        n = len(ms)
        table.add_row(f"{key} (x{n})", f"{sum(m['alpha'] for m in ms) / n:.2f}",
                      f"{sum(m['search_error_before'] for m in ms) / n:.3g}",
                      f"{sum(m['search_error_after'] for m in ms) / n:.3g}")
    out.print(table)


@app.command(help="Quantize MODEL with round-to-nearest (no calibration data needed).\n\n"
             "Example: quantize-llm rtn ./SmolLM2-135M-Instruct -o smol-w4g128 --bits 4 --group-size 128")
def rtn(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4, group_size: GroupSizeOpt = 128,
        sym: SymOpt = True, clip: ClipOpt = "minmax", format: FormatOpt = "gptq", keep_dense: KeepDenseOpt = None, device: DeviceOpt = "auto",
        overwrite: OverwriteOpt = False, resume: ResumeOpt = True,
        eval_file: EvalOpt = None, eval_windows: EvalWindowsOpt = 40, push_to_hub: PushOpt = None,
        strict_vllm: StrictVllmOpt = False, verify: VerifyOpt = True, max_shard_size: ShardOpt = "2GB", log_json: LogJsonOpt = None) -> None:
    _run_job(job_from_dict(dict(model=model, output=output, method="rtn", bits=bits, group_size=group_size, sym=sym,
                                format=format,
                                 keep_dense=keep_dense or [], options={"clip": clip}, **_run_keys(locals())),
                            "command line"), log_json)


@app.command(help="Quantize MODEL with GPTQ: error-compensating rounding from calibration data.\n\n"
             "Example: quantize-llm gptq ./SmolLM2-135M-Instruct -o smol-gptq --bits 4 --dataset c4.parquet")
def gptq(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4, group_size: GroupSizeOpt = 128,
         sym: SymOpt = True,
         act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="Quantize columns by decreasing activation (desc_act); stores g_idx.")] = False,
         static_groups: Annotated[bool, typer.Option("--static-groups", help="With --act-order: fix groups on the original column order (trivial g_idx).")] = False,
         damp: DampOpt = 0.01,
         block_size: BlockSizeOpt = 128,
         true_sequential: TrueSequentialOpt = True,
         clip: ClipOpt = "mse", format: FormatOpt = "gptq",
         dataset: DatasetOpt = "self", nsamples: NSamplesOpt = 128, seqlen: SeqlenOpt = 2048, seed: SeedOpt = 0,
         text_column: TextColumnOpt = "text", batch_size: BatchOpt = 8,
         keep_dense: KeepDenseOpt = None, device: DeviceOpt = "auto", overwrite: OverwriteOpt = False, resume: ResumeOpt = True,
        eval_file: EvalOpt = None, eval_windows: EvalWindowsOpt = 40, push_to_hub: PushOpt = None,
        strict_vllm: StrictVllmOpt = False, verify: VerifyOpt = True,
         max_shard_size: ShardOpt = "2GB", log_json: LogJsonOpt = None) -> None:
    if static_groups and not act_order:
        raise UsageError("--static-groups only changes something together with --act-order", "add --act-order or drop --static-groups")
    options = dict(block_size=block_size, damp=damp, static_groups=static_groups, true_sequential=true_sequential, clip=clip)
    _run_job(job_from_dict(dict(model=model, output=output, method="gptq", bits=bits, group_size=group_size, sym=sym,
                                format=format,
                                act_order=act_order, keep_dense=keep_dense or [], options=options,
                                calibration=_calibration(locals()), **_run_keys(locals())), "command line"), log_json)


@app.command(help="Quantize MODEL with AWQ: per-channel scales searched on calibration data and folded into "
             "the preceding norm or Linear, then a clip search per group, then rounding (RTN, or GPTQ with "
             "--then gptq). Writes the GPTQ layout, or the AutoAWQ GEMM layout with --format awq (4-bit).\n\n"
             "Example: quantize-llm awq ./SmolLM2-135M-Instruct -o smol-awq --bits 4 --dataset c4.parquet")
def awq(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4, group_size: GroupSizeOpt = 128,
        sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid or asymmetric (per-group zero, AWQ's default).")] = False,
        format: FormatOpt = "gptq",
        then: Annotated[str, typer.Option("--then", help="Rounding after scaling and clipping: rtn or gptq.")] = "rtn",
        grid: Annotated[int, typer.Option("--grid", help="Scale exponents tried per group: alpha = i/grid, i < grid.")] = 20,
        clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Search each group's range by output error after scaling.")] = True,
        max_shrink: Annotated[float, typer.Option("--max-shrink", help="The clip search shrinks ranges down to (1 - this).")] = 0.5,
        search_samples: Annotated[int, typer.Option("--search-samples", help="Calibration sequences the scale search runs the inspected modules on (0 = all).")] = 16,
        duo_scaling: Annotated[bool, typer.Option("--duo-scaling", help="AutoAWQ's scale variant: mean|x|^alpha / mean|w|^(1-alpha) (alpha 0 is then not plain rounding).")] = False,
        damp: DampOpt = 0.01,
        block_size: BlockSizeOpt = 128,
        true_sequential: TrueSequentialOpt = True,
        dataset: DatasetOpt = "self", nsamples: NSamplesOpt = 128, seqlen: SeqlenOpt = 2048, seed: SeedOpt = 0,
        text_column: TextColumnOpt = "text", batch_size: BatchOpt = 8,
        keep_dense: KeepDenseOpt = None, device: DeviceOpt = "auto", overwrite: OverwriteOpt = False, resume: ResumeOpt = True,
        eval_file: EvalOpt = None, eval_windows: EvalWindowsOpt = 40, push_to_hub: PushOpt = None,
        strict_vllm: StrictVllmOpt = False, verify: VerifyOpt = True,
        max_shard_size: ShardOpt = "2GB", log_json: LogJsonOpt = None) -> None:
    options = dict(grid=grid, clip=clip, max_shrink=max_shrink, search_samples=search_samples, then=then, damp=damp,
                   block_size=block_size, true_sequential=true_sequential, duo_scaling=duo_scaling)
    _run_job(job_from_dict(dict(model=model, output=output, method="awq", bits=bits, group_size=group_size, sym=sym,
                                format=format, keep_dense=keep_dense or [], options=options,
                                calibration=_calibration(locals()), **_run_keys(locals())), "command line"), log_json)


@app.command(help="Quantize MODEL with the outlier split: the few most damaging weights (or input channels) "
             "stay in float16 beside the low-bit codes. Weight mode scores weights by magnitude, or by "
             "w^2 / [H^-1]_jj with calibration data (always with --inner gptq); channel mode keeps input "
             "columns whose activations reach the threshold. Writes quantize-llm's outlier layout "
             "(docs/outlier-format.md), which load_quantized runs.\n\n"
             "Example: quantize-llm outlier ./SmolLM2-135M-Instruct -o smol-out --bits 3 --inner gptq "
             "--outlier-fraction 0.005 --dataset c4.parquet")
def outlier(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4,
            group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", help="Weights per scale along in_features; -1 = per output channel. Default 128; -1 in channel mode with --bits 8 (LLM.int8()'s per-row absmax).", show_default=False)] = None,
            sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric or asymmetric grid. Default asym; sym in channel mode with --bits 8.", show_default=False)] = None,
            inner: Annotated[str, typer.Option("--inner", help="Algorithm for the low-bit part: rtn or gptq.")] = "rtn",
            mode: Annotated[str, typer.Option("--mode", help="weight (scattered weights, CSR) or channel (whole input columns).")] = "weight",
            outlier_fraction: Annotated[Optional[float], typer.Option("--outlier-fraction", help="Share kept in float16 per layer (weights, or input columns in channel mode). Default 0.005 in weight mode.", show_default=False)] = None,
            outlier_threshold: Annotated[Optional[float], typer.Option("--outlier-threshold", help="Instead of a fraction: channel mode keeps columns with max |x| >= X (default 6.0); weight mode keeps weights whose sensitivity exceeds X^2 times the layer mean.", show_default=False)] = None,
            act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="With --inner gptq: columns by decreasing activation (stores g_idx).")] = False,
            clip: Annotated[Optional[str], typer.Option("--clip", help="Group range: minmax or mse. Default: minmax for rtn, mse for gptq.", show_default=False)] = None,
            damp: DampOpt = 0.01,
            block_size: BlockSizeOpt = 128,
            true_sequential: TrueSequentialOpt = True,
            dataset: Annotated[Optional[str], typer.Option("--dataset", help="Calibration text (a file, a datasets hub id, or 'self'). Needed by --inner gptq and channel mode (default: self); with --inner rtn in weight mode it switches scoring from magnitude to the inverse Hessian.", show_default=False)] = None,
            nsamples: NSamplesOpt = 128, seqlen: SeqlenOpt = 2048, seed: SeedOpt = 0,
            text_column: TextColumnOpt = "text", batch_size: BatchOpt = 8,
            keep_dense: KeepDenseOpt = None, device: DeviceOpt = "auto", overwrite: OverwriteOpt = False, resume: ResumeOpt = True,
        eval_file: EvalOpt = None, eval_windows: EvalWindowsOpt = 40, push_to_hub: PushOpt = None,
        strict_vllm: StrictVllmOpt = False, verify: VerifyOpt = True,
            max_shard_size: ShardOpt = "2GB", log_json: LogJsonOpt = None) -> None:
    if act_order and inner != "gptq":
        raise UsageError("--act-order only applies to --inner gptq", "add --inner gptq or drop --act-order")
    from ..algorithms.outlier import OutlierOptions

    options = dict(inner=inner, mode=mode, fraction=outlier_fraction, threshold=outlier_threshold,
                   calibrated=dataset is not None, clip=clip or ("mse" if inner == "gptq" else "minmax"),
                   damp=damp, block_size=block_size, true_sequential=true_sequential)
    needs_data = OutlierOptions(**options).needs_calibration
    _run_job(job_from_dict(dict(model=model, output=output, method="outlier", bits=bits, group_size=group_size, sym=sym,
                                act_order=act_order, keep_dense=keep_dense or [], options=options,
                                **({"calibration": _calibration({**locals(), "dataset": dataset or "self"})}
                                   if needs_data else {}),
                                **_run_keys(locals())), "command line"), log_json)


@app.command(help="Quantize MODEL to NF4 or FP4 in the bitsandbytes layout that stock transformers (with "
             "bitsandbytes) loads. --rounding gptq chooses the 4-bit codes with GPTQ's error feedback from "
             "calibration data, on the same per-block absmax.\n\n"
             "Example: quantize-llm nf4 ./SmolLM2-135M-Instruct -o smol-nf4\n\n"
             "Example: quantize-llm nf4 ./SmolLM2-135M-Instruct -o smol-nf4-gptq --rounding gptq --dataset c4.parquet")
def nf4(model: ModelArg, output: OutputOpt,
        blocksize: Annotated[int, typer.Option("--blocksize", help="Weights per absmax, over the flattened weight: 64 .. 4096.")] = 64,
        double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="Store the absmax as 8-bit codes with nested statistics (bitsandbytes' double quantization).")] = True,
        quant_type: Annotated[str, typer.Option("--quant-type", help="The 4-bit codebook: nf4 or fp4.")] = "nf4",
        rounding: Annotated[str, typer.Option("--rounding", help="nearest (bitsandbytes' own, no data) or gptq (needs calibration data).")] = "nearest",
        damp: DampOpt = 0.01,
        block_size: BlockSizeOpt = 128,
        true_sequential: TrueSequentialOpt = True,
        dataset: DatasetOpt = "self", nsamples: NSamplesOpt = 128, seqlen: SeqlenOpt = 2048, seed: SeedOpt = 0,
        text_column: TextColumnOpt = "text", batch_size: BatchOpt = 8,
        keep_dense: KeepDenseOpt = None, device: DeviceOpt = "auto", overwrite: OverwriteOpt = False, resume: ResumeOpt = True,
        eval_file: EvalOpt = None, eval_windows: EvalWindowsOpt = 40, push_to_hub: PushOpt = None,
        strict_vllm: StrictVllmOpt = False, verify: VerifyOpt = True,
        max_shard_size: ShardOpt = "2GB", log_json: LogJsonOpt = None) -> None:
    options = dict(rounding=rounding, block_size=block_size, damp=damp, true_sequential=true_sequential)
    _run_job(job_from_dict(dict(model=model, output=output, method="nf4", quant_type=quant_type, blocksize=blocksize,
                                double_quant=double_quant, keep_dense=keep_dense or [], options=options,
                                **({"calibration": _calibration(locals())} if rounding == "gptq" else {}),
                                **_run_keys(locals())), "command line"), log_json)


@app.command(help="Run the jobs of a recipe (TOML or YAML; see configs/). Every job is validated before the "
             "first one starts; jobs run in order and the run stops at the first failure, with its exit code.\n\n"
             "Example: quantize-llm run configs/llama3-8b-gptq-w4g128.toml\n\n"
             "Example (SLURM array): quantize-llm run jobs.toml --job-index $SLURM_ARRAY_TASK_ID --log-json log.jsonl")
def run(recipe: Annotated[Path, typer.Argument(help="The recipe file (.toml, .yaml or .yml).", show_default=False)],
        job_index: Annotated[Optional[int], typer.Option("--job-index", help="Run only job I (0-based), e.g. a scheduler's array index.", show_default=False)] = None,
        check: Annotated[bool, typer.Option("--check", help="Validate the recipe and list its jobs; run nothing.")] = False,
        log_json: LogJsonOpt = None) -> None:
    jobs = load_recipe(recipe)
    indices = _indices(recipe, jobs, job_index)
    if check:
        table = Table(title=f"{recipe}: {len(jobs)} job(s)")
        for col in ("index", "name", "method", "spec", "model", "output"):
            table.add_column(col)
        for i in indices:
            j = jobs[i]
            grid = f"w{j.spec.bits}g{j.spec.group_size} {'sym' if j.spec.sym else 'asym'}" if j.spec.codebook == "int" \
                else f"{j.spec.codebook} b{j.spec.blocksize}"
            table.add_row(str(i), j.name, j.spec.method, f"{grid} -> {j.spec.format}", j.model, str(j.output))
        out.print(table)
        return
    for i in indices:
        job = jobs[i]
        try:
            _run_job(job, log_json, command=f"quantize-llm run {shlex.quote(str(recipe))} --job-index {i}")
        except QuantizeError as exc:
            raise type(exc)(f"job {i} ({job.name}): {exc.message}", exc.hint) from None


@app.command(help="Print the memory, disk and time plan of a recipe's jobs before running them: peak host "
             "and device memory, disk for the output and the resume state, and with --time the expected "
             "time from quantizing the first block (into a temporary folder that is then removed).\n\n"
             "Example: quantize-llm plan configs/llama3-8b-gptq-w4g128.toml --time")
def plan(recipe: Annotated[Path, typer.Argument(help="The recipe file (.toml, .yaml or .yml).", show_default=False)],
         job_index: Annotated[Optional[int], typer.Option("--job-index", help="Plan only job I (0-based).", show_default=False)] = None,
         time_first_block: Annotated[bool, typer.Option("--time", help="Also time the first block (loads calibration data and runs it).")] = False) -> None:
    import tempfile
    import time

    from ..run.execute import quantize
    from ..run.plan import plan_run

    jobs = load_recipe(recipe)
    indices = _indices(recipe, jobs, job_index)
    for i in indices:
        job = jobs[i]
        run_plan = plan_run(job)
        out.print(Text.assemble((f"job {i} ({job.name})", "bold"), f": {len(run_plan.blocks)} blocks -> {job.output}"))
        for line in run_plan.lines():
            out.print(f"  {line}")
        for reason in run_plan.vllm:
            out.print(f"  warning: vLLM: {reason}")
        if time_first_block:
            timing: dict = {}

            def stop_after_first(kind: str, data: dict) -> None:
                if kind == "eta":
                    timing.update(data)
                    raise _PlanTimed
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=Path(job.output).expanduser().absolute().parent) as tmp:
                try:
                    quantize(job.model, Path(tmp) / "timing", job.spec, options=job.options,
                             calibration=job.calibration, device=job.device, batch_size=job.batch_size,
                             on_event=stop_after_first, resume=False)
                except _PlanTimed:
                    pass
            if timing:
                out.print(f"  time: the first block took {timing['first_block_seconds']:.1f} s after "
                          f"{time.perf_counter() - start - timing['first_block_seconds']:.1f} s of set-up; expected "
                          f"total about {timing['expected_seconds'] / 60:.1f} min")


class _PlanTimed(Exception):
    """Stops a timing run of `plan --time` once the first block is done."""


def _indices(recipe: Path, jobs: list, job_index: int | None) -> list[int]:
    if job_index is None:
        return list(range(len(jobs)))
    if not 0 <= job_index < len(jobs):
        raise UsageError(f"--job-index {job_index} is out of range: {recipe} has {len(jobs)} job(s)",
                         f"use 0 .. {len(jobs) - 1}")
    return [job_index]


@app.command(name="convert", help="Re-encode a quantized checkpoint (ours, or a GPTQ, AWQ or compressed-tensors "
             "checkpoint made by another tool) into another format without requantizing. Refused, naming the "
             "module and the reason, where the target cannot represent it exactly.\n\n"
             "Example: quantize-llm convert smol-gptq -o smol-ct --format compressed-tensors")
def convert_(path: Annotated[str, typer.Argument(help="A quantized checkpoint folder or hub id.", show_default=False)],
             output: OutputOpt,
             format: Annotated[str, typer.Option("--format", help="Target: gptq, awq, compressed-tensors (or outlier, bnb for their own results).", show_default=False)],
             overwrite: OverwriteOpt = False, max_shard_size: ShardOpt = "2GB", log_json: LogJsonOpt = None) -> None:
    from ..run.convert import convert
    from .progress import Reporter

    argv = click.globals.get_current_context().find_root().obj or sys.argv[1:]
    with Reporter(log_json, label="convert") as reporter:
        summary = convert(path, output, format, overwrite=overwrite, max_shard_bytes=parse_size(max_shard_size),
                          on_event=reporter, command="quantize-llm " + " ".join(shlex.quote(str(a)) for a in argv))
    out.print(f"converted {summary.modules} modules from {summary.source_format} to {summary.target_format} "
              f"in {summary.seconds:.1f} s: wrote {summary.output} ({_human(summary.output_bytes)})")


@app.command(help="List the quantized modules of a checkpoint, its size and its real bits per weight.\n\n"
             "Example: quantize-llm inspect smol-w4g128")
def inspect(path: Annotated[str, typer.Argument(help="A quantized checkpoint folder or hub id.")],
            all_modules: Annotated[bool, typer.Option("--all", help="List every module, not a summary by name.")] = False) -> None:
    from ..eval.inspection import inspect_checkpoint

    info = inspect_checkpoint(path)
    table = Table(title=f"{info.path} ({info.quant_method})")
    for col in ("module", "bits", "group", "sym", "shape (out x in)", "bytes"):
        table.add_column(col, justify="left" if col == "module" else "right")
    rows: dict[str, list] = {}
    for m in info.modules:
        key = m.name if all_modules else re.sub(r"\.\d+\.", ".*.", m.name)
        group = f"{m.codebook} b{m.group_size}" if m.codebook != "int" else \
            "channel" if m.group_size == -1 else str(m.group_size)
        sym = "-" if m.codebook != "int" else "yes" if m.sym else "no"
        row = rows.setdefault(key, [key, m.bits, group, sym, m.shape, 0, 0])
        row[5] += m.nbytes
        row[6] += 1
    for key, (name, bits, group, sym, shape, nbytes, count) in rows.items():
        label = name if count == 1 else f"{name} (x{count})"
        table.add_row(label, str(bits), group, sym, f"{shape[0]} x {shape[1]}", f"{nbytes:,}")
    out.print(table)
    out.print(f"quantized modules: {len(info.modules)}   quantized weights: {info.quantized_params:,}")
    out.print(f"quantized tensors: {_human(info.quantized_bytes)}   whole checkpoint: {_human(info.total_bytes)}")
    what = "codes, absmax and their nested statistics" if any(m.codebook != "int" for m in info.modules) \
        else "codes, scales, zeros, g_idx and the float16 outliers with their indices" \
        if info.quant_method == "quantize_llm_outlier" else "codes, scales, zeros and g_idx"
    out.print(f"bits per weight: {info.bits_per_weight:.3f} ({what})")


@app.command(name="eval", help="Perplexity on a text file (BENCHMARKS.md protocol Q); with --baseline, "
             "also the KL divergence to the unquantized model.\n\n"
             "Example: quantize-llm eval smol-w4g128 --dataset wiki.test.raw --baseline ./SmolLM2-135M-Instruct")
def eval_(model: ModelArg,
          dataset: Annotated[Path, typer.Option("--dataset", help="UTF-8 text file, read as one string.", show_default=False)],
          seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window.")] = 512,
          windows: Annotated[int, typer.Option("--windows", help="Number of windows; 0 = the whole text.")] = 40,
          baseline: Annotated[Optional[str], typer.Option("--baseline", help="Unquantized model for KL and the perplexity ratio.", show_default=False)] = None,
          device: DeviceOpt = "auto", log_json: LogJsonOpt = None) -> None:
    from ..eval.evaluate import run_eval
    from .progress import Reporter

    with Reporter(log_json, label="eval") as reporter:
        result = run_eval(model, dataset, seqlen=seqlen, windows=windows, baseline=baseline, device=device,
                          on_event=reporter)
    table = Table(title=f"{model} on {dataset.name} ({result.windows} x {result.seqlen} tokens)")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("KL to baseline", justify="right")
    if result.baseline_perplexity is not None:
        table.add_row(str(baseline), f"{result.baseline_perplexity:.3f}", "1.000", "-")
        table.add_row(model, f"{result.perplexity:.3f}", f"{result.ppl_ratio:.4f}", f"{result.kl:.5f}")
    else:
        table.add_row(model, f"{result.perplexity:.3f}", "-", "-")
    out.print(table)


@app.command(help="Generate text from MODEL (a quantized checkpoint through our loader and its CUDA kernels, or an "
                  "unquantized one through transformers) and report tokens per second.\n\n"
                  "Example: quantize-llm generate ./smol-w4g128 \"The capital of France is\" --max-new-tokens 32")
def generate(model: ModelArg,
             prompt: Annotated[str, typer.Argument(help="The prompt text.", show_default=False)],
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="New tokens to generate.")] = 64,
             temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; above 0, sampling.")] = 0.0,
             top_p: Annotated[float, typer.Option("--top-p", help="Sampling: nucleus probability mass.")] = 1.0,
             seed: Annotated[int, typer.Option("--seed", help="Sampling: random seed.")] = 0,
             chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
             ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Always generate --max-new-tokens tokens (for timing).")] = False,
             backend: Annotated[str, typer.Option("--backend", help="auto (CUDA kernels where they load), cuda (insist), torch (PyTorch path).")] = "auto",
             dtype: Annotated[str, typer.Option("--dtype", help="Activations: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")] = "auto",
             device: DeviceOpt = "auto") -> None:
    from ..eval.generate import generate as run_generate

    result = run_generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, chat=chat, device=device, backend=backend, dtype=dtype, ignore_eos=ignore_eos)
    out.print(result.text, markup=False, highlight=False)
    Console(stderr=True, highlight=False).print(
        f"{result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
        f"(prompt {result.prompt_tokens} tokens; {result.device}, {result.dtype}, {result.backend})", markup=False)


@app.command(help="Versions and the state of the CUDA kernel.")
def env() -> None:
    import torch
    import transformers

    from ..runtime.ops import kernel_status

    status = kernel_status()
    out.print(f"quantize-llm {__version__}")
    out.print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    out.print(f"CUDA available: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    out.print(f"dequant-matmul kernel: {'available' if status.available else 'not available'} ({status.reason})")


def _fail(message: str, code: int) -> None:
    """The one line every failure ends with (user data in it is printed as text, never as markup)."""
    Console(stderr=True, highlight=False).print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise SystemExit(code)


INTERRUPTED = "interrupted; nothing was written"
DEBUG_ON = ("1", "true", "yes", "on")


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's pre-emption) ends the run like Ctrl-C: temp files removed, exit 130."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and maps every expected failure to one line and an exit code."""
    debug = os.environ.get("QUANTIZE_LLM_DEBUG", "").strip().lower() in DEBUG_ON
    if argv is None:   # the real command line, not a test calling main() in-process
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(args=argv, prog_name="quantize-llm", standalone_mode=False,
                   obj=list(sys.argv[1:] if argv is None else argv))
    except QuantizeError as exc:
        if debug:
            traceback.print_exc()
        _fail(exc.one_line(), exc.exit_code)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:
        exc.show()
        raise SystemExit(2) from None
    except click.ClickException as exc:
        command = f" {exc.ctx.info_name}" if getattr(exc, "ctx", None) and exc.ctx.parent else ""
        _fail(f"{exc.format_message()} (see quantize-llm{command} --help)", 2)
    except (KeyboardInterrupt, getattr(click.exceptions, "Abort", KeyboardInterrupt)):
        _fail(INTERRUPTED, 130)
    except Exception as exc:  # noqa: BLE001  (the one boundary: no traceback without QUANTIZE_LLM_DEBUG)
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(rerun with QUANTIZE_LLM_DEBUG=1 for a traceback, and report it)", 1)
    if code == 130:  # typer turns KeyboardInterrupt into exit code 130 itself
        _fail(INTERRUPTED, 130)
    raise SystemExit(code if isinstance(code, int) else 0)
