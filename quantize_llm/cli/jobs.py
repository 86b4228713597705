"""The commands that read a recipe: run (its jobs, in order) and plan (their memory, disk and time)."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ..errors import QuantizeError, UsageError
from ..run.recipe import load_recipe
from .app import app
from .options import LogJsonOpt, RecipeArg, TrustRemoteCodeOpt
from .quantize import run_job
from .report import Results, out, print_jobs


@app.command(help="Run the jobs of a recipe (TOML or YAML; see configs/). Every job is validated before the "
             "first one starts; jobs run in order and the run stops at the first failure, with its exit code.\n\n"
             "Example: quantize-llm run configs/llama3-8b-gptq-w4g128.toml\n\n"
             "Example (SLURM array): quantize-llm run jobs.toml --job-index $SLURM_ARRAY_TASK_ID --log-json log.jsonl")
def run(recipe: RecipeArg,
        job_index: Annotated[int | None, typer.Option("--job-index", help="Run only job I (0-based), e.g. a "
                                                         "scheduler's array index.", show_default=False)] = None,
        check: Annotated[bool, typer.Option("--check", help="Validate the recipe and list its jobs; run "
                                            "nothing.")] = False,
        trust_remote_code: TrustRemoteCodeOpt = False, log_json: LogJsonOpt = None) -> None:
    jobs = _trusting(load_recipe(recipe), trust_remote_code)
    indices = _indices(recipe, jobs, job_index)
    if check:
        print_jobs(recipe, jobs, indices, Results(log_json))
        return
    for i in indices:
        job = jobs[i]
        try:
            run_job(job, log_json, command=f"quantize-llm run {shlex.quote(str(recipe))} --job-index {i}")
        except QuantizeError as exc:
            raise type(exc)(f"job {i} ({job.name}): {exc.message}", exc.hint) from None


@app.command(help="Print the memory, disk and time plan of a recipe's jobs before running them: peak host "
             "and device memory, disk for the output and the resume state, and with --time the expected "
             "time from quantizing the first block (into a temporary folder that is then removed).\n\n"
             "Example: quantize-llm plan configs/llama3-8b-gptq-w4g128.toml --time")
def plan(recipe: RecipeArg,
         job_index: Annotated[int | None, typer.Option("--job-index", help="Plan only job I (0-based).",
                                                       show_default=False)] = None,
         time_first_block: Annotated[bool, typer.Option(
             "--time", help="Also time the first block (loads calibration data and runs it).")] = False,
         target_bpw: Annotated[str | None, typer.Option(
             "--target-bpw", help="Budgets in bits per weight, comma-separated (e.g. 3.5,4.0,4.5): print each "
             "one's predicted allocation (one measurement pass, cached beside OUT).", show_default=False)] = None,
         trust_remote_code: TrustRemoteCodeOpt = False) -> None:
    import tempfile
    import time

    from ..models.load import remote_code_warning
    from ..run.execute import quantize
    from ..run.plan import plan_run

    jobs = _trusting(load_recipe(recipe), trust_remote_code)
    indices = _indices(recipe, jobs, job_index)
    if target_bpw is not None:
        _plan_budgets(jobs, indices, target_bpw)
        return
    for i in indices:
        job = jobs[i]
        if job.trust_remote_code:
            out.print(f"  warning: {remote_code_warning(job.model)}")
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
                             on_event=stop_after_first, resume=False, trust_remote_code=job.trust_remote_code)
                except _PlanTimed:
                    pass
            if timing:
                out.print(f"  time: the first block took {timing['first_block_seconds']:.1f} s after "
                          f"{time.perf_counter() - start - timing['first_block_seconds']:.1f} s of set-up; expected "
                          f"total about {timing['expected_seconds'] / 60:.1f} min")


def _plan_budgets(jobs: list, indices: list[int], budgets: str) -> None:
    """`plan --target-bpw 3.5,4.0`: each job's allocation at each budget, and the uniform settings beside."""
    from dataclasses import replace

    from ..run.budget import Budget
    from ..run.plan import plan_run

    try:
        values = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--target-bpw {budgets!r} is not a list of numbers", "write it like 3.5,4.0,4.5") from None
    if not values:
        raise UsageError("--target-bpw names no budget", "write it like 3.5,4.0,4.5")
    for i in indices:
        job = jobs[i]
        if job.spec.method not in ("rtn", "gptq", "awq"):
            raise UsageError(f"job {i} ({job.name}): --target-bpw is supported for rtn, gptq and awq")
        out.print(Text.assemble((f"job {i} ({job.name})", "bold"), f": {job.model}"))
        choice = None
        for value in values:
            choice = plan_run(replace(job, budget=Budget(bpw=value))).allocation
            for line in choice.lines():
                out.print(f"  {line}")
        if choice is not None:
            out.print("  uniform settings (exact bits per weight, predicted KL):")
            for label, bpw, predicted in choice.uniform:
                out.print(f"    {label:16s} {bpw:7.4f}  {predicted:.5f}")


def _trusting(jobs: list, trust_remote_code: bool) -> list:
    """The recipe's jobs, each allowed the model's own code where --trust-remote-code says so (a
    job's own `trust_remote_code = true` allows it for that job alone)."""
    from dataclasses import replace

    return [replace(job, trust_remote_code=True) if trust_remote_code else job for job in jobs]


class _PlanTimed(Exception):
    """Stops a timing run of `plan --time` once the first block is done."""


def _indices(recipe: Path, jobs: list, job_index: int | None) -> list[int]:
    """The jobs to run: all of them, or the one --job-index names."""
    if job_index is None:
        return list(range(len(jobs)))
    if not 0 <= job_index < len(jobs):
        raise UsageError(f"--job-index {job_index} is out of range: {recipe} has {len(jobs)} job(s)",
                         f"use 0 .. {len(jobs) - 1}")
    return [job_index]
