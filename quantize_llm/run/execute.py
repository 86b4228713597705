"""Executing a plan: `execute(plan)` streams the checkpoint block by block into the writer.

    lock OUT -> open the checkpoint, check disk and memory -> writer -> calibration tokens ->
    resume state -> the tensors outside the blocks -> the blocks an interrupted run finished ->
    the runner's blocks (encode, write, record) -> config, model card, verification, rename

then, optionally, the evaluation into the model card and the upload. `quantize()` is the library
call every command ends in: `execute(plan_run(job))`. The only place that knows about the order of
the run and what a failure part-way must leave behind (DESIGN.md, "Pipeline").
"""
from __future__ import annotations

import contextlib
import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..algorithms.base import Algorithm
from ..calibration.sequential import BlockResult, Calibration, LayerReport, Timer, run
from ..core.primitives import Float16Overflow, to_stored
from ..core.qweight import QuantizedWeight
from ..core.spec import QuantSpec
from ..errors import Interrupted, ModelError, OutputError, RunError, SpecError, UsageError
from ..formats.base import ConfigFacts
from ..formats.checkpoint import NO_SPACE, CheckpointWriter, carried_files, check_output, human_bytes, remove_stale
from ..models.load import CheckpointReader, remote_code_warning
from .card import model_card
from .job import Job, parse_size
from .plan import RunPlan, plan_run
from .resources import ResourcePlan, SelfText, available_memory
from .resume import HashingReader, OutputLock, ResumeState, files_identity, tokens_fingerprint
from .summary import Summary
from .verify import check_modules, check_outputs, digest

EventHandler = Callable[[str, dict], None]

def quantize(model: str, output: str | Path, spec: QuantSpec, *, options: object | None = None,
             calibration: Any = None, device: str = "auto", overwrite: bool = False,
             max_shard_bytes: int = 2 * 1024 ** 3, batch_size: int = 8,
             on_event: EventHandler | None = None, command: str | None = None, resume: bool = True,
             evaluation: Any = None, push_to_hub: str | None = None, strict_vllm: bool = False,
             verify: bool = True, trust_remote_code: bool = False, budget: Any = None,
             max_memory: str | None = None) -> Summary:
    """Quantize MODEL (folder, hub id or cache entry) with `spec` and write OUT atomically.

    `options` are the algorithm's own (e.g. GPTQOptions); `calibration` a CalibrationSpec for
    algorithms that need data (default: self-generated text). With `resume`, finished blocks are
    recorded beside OUT (resume.py) and a rerun after an interruption continues from there.
    `evaluation` (publish.EvalSpec) measures the written checkpoint against the source into its
    model card; `push_to_hub` uploads it (checked before any work). Combinations that vLLM serves
    slowly or not at all are warned about before any work (errors with `strict_vllm`). With
    `verify`, the written files are read back and checked (verify.py) before the rename. With
    `trust_remote_code`, a model whose config.json names code of its own is built with that code (one
    warning says so); without it, such a model is refused. `budget` (budget.Budget) chooses each
    module's setting for a size budget (run/budget.py). `max_memory` (a size, "20GB") caps the
    memory a calibrated run plans for on its work device (default: what is free).
    """
    from ..formats.gguf import parse_format

    scheme = parse_format(spec.format)
    if scheme is not None:                      # one GGUF file, not a checkpoint folder (run/gguf.py)
        from .gguf import export_gguf

        if budget is not None:
            raise SpecError("--target-bpw/--target-size choose per-module settings, which GGUF output does not "
                            "take yet", "drop the budget, or write the gptq format")

        return export_gguf(model, output, spec, scheme, overwrite=overwrite, on_event=on_event,
                           trust_remote_code=trust_remote_code, options=options, calibration=calibration,
                           batch_size=batch_size, device=device)
    output = Path(output).expanduser()
    job = Job(name=output.name, model=model, output=output, spec=spec, options=options, calibration=calibration,
              device=device, overwrite=overwrite, max_shard_size=str(max_shard_bytes), batch_size=batch_size,
              resume=resume, strict_vllm=strict_vllm, verify=verify, evaluation=evaluation, push_to_hub=push_to_hub,
              trust_remote_code=trust_remote_code, budget=budget, max_memory=max_memory)
    if trust_remote_code and on_event is not None:
        on_event("warning", {"message": remote_code_warning(model)})
    return execute(plan_run(job, command), on_event)


