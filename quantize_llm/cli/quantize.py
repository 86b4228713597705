"""The five quantizing commands (rtn, gptq, awq, outlier, nf4) and `run_job`, which every quantizing
command and recipe job ends in.

A command turns its options into a recipe job's keys and goes through `job_from_dict`, so a command and
its one-job recipe are one code path (recipe.py).
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..run.recipe import COMMAND_LINE, Job, job_from_dict, parse_size
from .app import app, click
from .options import (
    BitsOpt,
    BudgetOptions,
    CalibrationOptions,
    ClipOpt,
    FormatOpt,
    GptqClipOpt,
    GroupSizeOpt,
    KeepDenseOpt,
    ModelArg,
    OutputOpt,
    QepOpt,
    RunOptions,
    SolverOptions,
    SymOpt,
    grouped_options,
)
from .report import Results, print_summary


def run_job(job: Job, log_json: Path | None, command: str | None = None) -> None:
    """Run one job with progress on stderr and the summary as results. `command` is what the model
    card records (default: this process's command line)."""
    from ..run.execute import quantize
    from .progress import Reporter

    if command is None:
        argv = click.globals.get_current_context().find_root().obj or sys.argv[1:]
        command = "quantize-llm " + " ".join(shlex.quote(str(a)) for a in argv)
    with Reporter(log_json, label=job.spec.method, job=job.name) as reporter:
        summary = quantize(job.model, job.output, job.spec, options=job.options, calibration=job.calibration,
                           device=job.device, overwrite=job.overwrite, max_shard_bytes=parse_size(job.max_shard_size),
                           batch_size=job.batch_size, on_event=reporter, command=command, resume=job.resume,
                           evaluation=job.evaluation, push_to_hub=job.push_to_hub, strict_vllm=job.strict_vllm,
                           verify=job.verify, trust_remote_code=job.trust_remote_code, budget=job.budget,
                           max_memory=job.max_memory)
    print_summary(summary, job.spec, Results(log_json))


def command_job(method: str, model: str, output: str, run: RunOptions, *, spec: dict[str, Any],
                options: dict[str, Any], calibration: CalibrationOptions | None = None,
                uses_data: bool = True, budget: BudgetOptions | None = None) -> Job:
    """The job a method command describes. `spec`: the grid keys (bits, group_size, ...; None = the
    method's default); `options`: the method's options table; `calibration`: the command's calibration
    options (their batch size and generation memory are always checked; their text is the job's when
    `uses_data`)."""
    keys: dict[str, Any] = {"model": model, "output": output, "method": method, **spec, "options": options,
                            **run.job_keys(), **(budget.job_keys() if budget is not None else {})}
    if calibration is not None:
        keys["batch_size"] = calibration.batch_size
        if calibration.generation_memory is not None:   # checked like the batch size, whether text is written or not
            parse_size(calibration.generation_memory, "--generation-memory")
        if uses_data:
            keys["calibration"] = calibration.table()
    return job_from_dict(keys, COMMAND_LINE)


@app.command(help="Quantize MODEL with round-to-nearest (no calibration data needed).\n\n"
             "Example: quantize-llm rtn ./SmolLM2-135M-Instruct -o smol-w4g128 --bits 4 --group-size 128")
@grouped_options
def rtn(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4, group_size: GroupSizeOpt = 128, sym: SymOpt = True,
        clip: ClipOpt = "minmax", format: FormatOpt = "gptq", keep_dense: KeepDenseOpt = None, *,
        budget: BudgetOptions, run: RunOptions) -> None:
    job = command_job("rtn", model, output, run, options={"clip": clip}, budget=budget,
                      spec=dict(bits=bits, group_size=group_size, sym=sym, format=format, keep_dense=keep_dense))
    run_job(job, run.log_json)


@app.command(help="Quantize MODEL with GPTQ: error-compensating rounding from calibration data.\n\n"
             "Example: quantize-llm gptq ./SmolLM2-135M-Instruct -o smol-gptq --bits 4 --dataset c4.parquet")
@grouped_options
def gptq(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4, group_size: GroupSizeOpt = 128, sym: SymOpt = True,
         act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="Quantize columns by decreasing "
                                                 "activation (desc_act); stores g_idx.")] = False,
         static_groups: Annotated[bool, typer.Option("--static-groups", help="With --act-order: fix groups on the "
                                                     "original column order (trivial g_idx).")] = False,
         clip: GptqClipOpt = "mse", qep: QepOpt = 0.0, format: FormatOpt = "gptq", keep_dense: KeepDenseOpt = None,
         *, solver: SolverOptions, calibration: CalibrationOptions, budget: BudgetOptions, run: RunOptions) -> None:
    if static_groups and not act_order:
        raise UsageError("--static-groups only changes something together with --act-order",
                         "add --act-order or drop --static-groups")
    job = command_job("gptq", model, output, run, calibration=calibration, budget=budget,
                      spec=dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order, format=format,
                                keep_dense=keep_dense),
                      options=dict(solver.options(), static_groups=static_groups, clip=clip, qep=qep))
    run_job(job, run.log_json)


