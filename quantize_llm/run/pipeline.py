"""quantize(): check the whole plan, then stream the checkpoint through the runner into a writer.

The only place that knows about devices, memory and order (DESIGN.md, "Pipeline").
"""
from __future__ import annotations

import fnmatch
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__
from ..algorithms import get_algorithm
from ..calibration.sequential import BlockPlan, Calibration, LayerReport, LinearPlan, Timer, run
from ..core.primitives import Float16Overflow, to_stored
from ..core.qweight import QuantizedWeight
from ..core.spec import QuantSpec
from ..errors import CheckpointError, Interrupted, ModelError, OutputError, RunError, SpecError, UsageError
from ..formats import get_format
from ..formats.checkpoint import NO_SPACE, CheckpointWriter, check_output, human_bytes, local_folder, remove_stale
from ..formats.vllm import preflight
from ..models.architectures import ArchitectureMap, get_architecture
from ..models.load import CheckpointReader, build_skeleton, check_against_config, resolve_model
from .resources import ResourcePlan
from .resources import estimate as estimate_resources
from .resume import HashingReader, OutputLock, ResumeState, files_identity, model_fingerprint, tokens_fingerprint
from .verify import check_modules, check_outputs, digest

EventHandler = Callable[[str, dict], None]

# Files carried from the source folder beside the weights (tokenizer, generation settings, license).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                 "chat_template.json", "generation_config.json", "*.tiktoken", "LICENSE*")


@dataclass
class Summary:
    """What a run did, for the summary table, the JSON log and the model card."""

    model: str
    output: str
    spec: dict
    blocks: int
    seconds: float
    input_bytes: int
    output_bytes: int
    quantized_params: int
    quantized_bytes: int          # bytes of the quantized Linears' packed tensors (no bias)
    bits_per_weight: float        # 8 * quantized_bytes / quantized_params
    peak_rss_mb: float
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    calibration: dict[str, Any] | None = None                 # source, sha256, samples, rule
    evaluation: dict[str, Any] | None = None                  # perplexity/KL after writing (--eval)
    pushed_to: str | None = None                              # hub URL (--push-to-hub)
    verification: dict[str, Any] | None = None                # modules read back, last block's difference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """'auto' -> the first CUDA device when present, else CPU; an unusable device is a UsageError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "," in device:
        raise UsageError(f"--device {device}: this command runs on one device",
                         "give one device, such as cuda:0")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for but CUDA is not available here",
                             "use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible",
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device} is not supported", "use auto, cpu, cuda or cuda:N")
    return dev


def plan_blocks(reader: CheckpointReader, arch: ArchitectureMap, skeleton: nn.Module,
                spec: QuantSpec) -> list[BlockPlan]:
    """Every block's Linears, checked against the architecture map, the spec and the format."""
    fmt = get_format(spec.format)
    try:
        layers = skeleton.get_submodule(arch.layers)
    except AttributeError:
        raise ModelError(f"the model has no {arch.layers}, where this architecture keeps its blocks") from None
    names = reader.names()
    present = set(names)
    plans = []
    for i, block in enumerate(layers):
        prefix = f"{arch.layers}.{i}."
        found = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(found - set(arch.linears))
        if unknown:
            raise ModelError(f"block {i} holds Linear {unknown[0]} that the architecture map does not know",
                             "add it to models/architectures.py, or report the model")
        linears = []
        for local in arch.linears:
            name = prefix + local
            if f"{name}.weight" not in present:
                raise CheckpointError(f"tensor {name}.weight is missing from the checkpoint",
                                      "the checkpoint is incomplete or not of the architecture it declares")
            out_features, in_features = reader.shape(f"{name}.weight")
            quantize = not spec.is_dense(name)
            own = None
            if quantize:
                own = module_spec(spec, name, fmt)
                reason = fmt.check_shape(own or spec, out_features, in_features)
                if reason is not None:
                    raise SpecError(f"{name}: the {fmt.name} format cannot hold this layer ({reason})",
                                    f"keep it unquantized with --keep-dense '{re.escape(name)}$'")
            linears.append(LinearPlan(name, local, out_features, in_features, quantize, own))
        tensors = tuple(n for n in names if n.startswith(prefix))
        plans.append(BlockPlan(i, prefix, tuple(linears), tensors))
    if not plans:
        raise ModelError(f"the model has no decoder blocks under {arch.layers}")
    if any(lp.spec is not None and _grid(lp.spec) != _grid(spec) for p in plans for lp in p.linears) \
            and not getattr(fmt, "per_module", False):
        raise SpecError(f"the {fmt.name} format has one setting for every layer, so it cannot hold per-module "
                        "overrides", "use the gptq format (it records them as `dynamic` entries)")
    if not any(lp.quantize for p in plans for lp in p.linears):
        raise SpecError("--keep-dense leaves no Linear to quantize", "loosen the --keep-dense patterns")
    return plans