def execute(plan: RunPlan, on_event: EventHandler | None = None) -> Summary:
    """Run `plan` (see the module docstring); the Summary of what was written."""
    emit = on_event or (lambda kind, data: None)
    start = time.perf_counter()
    with OutputLock(plan.output, emit):                 # first: a second run of OUT is refused
        check_output(plan.output, overwrite=plan.job.overwrite, protect=[plan.source.folder])
        remove_stale(plan.output)                       # temporary folders of killed runs, never a live one's
        run = _Run(plan, emit, start)
        summary = run.guarded()
    timer = Timer()
    timer.seconds.update(summary.timings)
    job = plan.job
    if job.evaluation is not None:
        from .publish import evaluate_into_card

        t = time.perf_counter()
        summary.evaluation = evaluate_into_card(plan.output, plan.source.folder, job.evaluation,
                                                str(plan.devices[0]), emit, trust_remote_code=job.trust_remote_code)
        timer.add("evaluation", t)
    if job.push_to_hub:
        from .publish import push

        t = time.perf_counter()
        summary.pushed_to = push(plan.output, job.push_to_hub)
        timer.add("upload", t)
    summary.timings = dict(timer.seconds)
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_mb = peak_rss_mb()
    emit("done", {k: v for k, v in summary.to_dict().items() if k != "layers"})
    return summary


