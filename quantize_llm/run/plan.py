"""Planning a run: `plan_run(job)` decides and checks everything before any work.

A RunPlan is a frozen record of what a run will do: the source checkpoint and its architecture,
every block's Linears with their settings, the output head, the devices, the memory and disk the
run needs, what identifies it for resuming, and what vLLM will make of the result. Making one
reads config.json and the safetensors headers (and downloads a hub model); it writes nothing and
loads no weights. `quantize-llm plan` prints it, and every run prints the same lines before it starts
(`execute.execute`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .._version import __version__
from ..algorithms import get_algorithm
from ..algorithms.base import Algorithm
from ..calibration.sequential import BlockPlan, LinearPlan
from ..core.devices import resolve_devices
from ..core.spec import QuantSpec
from ..errors import CheckpointError, ModelError, SpecError
from ..formats import get_format
from ..formats.base import Format
from ..formats.checkpoint import check_output, human_bytes, local_folder
from ..formats.vllm import preflight
from ..models.architectures import ArchitectureMap, architecture_name, get_architecture
from ..models.load import CheckpointReader, build_skeleton, check_against_config, resolve_model
from ..models.sources import refuse_quantized
from ..models.structure import Blocks, discover
from ..models.weightmap import WeightMap
from ..models.weightmap import build as build_weight_map
from .job import Job, parse_size
from .resources import ResourcePlan, SelfText, available_memory, kv_cache_bytes
from .resources import estimate as estimate_resources
from .resume import model_fingerprint


@dataclass(frozen=True)
class Source:
    """The checkpoint a run reads."""

    model: str                   # as the user named it: a folder, a hub id or a cache entry
    folder: Path                 # the resolved checkpoint folder
    config: dict[str, Any]       # config.json
    architecture: str            # config.json's architectures[0]
    arch: ArchitectureMap | None  # the family's override (models/architectures.py), if it has one
    skeleton: nn.Module          # the float model on the meta device
    total_bytes: int             # tensor bytes in the weight files
    layers: str                  # the path of the ModuleList of decoder blocks (models/structure.py)
    kept: tuple[str, ...]        # what stays dense besides embeddings and head, as plan lines
    weights: WeightMap | None = None   # stored names -> the model's names (renames, fused experts)


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided and checked (see the module docstring)."""

    job: Job
    command: str | None          # the command line, for the model card
    source: Source
    spec: QuantSpec              # the job's spec with the format's smallest zero point
    format: type[Format]
    algorithm: type[Algorithm]
    calibrated: bool             # the algorithm (with these options) needs calibration inputs
    devices: tuple[torch.device, ...]
    blocks: tuple[BlockPlan, ...]
    outside: tuple[str, ...]     # tensors outside the blocks: embeddings, final norm, untied head
    head: tuple[str, QuantSpec] | None   # the output head and its grid, when an override quantizes it
    resources: ResourcePlan
    fingerprint: dict[str, Any]  # what a saved run must share to be resumed (the calibration tokens join it)
    vllm: tuple[str, ...]        # why vLLM would serve the result slowly or not at all
    allocation: Any = None       # budget.Choice: the per-module settings chosen for --target-bpw/--target-size

    @property
    def output(self) -> Path:
        return self.job.output

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.job.max_shard_size)

    def lines(self) -> list[str]:
        """The plan as people read it (`quantize-llm plan`, and the start of every run)."""
        src, spec = self.source, self.spec
        linears = [lp for b in self.blocks for lp in b.linears]
        quantized = sum(lp.quantize for lp in linears)
        grid = (f"{spec.codebook} blocks of {spec.blocksize}" if spec.codebook != "int" else
                f"{spec.bits}-bit, group {'per channel' if spec.group_size == -1 else spec.group_size}, "
                f"{'sym' if spec.sym else 'asym'}{', act-order' if spec.act_order else ''}")
        overridden = sum(lp.spec is not None for lp in linears)
        lines = [f"model: {src.model} ({src.architecture}, {len(self.blocks)} blocks, "
                 f"{human_bytes(src.total_bytes)} of weights)",
                 f"quantize: {quantized} of {len(linears)} block Linears with {spec.method}, {grid}"
                 + (f" ({overridden} with their own setting)" if overridden else "")
                 + (f"; {self.head[0]} too" if self.head else "") + f" -> the {self.format.name} format",
                 f"calibration: {self._calibration()}",
                 f"devices: {','.join(map(str, self.devices))}"]
        lines += [f"dense: {line}" for line in src.kept]
        if self.allocation is not None:
            lines += self.allocation.lines()
        return lines + self.resources.lines()

    def _calibration(self) -> str:
        cal = self.job.calibration
        if not self.calibrated or cal is None:
            return "none (this method uses no data)"
        text = f"{cal.source}, {cal.nsamples} x {cal.seqlen} tokens, batches of {self.job.batch_size}"
        towers = non_text_parts(self.source.skeleton)
        if towers:   # a multimodal model: its language model alone runs on the calibration text
            text += f"; text only: the language model's blocks see it (not run: {', '.join(towers)})"
        return text