def module_spec(spec: QuantSpec, name: str, fmt: Any) -> QuantSpec | None:
    """The spec of module `name` when a per-module override changes it (checked against the
    format, with the format's smallest zero point), else None."""
    if not spec.overrides:
        return None
    own = spec.for_module(name)
    if own == spec.replace(overrides=()):
        return None
    reason = fmt.supports(own)
    if reason is not None:
        raise SpecError(f"{name}: override {own.to_dict()['bits']}-bit group {own.group_size}: {reason}")
    return own.replace(min_zero=fmt.min_zero(own))


def output_head(spec: QuantSpec, fmt: Any, reader: CheckpointReader, skeleton: nn.Module,
                config: dict) -> tuple[str, QuantSpec] | None:
    """(name, spec) of the output head when a per-module override names it, else None.

    The head is quantized only when an override matches its module name (e.g. `^lm_head$`): it
    is rounded to the nearest grid point (RTN; no calibration statistics reach it) with that
    override's settings."""
    get_out = getattr(skeleton, "get_output_embeddings", None)
    module = get_out() if callable(get_out) else None
    name = next((n for n, m in skeleton.named_modules() if m is module), None) if module is not None else None
    if name is None or not spec.overrides or spec.is_dense(name):
        return None
    if not any(re.search(pattern, name) for pattern, _ in spec.overrides):
        return None
    if not getattr(fmt, "per_module", False):
        raise SpecError(f"the {fmt.name} format cannot hold a quantized {name}", "use the gptq format")
    tied = getattr(getattr(skeleton, "config", None), "tie_word_embeddings", config.get("tie_word_embeddings", False))
    if f"{name}.weight" not in set(reader.names()) or tied:
        raise SpecError(f"{name} shares its weight with the input embeddings, so quantizing it would change them "
                        "too", f"drop the override for {name}")
    own = spec.for_module(name)
    reason = fmt.supports(own) or fmt.check_shape(own, *reader.shape(f"{name}.weight"))
    if reason is not None:
        raise SpecError(f"{name}: {reason}")
    return name, own.replace(min_zero=fmt.min_zero(own), method="rtn")


def head_tensors(head: tuple[str, QuantSpec], weight: torch.Tensor, fmt: Any,
                 dtype: torch.dtype) -> tuple[QuantizedWeight, dict]:
    """The output head rounded to its grid (RTN), and its tensors encoded by the format."""
    from ..algorithms.rtn import rtn_quantize

    try:
        qw = replace(rtn_quantize(weight, head[1]), source_dtype=dtype)
        return qw, fmt.encode(qw)
    except Float16Overflow as exc:
        raise exc.at(head[0]) from None


def estimate_output_bytes(reader: CheckpointReader, plans: list[BlockPlan], spec: QuantSpec) -> int:
    """Upper estimate of the written checkpoint's tensor bytes (for the disk-space check)."""
    total = reader.total_bytes
    for p in plans:
        for lp in p.linears:
            if lp.quantize:
                n = lp.out_features * lp.in_features
                total -= reader.nbytes(f"{lp.name}.weight")
                if spec.codebook != "int":   # codes, a float32 absmax per block, small tables
                    total += n // 2 + 1 + 4 * (n // spec.blocksize + 1) + 2048
                    continue
                own = lp.spec or spec
                groups = own.n_groups(lp.in_features)
                total += (n * own.bits // 8
                          + groups * lp.out_features * (2 + own.bits / 8) + 4 * lp.in_features)
                if spec.format == "outlier":   # row pointers, and up to 1% of weights at 4-6 bytes each
                    total += 4 * (lp.out_features + 1) + 6 * n // 100
    return int(total)


