"""The Format protocol: pack a QuantizedWeight into named tensors and read it back.

Readers validate what they are given: `describe` checks a module's tensor headers against each
other and the `quantization_config` (bits, group size, dtypes, shapes), `decode` does the same and
then checks the values (g_idx range, finite scales, ...). Both raise ValueError with the reason;
formats/reading.py turns it into "checkpoint damaged: <module>: <reason>".
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..core.qweight import QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import CheckpointError


@dataclass(frozen=True)
class ModuleHeader:
    """What a quantized module's stored tensors say about it (for `quantize-llm inspect`)."""

    bits: int
    group_size: int               # integer grids: weights per scale (-1 = channel); codebooks: block size
    sym: bool
    shape: tuple[int, int]        # (out_features, in_features)
    codebook: str = "int"


@dataclass(frozen=True)
class ConfigFacts:
    """What a run (or a conversion) knows that a format may record in quantization_config; each
    format spells it the way its readers expect (GPTQ's `dynamic`, compressed-tensors' `ignore`, ...)."""

    spec: QuantSpec                                # the checkpoint's setting (per-module ones below)
    modules_in_block: list[list[str]]              # local Linear names quantized somewhere, by input group
    overrides: dict[str, QuantSpec] = field(default_factory=dict)   # full name -> its own grid, where it differs
    excluded: list[str] = field(default_factory=list)   # block Linears left dense where the same local name is not
    dense_modules: list[str] = field(default_factory=list)   # every Linear left unquantized (full names)
    lm_head: bool = False                          # the output head is quantized
    record: MethodRecord = field(default_factory=MethodRecord)
    meta: dict[str, Any] = field(default_factory=dict)   # our record: tool, method, spec, options, calibration
    dtype: str | None = None                       # the model's dtype name


DAMAGED_HINT = ("the files were changed after they were written, or written by a tool that broke them; "
                "re-download the checkpoint or quantize the model again")


def damaged(where: str, reason: str) -> CheckpointError:
    """The error for a checkpoint whose quantized part cannot be what it claims: `where` is the
    module (or config.json), `reason` what does not fit."""
    return CheckpointError(f"checkpoint damaged: {where}: {reason}", DAMAGED_HINT)


TensorHeader = tuple[torch.dtype, tuple[int, ...]]     # (dtype, shape) of one stored tensor


def headers_of(tensors: Mapping[str, Tensor]) -> dict[str, TensorHeader]:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class MissingTensor(ValueError):
    """A module lacks one of the tensors its format stores; `name` is its local name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"its {name} tensor is missing")
        self.name = name


def need(headers: Mapping[str, TensorHeader], name: str, dtype: torch.dtype | str,
         shape: tuple[int, ...] | None = None, ndim: int | None = None, meaning: str = "") -> tuple[int, ...]:
    """The shape of stored tensor `name` after checking it is there, of `dtype` (a torch dtype, or
    "floating" / "integer") and of `shape` (or of `ndim` dimensions); ValueError otherwise."""
    if name not in headers:
        raise MissingTensor(name)
    got_dtype, got = headers[name]
    if isinstance(dtype, str):
        ok = got_dtype.is_floating_point if dtype == "floating" else \
            not (got_dtype.is_floating_point or got_dtype.is_complex or got_dtype == torch.bool)
        if not ok:
            raise ValueError(f"{name} is {_dtype_name(got_dtype)}, where the format stores {dtype} numbers")
    elif got_dtype != dtype:
        raise ValueError(f"{name} is {_dtype_name(got_dtype)}, where the format stores {_dtype_name(dtype)}")
    if shape is not None and tuple(got) != tuple(shape):
        raise ValueError(f"{name} has shape {list(got)}, expected {list(shape)}" + (f" ({meaning})" if meaning else ""))
    if ndim is not None and len(got) != ndim:
        raise ValueError(f"{name} has shape {list(got)}; the format stores it with {ndim} dimension(s)")
    return tuple(got)


def config_int(qconfig: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` present (and not null) in the config, which must be an integer."""
    key = next((k for k in keys if qconfig.get(k) is not None), None)
    if key is None:
        if default is None:
            raise ValueError(f"quantization_config has no {keys[0]}")
        return default
    value = qconfig[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"quantization_config's {key} is {value!r}, not an integer")
    return value