def plan_run(job: Job, command: str | None = None) -> RunPlan:
    """Decide and check everything `job` will do (see the module docstring). Bad input is refused
    here, with one line each, before any work: settings the format or the algorithm cannot take,
    devices this machine lacks, an output that would destroy something, a model that is missing,
    damaged, already quantized or not of its declared shape, layers the format cannot hold."""
    fmt, spec, algorithm = prepare(job.spec, job.options)
    devices = resolve_devices(job.device)
    check_output(job.output, overwrite=job.overwrite, protect=local_folder(job.model))
    parse_size(job.max_shard_size)
    if job.push_to_hub:
        from .publish import check_hub

        check_hub(job.push_to_hub)
    folder = resolve_model(job.model, trust_remote_code=job.trust_remote_code)
    check_output(job.output, overwrite=job.overwrite, protect=[folder])
    with CheckpointReader(folder) as reader:
        config = reader.config
        if config.get("quantization_config"):      # an FP8 source reads as bfloat16 and has none here
            refuse_quantized(job.model, config["quantization_config"])
        architecture = architecture_name(config)
        arch = get_architecture(config)
        skeleton = build_skeleton(folder, config, trust_remote_code=job.trust_remote_code)
        check_against_config(reader, skeleton)
        found = discover(skeleton, arch.layers if arch is not None else None)
        weights = build_weight_map(skeleton, reader.names())
        blocks = plan_blocks(reader, found, arch, skeleton, spec, weights)
        allocation = None
        if job.budget is not None:   # measured (or read from the cache beside OUT), then solved
            from .budget import plan_budget

            allocation = plan_budget(job, fmt, spec, folder, blocks, reader, weights.memory_of(), devices[0])
            spec = allocation.apply(spec.replace(min_zero=0))
            spec = spec.replace(min_zero=fmt.min_zero(spec))
            blocks = plan_blocks(reader, found, arch, skeleton, spec, weights)
        in_blocks = {n for b in blocks for n in b.tensors}
        head = output_head(spec, fmt, reader, skeleton, config)
        vllm = tuple(preflight(spec, fmt.name, [(lp.name, lp.out_features, lp.in_features, lp.spec)
                                                for b in blocks for lp in b.linears if lp.quantize]))
        if vllm and job.strict_vllm:
            raise SpecError(f"--strict-vllm: {vllm[0]}", f"{len(vllm)} reason(s) in all" if len(vllm) > 1 else None)
        resources = resource_plan(reader, blocks, spec, config, algorithm.needs_calibration, job.calibration,
                                  job.batch_size, devices[0], job.resume, job.verify, devices=len(devices),
                                  options=job.options, trust_remote_code=job.trust_remote_code,
                                  max_memory=parse_size(job.max_memory, "--max-memory")
                                  if job.max_memory is not None else None)
        outside = tuple(n for n in reader.names() if n not in in_blocks)
        source = Source(job.model, folder, config, architecture, arch, skeleton, reader.total_bytes, found.path,
                        kept_dense(found, skeleton, outside, blocks, weights), weights)
    calibrated = bool(algorithm.needs_calibration)
    fingerprint = {"tool": __version__, "model": model_fingerprint(folder), "spec": spec.to_dict(),
                   "options": asdict(job.options) if job.options is not None else None, "format": fmt.name,
                   "batch_size": job.batch_size if calibrated else None, "device": devices[0].type,
                   "max_shard_bytes": parse_size(job.max_shard_size)}
    return RunPlan(job=job, command=command, source=source, spec=spec, format=fmt, algorithm=type(algorithm),
                   calibrated=calibrated, devices=devices, blocks=tuple(blocks), outside=outside, head=head,
                   resources=resources, fingerprint=fingerprint, vllm=vllm, allocation=allocation)