def parse_devices(device: str) -> tuple[torch.device, ...] | None:
    """The devices `device` names, checked for form only (nothing about this machine); None for
    "auto". A list names GPUs with their index, each once, or CPU workers (`cpu,cpu`, which exist
    to check on a machine without GPUs that a spread run gives the same checkpoint)."""
    parts = [p.strip() for p in str(device).split(",")]
    if parts == ["auto"]:
        return None
    if len(parts) > 1 and any(not p or p == "auto" for p in parts):
        raise UsageError(f"--device {device}: a list names each device", "write it like cuda:0,cuda:1")
    try:
        devices = tuple(torch.device(p) for p in parts)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    bad = next((d for d in devices if d.type not in ("cpu", "cuda")), None)
    if bad is not None:
        raise UsageError(f"--device {device} is not supported", "use auto, cpu, cuda or cuda:N")
    if len(devices) > 1:
        if len({d.type for d in devices}) > 1:
            raise UsageError(f"--device {device} mixes CPU and GPU", "list GPUs only, such as cuda:0,cuda:1")
        if devices[0].type == "cuda":
            if any(d.index is None for d in devices):
                raise UsageError(f"--device {device}: a GPU in a list needs its index", "write it like cuda:0,cuda:1")
            twice = next((d for i, d in enumerate(devices) if d in devices[:i]), None)
            if twice is not None:
                raise UsageError(f"--device {device} names {twice} twice", "name each GPU once")
    return devices


def resolve_devices(device: str) -> tuple[torch.device, ...]:
    """One device (resolve_device) or a comma-separated list of them for a run spread over several
    (parse_devices), each checked against this machine."""
    devices = parse_devices(device)
    if devices is None or len(devices) == 1:
        return (resolve_device(device.strip()),)
    return tuple(resolve_device(str(d)) for d in devices)


def resource_plan(reader: CheckpointReader, plans: list[BlockPlan], spec: QuantSpec, config: dict,
                  calibrated: bool, calibration: Any, batch_size: int, dev: torch.device, resume: bool,
                  verify: bool = True, devices: int = 1) -> ResourcePlan:
    """Memory and disk the run will need (plan.py), from the headers and the settings."""
    nsamples = getattr(calibration, "nsamples", 128)
    seqlen = getattr(calibration, "seqlen", 2048)
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if context:
        seqlen = min(seqlen, int(context))
    return estimate_resources(reader, plans, config, output_bytes=estimate_output_bytes(reader, plans, spec),
                              calibrated=calibrated, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size,
                              device_type=dev.type, resume=resume, verify=verify, devices=devices)


def prepare(spec: QuantSpec, options: object | None) -> tuple[Any, QuantSpec, Any]:
    """The format, the spec with the format's smallest zero point, and the algorithm; an
    impossible combination is a SpecError before any model is touched."""
    fmt = get_format(spec.format)
    reason = fmt.supports(spec)
    if reason is not None:
        raise SpecError(reason)
    spec = spec.replace(min_zero=fmt.min_zero(spec))
    algorithm = get_algorithm(spec.method)(spec, options)
    if spec.codebook not in getattr(algorithm, "codebooks", ("int",)):
        raise SpecError(f"the {spec.method} algorithm does not produce {spec.codebook} codes",
                        "use the nf4 command for nf4/fp4")
    return fmt, spec, algorithm


def plan_job(model: str, spec: QuantSpec, *, options: object | None = None, calibration: Any = None,
             device: str = "auto", batch_size: int = 8, resume: bool = True, verify: bool = True) -> ResourcePlan:
    """The resource plan of a job from the checkpoint's headers alone (nothing is loaded or run)."""
    fmt, spec, algorithm = prepare(spec, options)
    devices = resolve_devices(device)
    dev = devices[0]
    with CheckpointReader(resolve_model(model)) as reader:
        config = reader.config
        plans = plan_blocks(reader, get_architecture(config), build_skeleton(reader.folder, config), spec)
        return resource_plan(reader, plans, spec, config, algorithm.needs_calibration, calibration, batch_size,
                             dev, resume, verify, devices=len(devices))