class _Run:
    """One execution in progress, with OUT locked: what it has written so far and how to go on."""

    def __init__(self, plan: RunPlan, emit: EventHandler, start: float) -> None:
        self.plan, self.emit, self.start = plan, emit, start
        self.algorithm: Algorithm = plan.algorithm(plan.spec, plan.job.options)
        self.timer = Timer()
        self.state: ResumeState | None = None
        self.cal: Calibration | None = None
        self.cal_info: dict[str, Any] | None = None
        self.digests: dict[str, str] = {}           # module -> digest of its result (verification)
        self.reports: list[LayerReport] = []
        self.q_params = self.q_bytes = 0
        self.final_inputs: Sequence[torch.Tensor] | None = None   # the last block's outputs (calibrated runs)

    def guarded(self) -> Summary:
        """`write()`, with failures mapped: Ctrl-C and SIGTERM say what was kept, a full disk says
        where, and bad input found part-way drops the saved progress (a rerun would fail the same
        way); a run that stops before any block is recorded keeps nothing."""
        try:
            return self.write()
        except KeyboardInterrupt:
            state = self.state
            kept = state is not None and state.enabled and state.done > 0
            raise Interrupted("interrupted; the output was not written " + (
                f"({state.done} finished blocks are kept in {state.folder}: rerun the same command to resume)"
                if kept and state is not None else "(nothing was kept: rerun the command to start again)"
                if not self.plan.job.resume else "(no block had finished: rerun the same command to start again)"
            )) from None
        except UsageError:
            if self.state is not None:
                self.state.clear()
            raise
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            where = Path(exc.filename).parent if exc.filename else self.plan.output.absolute().parent
            resumable = self.state is not None and self.state.enabled
            raise RunError(f"no space left on the disk of {where}",
                           "free some space and rerun the same command to resume" if resumable else
                           "free some space and rerun") from None
        finally:
            if self.state is not None:
                if self.state.done == 0:
                    self.state.clear()
                else:
                    self.state.close()

    def write(self) -> Summary:
        plan, emit = self.plan, self.emit
        with CheckpointReader(plan.source.folder) as reader:
            emit("start", {"model": plan.source.model, "output": str(plan.output), "blocks": len(plan.blocks),
                           "spec": plan.spec.to_dict(), "device": ",".join(map(str, plan.devices)),
                           "input_bytes": reader.total_bytes})
            emit("plan", {"lines": plan.lines(), **plan.resources.to_dict()})
            check_disk(plan.output, plan.resources)
            check_memory(plan.resources, plan.job.max_memory)
            for reason in plan.vllm:
                emit("warning", {"message": f"vLLM: {reason}"})
            read = HashingReader(lambda name: reader.read(name, check_finite=True))
            with CheckpointWriter(plan.output, overwrite=plan.job.overwrite, max_shard_bytes=plan.max_shard_bytes,
                                  expected_bytes=plan.resources.output_bytes, protect=[plan.source.folder]) as writer, \
                    activation_folder(plan.output, plan.resources.activations) as offload:
                if plan.calibrated:
                    self.calibrate(reader, offload)
                state = self.state = ResumeState(plan.output, {
                    **plan.fingerprint,
                    "calibration_tokens": tokens_fingerprint(self.cal.tokens if self.cal is not None else None)},
                    enabled=plan.job.resume, emit=emit, identity=files_identity(plan.source.folder))
                state.open(calibrated=plan.calibrated)
                done = state.check_sources(read, list(plan.outside))
                self.write_outside(reader, read, writer)
                state.save_outside(read.take(plan.outside))
                for index in range(done):              # blocks finished by an interrupted run
                    self.replay(index, writer)
                start_inputs = state.load_inputs(done) if done and self.cal is not None else None
                for result in run(list(plan.blocks), self.algorithm, read, plan.devices, self.cal, self.timer,
                                  start=done, start_inputs=start_inputs):
                    self.write_block(result, reader, read, writer, first=result.index == done)
                return self.finish(reader, writer)

    def calibrate(self, reader: CheckpointReader, offload: Path | None = None) -> None:
        """The calibration tokens, and what the runner needs to feed them through the blocks
        (`offload`: the folder of activations the plan keeps on disk)."""
        plan, t = self.plan, time.perf_counter()
        src = plan.source
        cal_set = load_calibration_tokens(src.folder, src.config, plan.job.calibration, plan.devices[0], self.emit,
                                          trust_remote_code=plan.job.trust_remote_code,
                                          generation=plan.resources.self_text, output=plan.output)
        self.timer.add("calibration data", t)
        self.cal_info = {"source": cal_set.source, "sha256": cal_set.sha256,
                         "nsamples": int(cal_set.tokens.shape[0]), "seqlen": int(cal_set.tokens.shape[1]),
                         "rule": cal_set.rule}
        source = plan.job.calibration.source if plan.job.calibration is not None else "self"
        if source != "self" and Path(source).expanduser().is_file():
            self.cal_info["path"] = str(Path(source).expanduser().resolve())
        self.cal = Calibration(src.skeleton, src.layers, cal_set.tokens,
                               true_sequential=self.algorithm.record().true_sequential is not False,
                               batch_size=plan.job.batch_size, dtype=torch.float32, arch=src.arch,
                               stored_dtype=reader.dtype, weights=src.weights,
                               activations=plan.resources.activations, offload_dir=offload,
                               narrow=plan.resources.narrow)

    def write_outside(self, reader: CheckpointReader, read: HashingReader, writer: CheckpointWriter) -> None:
        """Embeddings, the final norm and an untied head, as stored (the head rounded when an
        override quantizes it)."""
        head = self.plan.head
        for name in self.plan.outside:
            if head is None or name != f"{head[0]}.weight":
                writer.add(name, read(name))
                continue
            weight = read(name)
            qw, encoded = head_tensors(head, weight, self.plan.format, reader.dtype(name))
            self.digests[head[0]] = digest(qw)
            for local, tensor in encoded.items():
                writer.add(f"{head[0]}.{local}", tensor)
                self.q_bytes += tensor.numel() * tensor.element_size()
            self.q_params += weight.numel()

    def replay(self, index: int, writer: CheckpointWriter) -> None:
        """Block `index` as an interrupted run recorded it."""
        assert self.state is not None
        tensors, saved = self.state.load_block(index)
        for name, tensor in tensors:
            writer.add(name, tensor)
        self.q_params += saved["quantized_params"]
        self.q_bytes += saved["quantized_bytes"]
        self.digests.update(saved.get("digests", {}))
        self.reports.extend(LayerReport(r["name"], tuple(r["shape"]), r["seconds"], r["metrics"])
                            for r in saved["layers"])

    def write_block(self, result: BlockResult, reader: CheckpointReader, read: HashingReader,
                    writer: CheckpointWriter, first: bool) -> None:
        """Encode one finished block, write it, record it for resuming, and report it."""
        plan, timer, t = self.plan, self.timer, time.perf_counter()
        fmt = plan.format
        # Formats that record the weight's dtype (bnb) get the checkpoint's, not the work dtype.
        encoded = {name: fmt.encode(replace(qw, source_dtype=reader.dtype(f"{name}.weight")))
                   for name, (qw, _) in result.quantized.items()}
        block_digests = {name: digest(qw) for name, (qw, _) in result.quantized.items()}
        self.digests.update(block_digests)
        if result.next_inputs is not None:
            self.final_inputs = result.next_inputs
        t = timer.add("packing", t)
        ordered: list[tuple[str, torch.Tensor]] = []
        block_params = block_bytes = 0
        for name, (qw, bias) in result.quantized.items():
            for local, tensor in encoded[name].items():
                ordered.append((f"{name}.{local}", tensor))
                block_bytes += tensor.numel() * tensor.element_size()
            if bias is not None:
                ordered.append((f"{name}.bias", to_stored(bias, fmt.bias_dtype, "bias", name)))
            block_params += qw.codes.numel()
        ordered.extend(result.passthrough.items())
        for name, tensor in ordered:
            writer.add(name, tensor)
        self.q_params += block_params
        self.q_bytes += block_bytes
        layers = [asdict(r) for r in result.reports]
        assert self.state is not None
        self.state.save_block(result.index, ordered, {"quantized_params": block_params, "quantized_bytes": block_bytes,
                                                      "layers": layers, "digests": block_digests},
                              result.next_inputs, source=read.take(plan.blocks[result.index].tensors))
        timer.add("write", t)
        self.reports.extend(result.reports)
        if first:
            remaining = len(plan.blocks) - result.index - 1
            self.emit("eta", {"first_block_seconds": result.seconds, "remaining_blocks": remaining,
                              "expected_seconds": (time.perf_counter() - self.start) + remaining * result.seconds})
        self.emit("block", {"index": result.index, "blocks": len(plan.blocks), "seconds": result.seconds,
                            "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_mb(plan.devices),
                            "timings": {k: round(v, 3) for k, v in timer.seconds.items()}, "layers": layers})

    def finish(self, reader: CheckpointReader, writer: CheckpointWriter) -> Summary:
        """config.json, the format's config file, the carried files and the model card; then the
        written folder is verified and renamed into place."""
        plan, t = self.plan, time.perf_counter()
        qconfig = plan.format.quantization_config(self.config_facts())
        summary = Summary(model=plan.source.model, output=str(plan.output), spec=plan.spec.to_dict(),
                          blocks=len(plan.blocks), seconds=0.0, input_bytes=reader.total_bytes,
                          output_bytes=writer.total_bytes, quantized_params=self.q_params,
                          quantized_bytes=self.q_bytes, bits_per_weight=8 * self.q_bytes / max(self.q_params, 1),
                          peak_rss_mb=0.0, layers=self.reports, timings=dict(self.timer.seconds),
                          calibration=self.cal_info,
                          allocation=plan.allocation.lines() if plan.allocation is not None else None)
        files: dict[str, Any] = dict(carried_files(plan.source.folder))
        if plan.format.config_file:
            files[plan.format.config_file] = json.dumps(qconfig, indent=2) + "\n"
        files["README.md"] = model_card(summary, qconfig, plan.command, plan.source.folder, plan.format.description)
        verification: dict[str, Any] = {}
        writer.finish(config={**plan.source.config, "quantization_config": qconfig}, files=files,
                      verify=(lambda tmp: self.verify(tmp, verification)) if plan.job.verify else None)
        summary.verification = verification or None
        assert self.state is not None
        self.state.clear()
        self.timer.add("write", t)
        summary.timings = dict(self.timer.seconds)
        return summary

    def verify(self, tmp: Path, verification: dict[str, Any]) -> None:
        """The written folder, read back before the rename: every module decodes to its result,
        and in calibrated runs the loaded checkpoint reproduces the last block's outputs."""
        t0 = time.perf_counter()
        verification["modules"] = check_modules(tmp, self.digests)
        cal, state = self.cal, self.state
        if cal is not None and self.final_inputs is None and state is not None and state.done == len(self.plan.blocks):
            self.final_inputs = state.load_inputs(len(self.plan.blocks))
        if cal is not None and self.final_inputs is not None:
            batch = min(self.plan.job.batch_size, cal.tokens.shape[0])
            verification["last_block_rel_diff"] = check_outputs(tmp, cal.tokens[:batch], self.final_inputs[0],
                                                                self.plan.source.layers, self.plan.devices[0],
                                                                trust_remote_code=self.plan.job.trust_remote_code)
        verification["seconds"] = time.perf_counter() - t0
        self.emit("verified", dict(verification))

    def config_facts(self) -> ConfigFacts:
        """What this run tells the format to record in quantization_config."""
        plan, spec = self.plan, self.plan.spec
        linears = [lp for b in plan.blocks for lp in b.linears]
        quantized_somewhere = {lp.local for lp in linears if lp.quantize}
        groups = [[n for n in group if n in quantized_somewhere] for group in listed_groups(plan)]
        overrides = {lp.name: lp.spec for lp in linears if lp.quantize and lp.spec is not None
                     and _grid(lp.spec) != _grid(spec)}
        if plan.head is not None and _grid(plan.head[1]) != _grid(spec):
            overrides[plan.head[0]] = plan.head[1]
        # Module names as the model in memory has them (what transformers matches `ignore` lists against).
        quantized = {b.module_prefix + lp.local for b in plan.blocks for lp in b.linears if lp.quantize}
        quantized |= {plan.head[0]} if plan.head else set()
        meta: dict[str, Any] = {"quantizer": [f"quantize-llm:{__version__}"], "method": spec.method,
                                "spec": spec.to_dict()}
        if plan.job.options is not None:
            meta["options"] = asdict(plan.job.options)
        if self.cal_info is not None:
            meta["calibration"] = self.cal_info
        config = plan.source.config
        model_dtype = config.get("dtype") or config.get("torch_dtype")
        return ConfigFacts(
            spec=spec, modules_in_block=[g for g in groups if g], overrides=overrides,
            excluded=[b.module_prefix + lp.local if lp.expert is None else lp.name for b in plan.blocks
                      for lp in b.linears if not lp.quantize and lp.local in quantized_somewhere],
            dense_modules=[n for n, m in plan.source.skeleton.named_modules()
                           if isinstance(m, nn.Linear) and n not in quantized] + routers(plan, quantized),
            lm_head=plan.head is not None, record=self.algorithm.record(), meta=meta,
            dtype=str(model_dtype).removeprefix("torch.") if model_dtype else None)