@app.command(help="Quantize MODEL with AWQ: per-channel scales searched on calibration data and folded into "
             "the preceding norm or Linear, then a clip search per group, then rounding (RTN, or GPTQ with "
             "--then gptq). Writes the GPTQ layout, or the AutoAWQ GEMM layout with --format awq (4-bit).\n\n"
             "Example: quantize-llm awq ./SmolLM2-135M-Instruct -o smol-awq --bits 4 --dataset c4.parquet")
@grouped_options
def awq(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4, group_size: GroupSizeOpt = 128,
        sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid or asymmetric (per-group zero, AWQ's "
                                          "default).")] = False,
        format: FormatOpt = "gptq",
        then: Annotated[str, typer.Option("--then", help="Rounding after scaling and clipping: rtn or gptq.")] = "rtn",
        grid: Annotated[int, typer.Option("--grid", help="Scale exponents tried per group: alpha = i/grid, "
                                          "i < grid.")] = 20,
        clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Search each group's range by output error "
                                           "after scaling.")] = True,
        max_shrink: Annotated[float, typer.Option("--max-shrink", help="The clip search shrinks ranges down to "
                                                  "(1 - this).")] = 0.5,
        search_samples: Annotated[int, typer.Option("--search-samples", help="Calibration sequences the scale "
                                                    "search runs the inspected modules on (0 = all).")] = 16,
        duo_scaling: Annotated[bool, typer.Option("--duo-scaling", help="AutoAWQ's scale variant: mean|x|^alpha / "
                                                  "mean|w|^(1-alpha) (alpha 0 is then not plain rounding).")] = False,
        keep_dense: KeepDenseOpt = None, *,
        solver: SolverOptions, calibration: CalibrationOptions, budget: BudgetOptions, run: RunOptions) -> None:
    job = command_job("awq", model, output, run, calibration=calibration, budget=budget,
                      spec=dict(bits=bits, group_size=group_size, sym=sym, format=format, keep_dense=keep_dense),
                      options=dict(solver.options(), grid=grid, clip=clip, max_shrink=max_shrink,
                                   search_samples=search_samples, then=then, duo_scaling=duo_scaling))
    run_job(job, run.log_json)


@dataclass(frozen=True)
class OutlierCalibration(CalibrationOptions):
    """The outlier split's calibration options: without --dataset, weight mode with --inner rtn uses no data."""

    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="Calibration text (a file, a datasets hub id, or 'self'). Needed by --inner gptq and channel "
        "mode (default: self); with --inner rtn in weight mode it switches scoring from magnitude to the inverse "
        "Hessian.", show_default=False)] = None  # type: ignore[assignment]  # None: decided by the mode

    def table(self) -> dict[str, Any]:
        """Where the split uses data, text the model writes itself unless --dataset names some."""
        return {**super().table(), "dataset": self.dataset or "self"}


@app.command(help="Quantize MODEL with the outlier split: the few most damaging weights (or input channels) "
             "stay in float16 beside the low-bit codes. Weight mode scores weights by magnitude, or by "
             "w^2 / [H^-1]_jj with calibration data (always with --inner gptq); channel mode keeps input "
             "columns whose activations reach the threshold. Writes quantize-llm's outlier layout "
             "(docs/outlier-format.md), which load_quantized runs.\n\n"
             "Example: quantize-llm outlier ./SmolLM2-135M-Instruct -o smol-out --bits 3 --inner gptq "
             "--outlier-fraction 0.005 --dataset c4.parquet")