def config_group_size(qconfig: Mapping[str, Any], *keys: str, default: int) -> int:
    """A group size from the config: a positive integer, or -1 for one group per output channel."""
    group_size = config_int(qconfig, *keys, default=default)
    if group_size == 0 or group_size < -1:
        raise ValueError(f"quantization_config's {keys[0]} is {group_size}; a group size is a positive number of "
                         "weights, or -1 for one group per output channel")
    return group_size


def config_bool(qconfig: Mapping[str, Any], key: str, default: bool) -> bool:
    value = qconfig.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"quantization_config's {key} is {value!r}, not true or false")
    return value


def config_method(qconfig: Mapping[str, Any], default: str) -> str:
    """The algorithm our own `meta` records (provenance only), else `default`."""
    meta = qconfig.get("meta")
    method = meta.get("method") if isinstance(meta, dict) else None
    return method if isinstance(method, str) and method else default


def check_finite(name: str, tensor: Tensor) -> None:
    """ValueError when a floating tensor holds NaN or Inf."""
    bad = ~torch.isfinite(tensor.float())
    if bool(bad.any()):
        nan = int(torch.isnan(tensor.float()).sum())
        raise ValueError(f"{name} holds {nan} NaN and {int(bad.sum()) - nan} Inf values")


def check_finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value!r}, not a finite number")
    return float(value)


def float16_scales(name: str, scales: Tensor) -> Tensor:
    """`scales` as float16 (the QuantizedWeight contract), refusing NaN, Inf and values float16
    cannot hold."""
    check_finite(name, scales)
    half = scales.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise ValueError(f"{name} holds values beyond float16's range (largest {float(scales.abs().max()):g})")
    return half


class Format(Protocol):
    """One on-disk layout. Stateless; formats never quantize, they pack and unpack."""

    name: ClassVar[str]
    quant_method: ClassVar[str]               # `quant_method` in quantization_config
    tensor_names: ClassVar[tuple[str, ...]]   # local names a quantized module stores (no prefix)
    markers: ClassVar[tuple[str, ...]]        # a module is quantized iff it stores one of these
    bias_dtype: ClassVar[torch.dtype | None]  # dtype biases are written in; None keeps the checkpoint's
    config_file: ClassVar[str | None]         # extra file holding quantization_config, if any
    description: ClassVar[str]                # "the ... layout that ... load", for the model card
    per_module: ClassVar[bool]                # whether modules may differ in bits/group/sym (overrides)

    @staticmethod
    def supports(spec: QuantSpec) -> str | None:
        """None when the format can hold results of `spec`, else the reason and the fix."""

    @staticmethod
    def check_shape(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
        """None when a Linear of this shape can be stored, else the reason."""

    @staticmethod
    def min_zero(spec: QuantSpec) -> int:
        """Smallest integer zero point the format can store for `spec`."""

    @staticmethod
    def encode(qw: QuantizedWeight) -> dict[str, Tensor]:
        """Tensors for one Linear, with local names (no module prefix)."""

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        """Inverse of `encode`, given the checkpoint's `quantization_config`; checks what `describe`
        checks, then the values. ValueError when they do not fit."""

    @staticmethod
    def describe(qconfig: Mapping[str, Any], headers: Mapping[str, TensorHeader],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        """A module's header from its local tensors' (dtype, shape), checked against each other and
        `qconfig`; `read(local name)` loads a small tensor. ValueError when they do not fit."""

    @staticmethod
    def quantization_config(facts: ConfigFacts) -> dict[str, Any]:
        """The `quantization_config` object for config.json: every key the format's readers
        expect, spelled their way, plus our `meta`."""