def _grid(spec: QuantSpec) -> tuple[int, int, bool]:
    """What a format must record per module: bits, group size, sym."""
    return spec.bits, spec.group_size, spec.sym


def head_tensors(head: tuple[str, QuantSpec], weight: torch.Tensor, fmt: Any,
                 dtype: torch.dtype) -> tuple[QuantizedWeight, dict]:
    """The output head rounded to its grid (RTN), and its tensors encoded by the format."""
    from ..algorithms.rtn import rtn_quantize

    try:
        qw = replace(rtn_quantize(weight, head[1]), source_dtype=dtype)
        return qw, fmt.encode(qw)
    except Float16Overflow as exc:
        raise exc.at(head[0]) from None


@contextmanager
def activation_folder(output: Path, where: str) -> Iterator[Path | None]:
    """A folder beside the output for calibration activations kept on disk (removed afterwards,
    whatever happens); None when they are kept in memory."""
    if where != "disk":
        yield None
        return
    out = Path(output).expanduser().absolute()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.activations-", dir=out.parent) as folder:
        yield Path(folder)


def check_disk(output: Path, resources: ResourcePlan) -> None:
    """Refuse to start when the output (and the resume state) cannot fit on OUT's disk."""
    parent = Path(output).expanduser().absolute().parent
    if not parent.is_dir():
        return   # the writer reports a missing parent with its own message
    free, need = shutil.disk_usage(parent).free, int(resources.disk_bytes * 1.1)
    if free < need:
        parts = [f"the checkpoint ({human_bytes(resources.output_bytes)})"]
        if resources.resume_bytes:
            parts.append(f"the resume state ({human_bytes(resources.resume_bytes)})")
        if resources.offload_bytes:
            parts.append(f"the calibration activations, which do not fit in memory "
                         f"({human_bytes(resources.offload_bytes)})")
        what = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
        hint = "free some space, or choose another -o"
        if resources.resume_bytes:
            hint = "pass --no-resume to drop the resume state, " + hint
        if resources.offload_bytes:
            hint = "lower --nsamples or --seqlen, " + hint
        raise OutputError(f"not enough disk space in {parent}: {what} need about {human_bytes(need)} with a "
                          f"10% margin, {human_bytes(free)} is free", hint)


