"""The block-by-block runner: one decoder block in memory at a time, results streamed out.

`run()` yields, for each block in order, the quantized results of its Linears and the block's
other tensors, so the caller can encode and write them and drop them before the next block is read.

Calibrated algorithms (`needs_calibration`) get the block's real inputs: the calibration tokens
are run once through everything before block 0 (`capture_inputs`), which also records the keyword
arguments every block receives (masks, rotary embeddings). Then, per block: its weights are loaded
onto the work device, its Linears are quantized stage by stage (true-sequential: q/k/v, then o,
then gate/up, then down), each stage's forward pass stopping as soon as the inputs it needs have
been observed; the quantized (fake-quant) block finally produces the next block's inputs, so
quantization error propagates.

With several work devices (devices.py), calibration batch b and its keyword arguments live on
device b % n, every device holds a replica of the current block, the forward passes run side by
side, the observed inputs reach the algorithm in batch order, and independent solves run on
different devices (`LayerContext.map`): the same arithmetic in the same order as on one device.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..algorithms.base import Algorithm, BlockContext, LayerContext
from ..core import narrow as narrow_weights
from ..core.devices import move, spread
from ..core.qweight import QuantizedWeight
from ..errors import RunError
from .activations import Activations, Paired
from .experts import MIN_EXPERT_TOKENS, ExpertUnits, expert_units, observing
from .trace import awq_groups, query_key, trace


@dataclass(frozen=True)
class LinearPlan:
    """One Linear of a block: its full name, shape, and whether it is quantized."""

    name: str                    # full module path, e.g. "model.layers.0.self_attn.q_proj"
    local: str                   # path inside the block, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int
    quantize: bool
    spec: Any = None             # this Linear's QuantSpec when a per-module override applies
    why_dense: str | None = None   # kept dense by the plan, not by --keep-dense: why (the format cannot hold it)
    expert: tuple[str, str, int] | None = None   # one expert's matrix of fused experts: (the fused parameter's
    #                                             path in the block, the stored tensors' pattern, expert index)


@dataclass(frozen=True)
class BlockPlan:
    index: int
    prefix: str                  # e.g. "model.layers.0.", as the checkpoint names the block's tensors
    linears: tuple[LinearPlan, ...]
    tensors: tuple[str, ...]     # every stored tensor of the block
    memory_prefix: str = ""      # the block's path in the model in memory, where it differs (renamed)

    @property
    def module_prefix(self) -> str:
        return self.memory_prefix or self.prefix


@dataclass
class LayerReport:
    """What happened to one Linear; metrics such as rel_error, damp."""

    name: str
    shape: tuple[int, int]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class BlockResult:
    index: int
    quantized: dict[str, tuple[QuantizedWeight, Tensor | None]]   # full name -> (result, bias)
    passthrough: dict[str, Tensor]                                 # tensor name -> unchanged tensor
    reports: list[LayerReport]
    seconds: float
    next_inputs: Sequence[Tensor] | None = None   # calibrated runs: the next block's inputs (for resuming)


@dataclass
class Calibration:
    """What calibrated runs need besides the checkpoint."""

    skeleton: nn.Module          # the model on the meta device (models.load.build_skeleton)
    layers: str                  # the path of the ModuleList of decoder blocks (models.structure)
    tokens: Tensor               # int64 (n, L)
    true_sequential: bool = True
    batch_size: int = 8
    dtype: torch.dtype = torch.float32
    arch: Any = None             # the family's ArchitectureMap override, for block-level algorithms (AWQ)
    stored_dtype: Callable[[str], torch.dtype] | None = None   # checkpoint dtype of a tensor name
    weights: Any = None          # models.weightmap.WeightMap: the model's parameter names -> stored tensors
    activations: str = "device"  # where the activations are kept: "device", "host" or "disk" (activations.py)
    offload_dir: Path | None = None   # the folder of "disk"
    # Hold the quantized Linears of a block in their stored dtype (bf16) and widen each one as it
    # runs, observe one input group per pass, and serve solved Linears from their codes: the same
    # results in about half a float32 block (the plan's choice where the float32 block does not fit)
    narrow: bool = False

    def loader(self, read: Callable[[str], Tensor]) -> Callable[[str], Tensor]:
        """A model parameter's value by its name in memory (renamed, or rebuilt from fused experts; a
        parameter tied to another that is stored, such as a decoder's copy of the embeddings, from it)."""
        weights = self.weights
        if weights is None:
            return read
        tied = dict(getattr(self.skeleton, "all_tied_weights_keys", None) or {})   # target -> source

        def load(name: str) -> Tensor:
            if name not in weights.to_disk and name not in weights.fused and tied.get(name) in weights.to_disk:
                name = tied[name]
            return weights.assemble(name, read)
        return load

    def stored_name(self, name: str) -> str:
        """The stored tensor behind a model parameter (the first piece of fused experts)."""
        weights = self.weights
        if weights is None:
            return name
        fused = weights.fused.get(name)
        return fused.names()[0] if fused is not None else weights.disk_name(name)


class _Stop(Exception):
    """Raised by a hook once a forward pass has produced everything the current stage needs."""


