"""Reading the quantized modules of a checkpoint: the one way in for every reader (convert, inspect,
load_quantized and so eval and generate), so each refuses a damaged or foreign checkpoint alike.

The format's `describe` (headers) and `decode` (headers and values) say what is wrong; this module
names the module and turns it into "checkpoint damaged: <module>: <reason>" (a CheckpointError).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..core.qweight import QuantizedWeight
from ..errors import CheckpointError, SpecError
from . import format_for_config, module_qconfig
from .base import MissingTensor, ModuleHeader, check_finite, damaged

# What describe/decode raise on bad input: ValueError by contract; KeyError and TypeError from
# config values of the wrong kind; SpecError where a value passes the reader but not QuantSpec.
_BAD = (ValueError, KeyError, TypeError, SpecError)


def _reason(prefix: str, exc: BaseException) -> str:
    if isinstance(exc, (KeyError, MissingTensor)):
        name = exc.name if isinstance(exc, MissingTensor) else exc.args[0] if exc.args else "?"
        return f"tensor {prefix}.{name} is missing"
    if isinstance(exc, SpecError):
        return f"quantization_config holds a setting no quantized layer can have ({exc.message})"
    return " ".join(str(exc).split()) or type(exc).__name__


def marked_module(name: str, markers: Iterable[str]) -> str | None:
    """The module whose marker tensor `name` is ("m.q_proj.qweight" -> "m.q_proj" for the marker
    "qweight"), else None. A module is quantized iff it stores one of its format's markers."""
    for m in markers:
        if name.endswith(f".{m}"):
            return name[: -len(m) - 1]
    return None


def quantized_modules(names: list[str], fmt: Any) -> dict[str, dict[str, str]]:
    """The modules among tensor `names` that `fmt` quantized, in file order: module -> local name
    -> full name of the tensors it stores."""
    present = set(names)
    found = dict.fromkeys(p for p in (marked_module(n, fmt.markers) for n in names) if p is not None)
    return {p: {t: f"{p}.{t}" for t in fmt.tensor_names if f"{p}.{t}" in present} for p in found}


class QuantizedModules:
    """The quantized modules of an open CheckpointReader whose config.json has a quantization_config.

    `.fmt` is the format's reader, `.prefixes` the modules (in file order), `.tensors(prefix)` the
    local -> full names of one module's tensors. `decode` and `describe` validate as they read.
    """

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.qconfig: dict[str, Any] = reader.config.get("quantization_config")
        self.fmt = format_for_config(self.qconfig)
        names = reader.names()
        self._local = quantized_modules(names, self.fmt)
        self.prefixes = list(self._local)
        if not self.prefixes:
            method = self.qconfig.get("quant_method")
            raise CheckpointError(f"checkpoint damaged: config.json says quant_method {method!r}, but no tensor "
                                  f"holds a {self.fmt.name} module (no {', '.join(self.fmt.markers)} tensor)",
                                  "the config belongs to another checkpoint, or the weights were replaced")
        known = set(self.prefixes)
        # A module's other tensors without its marker: the marker was lost ("weight" is every dense
        # Linear's own name, so it proves nothing).
        others = [t for t in self.fmt.tensor_names if t not in self.fmt.markers and t != "weight"]
        for name in names:
            for t in others:
                if name.endswith(f".{t}") and name[: -len(t) - 1] not in known:
                    raise damaged(name[: -len(t) - 1], f"it stores {t} but not its {self.fmt.markers[0]} tensor")

    def tensors(self, prefix: str) -> dict[str, str]:
        """Local name -> full name of the tensors module `prefix` stores."""
        return self._local[prefix]

    def _qconfig(self, prefix: str) -> Mapping[str, Any]:
        try:
            return module_qconfig(self.qconfig, prefix)
        except _BAD as exc:
            raise damaged(prefix, _reason(prefix, exc)) from None

    def describe(self, prefix: str, shape: tuple[int, int] | None = None) -> ModuleHeader:
        """The module's header, from its tensor headers (and the small tensors a format needs)."""
        local = self._local[prefix]
        qconfig = self._qconfig(prefix)
        try:
            header = self.fmt.describe(qconfig, {t: (self.reader.dtype(f), self.reader.shape(f))
                                                 for t, f in local.items()},
                                       lambda t: self.reader.read(local[t]))
        except _BAD as exc:
            raise damaged(prefix, _reason(prefix, exc)) from None
        _check_shape(prefix, header.shape, shape)
        return header

    def decode(self, prefix: str, shape: tuple[int, int] | None = None) -> QuantizedWeight:
        """The module's QuantizedWeight; `shape` (out, in), where given, is what the model expects."""
        local = self._local[prefix]
        qconfig = self._qconfig(prefix)
        try:
            qw = self.fmt.decode({t: self.reader.read(f) for t, f in local.items()}, qconfig)
            if qw.is_codebook:
                check_finite("the absmax", qw.scale_tensor())
            else:
                check_finite("scales", qw.grid_scale)
            if qw.outliers is not None:
                check_finite("outlier_values", qw.outliers.values)
        except _BAD as exc:
            raise damaged(prefix, _reason(prefix, exc)) from None
        _check_shape(prefix, qw.shape, shape)
        return qw


def _check_shape(prefix: str, got: tuple[int, int], want: tuple[int, int] | None) -> None:
    if want is not None and tuple(got) != tuple(want):
        raise damaged(prefix, f"its tensors hold a [{got[0]}, {got[1]}] weight, but config.json describes a "
                              f"[{want[0]}, {want[1]}] Linear there")


def linear_shape(model: nn.Module, prefix: str) -> tuple[int, int]:
    """(out_features, in_features) of the Linear `prefix` of `model`; refused when there is none."""
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise damaged(prefix, "the checkpoint quantizes it, but config.json's model has no Linear of that name")
    return module.out_features, module.in_features