def prepare(spec: QuantSpec, options: object | None) -> tuple[type[Format], QuantSpec, Algorithm]:
    """The format, the spec with the format's smallest zero point, and the algorithm; an
    impossible combination is a SpecError before any model is touched."""
    fmt = get_format(spec.format)
    reason = fmt.supports(spec)
    if reason is not None:
        raise SpecError(reason)
    spec = spec.replace(min_zero=fmt.min_zero(spec))
    algorithm = get_algorithm(spec.method)(spec, options)
    if spec.codebook not in algorithm.codebooks:
        raise SpecError(f"the {spec.method} algorithm does not produce {spec.codebook} codes",
                        "use the nf4 command for nf4/fp4")
    return fmt, spec, algorithm


def plan_blocks(reader: CheckpointReader, found: Blocks, arch: ArchitectureMap | None, skeleton: nn.Module,
                spec: QuantSpec, weights: WeightMap | None = None) -> list[BlockPlan]:
    """Every block's Linears (discovered, models/structure.py), checked against the checkpoint,
    the spec and the format. A family's override fixes the order they are listed in. Names are the
    checkpoint's (`weights` maps them to the model's: renamed blocks, experts fused in memory): each
    expert of fused experts is one matrix of its own, quantized under its stored name."""
    fmt = get_format(spec.format)
    names = reader.names()
    present = set(names)
    weights = weights or build_weight_map(skeleton, names)
    memory_of = weights.memory_of()
    order = {name: i for i, name in enumerate(arch.linears)} if arch is not None else {}
    plans = []
    for i, locals_ in enumerate(found.linears):
        mprefix = f"{found.path}.{i}."
        tensors = tuple(n for n in names if memory_of.get(n, n).startswith(mprefix))
        layers = cast(nn.ModuleList, skeleton.get_submodule(found.path))
        prefix = _stored_prefix(weights, mprefix, locals_ or tuple(n for n, _ in layers[i].named_parameters()))
        units: list[tuple[str, str, tuple[str, str, int] | None]] = []
        for local in sorted(locals_, key=lambda n: (order.get(n, len(order)), locals_.index(n))):
            if mprefix + local + ".weight" in weights.fused:   # stored in another layout: kept_dense says so
                continue
            stored = weights.disk_name(mprefix + local + ".weight")
            if stored not in present:
                raise CheckpointError(f"tensor {stored} is missing from the checkpoint",
                                      "the checkpoint is incomplete or not of the architecture it declares")
            units.append((stored.removesuffix(".weight"), local, None))
        for target, fused in weights.fused.items():   # experts stored one matrix each, fused in memory
            if not target.startswith(mprefix) or skeleton.get_parameter(target).dim() != 3:
                continue
            for pattern, stored_names in fused.pieces.items():
                for e, stored in enumerate(stored_names):
                    if len(reader.shape(stored)) == 2 and stored.endswith(".weight") and stored.startswith(prefix):
                        units.append((stored.removesuffix(".weight"), stored[len(prefix):].removesuffix(".weight"),
                                      (target[len(mprefix):], pattern, e)))
        linears: list[LinearPlan] = []
        unfit: list[tuple[int, str]] = []   # (index in linears, why the format cannot hold it)
        for name, local, expert in units:
            out_features, in_features = reader.shape(f"{name}.weight")
            quantize = not spec.is_dense(name)
            own = None
            if quantize:
                own = module_spec(spec, name, fmt)
                reason = fmt.check_shape(own or spec, out_features, in_features)
                if reason is not None:
                    unfit.append((len(linears), reason))
            linears.append(LinearPlan(name, local, out_features, in_features, quantize, own, expert=expert))
        if unfit:
            linears = _keep_unfit_dense(linears, unfit, fmt.name)
        plans.append(BlockPlan(i, prefix, tuple(linears), tensors, "" if prefix == mprefix else mprefix))
    if not any(p.linears for p in plans):
        raise ModelError(f"the decoder blocks under {found.path} hold no Linear layer this tool can quantize"
                         + (f" (their weights are fused 3-D parameters such as {found.fused[0][0]})"
                            if any(found.fused) else ""),
                         "this family cannot be quantized by this tool yet; report the model")
    if any(lp.spec is not None and _grid(lp.spec) != _grid(spec) for p in plans for lp in p.linears) \
            and not fmt.per_module:
        raise SpecError(f"the {fmt.name} format has one setting for every layer, so it cannot hold per-module "
                        "overrides", "use the gptq format (it records them as `dynamic` entries)")
    if not any(lp.quantize for p in plans for lp in p.linears):
        raise SpecError("--keep-dense leaves no Linear to quantize", "loosen the --keep-dense patterns")
    return plans