@grouped_options
def outlier(model: ModelArg, output: OutputOpt, bits: BitsOpt = 4,
            group_size: Annotated[int | None, typer.Option(
                "--group-size", "-g", help="Weights per scale along in_features; -1 = per output channel. Default "
                "128; -1 in channel mode with --bits 8 (LLM.int8()'s per-row absmax).", show_default=False)] = None,
            sym: Annotated[bool | None, typer.Option(
                "--sym/--asym", help="Symmetric or asymmetric grid. Default asym; sym in channel mode with --bits 8.",
                show_default=False)] = None,
            inner: Annotated[str, typer.Option("--inner", help="Algorithm for the low-bit part: rtn or gptq.")] = "rtn",
            mode: Annotated[str, typer.Option("--mode", help="weight (scattered weights, CSR) or channel (whole "
                                              "input columns).")] = "weight",
            outlier_fraction: Annotated[float | None, typer.Option(
                "--outlier-fraction", help="Share kept in float16 per layer (weights, or input columns in channel "
                "mode). Default 0.005 in weight mode.", show_default=False)] = None,
            outlier_threshold: Annotated[float | None, typer.Option(
                "--outlier-threshold", help="Instead of a fraction: channel mode keeps columns with max |x| >= X "
                "(default 6.0); weight mode keeps weights whose sensitivity exceeds X^2 times the layer mean.",
                show_default=False)] = None,
            act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="With --inner gptq: columns "
                                                    "by decreasing activation (stores g_idx).")] = False,
            clip: Annotated[str | None, typer.Option("--clip", help="Group range: minmax or mse. Default: minmax "
                                                        "for rtn, mse for gptq.", show_default=False)] = None,
            keep_dense: KeepDenseOpt = None, *,
            solver: SolverOptions, calibration: OutlierCalibration, run: RunOptions) -> None:
    from ..algorithms.outlier import OutlierOptions

    if act_order and inner != "gptq":
        raise UsageError("--act-order only applies to --inner gptq", "add --inner gptq or drop --act-order")
    options = dict(solver.options(), inner=inner, mode=mode, fraction=outlier_fraction, threshold=outlier_threshold,
                   calibrated=calibration.dataset is not None, clip=clip or ("mse" if inner == "gptq" else "minmax"))
    job = command_job("outlier", model, output, run, calibration=calibration,
                      uses_data=OutlierOptions(**options).needs_calibration,
                      spec=dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order, keep_dense=keep_dense),
                      options=options)
    run_job(job, run.log_json)


@app.command(help="Quantize MODEL to NF4 or FP4 in the bitsandbytes layout that stock transformers (with "
             "bitsandbytes) loads. --rounding gptq chooses the 4-bit codes with GPTQ's error feedback from "
             "calibration data, on the same per-block absmax.\n\n"
             "Example: quantize-llm nf4 ./SmolLM2-135M-Instruct -o smol-nf4\n\n"
             "Example: quantize-llm nf4 ./SmolLM2-135M-Instruct -o smol-nf4-gptq --rounding gptq --dataset c4.parquet")
@grouped_options
def nf4(model: ModelArg, output: OutputOpt,
        blocksize: Annotated[int, typer.Option("--blocksize", help="Weights per absmax, over the flattened weight: "
                                               "64 .. 4096.")] = 64,
        double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="Store the absmax as "
                                                   "8-bit codes with nested statistics (bitsandbytes' double "
                                                   "quantization).")] = True,
        quant_type: Annotated[str, typer.Option("--quant-type", help="The 4-bit codebook: nf4 or fp4.")] = "nf4",
        rounding: Annotated[str, typer.Option("--rounding", help="nearest (bitsandbytes' own, no data) or gptq "
                                              "(needs calibration data).")] = "nearest",
        keep_dense: KeepDenseOpt = None, *,
        solver: SolverOptions, calibration: CalibrationOptions, run: RunOptions) -> None:
    job = command_job("nf4", model, output, run, calibration=calibration, uses_data=rounding == "gptq",
                      spec=dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                keep_dense=keep_dense),
                      options=dict(solver.options(), rounding=rounding))
    run_job(job, run.log_json)