def check_memory(resources: ResourcePlan, max_memory: str | None = None) -> None:
    """Refuse to start a run whose planned host peak exceeds the memory this machine has free (or
    --max-memory, on a CPU, where that is less), before any calibration data is prepared (the run
    would be killed part-way instead)."""
    free = available_memory()
    limit = parse_size(max_memory, "--max-memory") if max_memory is not None and resources.device_peak_bytes is None \
        else None
    capped = limit is not None and (free is None or limit < free)
    if limit is not None:
        free = limit if free is None else min(free, limit)
    if free is None or resources.host_peak_bytes <= free:
        return
    room = f"--max-memory allows {human_bytes(free)}" if capped else f"{human_bytes(free)} is available"
    text, text_peak = resources.self_text, (resources.host_phases or {}).get("calibration text", 0)
    if text is not None and text_peak > free:   # the first phase: it would fail first
        weights = (f"{human_bytes(text.budget_bytes or 0)} of weights at once" if text.offloaded else
                   f"the whole float model {human_bytes(text.weights_bytes)}")
        raise UsageError(f"writing the calibration text needs about {human_bytes(text_peak)} of host memory "
                         f"({weights}, KV cache and logits {human_bytes(text.cache_bytes)}); {room}",
                         "pass --dataset with real text, or lower --seqlen or --generation-memory" if text.offloaded
                         else "pass --dataset with real text, or --generation-memory to read most weights from disk")
    cause = f", calibration activations {human_bytes(resources.activation_bytes)}" if resources.activation_bytes else ""
    if resources.hessian_bytes:
        cause += f", the largest Hessian {human_bytes(resources.hessian_bytes)}"
    # fewer samples only help where the activations are a good part of what does not fit
    fewer = resources.activation_bytes > (resources.host_peak_bytes - free) / 2
    raise UsageError(f"the run needs about {human_bytes(resources.host_peak_bytes)} of host memory (one block "
                     f"{human_bytes(resources.block_bytes)}{cause}); {room}",
                     "lower --nsamples, --seqlen or --batch-size, or run on a larger machine" if fewer
                     else "run on a machine with more memory (or a GPU), or use rtn, which holds one Linear at a time")