def _stored_prefix(weights: WeightMap, mprefix: str, locals_: tuple[str, ...]) -> str:
    """How the checkpoint names the block whose path in memory is `mprefix`."""
    for local in locals_:
        for suffix in (f"{local}.weight", local):
            stored = weights.to_disk.get(mprefix + suffix)
            if stored is not None and stored.endswith(suffix):
                return stored[:-len(suffix)]
    return mprefix


def non_text_parts(skeleton: nn.Module) -> list[str]:
    """The top-level parts of a multimodal model that are not its language model (vision tower,
    audio encoder, projector), by module path; [] for a text model."""
    from ..models.structure import is_not_text

    parts: list[str] = []
    for path, module in skeleton.named_modules():
        if path and is_not_text(path) and not any(path.startswith(p + ".") for p in parts) \
                and any(True for _ in module.parameters()):
            parts.append(path)
    return parts


UNFIT_SHARE = 0.5   # at most this share of a block's Linear weights may be kept dense for their shape


def _keep_unfit_dense(linears: list[LinearPlan], unfit: list[tuple[int, str]], fmt: str) -> list[LinearPlan]:
    """Linears whose shape the format cannot hold (a state-space model's 4-row gate projection, a
    width no group size divides) stay dense when they are a small part of the block; where they
    are not, the run is refused, naming the first and the fix."""
    size = sum(lp.out_features * lp.in_features for lp in linears)
    small = sum(linears[i].out_features * linears[i].in_features for i, _ in unfit)
    if small > UNFIT_SHARE * size:
        lp, reason = linears[unfit[0][0]], unfit[0][1]
        raise SpecError(f"{lp.name}: the {fmt} format cannot hold this layer ({reason})",
                        f"keep it unquantized with --keep-dense '{re.escape(lp.name)}$'")
    for i, reason in unfit:
        linears[i] = dataclasses.replace(linears[i], quantize=False, spec=None, why_dense=reason)
    return linears