def check_disk(output: Path, resources: ResourcePlan) -> None:
    """Refuse to start when the output (and the resume state) cannot fit on OUT's disk."""
    parent = Path(output).expanduser().absolute().parent
    if not parent.is_dir():
        return   # the writer reports a missing parent with its own message
    free, need = shutil.disk_usage(parent).free, int(resources.disk_bytes * 1.1)
    if free < need:
        what = (f"the checkpoint ({human_bytes(resources.output_bytes)}) and the resume state "
                f"({human_bytes(resources.resume_bytes)})") if resources.resume_bytes else \
            f"the checkpoint ({human_bytes(resources.output_bytes)})"
        hint = "pass --no-resume to drop the resume state, free some space, or choose another -o" \
            if resources.resume_bytes else "free some space, or choose another -o"
        raise OutputError(f"not enough disk space in {parent}: {what} need about {human_bytes(need)} with a "
                          f"10% margin, {human_bytes(free)} is free", hint)


def available_memory() -> int | None:
    """Bytes of host memory this process can still get (MemAvailable plus free swap), or None."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(resources: ResourcePlan) -> None:
    """Refuse to start a run whose planned host peak exceeds the memory this machine has free, before
    any calibration data is prepared (the run would be killed part-way instead)."""
    free = available_memory()
    if free is None or resources.host_peak_bytes <= free:
        return
    cause = f", calibration activations {human_bytes(resources.activation_bytes)}" if resources.activation_bytes else ""
    raise UsageError(f"the run needs about {human_bytes(resources.host_peak_bytes)} of host memory (one block "
                     f"{human_bytes(resources.block_bytes)}{cause}); {human_bytes(free)} is available",
                     "lower --nsamples, --seqlen or --batch-size, or run on a larger machine"
                     if resources.activation_bytes else "run on a larger machine")


def _grid(spec: QuantSpec) -> tuple[int, int, bool]:
    """What a format must record per module: bits, group size, sym."""
    return spec.bits, spec.group_size, spec.sym


def modules_in_block(plans: list[BlockPlan], arch: ArchitectureMap,
                     spec: QuantSpec | None = None) -> tuple[list[list[str]], dict]:
    """`modules_in_block_to_quantize` (GPTQ config) and `dynamic` exclusions for uneven --keep-dense."""
    quantized_somewhere = {lp.local for p in plans for lp in p.linears if lp.quantize}
    groups = [[n for n in group if n in quantized_somewhere] for group in arch.sequential]
    dynamic: dict[str, dict] = {f"-:^{re.escape(lp.name)}$": {} for p in plans for lp in p.linears
                                if not lp.quantize and lp.local in quantized_somewhere}
    for p in plans:   # per-module overrides, one exact entry per module
        for lp in p.linears:
            if lp.quantize and lp.spec is not None and (spec is None or _grid(lp.spec) != _grid(spec)):
                dynamic[f"+:^{re.escape(lp.name)}$"] = {"bits": lp.spec.bits, "group_size": lp.spec.group_size,
                                                         "sym": lp.spec.sym}
    return [g for g in groups if g], dynamic


def carried_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pat) for pat in CARRIED_FILES):
            files[path.name] = path
    return files


def load_calibration_tokens(folder: Path, config: dict, cal_spec: Any, dev: torch.device,
                            emit: EventHandler) -> Any:
    """Calibration tokens for a calibrated algorithm (see calibration/data.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..calibration.data import CalibrationSpec, load_calibration

    cal_spec = cal_spec or CalibrationSpec()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"no usable tokenizer in {folder} ({' '.join(str(exc).split())[:160]})",
                         "calibration needs the model's tokenizer files beside its weights") from None

    def model_loader() -> nn.Module:
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False).to(dev).eval()

    max_context = config.get("max_position_embeddings") or config.get("n_positions")
    return load_calibration(cal_spec, tokenizer, model_loader=model_loader, max_context=max_context,
                            warn=lambda message: emit("warning", {"message": message}),
                            progress=lambda tokens, total: emit("calibration_text", {"tokens": tokens, "total": total}))


