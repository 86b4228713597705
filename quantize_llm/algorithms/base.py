"""The Algorithm protocol and the context the runner hands it for each decoder block."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..core.devices import map_units
from ..core.primitives import FP16_MAX, Float16Overflow, LayerError, rtn_group_params
from ..core.qweight import QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import CheckpointError, QuantizeError, RunError


class NotPositiveDefinite(LayerError, RunError):
    """The Hessian stayed indefinite up to the damping bound: a damping problem."""

    @classmethod
    def of(cls, n: int, damp: float, start: float) -> NotPositiveDefinite:
        return cls(f"the Hessian ({n}x{n}) is not positive definite even with damping {damp:g}",
                   f"raise --damp (now {start:g}) or use more calibration samples")


class HessianNotFinite(LayerError, CheckpointError):
    """The calibration inputs overflowed float32 on their way to this Linear."""

    @classmethod
    def of(cls) -> HessianNotFinite:
        return cls("its calibration inputs overflow float32 (inf or NaN in their Hessian X^T X)",
                   "a weight, norm or embedding before it holds a huge value: the checkpoint looks damaged")


@contextmanager
def naming(module: str) -> Iterator[None]:
    """Errors of module-blind math raised inside the block name `module`."""
    try:
        yield
    except LayerError as exc:
        raise exc.at(module) from None


def solve_overflow(exc: Float16Overflow, weights: dict[str, Tensor], spec: QuantSpec, damp: float) -> QuantizeError:
    """The error for a value beyond float16 met inside an error-feedback solve (GPTQ) of `weights`
    (full name -> the weight it started from). Where a weight's own min-max ranges already need
    such a scale, the weights are the cause: that overflow, naming its module. Otherwise the
    feedback itself pushed the values out of range, which more damping tames."""
    for name, w in weights.items():
        try:
            rtn_group_params(w, spec.bits, spec.group_size, spec.sym, spec.min_zero)
        except Float16Overflow as own:
            return own.at(name)
    return RunError(f"{', '.join(weights)}: the error feedback pushed a {exc.what} to {exc.value:.3g}, "
                    f"beyond float16's {FP16_MAX:g}", f"raise --damp (now {damp:g})")


@dataclass
class LayerContext:
    """What an algorithm may use to quantize one decoder block.

    index     block number
    weights   local Linear name -> weight (out, in) on the work device, only those to quantize
    input_of  local Linear name -> the name its input statistics were observed under (Linears
              that share an input, like q/k/v, are observed once, under the group's first name)
    block     the materialized block module when the algorithm needs calibration, else None
    report    callback taking (linear name, metrics dict) for the per-layer report
    specs     local Linear name -> its QuantSpec where a per-module override differs from the
              algorithm's spec (`spec_of`)
    devices   the run's work devices; independent solves go through `map`, which runs them side
              by side when there are several (the weights are on the first)
    prefix    the block's module path ("model.layers.3."): prefix + local name is the full name
    """

    index: int
    weights: dict[str, Tensor]
    input_of: dict[str, str] = field(default_factory=dict)
    block: nn.Module | None = None
    report: Callable[[str, dict], None] = field(default=lambda name, metrics: None)
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    devices: tuple[torch.device, ...] = ()
    prefix: str = ""

    def spec_of(self, name: str, default: QuantSpec) -> QuantSpec:
        return self.specs.get(name, default)

    def full_name(self, *names: str) -> str:
        """The full module name(s) of local Linear names, for messages."""
        return ", ".join(self.prefix + n for n in names)

    def map(self, fn: Callable[[Any, torch.device], Any], units: list) -> list:
        """[fn(unit, device) for each unit]: unit i on devices[i % n], concurrently across devices.
        `fn` moves what it needs to `device` and must not depend on other units' results."""
        devices = self.devices or (next(iter(self.weights.values())).device if self.weights
                                   else torch.device("cpu"),)
        return map_units(devices, fn, units)


@dataclass
class BlockContext:
    """What a block-level algorithm (AWQ) gets before the block's Linears are quantized.

    block         the materialized block (float32 on the work device); the algorithm may rewrite
                  its parameters as long as the block computes the same function, and must name
                  every parameter it rewrote in `modified` (local names, e.g. "input_layernorm.weight")
    inputs        the block's calibration inputs, one (B, L, hidden) tensor per batch
    calls         the keyword arguments the block receives, per batch
    quantize      local names of the Linears that will be quantized
    arch          the model family's ArchitectureMap
    stored_dtype  local parameter name -> the dtype the checkpoint stores it in
    capture       capture(hooks, stop, batches=None): forward the first `batches` batches with
                  pre-hooks {module: fn(batch, args, kwargs)}, each pass ending before `stop` runs
                  (None: the whole block)
    forward       forward(i): the block's output for calibration batch i
    report        callback taking (linear name, metrics dict)
    devices       the run's work devices (the block and `inputs` are on the first)
    replicate     replicate(device): a copy of the block as it stands now, on `device` (runs
                  spread over several devices)
    """

    index: int
    block: nn.Module
    inputs: list[Tensor]
    calls: list[dict]
    quantize: tuple[str, ...]
    arch: Any
    stored_dtype: dict[str, Any]
    modified: set[str]
    capture: Callable[..., None]
    forward: Callable[[int], Tensor]
    report: Callable[[str, dict], None] = field(default=lambda name, metrics: None)
    specs: dict[str, QuantSpec] = field(default_factory=dict)   # as in LayerContext
    devices: tuple[torch.device, ...] = ()
    replicate: Callable[[torch.device], nn.Module] | None = None


@runtime_checkable
class Algorithm(Protocol):
    """One quantization method (registered by name in algorithms/__init__.py).

    name               the registry name (the command and the recipe's `method`)
    needs_calibration  whether the runner must feed it calibration inputs (for some methods it
                       depends on the options, so it may be set per instance)
    codebooks          the code families it produces: "int" grids, or bitsandbytes' "nf4"/"fp4"
    prepare_block      None, or a block-level step called once per block with a BlockContext
                       before its first stage is observed (AWQ's scale search and folding)
    """

    name: ClassVar[str]
    codebooks: ClassVar[tuple[str, ...]]
    spec: QuantSpec                       # the run's spec (per-module overrides: LayerContext.specs)

    @property
    def needs_calibration(self) -> bool: ...   # read-only: a class constant or set per instance

    @property
    def prepare_block(self) -> Callable[[BlockContext], None] | None: ...   # a method, or None

    def __init__(self, spec: QuantSpec, options: Any = None) -> None: ...

    def observe(self, linear_name: str, x: Tensor) -> None:
        """Accumulate statistics from the input x (..., in) of a Linear (or group sharing it)."""

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        """Quantize the Linears of one block; returns local name -> result."""

    def record(self) -> MethodRecord:
        """How the numbers are chosen, as far as a checkpoint's quantization_config records it."""