def kept_dense(found: Blocks, skeleton: nn.Module, outside: tuple[str, ...],
               blocks: list[BlockPlan] | None = None, weights: WeightMap | None = None) -> tuple[str, ...]:
    """What stays unquantized besides embeddings, norms and the head, one line per kind: MoE
    routers, fused experts, Linears whose shape the format cannot hold, and Linears outside the
    decoder blocks (vision towers, projectors)."""
    lines = []
    weights = weights or WeightMap({}, {})
    converted = [f"{found.path}.{i}.{local}" for i, block in enumerate(found.linears) for local in block
                 if f"{found.path}.{i}.{local}.weight" in weights.fused]
    if converted:
        lines.append(f"{len(converted)} block Linears stored in another layout that transformers converts on "
                     f"load, such as {converted[0]}")
    unfit = [lp for b in blocks or () for lp in b.linears if lp.why_dense]
    if unfit:
        first = unfit[0]
        lines.append(f"{len(unfit)} block Linears the format cannot hold, such as {first.name} "
                     f"[{first.out_features}, {first.in_features}] ({first.why_dense})")
    routers = sorted({r for block in found.routers for r in block})
    if routers:
        lines.append(f"MoE routers ({', '.join(routers)}) in {sum(map(bool, found.routers))} blocks")
    split = {lp.expert[0] for b in blocks or () for lp in b.linears if lp.expert}
    fused = sorted({f for block in found.fused for f in block if f not in split})
    if fused:
        lines.append(f"3-D expert weights stored fused in the checkpoint ({', '.join(fused)}) in "
                     f"{sum(map(bool, found.fused))} blocks (only experts stored one matrix each are quantized)")
    blocks_prefix = found.path + "."
    head = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None  # type: ignore[operator]
    others = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and m is not head
              and not n.startswith(blocks_prefix)]
    if others:
        parts = sorted({n.split(".")[0] if n.split(".")[0] != "model" else ".".join(n.split(".")[:2])
                        for n in others})
        lines.append(f"{len(others)} Linears outside the decoder blocks (under {', '.join(parts)})")
    return tuple(lines)


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
    if not fmt.per_module:
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


def estimate_output_bytes(reader: CheckpointReader, plans: list[BlockPlan], spec: QuantSpec) -> int:
    """Upper estimate of the written checkpoint's tensor bytes (for the disk-space check)."""
    total: float = reader.total_bytes
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


def resource_plan(reader: CheckpointReader, plans: list[BlockPlan], spec: QuantSpec, config: dict,
                  calibrated: bool, calibration: Any, batch_size: int, dev: torch.device, resume: bool,
                  verify: bool = True, devices: int = 1, options: Any = None,
                  trust_remote_code: bool = False, max_memory: int | None = None) -> ResourcePlan:
    """Memory and disk the run will need (resources.py), from the headers and the settings;
    `max_memory` caps the room a calibrated run plans for on its work device."""
    from ..calibration.data import CalibrationSpec

    calibration = calibration or CalibrationSpec()
    solver = calibrated and (spec.method == "gptq" or getattr(options, "then", None) == "gptq"
                             or getattr(options, "inner", None) == "gptq"
                             or getattr(options, "rounding", None) == "gptq")
    nsamples, seqlen = calibration.nsamples, calibration.seqlen
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if context:
        seqlen = min(seqlen, int(context))
    self_text = self_text_plan(reader, config, calibration, seqlen, dev, trust_remote_code) \
        if calibrated and calibration.source == "self" else None
    return estimate_resources(reader, plans, config, output_bytes=estimate_output_bytes(reader, plans, spec),
                              calibrated=calibrated, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size,
                              device_type=dev.type, resume=resume, verify=verify, devices=devices,
                              solver=solver, search=calibrated and spec.method == "awq", self_text=self_text,
                              masks=calibrated and spec.method == "outlier",
                              paired=calibrated and bool(getattr(options, "qep", 0)),
                              sequential=getattr(options, "true_sequential", True) is not False,
                              trials=_trials(options),
                              room=_room(memory_room(dev), max_memory) if calibrated else None)


def _trials(options: Any) -> tuple[int, int]:
    """AWQ's scale trials per group and clip trials per weight group (the plan's compute)."""
    grid = int(getattr(options, "grid", 20))
    clip = int(getattr(options, "max_shrink", 0.5) * getattr(options, "clip_grid", 20)) + 1 \
        if getattr(options, "clip", True) else 0
    return grid, clip