def quantize(model: str, output: str | Path, spec: QuantSpec, *, options: object | None = None,
             calibration: Any = None, device: str = "auto", overwrite: bool = False,
             max_shard_bytes: int = 2 * 1024 ** 3, batch_size: int = 8,
             on_event: EventHandler | None = None, command: str | None = None, resume: bool = True,
             evaluation: Any = None, push_to_hub: str | None = None, strict_vllm: bool = False,
             verify: bool = True) -> Summary:
    """Quantize MODEL (folder, hub id or cache entry) with `spec` and write OUT atomically.

    `options` are the algorithm's own (e.g. GPTQOptions); `calibration` a CalibrationSpec for
    algorithms that need data (default: self-generated text). With `resume`, finished blocks are
    recorded beside OUT (resume.py) and a rerun after an interruption continues from there.
    `evaluation` (publish.EvalSpec) measures the written checkpoint against the source into its
    model card; `push_to_hub` uploads it (checked before any work). Combinations that vLLM serves
    slowly or not at all are warned about before any work (errors with `strict_vllm`). With
    `verify`, the written files are read back and checked (verify.py) before the rename.
    """
    emit = on_event or (lambda kind, data: None)
    start = time.perf_counter()
    fmt, spec, algorithm = prepare(spec, options)
    devices = resolve_devices(device)
    output = Path(output).expanduser()
    check_output(output, overwrite=overwrite, protect=local_folder(model))   # before anything
    if push_to_hub:
        from .publish import check_hub

        check_hub(push_to_hub)
    run_args = dict(options=options, calibration=calibration, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                    batch_size=batch_size, command=command, resume=resume, strict_vllm=strict_vllm, verify=verify)
    with OutputLock(output, emit):                      # first: a second run is refused before any work
        folder = resolve_model(model)
        check_output(output, overwrite=overwrite, protect=[folder])
        remove_stale(output)                            # temporary folders of killed runs, never a live one's
        summary = _quantize_locked(model, folder, output, spec, fmt, algorithm, devices, emit, start, **run_args)
    timer = Timer()
    timer.seconds.update(summary.timings)
    dev = devices[0]
    if evaluation is not None:
        from .publish import evaluate_into_card

        t = time.perf_counter()
        summary.evaluation = evaluate_into_card(output, folder, evaluation, str(dev), emit)
        timer.add("evaluation", t)
    if push_to_hub:
        from .publish import push

        t = time.perf_counter()
        summary.pushed_to = push(output, push_to_hub)
        timer.add("upload", t)
    summary.timings = dict(timer.seconds)
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_mb = peak_rss_mb()
    emit("done", {k: v for k, v in summary.to_dict().items() if k != "layers"})
    return summary


def _quantize_locked(model: str, folder: Path, output: Path, spec: QuantSpec, fmt: Any, algorithm: Any,
                     devices: tuple[torch.device, ...], emit: EventHandler, start: float, *, options: object | None,
                     calibration: Any, overwrite: bool, max_shard_bytes: int, batch_size: int, command: str | None,
                     resume: bool, strict_vllm: bool, verify: bool) -> Summary:
    """The run itself, with OUT locked: plan, calibrate, stream the blocks into the writer, verify,
    rename. Failures are mapped here: Ctrl-C and SIGTERM say what was kept, a full disk says where,
    and bad input found part-way drops the saved progress (a rerun would fail the same way)."""
    work = _Work()
    try:
        return _quantize_blocks(model, folder, output, spec, fmt, algorithm, devices, emit, work, start, options=options,
                                calibration=calibration, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                                batch_size=batch_size, command=command, resume=resume, strict_vllm=strict_vllm,
                                verify=verify)
    except KeyboardInterrupt:
        kept = work.state is not None and work.state.enabled and work.state.done > 0
        raise Interrupted("interrupted; the output was not written " + (
            f"({work.state.done} finished blocks are kept in {work.state.folder}: rerun the same command to resume)"
            if kept else "(nothing was kept: rerun the command to start again)" if not resume else
            "(no block had finished: rerun the same command to start again)")) from None
    except UsageError:
        if work.state is not None:       # bad input found part-way: a rerun would fail the same way
            work.state.clear()
        raise
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        where = Path(exc.filename).parent if exc.filename else output.absolute().parent
        resumable = work.state is not None and work.state.enabled
        raise RunError(f"no space left on the disk of {where}",
                       "free some space and rerun the same command to resume" if resumable else
                       "free some space and rerun") from None
    finally:
        if work.state is not None:      # a run that stops before any block is recorded keeps nothing
            work.state.clear() if work.state.done == 0 else work.state.close()


@dataclass
class _Work:
    """What a failing run must know to say what it kept."""

    state: ResumeState | None = None


