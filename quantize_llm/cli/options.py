"""The options of the commands, each defined once.

A single option is an `Annotated` alias (`BitsOpt`, `DeviceOpt`, ...) that any command can name. Options
that several commands take together form an option group: a frozen dataclass whose fields are such
aliases with their defaults. A command takes a group as one typed parameter (`run: RunOptions`), and
`@grouped_options` shows Typer the group's fields as options of their own, then hands the command the
built group:

    @app.command()
    @grouped_options
    def gptq(model: ModelArg, output: OutputOpt, ..., solver: SolverOptions, calibration: CalibrationOptions,
             run: RunOptions) -> None:
        ... solver.damp ... run.job_keys() ...
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer


def _not_empty(value: str | None) -> str | None:
    """-o "" (or an unset variable) would name the current folder: refused before anything."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty; name the folder to write, e.g. -o model-w4")
    return value


ModelArg = Annotated[str, typer.Argument(help="A local checkpoint folder, a Hugging Face hub id, or a hub cache "
                                              "entry.", show_default=False)]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Folder to write (created atomically).",
                                        show_default=False, callback=_not_empty)]
RecipeArg = Annotated[Path, typer.Argument(help="The recipe file (.toml, .yaml or .yml).", show_default=False)]

# ---- the quantization grid -------------------------------------------------------------------------
BitsOpt = Annotated[int, typer.Option("--bits", "-b", help="Bits per weight: 2, 3, 4 or 8.")]
GroupSizeOpt = Annotated[int, typer.Option("--group-size", "-g", help="Weights per scale along in_features; -1 = "
                                                                      "per output channel.")]
SymOpt = Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid (zero fixed; vLLM's fast kernels) or "
                                                           "asymmetric (per-group zero).")]
ClipOpt = Annotated[str, typer.Option("--clip", help="Group range: minmax, or mse (shrink the range where it lowers "
                                                     "the rounding error).")]
GptqClipOpt = Annotated[str, typer.Option("--clip", help="Group range: minmax; mse (shrink the range where it lowers "
                                                         "the diag(H)-weighted rounding error); or feedback (mse's "
                                                         "range or one shrunk by 1 .. 0.7, whichever costs least "
                                                         "with GPTQ's error feedback inside the group).")]
QepOpt = Annotated[float, typer.Option("--qep", help="Fit the float model's outputs: each Linear's target is "
                                                    "corrected for the error of its (quantized model's) inputs by this "
                                                    "strength, 0..1 (1: GPTAQ's asymmetric objective; 0: plain "
                                                    "GPTQ). Runs the float model's activations beside.")]
FormatOpt = Annotated[str, typer.Option("--format", help="gptq (GPTQ layout), awq (AutoAWQ GEMM, 4-bit only) or "
                                                         "compressed-tensors (pack-quantized, 2/4/8-bit); rtn, gptq "
                                                         "and awq also write gguf (one llama.cpp file, Q4_K_M) or "
                                                         "gguf:TYPE (Q8_0, "
                                                         "Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K, Q4_K_M, "
                                                         "Q3_K_M).")]
KeepDenseOpt = Annotated[list[str] | None, typer.Option("--keep-dense", help="Regex of Linear names to leave "
                                                           "unquantized (repeatable).", show_default=False)]

# ---- run settings ---------------------------------------------------------------------------------------
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N; quantizing commands also take "
                                        "a list such as cuda:0,cuda:1 and spread calibrated runs over it (same "
                                        "checkpoint as one device).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 2GB or 500MB.")]
MaxMemoryOpt = Annotated[str | None, typer.Option("--max-memory", help="The most memory a calibrated run may plan "
                                                  "for on its work device (host RAM on a CPU, GPU memory on a GPU), "
                                                  "e.g. 20GB; default: what is free. The plan keeps activations away "
                                                  "or holds blocks narrow to fit it, or refuses.", show_default=False)]