def load_calibration_tokens(folder: Path, config: dict, cal_spec: Any, dev: torch.device,
                            emit: EventHandler, trust_remote_code: bool = False, generation: SelfText | None = None,
                            output: Path | None = None) -> Any:
    """Calibration tokens for a calibrated algorithm (see calibration/data.py).

    `generation` (the plan's resources.SelfText) says how `self` text is generated: by the whole
    float model, or by the model offloaded with accelerate to the plan's budget (offload_map), most
    of its weights read from the checkpoint's files at every step. Offloading gets a temporary
    folder beside `output` (else in the system's), named like the writer's temporary folders, so
    that the next run of OUT removes a killed run's (checkpoint.remove_stale); it is removed when
    the text is written, or generating it fails."""
    from transformers import AutoTokenizer

    from ..calibration.data import CalibrationSpec, load_calibration
    from ..models.sources import load_float_model, load_offloaded, mapped_allocations, offload_map

    cal_spec = cal_spec or CalibrationSpec()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"no usable tokenizer in {folder} ({' '.join(str(exc).split())[:160]})",
                         "calibration needs the model's tokenizer files beside its weights") from None
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    budget = generation.budget_bytes if generation is not None and cal_spec.source == "self" else None
    max_context = config.get("max_position_embeddings") or config.get("n_positions")
    with contextlib.nullcontext("") if budget is None else offload_scratch(output) as scratch, \
            contextlib.nullcontext() if budget is None else mapped_allocations():

        def model_loader() -> nn.Module:
            if budget is None:
                return load_float_model(folder, dtype, trust_remote_code).to(dev).eval()
            device_map = offload_map(folder, config, dtype, budget, dev, trust_remote_code).device_map
            return load_offloaded(folder, dtype, device_map, Path(scratch), trust_remote_code)

        return load_calibration(cal_spec, tokenizer, model_loader=model_loader, max_context=max_context,
                                warn=lambda message: emit("warning", {"message": message}),
                                progress=lambda tokens, total: emit("calibration_text",
                                                                    {"tokens": tokens, "total": total}))