class Timer:
    """Seconds spent per named stage (forward, hessian, solve, read, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


def run(blocks: list[BlockPlan], algorithm: Algorithm, read: Callable[[str], Tensor],
        device: torch.device | tuple[torch.device, ...], calibration: Calibration | None = None,
        timer: Timer | None = None, start: int = 0,
        start_inputs: Sequence[Tensor] | None = None) -> Iterator[BlockResult]:
    """Quantize block after block; `read(name)` returns a checkpoint tensor (checked finite).

    device: the work device, or several (calibrated runs spread over them; others use the first).
    start: skip the blocks before it (resuming); a calibrated run then needs `start_inputs`, the
    inputs block `start` received (BlockResult.next_inputs of the block before).
    """
    timer = timer or Timer()
    devices = tuple(device) if isinstance(device, (tuple, list)) else (device,)
    device = devices[0]
    if algorithm.needs_calibration:
        if calibration is None:
            raise RunError(f"the {algorithm.name} algorithm needs calibration data")
        if start and start_inputs is None:
            raise RunError(f"cannot resume at block {start}: its saved calibration inputs are missing")
        yield from _run_calibrated(blocks, algorithm, read, devices, calibration, timer, start, start_inputs)
        return
    for plan in blocks[start:]:
        block_start = time.perf_counter()
        results: dict[str, QuantizedWeight] = {}
        reports = []
        for lp in (lp for lp in plan.linears if lp.quantize):   # one weight in memory at a time
            t = time.perf_counter()
            weight = read(f"{lp.name}.weight").to(device)
            t = timer.add("read", t)
            metrics: dict = {}
            with torch.no_grad():
                qw = algorithm.quantize_layer(LayerContext(index=plan.index, weights={lp.local: weight},
                                                           report=lambda n, m: metrics.update(m),
                                                           specs=_specs([lp]), prefix=plan.prefix))[lp.local]
            t = timer.add("solve", t)
            metrics.setdefault("rel_error", weight_error(weight, qw))
            results[lp.local] = qw
            reports.append(_report(lp, metrics))
            del weight
        yield _finish(plan, results, read, reports, block_start, timer)
        release_memory()


def _specs(plans: Any) -> dict:
    """Local name -> QuantSpec for the Linears whose spec differs from the run's (overrides)."""
    return {lp.local: lp.spec for lp in plans if lp.spec is not None}