LogJsonOpt = Annotated[Path | None, typer.Option("--log-json", help="Append one JSON event per line to this file "
                                                    "('-' = stdout).", show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Record each finished block beside OUT and, "
                                         "when an interrupted run of the same job left some, continue from there.")]
EvalOpt = Annotated[Path | None, typer.Option("--eval", help="After writing, measure perplexity and KL divergence "
                                                 "against the source model on this text file and put them in the "
                                                 "model card.", show_default=False)]
EvalWindowsOpt = Annotated[int, typer.Option("--eval-windows", help="With --eval: windows of 512 tokens (0 = the "
                                                                    "whole text).")]
PushOpt = Annotated[str | None, typer.Option("--push-to-hub", help="Upload the finished checkpoint to this hub "
                                                "repository (user/name; private when created).", show_default=False)]
StrictVllmOpt = Annotated[bool, typer.Option("--strict-vllm", help="Refuse combinations that vLLM would serve "
                                             "without its fast kernels (or not at all), instead of warning.")]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="Read the written checkpoint back before "
                                         "renaming it into place: every module must decode to its result, and "
                                         "(calibrated runs) the loaded model must reproduce the run's last-block "
                                         "outputs.")]

TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model whose config.json "
                                                  "names code of its own (auto_map) and run that Python code "
                                                  "from its folder. Off: such a model is refused.")]

# ---- calibration and the solve -----------------------------------------------------------------------
DatasetOpt = Annotated[str, typer.Option("--dataset", help="Calibration text: a .txt/.jsonl/.json/.parquet file, "
                                         "a datasets hub id (org/name[:config[:split]]), or 'self' (the model "
                                         "writes its own).")]
NSamplesOpt = Annotated[int, typer.Option("--nsamples", help="Calibration sequences.")]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", help="Tokens per calibration sequence (capped by the model's "
                                                         "context).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for self-generated calibration text.")]
TextColumnOpt = Annotated[str, typer.Option("--text-column", help="Column or field holding the text.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Calibration sequences per forward pass.")]
GenerationMemoryOpt = Annotated[str | None, typer.Option(
    "--generation-memory", help="Without --dataset: the most of the float model's weights held in memory (a GPU's "
    "on a GPU) at once while it writes its calibration text, e.g. 4GB; the rest is read from the checkpoint's files "
    "at every step (slower). Default: the whole model when it fits in free memory, else what fits.",
    show_default=False)]
DampOpt = Annotated[float, typer.Option("--damp", help="Where GPTQ runs (gptq, --then gptq, --inner gptq, --rounding "
                                        "gptq) or the inverse Hessian is used: added to diag(H) as a fraction of "
                                        "its mean.")]
BlockSizeOpt = Annotated[int, typer.Option("--block-size", help="Where GPTQ runs: columns per lazy-update block.")]
TrueSequentialOpt = Annotated[bool, typer.Option("--true-sequential/--no-true-sequential", help="Calibrated runs: "
                                                 "re-run the block between q/k/v, o, gate/up and down.")]


@dataclass(frozen=True)
class RunOptions:
    """Where a quantizing command runs, what it writes and checks, and where its events go."""

    device: DeviceOpt = "auto"
    overwrite: OverwriteOpt = False
    resume: ResumeOpt = True
    eval_file: EvalOpt = None            # --eval: the text file the written checkpoint is measured on
    eval_windows: EvalWindowsOpt = 40
    push_to_hub: PushOpt = None
    strict_vllm: StrictVllmOpt = False
    verify: VerifyOpt = True
    trust_remote_code: TrustRemoteCodeOpt = False
    max_shard_size: ShardOpt = "2GB"
    max_memory: MaxMemoryOpt = None
    log_json: LogJsonOpt = None          # the command's event log, not part of the job

    def job_keys(self) -> dict[str, Any]:
        """These settings as a recipe job's keys (recipe.py checks them like a recipe's)."""
        keys: dict[str, Any] = {"device": self.device, "overwrite": self.overwrite, "resume": self.resume,
                                "strict_vllm": self.strict_vllm, "verify": self.verify,
                                "max_shard_size": self.max_shard_size}
        if self.trust_remote_code:
            keys["trust_remote_code"] = True
        if self.max_memory is not None:
            keys["max_memory"] = self.max_memory
        if self.push_to_hub is not None:
            keys["push_to_hub"] = self.push_to_hub
        if self.eval_file is not None:
            keys["eval"] = {"dataset": str(self.eval_file), "windows": self.eval_windows}
        return keys