def _room(free: int | None, limit: int | None) -> int | None:
    return limit if free is None else free if limit is None else min(free, limit)


def memory_room(dev: torch.device) -> int | None:
    """The memory a calibrated run on `dev` can hold its blocks and activations in (free_memory):
    activations that do not fit beside the rest are kept on the host or on disk (resources.estimate)."""
    if dev.type not in ("cpu", "cuda"):
        return None
    return free_memory(dev)


FREE_SHARE = 0.8   # of the free memory, what `self` generation may take unless --generation-memory says


def free_memory(dev: torch.device) -> int | None:
    """Bytes free for the work: the host's available memory on a CPU, the GPU's free memory on a GPU."""
    if dev.type == "cpu":
        return available_memory()
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(dev)[0])


def self_text_plan(reader: CheckpointReader, config: dict, calibration: Any, seqlen: int, dev: torch.device,
                   trust_remote_code: bool = False) -> SelfText:
    """How the model will write its own calibration text (resources.SelfText): whole when it fits,
    offloaded otherwise. With --generation-memory, offloaded to that many bytes of weights whenever
    the whole model needs more; without it, whole when the weights, the KV cache and the logits fit
    in FREE_SHARE of the free memory (host on a CPU, the GPU's own on a GPU), else offloaded to the
    largest budget whose phase (SelfText.work_bytes) fits in that share. The weights are float32 on
    a CPU, bfloat16 on a GPU, as execute.load_calibration_tokens loads them."""
    from ..calibration.data import GENERATION_BATCH
    from ..models.sources import largest_module, offload_map

    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    itemsize = dtype.itemsize
    sizes = sorted(itemsize * math.prod(reader.shape(n)) for n in reader.names())
    weights = sum(sizes)
    cache = kv_cache_bytes(config, min(GENERATION_BATCH, calibration.nsamples), seqlen, itemsize)
    whole = SelfText(weights_bytes=weights, cache_bytes=cache)
    budget, share = calibration.generation_bytes, None
    if budget is None:
        free = free_memory(dev)
        if free is None or weights + cache <= FREE_SHARE * free:
            return whole
        share = int(FREE_SHARE * free)
        budget = share - cache
    elif budget >= weights:
        return whole
    if reader.source_quantization is not None:   # dequantized in memory: there are no stored floats to read
        if share is not None:
            return whole
        raise SpecError("--generation-memory cannot offload an FP8 checkpoint (its weights are dequantized in "
                        "memory, so none can be read from its files)", "pass --dataset with real text")

    def offloaded(budget: int) -> SelfText:
        offload = offload_map(reader.folder, config, dtype, budget, dev, trust_remote_code)
        return SelfText(weights_bytes=weights, cache_bytes=cache, budget_bytes=budget,
                        resident_bytes=offload.resident_bytes, streamed_bytes=offload.streamed_bytes,
                        load_bytes=sum(sizes[-2:]))

    name, largest = largest_module(reader.folder, config, dtype, trust_remote_code)
    # The largest module is read whole. On a GPU, one more must fit beside it: with every module on
    # disk, accelerate would run the model on the CPU.
    least = largest if dev.type == "cpu" else 2 * largest
    if share is None and budget < least:
        raise SpecError(f"--generation-memory {calibration.generation_memory} is less than {name}, which "
                        f"offloading holds in memory whole ({human_bytes(largest)} in {_short(dtype)})"
                        + ("" if dev.type == "cpu" else ", twice over on a GPU (one module must stay there)"),
                        f"give at least {human_bytes(least)}, or pass --dataset")
    text = offloaded(max(budget, least))
    if share is not None and text.work_bytes(dev.type == "cpu") > share and budget > least:
        # loading's two weights did not fit beside what the budget keeps: keep less
        text = offloaded(max(budget - (text.work_bytes(dev.type == "cpu") - share), least))
    return text


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _grid(spec: QuantSpec) -> tuple[int, int, bool]:
    """What a format must record per module: bits, group size, sym."""
    return spec.bits, spec.group_size, spec.sym