def _quantize_blocks(model: str, folder: Path, output: Path, spec: QuantSpec, fmt: Any, algorithm: Any,
                     devices: tuple[torch.device, ...], emit: EventHandler, work: _Work, start: float, *,
                     options: object | None,
                     calibration: Any, overwrite: bool, max_shard_bytes: int, batch_size: int, command: str | None,
                     resume: bool, strict_vllm: bool, verify: bool) -> Summary:
    dev = devices[0]                                   # embeddings, Hessian sums, verification
    with CheckpointReader(folder) as reader:
        config = reader.config
        if config.get("quantization_config"):
            qconfig = config["quantization_config"]
            method = qconfig.get("quant_method", "unknown method") if isinstance(qconfig, dict) else "unknown method"
            raise ModelError(f"{model} is already quantized ({method})", "start from the unquantized checkpoint")
        arch = get_architecture(config)
        skeleton = build_skeleton(folder, config)
        check_against_config(reader, skeleton)
        plans = plan_blocks(reader, arch, skeleton, spec)
        block_tensors = {n for p in plans for n in p.tensors}
        outside = [n for n in reader.names() if n not in block_tensors]
        head = output_head(spec, fmt, reader, skeleton, config)
        vllm = preflight(spec, fmt.name, [(lp.name, lp.out_features, lp.in_features, lp.spec)
                                          for p in plans for lp in p.linears if lp.quantize])
        if vllm and strict_vllm:
            raise SpecError(f"--strict-vllm: {vllm[0]}", f"{len(vllm)} reason(s) in all" if len(vllm) > 1 else None)
        read = HashingReader(lambda name: reader.read(name, check_finite=True))
        reports: list[LayerReport] = []
        q_params = q_bytes = 0
        timer = Timer()
        resources = resource_plan(reader, plans, spec, config, algorithm.needs_calibration, calibration,
                                  batch_size, dev, resume, verify, devices=len(devices))
        emit("start", {"model": model, "output": str(output), "blocks": len(plans), "spec": spec.to_dict(),
                       "device": ",".join(map(str, devices)), "input_bytes": reader.total_bytes})
        emit("plan", resources.to_dict())
        check_disk(output, resources)
        check_memory(resources)
        for reason in vllm:
            emit("warning", {"message": f"vLLM: {reason}"})
        with CheckpointWriter(output, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                              expected_bytes=resources.output_bytes, protect=[folder]) as writer:
            cal = cal_info = None
            if algorithm.needs_calibration:
                t = time.perf_counter()
                cal_set = load_calibration_tokens(folder, config, calibration, dev, emit)
                timer.add("calibration data", t)
                cal_info = {"source": cal_set.source, "sha256": cal_set.sha256,
                            "nsamples": int(cal_set.tokens.shape[0]), "seqlen": int(cal_set.tokens.shape[1]),
                            "rule": cal_set.rule}
                source = getattr(calibration, "source", "self")
                if source != "self" and Path(source).expanduser().is_file():
                    cal_info["path"] = str(Path(source).expanduser().resolve())
                cal = Calibration(skeleton, arch.layers, arch.sequential, cal_set.tokens,
                                  true_sequential=getattr(options, "true_sequential", True),
                                  batch_size=batch_size, dtype=torch.float32, arch=arch,
                                  stored_dtype=reader.dtype)
            state = work.state = ResumeState(output, {
                "tool": __version__, "model": model_fingerprint(folder), "spec": spec.to_dict(),
                "options": asdict(options) if options is not None else None, "format": fmt.name,
                "calibration_tokens": tokens_fingerprint(cal.tokens if cal is not None else None),
                "batch_size": batch_size if cal is not None else None, "device": dev.type,
                "max_shard_bytes": max_shard_bytes}, enabled=resume, emit=emit, identity=files_identity(folder))
            state.open(calibrated=cal is not None)
            done = state.check_sources(read, outside)
            digests: dict[str, str] = {}              # module -> digest of its result (verification)
            final_inputs = None                        # the last block's outputs (calibrated runs)
            for name in outside:                       # embeddings, final norm, untied lm_head
                if head is not None and name == f"{head[0]}.weight":
                    weight = read(name)
                    head_qw, head_encoded = head_tensors(head, weight, fmt, reader.dtype(name))
                    digests[head[0]] = digest(head_qw)
                    for local, tensor in head_encoded.items():
                        writer.add(f"{head[0]}.{local}", tensor)
                        q_bytes += tensor.numel() * tensor.element_size()
                    q_params += weight.numel()
                    continue
                writer.add(name, read(name))
            state.save_outside(read.take(outside))
            for index in range(done):                  # blocks finished by an interrupted run
                tensors, saved = state.load_block(index)
                for name, tensor in tensors:
                    writer.add(name, tensor)
                q_params += saved["quantized_params"]
                q_bytes += saved["quantized_bytes"]
                digests.update(saved.get("digests", {}))
                reports.extend(LayerReport(r["name"], tuple(r["shape"]), r["seconds"], r["metrics"])
                               for r in saved["layers"])
            start_inputs = state.load_inputs(done) if done and cal is not None else None
            for result in run(plans, algorithm, read, devices, cal, timer, start=done, start_inputs=start_inputs):
                t = time.perf_counter()
                # Formats that record the weight's dtype (bnb) get the checkpoint's, not the work dtype.
                encoded = {name: fmt.encode(replace(qw, source_dtype=reader.dtype(f"{name}.weight")))
                           for name, (qw, _) in result.quantized.items()}
                block_digests = {name: digest(qw) for name, (qw, _) in result.quantized.items()}
                digests.update(block_digests)
                if result.next_inputs is not None:
                    final_inputs = result.next_inputs
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
                q_params += block_params
                q_bytes += block_bytes
                layers = [asdict(r) for r in result.reports]
                state.save_block(result.index, ordered, {"quantized_params": block_params,
                                                         "quantized_bytes": block_bytes, "layers": layers,
                                                         "digests": block_digests},
                                 result.next_inputs, source=read.take(plans[result.index].tensors))
                timer.add("write", t)
                reports.extend(result.reports)
                if result.index == done:               # the first block this run computed
                    remaining = len(plans) - done - 1
                    emit("eta", {"first_block_seconds": result.seconds, "remaining_blocks": remaining,
                                 "expected_seconds": (time.perf_counter() - start) + remaining * result.seconds})
                emit("block", {"index": result.index, "blocks": len(plans), "seconds": result.seconds,
                               "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_mb(devices),
                               "timings": {k: round(v, 3) for k, v in timer.seconds.items()}, "layers": layers})
            in_block, dynamic = modules_in_block(plans, arch, spec)
            meta: dict[str, Any] = {"quantizer": [f"quantize-llm:{__version__}"], "method": spec.method,
                                    "spec": spec.to_dict()}
            if options is not None:
                meta["options"] = asdict(options)
            if cal_info is not None:
                meta["calibration"] = cal_info
            extra: dict[str, Any] = {"meta": meta}
            for key, attr in (("damp_percent", "damp"), ("static_groups", "static_groups"),
                              ("true_sequential", "true_sequential")):
                if hasattr(options, attr):
                    extra[key] = getattr(options, attr)
            extra.update(getattr(algorithm, "config_extra", dict)())
            if head is not None:
                extra["lm_head"] = True
                if (head[1].bits, head[1].group_size, head[1].sym) != (spec.bits, spec.group_size, spec.sym):
                    dynamic[f"+:^{re.escape(head[0])}$"] = {"bits": head[1].bits, "group_size": head[1].group_size,
                                                             "sym": head[1].sym}
            if dynamic:
                extra["dynamic"] = dynamic
            quantized = {lp.name for p in plans for lp in p.linears if lp.quantize} | ({head[0]} if head else set())
            dense = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
            model_dtype = config.get("dtype") or config.get("torch_dtype")
            qconfig = fmt.quantization_config(spec, in_block, extra, dense_modules=dense,
                                              dtype=str(model_dtype).removeprefix("torch.") if model_dtype else None)
            summary = Summary(model=model, output=str(output), spec=spec.to_dict(), blocks=len(plans),
                              seconds=0.0, input_bytes=reader.total_bytes, output_bytes=writer.total_bytes,
                              quantized_params=q_params, quantized_bytes=q_bytes,
                              bits_per_weight=8 * q_bytes / max(q_params, 1), peak_rss_mb=0.0,
                              layers=reports, timings=dict(timer.seconds), calibration=cal_info)
            files: dict[str, Any] = dict(carried_files(folder))
            if fmt.config_file:
                files[fmt.config_file] = json_text(qconfig)
            files["README.md"] = model_card(summary, qconfig, command, folder, fmt.description)
            t = time.perf_counter()
            verification: dict[str, Any] = {}

            def check(tmp: Path) -> None:
                t0 = time.perf_counter()
                verification["modules"] = check_modules(tmp, digests)
                nonlocal final_inputs
                if cal is not None and final_inputs is None and done == len(plans):
                    final_inputs = state.load_inputs(len(plans))
                if cal is not None and final_inputs is not None:
                    batch = min(batch_size, cal.tokens.shape[0])
                    verification["last_block_rel_diff"] = check_outputs(tmp, cal.tokens[:batch], final_inputs[0],
                                                                        arch.layers, dev)
                verification["seconds"] = time.perf_counter() - t0
                emit("verified", dict(verification))

            writer.finish(config={**config, "quantization_config": qconfig}, files=files,
                          verify=check if verify else None)
            summary.verification = verification or None
            state.clear()
            timer.add("write", t)
    return summary


