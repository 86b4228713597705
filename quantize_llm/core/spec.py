"""QuantSpec: what the stored numbers look like, validated before any model is touched."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError
from .nf4codes import BLOCKSIZES
from .nf4codes import CODEBOOKS as TABLE_CODEBOOKS

INT_BITS = (2, 3, 4, 8)
OVERRIDABLE = ("bits", "group_size", "sym", "method")   # what a per-module override may change
CODEBOOKS = ("int", *TABLE_CODEBOOKS)    # "int": integer grid; nf4/fp4: bitsandbytes' 4-bit tables


@dataclass(frozen=True)
class QuantSpec:
    """How every quantized Linear is stored (independent of how the numbers were chosen).

    Algorithm knobs (GPTQ damping, AWQ grid, ...) live in each algorithm's own Options class.
    With a 4-bit codebook (nf4, fp4) bits is 4 and group_size, sym, act_order and min_zero play
    no part: blocksize and double_quant say how the absmax statistics are stored.
    """

    method: str = "rtn"                   # algorithm name in the registry (algorithms/__init__.py)
    bits: int = 4                         # bits per integer code: 2, 3, 4 or 8
    group_size: int = 128                 # weights per scale along in_features; -1 = per output channel
    sym: bool = True                      # symmetric grid: zero fixed at 2^(bits-1)
    act_order: bool = False               # whether a non-trivial g_idx may be stored
    format: str = "gptq"                  # on-disk format name in the registry (formats/__init__.py)
    min_zero: int = 0                     # smallest storable integer zero (GPTQ v1 cannot store 0)
    keep_dense: tuple[str, ...] = field(default=())  # regexes: Linears matching stay unquantized
    codebook: str = "int"                 # "int" (scale * (code - zero)) or a 4-bit table: "nf4", "fp4"
    blocksize: int = 64                   # nf4/fp4: weights per absmax, flat over the row-major weight
    double_quant: bool = True             # nf4/fp4: absmax stored as 8-bit codes + nested absmax (bnb)
    # per-module overrides, first match wins: ((regex, (("bits", 8), ("group_size", 128), ...)), ...)
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.codebook not in CODEBOOKS:
            raise SpecError(f"--quant-type {self.codebook} is not supported",
                            "choose nf4 or fp4 (4-bit codebooks); integer grids use the rtn and gptq commands")
        if self.blocksize not in BLOCKSIZES:
            raise SpecError(f"--blocksize {self.blocksize} is not supported",
                            f"choose one of {', '.join(map(str, BLOCKSIZES))}; 64 is bitsandbytes' default")
        if self.codebook != "int" and self.bits != 4:
            raise SpecError(f"--bits {self.bits} does not fit the {self.codebook} codebook", "its codes are 4-bit")
        if self.bits not in INT_BITS:
            raise SpecError(f"--bits {self.bits} is not supported",
                            f"choose one of {', '.join(map(str, INT_BITS))}; 4 is the usual choice")
        if self.group_size == 0 or self.group_size < -1:
            raise SpecError(f"--group-size {self.group_size} is not valid",
                            "use a positive number of weights per group (128 is typical) or -1 for per channel")
        if not 0 <= self.min_zero < 2 ** self.bits - 1:
            raise SpecError(f"min_zero {self.min_zero} is outside [0, {2 ** self.bits - 2}]")
        object.__setattr__(self, "keep_dense", tuple(self.keep_dense))
        object.__setattr__(self, "overrides", tuple((str(p), tuple(sorted(dict(c).items())))
                                                    for p, c in self.overrides))
        if self.overrides and self.codebook != "int":
            raise SpecError("per-module overrides apply to integer grids, not the nf4/fp4 codebooks",
                            "remove the overrides, or quantize with rtn, gptq, awq or outlier")
        for pattern, changes in self.overrides:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SpecError(f"override {pattern!r} is not a valid regular expression: {exc}") from None
            unknown = sorted(set(dict(changes)) - set(OVERRIDABLE))
            if unknown or not changes:
                what = "unknown setting " + unknown[0] if unknown else "changes nothing"
                raise SpecError(f"override {pattern!r}: {what}",
                                f"an override sets {', '.join(OVERRIDABLE)} (or keep_dense = true)")
            method = dict(changes).get("method")
            if method is not None and method not in ("rtn", self.method):
                raise SpecError(f"override {pattern!r}: method {method!r} inside a {self.method} run is not supported",
                                "a per-module method can only be rtn (round-to-nearest, no calibration statistics)")
            if method == "rtn" and self.method not in ("rtn", "gptq"):
                raise SpecError(f"override {pattern!r}: a per-module method is not supported in {self.method} runs",
                                "it is supported in gptq runs; quantize those modules in a separate job otherwise")
            try:
                self.replace(overrides=(), **dict(changes))   # each overridden spec must be valid by itself
            except SpecError as exc:
                raise SpecError(f"override {pattern!r}: {exc.message}", exc.hint) from None
        for pattern in self.keep_dense:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SpecError(f"--keep-dense {pattern!r} is not a valid regular expression: {exc}",
                                "quote the pattern, e.g. --keep-dense 'mlp\\.down_proj'") from None

    @property
    def maxq(self) -> int:
        """Largest integer code: 2^bits - 1."""
        return 2 ** self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Number of groups along in_features; the last one may be partial."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def for_module(self, module_name: str) -> QuantSpec:
        """The spec for one module: the first override whose regex matches (re.search) applied."""
        for pattern, changes in self.overrides:
            if re.search(pattern, module_name):
                return self.replace(overrides=(), **dict(changes))
        return self.replace(overrides=()) if self.overrides else self

    def is_dense(self, module_name: str) -> bool:
        """True when `module_name` matches a --keep-dense pattern (re.search)."""
        return any(re.search(p, module_name) for p in self.keep_dense)

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_dense"] = list(self.keep_dense)
        d["overrides"] = [{"match": p, **dict(c)} for p, c in self.overrides]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown setting(s) {', '.join(unknown)}",
                            f"known settings are {', '.join(sorted(known))}")
        data = dict(data)
        data["overrides"] = tuple((o["match"], tuple((k, v) for k, v in o.items() if k != "match"))
                                  for o in data.get("overrides") or ())
        return cls(**data)


@dataclass(frozen=True)
class MethodRecord:
    """How an algorithm chose the numbers, as far as a checkpoint's quantization_config records it
    (each format writes what its readers expect: GPTQ's `damp_percent`, ...). None: not applicable."""

    damp: float | None = None              # damping of diag(H), where the method has the setting
    static_groups: bool | None = None      # act-order with groups fixed on the original order
    true_sequential: bool | None = None    # stages re-run between q/k/v, o, gate/up, down
    keys: tuple[tuple[str, Any], ...] = ()  # the method's own keys for this package's formats (outlier split)