def weight_error(weight: Tensor, qw: QuantizedWeight) -> float:
    """||W - W'||_F / ||W||_F, over slices of rows to keep temporaries small."""
    num = den = 0.0
    step = max(1, (1 << 22) // weight.shape[1])
    for r in range(0, weight.shape[0], step):
        w = weight[r:r + step].float()
        deq = qw.dequantize_rows(r, min(r + step, weight.shape[0]))
        num += float(((w - deq) ** 2).sum())
        den += float((w ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and peak RSS creeps up)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def _report(lp: LinearPlan, metrics: dict) -> LayerReport:
    metrics = dict(metrics)
    return LayerReport(lp.name, (lp.out_features, lp.in_features), float(metrics.pop("seconds", 0.0)), metrics)


def _finish(plan: BlockPlan, results: dict[str, QuantizedWeight], read: Callable[[str], Tensor],
            reports: list[LayerReport], start: float, timer: Timer,
            rewritten: dict[str, Tensor] | None = None) -> BlockResult:
    """Bundle a block's results with its other tensors (norms, dense Linears): read as stored, or
    taken from `rewritten` (full name -> tensor) where a block-level algorithm changed them."""
    t = time.perf_counter()
    rewritten = rewritten or {}
    quantized, skip = {}, set()
    for lp in plan.linears:
        if lp.local not in results:
            continue
        bias_name = f"{lp.name}.bias"
        bias = (rewritten[bias_name] if bias_name in rewritten else read(bias_name)) \
            if bias_name in plan.tensors else None
        quantized[lp.name] = (results[lp.local].to("cpu"), bias)
        skip.update({f"{lp.name}.weight", bias_name})
    passthrough = {name: rewritten[name] if name in rewritten else read(name)
                   for name in plan.tensors if name not in skip}
    timer.add("read", t)
    return BlockResult(plan.index, quantized, passthrough, reports, time.perf_counter() - start)


# ---- calibrated path -----------------------------------------------------------------------------

class _Recorder(nn.Module):
    """Stands in for block `index` while capturing: records what the block would receive.

    `block` (the block it stands in for) tells which positional arguments have names: those are
    recorded by name, so that `use_cache` can be turned off however it was passed; the rest are
    replayed positionally. Caches are left out (each replay starts without one)."""

    def __init__(self, index: int, last: int, calls: list[list[dict]], inputs: list[Tensor],
                 block: nn.Module | None = None,
                 live: Callable[[nn.Module, int, Tensor, dict], Any] | None = None) -> None:
        super().__init__()
        self.index, self.last, self.calls, self.inputs = index, last, calls, inputs
        self.signature = _signature(block)
        object.__setattr__(self, "_block", block)   # not a submodule: attribute reads fall back to it
        self.live = live

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)   # the model asks its layers for attributes (BigBird, RWKV)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        args_list = list(args)
        accepts_use_cache = True
        if self.signature is not None:
            params = list(self.signature.parameters.values())[1:]   # after hidden_states
            named = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
            while args_list and named and named[0] not in kwargs:
                kwargs[named.pop(0)] = args_list.pop(0)
            accepts_use_cache = "use_cache" in self.signature.parameters or any(
                p.kind == p.VAR_KEYWORD for p in params)
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
        if args_list:   # replayed positionally (an encoder-decoder's mask, encoder states), caches left out
            kwargs[POSITIONAL] = tuple(None if _is_cache(a) else a for a in args_list)
        if accepts_use_cache:
            kwargs["use_cache"] = False
        else:
            kwargs.pop("use_cache", None)
        self.calls[self.index].append(kwargs)
        if self.index == 0:
            self.inputs.append(hidden_states)
        if self.index == self.last:
            raise _Stop
        if self.live is not None:   # the block's real output: the model hands part of it to the next block
            return self.live(self._block, self.index, hidden_states, kwargs)
        return hidden_states


def _signature(block: nn.Module | None) -> inspect.Signature | None:
    if block is None:
        return None
    try:
        return inspect.signature(block.forward)
    except (TypeError, ValueError):
        return None


def _materialize(module: nn.Module, prefix: str, read: Callable[[str], Tensor], device: torch.device,
                 dtype: torch.dtype, skip: tuple[str, ...] = (), rows: dict[str, Tensor] | None = None,
                 stored: frozenset[str] = frozenset()) -> list[str]:
    """Replace `module`'s meta parameters by checkpoint tensors (floats cast to dtype); buffers to device.
    rows: parameters of which only these rows are kept (`embedding_rows`), cut before the cast.
    stored: parameters kept in their stored floating dtype where it is narrower than dtype.

    Returns the names of the parameters loaded.
    """
    loaded = []
    for name, _ in list(module.named_parameters()):
        if any(name.startswith(s) for s in skip):
            continue
        value = read(prefix + name)
        if rows and name in rows:
            value = value.index_select(0, rows[name].to(value.device))
        keep = not value.is_floating_point() or (name in stored and value.element_size() < dtype.itemsize)
        value = value.to(device=device, dtype=value.dtype if keep else dtype)
        _set(module, name, nn.Parameter(value, requires_grad=False))
        loaded.append(name)
    for name, buf in list(module.named_buffers()):
        if any(name.startswith(s) for s in skip) or buf.device.type == "meta":
            continue
        _set(module, name, buf.to(device), buffer=True)
    return loaded


# An input embedding table larger than this in float32 is cut to the rows the calibration tokens use
# while they are embedded: a 128k vocabulary is 2.1 GB at Llama-3-8B's width and 8.4 GB at 405B's,
# of which 128 x 2048 calibration tokens touch at most a fifth.
COMPACT_EMBEDDING_BYTES = 64 * 2 ** 20


def embedding_rows(base: nn.Module, tokens: Tensor) -> tuple[str, Tensor] | None:
    """(parameter name in `base`, sorted distinct token ids) of base's input embedding table when it
    is worth cutting to the rows `tokens` use: over COMPACT_EMBEDDING_BYTES in float32 and at most
    half of its rows used. None otherwise (or for an input embedding that is not a table)."""
    try:
        emb = input_embeddings(base)
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(emb, nn.Embedding) or emb.weight.dim() != 2:
        return None
    name = next((n for n, m in base.named_modules() if m is emb), None)
    if name is None:
        return None
    ids = torch.unique(tokens.reshape(-1).cpu())                       # sorted
    vocab, width = emb.weight.shape
    if 4 * vocab * width < COMPACT_EMBEDDING_BYTES or 2 * len(ids) > vocab or int(ids[0]) < 0 \
            or int(ids[-1]) >= vocab:
        return None
    return (f"{name}.weight" if name else "weight"), ids


def input_embeddings(base: nn.Module) -> nn.Module:
    """base.get_input_embeddings() of a transformers model (AttributeError for other modules)."""
    return cast(nn.Module, cast(Any, base).get_input_embeddings())


def lookup_rows(emb: nn.Module, ids: Tensor) -> Any:
    """Make `emb`, whose table holds only the rows of the sorted token `ids`, look up token ids as
    the whole table would (ids are mapped to positions before its forward: a subclass's own forward,
    such as a scaled embedding, runs unchanged). Returns the hook's handle."""
    table_ids = ids.to(cast(Tensor, emb.weight).device)

    def remap(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        key = None if args else next(k for k in ("input", "input_ids") if k in kwargs)
        x = args[0] if key is None else kwargs[key]
        pos = torch.searchsorted(table_ids, x).clamp_(max=len(table_ids) - 1)
        if not bool((table_ids[pos] == x).all()):
            raise RunError("a token outside the calibration text reached the input embeddings while block "
                           "0's inputs were made", "report it, with the model's name")
        if key is None:
            return (pos, *args[1:]), kwargs
        return args, {**kwargs, key: pos}

    return emb.register_forward_pre_hook(remap, with_kwargs=True)


def _set(module: nn.Module, name: str, value: Tensor, buffer: bool = False) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if buffer:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = cast(nn.Parameter, value)


def text_model_path(skeleton: nn.Module, layers_path: str) -> str:
    """The innermost transformers model holding the blocks (LlamaModel at "model", a multimodal
    model's language model, BertModel at "bert"): the one that takes token ids."""
    from transformers import PreTrainedModel

    parts = layers_path.split(".")[:-1]
    for depth in range(len(parts), 0, -1):
        path = ".".join(parts[:depth])
        if isinstance(skeleton.get_submodule(path), PreTrainedModel):
            return path
    return ".".join(parts)


def capture_inputs(cal: Calibration, read: Callable[[str], Tensor], device: torch.device,
                   store: Activations | None = None) -> tuple[Any, list[list[dict]]]:
    """Run the tokens through everything before block 0, in batches.

    Returns block 0's inputs per batch (B, L, hidden), in `store` when given (else a list), and, per
    block, the keyword arguments it receives per batch. The embedding weights are released afterwards.
    """
    layers_path = cal.layers
    base_path = text_model_path(cal.skeleton, layers_path)
    base = cal.skeleton.get_submodule(base_path)
    layers = cast(nn.ModuleList, cal.skeleton.get_submodule(layers_path))
    cut = embedding_rows(base, cal.tokens)
    shapes = {name: p.shape for name, p in base.named_parameters()}
    loaded = _materialize(base, base_path + "." if base_path else "", cal.loader(read), device, cal.dtype,
                          skip=((layers_path[len(base_path) + 1:] if base_path else layers_path) + ".",),
                          rows=dict([cut]) if cut else None)
    hook = lookup_rows(input_embeddings(base), cut[1]) if cut else None
    originals = list(layers)
    load = cal.loader(read)

    def live(block: nn.Module, index: int, x: Tensor, kwargs: dict) -> Any:
        """Block `index` run for real (materialized, run, released), for models whose blocks return
        state the next block takes (a sparse-attention indexer's choice, a second stream)."""
        block = copy.deepcopy(block)   # the skeleton's block stays on meta, with its buffers, for the runner
        _materialize(block, f"{layers_path}.{index}.", load, device, cal.dtype)
        return _block_forward(block, x, kwargs, whole=True)

    calls: list[list[dict]] = []
    inputs: Any = store if store is not None else []

    def capture(live_blocks: bool) -> None:
        calls[:] = [[] for _ in range(len(layers))]
        inputs.clear()
        for i in range(len(layers)):
            layers[i] = _Recorder(i, len(layers) - 1, calls, inputs, originals[i], live if live_blocks else None)
        with torch.no_grad():
            for batch in cal.tokens.split(cal.batch_size):
                try:
                    base(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass

    try:
        try:
            capture(live_blocks=False)
        except (ValueError, TypeError):   # the model unpacks what a block returns: run the blocks for real
            try:
                capture(live_blocks=True)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise RunError(f"the decoder blocks of {type(cal.skeleton).__name__} hand state to the next "
                               f"block besides the hidden states ({_first_line(exc)}), which the calibrated "
                               "runner cannot replay block by block", "use rtn (or nf4) for this model") from None
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        if hook is not None:
            hook.remove()
        for name in loaded:   # release the embeddings; the skeleton's blocks are untouched
            _set(base, name, nn.Parameter(torch.empty(shapes[name], dtype=base.get_parameter(name).dtype,
                                                      device="meta"), requires_grad=False))
    return inputs, calls


POSITIONAL = "\0positional"   # key of a recorded call's positional arguments after hidden_states


def _is_cache(value: Any) -> bool:
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


def _replay(block: nn.Module, inputs: list[Tensor], calls: list[dict], i: int, device: torch.device) -> Tensor:
    """Batch i's forward pass through `block`, on `device`."""
    return _block_forward(block, inputs[i].to(device), move(calls[i], device))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _block_forward(block: nn.Module, x: Tensor, kwargs: dict, whole: bool = False) -> Any:
    """The block's output hidden states on x (whole=True: everything the block returns)."""
    if POSITIONAL in kwargs:
        kwargs = dict(kwargs)
        out = block(x, *kwargs.pop(POSITIONAL), **kwargs)
    else:
        out = block(x, **kwargs)
    if whole:
        return out
    return out[0] if isinstance(out, tuple) else out


def _run_calibrated(blocks: list[BlockPlan], algorithm: Algorithm, read: Callable[[str], Tensor],
                    devices: tuple[torch.device, ...], cal: Calibration, timer: Timer, start: int = 0,
                    start_inputs: Sequence[Tensor] | None = None) -> Iterator[BlockResult]:
    t = time.perf_counter()
    primary, ndev = devices[0], len(devices)
    # --qep: the float model's activations run beside the quantized model's (`floats`, the same
    # object as `inputs` until they differ); a block's result then carries both (Paired)
    paired = bool(getattr(algorithm, "float_inputs", False))
    # batch b is read on device b % n; kept there, on the host or on disk (cal.activations)
    inputs, calls = capture_inputs(cal, read, primary,      # resuming too: every block's kwargs
                                   Activations(cal.activations, devices, cal.offload_dir))
    floats = inputs
    if start and start_inputs is not None:   # (run() checked they are there)
        n = len(inputs)
        if len(start_inputs) != (2 * n if paired else n) or any(
                tuple(start_inputs[i].shape) != inputs.shape(i % n) for i in range(len(start_inputs))):
            raise RunError(f"the saved inputs of block {start} do not match the calibration batches")
        saved = [inputs.like() for _ in range(len(start_inputs) // n)]
        for i in range(len(start_inputs)):
            saved[i // n].append(start_inputs[i].to(dtype=inputs.dtype(i % n)))
        inputs.release()
        inputs, floats = saved[0], saved[-1]
    if ndev > 1:   # batch b's keyword arguments for every block to device b % n
        memos: list[dict] = [{} for _ in devices]
        calls = [[move(kw, devices[b % ndev], memos[b % ndev]) for b, kw in enumerate(per_block)]
                 for per_block in calls]
    timer.add("forward", t)
    layers = cast(nn.ModuleList, cal.skeleton.get_submodule(cal.layers))
    for plan in blocks[start:]:
        block_start = t = time.perf_counter()
        block = layers[plan.index]
        template = copy.deepcopy(block) if ndev > 1 else None   # still on meta: the replicas' skeleton
        quantize = {lp.local: lp for lp in plan.linears if lp.quantize}
        narrow = cal.narrow and ndev == 1 and not paired \
            and not expert_units(list(quantize.values())).units
        _materialize(block, plan.module_prefix, cal.loader(read), primary, cal.dtype,
                     stored=frozenset(f"{n}.weight" for n in quantize) if narrow else frozenset())
        if narrow:
            _widen(block, tuple(quantize), cal.dtype)
        t = timer.add("read", t)
        extra: dict[str, dict] = {name: {} for name in quantize}
        block_calls = calls[plan.index]
        if len(block_calls) < len(inputs):   # the model skips this block on text (a cross-attention layer)
            with torch.no_grad():
                rounded = _round_unused(tuple(quantize), block, plan, quantize, algorithm.spec, extra)
            block.to("meta")
            result = _finish(plan, rounded, read, [_report(quantize[n], extra[n]) for n in quantize], block_start,
                             timer)
            result.next_inputs = Paired(inputs, floats) if paired else inputs
            yield result
            continue
        with torch.no_grad():
            passes: list[Callable[[], Any]] = [functools.partial(_replay, block, inputs, block_calls, i, primary)
                                               for i in range(len(inputs))]
            try:
                layout = trace(block, tuple(n for n, lp in quantize.items() if lp.expert is None), passes)
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise RunError(f"block {plan.index} of {type(cal.skeleton).__name__} does not run on its own with "
                               f"the inputs the model gave it ({_first_line(exc)[:160]}), so it cannot be "
                               "calibrated block by block", "use rtn (or nf4) for this model") from None
        t = timer.add("forward", t)
        groups = [g for g in layout.groups if g]
        # narrow: one input group per pass (the block unchanged between them unless true-sequential)
        stages = [[g] for g in groups] if cal.true_sequential or narrow else [groups]
        input_of = {name: g[0] for g in groups for name in g}
        results: dict[str, QuantizedWeight] = {}
        modified: set[str] = set()
        with torch.no_grad():
            prepare = algorithm.prepare_block
            if prepare is not None:   # block-level algorithms (AWQ) rewrite the block first, on one device
                arch = cal.arch
                if arch is None or not arch.awq:   # no measured groups for the family: find them here
                    arch = discovered_awq(block, layout, lambda: _block_forward(block, inputs[0], block_calls[0]),
                                          cal.layers)
                dtype_of = cal.stored_dtype or (lambda name: read(name).dtype)
                dtypes = {n: dtype_of(cal.stored_name(plan.module_prefix + n)) for n, _ in block.named_parameters()}
                here = inputs.on(primary) if ndev > 1 else inputs   # each batch copied when it is read
                here_calls = move(block_calls, primary) if ndev > 1 else block_calls
                prepare(BlockContext(
                    index=plan.index, block=block, inputs=here, calls=here_calls,
                    quantize=tuple(quantize), arch=arch, stored_dtype=dtypes, modified=modified,
                    specs=_specs(quantize.values()),
                    capture=lambda hooks, stop, batches=None: capture(block, here, here_calls,
                                                                      hooks, stop, batches),
                    forward=lambda i: _block_forward(block, here[i], here_calls[i]),
                    report=lambda n, m: extra[n].update(m) if n in extra else None,
                    devices=devices, replicate=lambda dev: _replica(template, block, dev)))
                del here, here_calls
                t = timer.add("search", t)
            replicas = [block] + [_replica(template, block, dev) for dev in devices[1:]]
            originals: dict[str, list[Tensor]] = {}   # --qep: the float weights the float model's passes use
            float_outputs = None
            if paired:   # the float model's next inputs, while the block is still float
                float_outputs = floats.like()
                spread(devices, len(floats), lambda i, dev: _block_forward(replicas[i % ndev], floats[i],  # noqa: F821
                                                                           block_calls[i]),
                       consume=lambda i, y: float_outputs.append(y))  # noqa: F821
            for k, stage in enumerate(stages):
                if narrow:   # scalings AWQ folded into the stage's Linears: applied now, once
                    _apply_scalings(block, [n for g in stage for n in g])
                t = _observe_stage(replicas, devices, stage, algorithm, inputs, block_calls, timer, t,
                                   floats if paired else None, originals)
                if narrow and k == len(stages) - 1:   # nothing reads the solved Linears' originals again
                    _serve_codes(block, results, cal.dtype)
                names = [n for g in stage for n in g]
                weights = {n: cast(nn.Linear, block.get_submodule(n)).weight.detach() for n in names}
                stage_results = algorithm.quantize_layer(LayerContext(
                    index=plan.index, weights=weights, input_of=input_of, block=block,
                    report=lambda n, m: extra[n].update(m), specs=_specs(quantize.values()), devices=devices,
                    prefix=plan.prefix))
                del weights   # narrow: the stored weights go with their Linears' (_serve_codes)
                t = timer.add("solve", t)
                if narrow:   # true-sequential: the next stage sees them quantized; else after the last pass
                    if cal.true_sequential:
                        _serve_codes(block, stage_results, cal.dtype)
                else:
                    for name in names:   # later stages see the quantized weights (fake-quant), on every replica
                        fake = stage_results[name].dequantize(cast(nn.Linear, block.get_submodule(name)).weight.dtype)
                        if paired:
                            originals[name] = [cast(nn.Linear, r.get_submodule(name)).weight.data for r in replicas]
                        for replica, dev in zip(replicas, devices, strict=True):
                            replica.get_submodule(name).weight.data = fake.to(dev)
                results.update(stage_results)
            if narrow:
                _serve_codes(block, results, cal.dtype)
            if layout.unused:   # no input reaches them: rounded to the nearest grid point
                results.update(_round_unused(layout.unused, block, plan, quantize, algorithm.spec, extra))
            experts = expert_units(list(quantize.values()))
            if experts.units:   # fused experts: each expert's matrices, from the tokens routed to it
                t = _quantize_experts(block, replicas, devices, plan, experts, algorithm, inputs, block_calls,
                                      read, cal, extra, results, timer, t)
            outputs = inputs.like()   # stored batch by batch as they come (at most a few on the devices)
            spread(devices, len(inputs), lambda i, dev: _block_forward(replicas[i % ndev], inputs[i], block_calls[i]),  # noqa: F821
                   consume=lambda i, y: outputs.append(y))
            if floats is not inputs:
                floats.release()
            inputs.release()   # the previous block's result (its files, on disk) is no longer needed
            inputs = outputs
            if float_outputs is not None:
                floats = float_outputs
            del originals, float_outputs
            timer.add("forward", t)
        rewritten = {cal.stored_name(plan.module_prefix + n): block.get_parameter(n).detach().to("cpu", dtypes[n])
                     for n in sorted(modified)} if modified else {}
        del replicas
        block.to("meta")
        if narrow:
            _unwiden(block)
        reports = [_report(quantize[n], extra[n]) for n in quantize]
        result = _finish(plan, results, read, reports, block_start, timer, rewritten)
        result.next_inputs = Paired(inputs, floats) if paired else inputs
        yield result
        release_memory()


@contextlib.contextmanager
def _weights_of(block: nn.Module, weights: dict[str, list[Tensor]], replica: int) -> Iterator[None]:
    """The Linears named in `weights` run on weights[name][replica] inside (their data swapped, then back)."""
    saved = {}
    try:
        for name, per_replica in weights.items():
            param = block.get_submodule(name).weight
            saved[name] = param.data
            param.data = per_replica[replica]
        yield
    finally:
        for name, data in saved.items():
            block.get_submodule(name).weight.data = data


def _widen(block: nn.Module, names: tuple[str, ...], dtype: torch.dtype) -> None:
    """Linears `names` of `block` held narrower than dtype run on their weight widened to dtype for
    the call (exact: the same product as on a widened copy; scalings a block search folds into
    them are kept beside the stored weight and replayed: core/narrow.py)."""
    for name in names:
        module = block.get_submodule(name)
        if isinstance(module, nn.Linear) and module.weight.dtype != dtype:
            module.forward = functools.partial(_wide_linear, module)   # type: ignore[method-assign]
            narrow_weights.hold(module, dtype)


def _wide_linear(module: nn.Linear, x: Tensor) -> Tensor:
    return nn.functional.linear(x, narrow_weights.widened(module).to(x.dtype), module.bias)


def _apply_scalings(block: nn.Module, names: list[str]) -> None:
    """Linears `names` held narrow with scalings (AWQ's folds) take their widened weight as theirs
    (exactly the wide run's), so their stage observes and solves what a wide run would."""
    for name in names:
        module = block.get_submodule(name)
        if isinstance(module, nn.Linear) and narrow_weights.scaled(module):
            wide = narrow_weights.widened(module)
            narrow_weights.release(module)
            module.weight.data = wide


def _serve_codes(block: nn.Module, results: dict[str, QuantizedWeight], dtype: torch.dtype) -> None:
    """Solved Linears run on their codes, dequantized to dtype for each call (the values the
    fake-quant path writes into the weight); their stored weights are released (kept on meta)."""
    for name, qw in results.items():
        module = block.get_submodule(name)
        if not isinstance(module, nn.Linear) or module.weight.device.type == "meta":
            continue
        module.forward = functools.partial(_codes_linear, module, qw, dtype)   # type: ignore[method-assign]
        weight = module.weight
        _set(module, "weight", nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                            requires_grad=False))


def _codes_linear(module: nn.Linear, qw: QuantizedWeight, dtype: torch.dtype, x: Tensor) -> Tensor:
    return nn.functional.linear(x, qw.dequantize(dtype).to(x.device), module.bias)


def _unwiden(block: nn.Module) -> None:
    """Back to the modules' own forward (the skeleton block is materialized again by later passes)."""
    for module in block.modules():
        module.__dict__.pop("forward", None)
        narrow_weights.release(module)


EXPERT_STATISTICS_BYTES = 2 << 30   # Hessians of experts gathered in one pass over the calibration set


def _expert_chunks(stage: dict[tuple[str, int, str], list[str]], width: dict[str, int],
                   budget: int) -> list[dict[tuple[str, int, str], list[str]]]:
    """The stage's experts in chunks whose float32 Hessians fit `budget` (at least one expert each)."""
    chunks: list[dict[tuple[str, int, str], list[str]]] = [{}]
    used = 0
    for key, names in stage.items():
        cost = 4 * width[names[0]] ** 2
        if chunks[-1] and used + cost > budget:
            chunks.append({})
            used = 0
        chunks[-1][key] = names
        used += cost
    return chunks


def _forget(algorithm: Algorithm, keys: list[str]) -> None:
    """Drop the algorithm's accumulated statistics under `keys` (those it has not used up)."""
    store = getattr(algorithm, "hessians", None)
    if isinstance(store, dict):
        for key in keys:
            store.pop(key, None)


def _quantize_experts(block: nn.Module, replicas: list[nn.Module], devices: tuple[torch.device, ...], plan: BlockPlan,
                      experts: ExpertUnits, algorithm: Algorithm, inputs: list[Tensor], calls: list[dict],
                      read: Callable[[str], Tensor], cal: Calibration, extra: dict[str, dict],
                      results: dict[str, QuantizedWeight], timer: Timer, t: float) -> float:
    """Quantize the matrices of fused experts: first every expert's gate and up projections (their
    input: the tokens routed to the expert), then, with those in place, the down projections (their
    input: the gated intermediate). Statistics come from forward passes of the whole block through
    calibration.experts.observe_forward, for as many experts at a time as EXPERT_STATISTICS_BYTES
    of Hessians allow (a block of hundreds of experts takes several passes; the results do not
    depend on how many). Results are put back into the fused parameters (rebuilt with transformers'
    own conversion) so the down projections, later stages and the next block see them."""
    primary = devices[0]
    paths = {id(m): p for p, m in block.named_modules()}
    routed: dict[tuple[str, int], int] = defaultdict(int)
    everyone = {module: f"{module}#all" for module, _, _ in experts.units}   # every token into the layer
    width = {lp.local: lp.in_features for lp in plan.linears}

    def few(module: nn.Module, e: int) -> bool:
        return routed[(paths[id(module)], e)] < MIN_EXPERT_TOKENS

    for role in ("in", "mid"):
        stage = {key: names for key, names in experts.units.items() if key[2] == role}
        for number, chunk in enumerate(_expert_chunks(stage, width, EXPERT_STATISTICS_BYTES)):
            count = role == "in" and number == 0   # routed tokens are counted once, for every expert

            def observer(module: nn.Module, e: int, r: str, x: Tensor, n: int, role: str = role,
                         chunk: dict = chunk, count: bool = count) -> None:
                path = paths[id(module)]
                if r != role:
                    return
                h0 = time.perf_counter()
                if e < 0:
                    if path in everyone and role == "in":
                        algorithm.observe(everyone[path], x)
                else:
                    if count:
                        routed[(path, e)] += n
                    names = chunk.get((path, e, r))
                    if names:
                        algorithm.observe(names[0], x)
                timer.seconds["hessian"] += time.perf_counter() - h0

            with observing(block, observer, wants_all=few if role == "mid" else None):
                for i in range(len(inputs)):
                    _replay(block, inputs, calls, i, primary)
            t = timer.add("forward", t)
            input_of: dict[str, str] = {}
            for (module, e, _), names in chunk.items():
                scarce = routed[(module, e)] < MIN_EXPERT_TOKENS
                for name in names:
                    input_of[name] = everyone[module] if role == "in" and scarce else names[0]
                    extra[name].update({"tokens": float(routed[(module, e)]), "all_tokens": float(scarce)})
            weights = {name: read(f"{plan.prefix}{name}.weight").to(primary, cal.dtype)
                       for names in chunk.values() for name in names}
            quantize = {lp.local: lp for lp in plan.linears if lp.local in weights}
            chunk_results = algorithm.quantize_layer(LayerContext(
                index=plan.index, weights=weights, input_of=input_of, block=block,
                report=lambda n, m: extra[n].update(m), specs=_specs(quantize.values()), devices=devices,
                prefix=plan.prefix))
            t = timer.add("solve", t)
            results.update(chunk_results)
            # Statistics gathered but not used (an expert's few routed tokens where every token's were
            # used instead; the every-token sum) must not reach the next chunk or the next block.
            _forget(algorithm, [*(names[0] for names in chunk.values()), *everyone.values()])
            del weights
        fake = {f"{plan.prefix}{n}.weight": results[n].dequantize(cal.dtype) for names in stage.values() for n in names}
        for target in {lp.expert[0] for lp in plan.linears if lp.expert and f"{plan.prefix}{lp.local}.weight" in fake}:
            value = cal.loader(lambda n: fake[n] if n in fake else read(n))(plan.module_prefix + target)
            for replica, dev in zip(replicas, devices, strict=True):
                replica.get_parameter(target).data = value.to(dev, cal.dtype)
    return t


def discovered_awq(block: nn.Module, layout: Any, forward: Callable[[], Any], layers: str) -> Any:
    """An ArchitectureMap holding the AWQ groups measured on this block (trace.awq_groups)."""
    from ..models.architectures import ArchitectureMap

    names = [n for g in layout.groups for n in g]
    return ArchitectureMap(layers=layers, sequential=layout.groups, awq=awq_groups(block, layout, forward),
                           awq_no_clip=query_key(names))


def _round_unused(names: tuple[str, ...], block: nn.Module, plan: BlockPlan, quantize: dict[str, LinearPlan],
                  spec: Any, extra: dict[str, dict]) -> dict[str, QuantizedWeight]:
    """Nearest rounding for the Linears the block's forward pass never reached (a branch the
    calibration text does not take: there is nothing to calibrate them on), flagged `unused`."""
    from ..algorithms.nf4 import NF4, NF4Options
    from ..algorithms.rtn import rtn_quantize

    out = {}
    for name in names:
        own = quantize[name].spec or spec
        weight = cast(nn.Linear, block.get_submodule(name)).weight.detach()
        if own.codebook == "int":
            qw = rtn_quantize(weight, own)
        else:
            qw = NF4(own, NF4Options()).quantize_layer(LayerContext(
                index=plan.index, weights={name: weight}, report=lambda n, m: None, prefix=plan.prefix))[name]
        extra[name].update({"unused": 1.0, "rel_error": weight_error(weight, qw)})
        out[name] = qw
    return out


def _replica(template: nn.Module | None, block: nn.Module, device: torch.device) -> nn.Module:
    """A copy of the materialized `block` on `device`, built from its meta `template` (None on one
    device, where no replica is made)."""
    replica = copy.deepcopy(cast(nn.Module, template))
    for name, param in block.named_parameters():   # copy=True: never shares storage with the block
        _set(replica, name, nn.Parameter(param.detach().to(device, copy=True), requires_grad=False))
    for name, buf in block.named_buffers():
        if buf.device.type != "meta":
            _set(replica, name, buf.to(device, copy=True), buffer=True)
    return replica


def capture(block: nn.Module, inputs: list[Tensor], calls: list[dict],
            hooks: dict[str, Callable[[int, tuple, dict], None]], stop: str | None, batches: int | None = None) -> None:
    """Forward the first `batches` (default all) calibration batches through `block`; before each
    module named in `hooks` runs, call its hook with (batch number, args, kwargs); end each batch's
    forward pass once the module `stop` is about to run (None: run the whole block)."""
    batch = [0]

    def make(name: str, fn: Callable) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            fn(batch[0], args, kwargs)
            if name == stop:
                raise _Stop
        return pre_hook

    handles = [block.get_submodule(name).register_forward_pre_hook(make(name, fn), with_kwargs=True)
               for name, fn in hooks.items()]
    if stop is not None and stop not in hooks:
        handles.append(block.get_submodule(stop).register_forward_pre_hook(make(stop, lambda *a: None),
                                                                           with_kwargs=True))
    try:
        for i, (x, kwargs) in enumerate(zip(inputs, calls, strict=True)):
            if batches is not None and i >= batches:
                break
            batch[0] = i
            try:
                _block_forward(block, x, kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def _observe_stage(replicas: list[nn.Module], devices: tuple[torch.device, ...], stage: list[tuple[str, ...]],
                   algorithm: Algorithm, inputs: list[Tensor], calls: list[dict], timer: Timer, t: float,
                   floats: Sequence[Tensor] | None = None, originals: dict[str, list[Tensor]] | None = None) -> float:
    """Forward the calibration inputs through the block just far enough to observe the stage's
    inputs. On several devices the batches run side by side and their observed inputs are handed
    to the algorithm here, in batch order.

    With `floats` (--qep), each batch also runs from the float model's inputs through the block
    with its float weights (`originals`: Linear name -> its float weight on each replica, for the
    Linears earlier stages replaced by their quantized values), and the algorithm sees each input
    pair (observe_pair)."""
    hessian_seconds = [0.0]
    names, stop = [g[0] for g in stage], stage[-1][0]

    def observe(name: str, x: Tensor, x_float: Tensor | None = None) -> None:
        h0 = time.perf_counter()
        if x_float is None:
            algorithm.observe(name, x)
        else:
            algorithm.observe_pair(name, x, x_float)   # type: ignore[attr-defined]
        hessian_seconds[0] += time.perf_counter() - h0

    if floats is not None:
        def pair(i: int, dev: torch.device) -> list[tuple[str, Tensor, Tensor]]:
            replica, seen = replicas[i % len(devices)], defaultdict(list)   # name -> its float inputs, in call order
            with _weights_of(replica, originals or {}, i % len(devices)):
                capture(replica, [floats[i]], [calls[i]],
                        {name: lambda b, args, kw, name=name: seen[name].append(args[0])  # type: ignore[misc]
                         for name in names}, stop=stop)
            both: list[tuple[str, Tensor, Tensor]] = []
            capture(replica, [inputs[i]], [calls[i]],
                    {name: lambda b, args, kw, name=name: both.append((name, args[0], seen[name].pop(0)))  # type: ignore[misc]
                     for name in names}, stop=stop)
            return both

        def consume_pairs(i: int, both: list[tuple[str, Tensor, Tensor]]) -> None:
            for name, x, x_float in both:
                observe(name, x, x_float)

        spread(devices, len(inputs), pair, consume=consume_pairs)
    elif len(devices) == 1:
        capture(replicas[0], inputs, calls, {name: lambda b, args, kw, name=name: observe(name, args[0])  # type: ignore[misc]
                                             for name in names}, stop=stop)
    else:
        def work(i: int, dev: torch.device) -> list[tuple[str, Tensor]]:
            seen: list[tuple[str, Tensor]] = []
            capture(replicas[i % len(devices)], [inputs[i]], [calls[i]],
                    {name: lambda b, args, kw, name=name: seen.append((name, args[0]))  # type: ignore[misc]
                     for name in names}, stop=stop)
            return seen

        def consume(i: int, seen: list[tuple[str, Tensor]]) -> None:
            for name, x in seen:
                observe(name, x)

        spread(devices, len(inputs), work, consume=consume)
    now = time.perf_counter()
    timer.seconds["hessian"] += hessian_seconds[0]
    timer.seconds["forward"] += now - t - hessian_seconds[0]
    return now