TargetBpwOpt = Annotated[float | None, typer.Option("--target-bpw", help="Choose each Linear's bits and group size "
                                                    "for this budget of stored bits per weight (scales, zeros and "
                                                    "g_idx included), from measured errors and sensitivities; "
                                                    "written as per-module overrides.", show_default=False)]
TargetSizeOpt = Annotated[str | None, typer.Option("--target-size", help="As --target-bpw, for a budget on the whole "
                                                   "checkpoint's tensor bytes (e.g. 90MB, 4.5GB; embeddings and head "
                                                   "at their stored size).", show_default=False)]


@dataclass(frozen=True)
class BudgetOptions:
    """Per-module settings chosen for a size budget (run/budget.py)."""

    target_bpw: TargetBpwOpt = None
    target_size: TargetSizeOpt = None

    def job_keys(self) -> dict[str, Any]:
        return {k: v for k, v in (("target_bpw", self.target_bpw), ("target_size", self.target_size)) if v is not None}


@dataclass(frozen=True)
class CalibrationOptions:
    """The calibration text of the methods that use data, and how many sequences a forward pass takes."""

    dataset: DatasetOpt = "self"
    nsamples: NSamplesOpt = 128
    seqlen: SeqlenOpt = 2048
    seed: SeedOpt = 0
    text_column: TextColumnOpt = "text"
    batch_size: BatchOpt = 8
    generation_memory: GenerationMemoryOpt = None

    def table(self) -> dict[str, Any]:
        """The recipe's calibration table these options describe."""
        table: dict[str, Any] = {"dataset": self.dataset, "nsamples": self.nsamples, "seqlen": self.seqlen,
                                 "seed": self.seed, "text_column": self.text_column}
        if self.generation_memory is not None:
            table["generation_memory"] = self.generation_memory
        return table


@dataclass(frozen=True)
class SolverOptions:
    """GPTQ's solve, wherever a method runs it, and how a calibrated run walks a block."""

    damp: DampOpt = 0.01
    block_size: BlockSizeOpt = 128
    true_sequential: TrueSequentialOpt = True

    def options(self) -> dict[str, Any]:
        """The entries of the method's options table these settings fill."""
        return {"damp": self.damp, "block_size": self.block_size, "true_sequential": self.true_sequential}


def grouped_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with each parameter whose annotation is an option group replaced, for Typer, by the
    group's fields; the call builds the group from them and passes it to `command` under its name."""
    groups: dict[str, type] = {}
    params: list[inspect.Parameter] = []
    for param in inspect.signature(command, eval_str=True).parameters.values():
        if not (isinstance(param.annotation, type) and dataclasses.is_dataclass(param.annotation)):
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        group = param.annotation
        groups[param.name] = group
        hints = typing.get_type_hints(group, include_extras=True)
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                     annotation=hints[f.name]) for f in dataclasses.fields(group)]
    names = [p.name for p in params]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TypeError(f"{command.__name__}: option {', '.join(repeated)} is declared twice")

    @functools.wraps(command)
    def call(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group(**{f.name: values.pop(f.name) for f in dataclasses.fields(group)})
        return command(**values)

    call.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # what Typer reads
    call.__annotations__ = {p.name: p.annotation for p in params}
    return call