def json_text(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"


def peak_device_mb(devices: tuple[torch.device, ...]) -> float | None:
    """Peak memory allocated by torch so far on the most loaded CUDA work device; None on CPU."""
    if devices[0].type != "cuda":
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in devices) / 2 ** 20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_card(summary: Summary, qconfig: dict, command: str | None, folder: Path,
               layout: str = "GPTQ layout that transformers (with optimum and gptqmodel) and vLLM load") -> str:
    """README.md for the output: what was done, with which settings, and how to load it."""
    spec = summary.spec
    source_license = _front_matter_value(folder / "README.md", "license")
    head = ["---", "library_name: transformers", f"tags: [quantize-llm, {qconfig['quant_method']}, "
            f"{spec['bits']}-bit, {spec['method']}]"]
    if source_license:
        head.append(f"license: {source_license}")
    if "/" in summary.model and not Path(summary.model).exists():
        head.append(f"base_model: {summary.model}")
    head.append("---")
    gs = "per channel" if spec["group_size"] == -1 else str(spec["group_size"])
    grid = [("bits", spec["bits"]), ("group size", gs), ("symmetric", spec["sym"]), ("act-order", spec["act_order"]),
            ("format", f"{qconfig['quant_method']} ({qconfig.get('checkpoint_format', '')})")]
    stored = "scales and zeros included"
    if spec["codebook"] != "int":   # a 4-bit table with a per-block absmax: no groups, zeros or order
        grid = [("codebook", spec["codebook"]), ("block size", spec["blocksize"]),
                ("double quantization", spec["double_quant"]), ("format", qconfig["quant_method"])]
        stored = "absmax and nested statistics included"
    rows = [("method", spec["method"]), *grid,
            ("kept unquantized", ", ".join(spec["keep_dense"]) or "embeddings, norms, lm_head"),
            *([("per-module overrides (first match wins)",
                "; ".join(f"`{o['match']}`: " + ", ".join(f"{k} {v}" for k, v in o.items() if k != "match")
                          for o in spec["overrides"]))] if spec.get("overrides") else []),
            (f"bits per weight (quantized Linears, {stored})", f"{summary.bits_per_weight:.3f}"),
            ("quantized parameters", f"{summary.quantized_params:,}"),
            *([("calibration", f"{summary.calibration['source']}: {summary.calibration['nsamples']} x "
                               f"{summary.calibration['seqlen']} tokens"),
               ("calibration tokens SHA-256", summary.calibration["sha256"]),
               ("calibration rule", summary.calibration["rule"])] if summary.calibration else []),
            ("tool", f"quantize-llm {__version__}")]
    table = ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    cmd = command or f"quantize-llm {spec['method']} {summary.model}"
    body = [f"# {Path(summary.output).name}", "",
            f"`{summary.model}` quantized to {spec['bits']}-bit with {spec['method'].upper()} by quantize-llm "
            f"{__version__}, stored in the {layout}.", "", *table, "", "## Command", "", "```",
            cmd, "```", "", "## Loading", "", "```python", "from quantize_llm import load_quantized",
            f"model = load_quantized(\"{Path(summary.output).name}\")", "```", ""]
    return "\n".join(head + [""] + body)


def _front_matter_value(readme: Path, key: str) -> str | None:
    try:
        lines = readme.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip() or None
    return None