def offload_scratch(output: Path | None) -> tempfile.TemporaryDirectory[str]:
    """A new temporary folder for offloaded weights: beside `output` as `.OUT.tmp-offload-*`, where
    checkpoint.remove_stale finds it if a run is killed, else in the system's temporary folder."""
    if output is None:
        return tempfile.TemporaryDirectory(prefix="quantize-llm-offload-")
    output = Path(output).expanduser().absolute()
    return tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-offload-", dir=output.parent)


def peak_device_mb(devices: tuple[torch.device, ...]) -> float | None:
    """Peak memory allocated by torch so far on the most loaded CUDA work device; None on CPU."""
    if devices[0].type != "cuda":
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in devices) / 2 ** 20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def listed_groups(plan: RunPlan) -> list[list[str]]:
    """The block Linears as quantization_config lists them (`modules_in_block_to_quantize`): the
    family's groups where it has an override, then every other Linear in its own group, in the
    order the blocks hold them."""
    groups = [list(g) for g in plan.source.arch.sequential] if plan.source.arch is not None else []
    listed = {n for g in groups for n in g}
    for block in plan.blocks:
        for lp in block.linears:
            if lp.local not in listed:
                listed.add(lp.local)
                groups.append([lp.local])
    return groups


def routers(plan: RunPlan, quantized: set[str]) -> list[str]:
    """Modules of the blocks that hold a matrix but are not torch Linears and stay dense, such as
    a MoE router written as a module of its own (`mlp.gate` with a (experts, hidden) weight):
    serving engines build them as Linear layers, so the formats' lists of unquantized modules must
    name them."""
    skeleton, found = plan.source.skeleton, []
    for block in plan.blocks:
        module = skeleton.get_submodule(block.module_prefix.rstrip("."))
        for name, param in module.named_parameters():
            owner = block.module_prefix + name.removesuffix(".weight")
            if name.endswith(".weight") and param.dim() == 2 and owner not in quantized \
                    and not isinstance(skeleton.get_submodule(owner), (nn.Linear, nn.Embedding)):
                found.append(owner)
    return found
