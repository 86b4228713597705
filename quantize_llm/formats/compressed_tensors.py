"""compressed-tensors `pack-quantized` (FORMATS.md §4), as llm-compressor writes it and transformers
(with the compressed-tensors package) and vLLM read it.

Per Linear, in nn.Linear orientation:
    weight_packed       int32 (out, in*b/32)  unsigned codes (signed value + 2^(b-1)) packed along in
    weight_scale        scale dtype (out, G)  G = in / group_size, or 1 per channel
    weight_shape        int64 (2,)            [out, in]
    weight_zero_point   int32 (out*b/32, G)   asymmetric only: unsigned zero points packed along out
The signed code and zero are ours minus 2^(b-1), so w = scale * (code - zero) is the same number and
the stored unsigned fields are exactly our codes and zeros. Groups are contiguous columns: the
deprecated `weight_g_idx` is not written (CT 0.20 ignores it), so act-order results are refused
unless their groups are static. Every dense Linear is in `ignore`. Modules with settings of their
own (recipe overrides, a --target-bpw allocation) get config groups of their own, which list them
by name (and, where a block's q/k/v or gate/up all share one, the module vLLM merges them into:
vLLM matches a layer's own name before the "Linear" class of the base group); reading picks a
module's group the same way (`module_group`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.packing import pack_int32, packed_length, unpack_int32
from ..core.qweight import QuantizedWeight
from ..core.spec import QuantSpec
from .base import (
    ConfigFacts,
    ModuleHeader,
    TensorHeader,
    config_bool,
    config_group_size,
    config_int,
    config_method,
    float16_scales,
    headers_of,
    need,
)

CT_VERSION = "0.20.0"          # the compressed-tensors release whose layout this writes (§4.3 packing)
BITS = (2, 4, 8)               # widths whose codes fill int32 words exactly
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CompressedTensorsFormat:
    name: ClassVar[str] = "compressed-tensors"
    quant_method: ClassVar[str] = "compressed-tensors"
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    markers: ClassVar[tuple[str, ...]] = ("weight_packed",)
    bias_dtype: ClassVar[torch.dtype | None] = None           # the model's dtype
    config_file: ClassVar[str | None] = None
    per_module: ClassVar[bool] = True     # per-module settings as config groups of their own
    description: ClassVar[str] = ("compressed-tensors pack-quantized layout that transformers (with "
                                  "compressed-tensors) and vLLM load")

    @staticmethod
    def supports(spec: QuantSpec) -> str | None:
        if spec.codebook != "int":
            return (f"the compressed-tensors format here stores integer grids, not the {spec.codebook} "
                    "codebook; use the bnb format")
        if spec.bits not in (2, 4, 8):
            return (f"compressed-tensors changed its {spec.bits}-bit packing in 2026 (FORMATS.md §4.3), so "
                    f"readers disagree on it; use 4 or 8 bits, or --format gptq for {spec.bits}-bit")
        if spec.act_order:
            return ("compressed-tensors 0.20 no longer applies g_idx, so act-order groups cannot be stored; "
                    "add --static-groups (contiguous groups) or drop --act-order")
        return None

    @staticmethod
    def check_shape(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
        if spec.group_size != -1 and in_features % spec.group_size:
            return (f"shape [{out_features}, {in_features}]: in_features is not a multiple of the group size "
                    f"{spec.group_size}, which compressed-tensors needs")
        try:
            packed_length(in_features, spec.bits)
            packed_length(out_features, spec.bits)   # zero points (asym) and this package's loader
        except ValueError as exc:
            return f"shape [{out_features}, {in_features}]: {exc}"
        return None

    @staticmethod
    def min_zero(spec: QuantSpec) -> int:
        return 0

    @staticmethod
    def encode(qw: QuantizedWeight) -> dict[str, Tensor]:
        bits = qw.spec.bits
        if qw.g_idx is not None:
            raise ValueError("compressed-tensors cannot store a g_idx (act-order)")
        dtype = qw.source_dtype if qw.source_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
        scale = qw.grid_scale.to(torch.float32)
        if dtype == torch.bfloat16 and not torch.equal(scale.to(torch.bfloat16).float(), scale):
            dtype = torch.float32   # a float16 scale bfloat16 cannot hold exactly: keep it exact
        out_features, in_features = qw.shape
        tensors = {
            "weight_packed": pack_int32(qw.codes.contiguous(), bits, dim=1),            # (out, in*b/32)
            "weight_scale": scale.to(dtype).contiguous(),                               # (out, G)
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
        if not qw.spec.sym:
            tensors["weight_zero_point"] = pack_int32(qw.grid_zero.to(torch.int32).contiguous(), bits, dim=0)
        elif bool((qw.grid_zero != 2 ** (bits - 1)).any()):
            raise ValueError("a symmetric result must have every zero equal to 2^(bits-1)")
        return tensors

    @staticmethod
    def _weights(qconfig: Mapping[str, Any]) -> Mapping[str, Any]:
        fmt = qconfig.get("format", "")
        if fmt != "pack-quantized" or qconfig.get("quantization_status", "compressed") != "compressed":
            raise ValueError(f"compressed-tensors format {fmt!r} is not read; only pack-quantized, compressed")
        groups = qconfig.get("config_groups") or {}
        if not isinstance(groups, dict) or len(groups) != 1:
            raise ValueError(f"config_groups holds {len(groups) if isinstance(groups, dict) else 'no'} scheme(s) "
                             "for this module: a module's scheme is the one group whose targets name it, or else "
                             "the one targeting Linear")
        group = next(iter(groups.values()))
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise ValueError("config_groups' scheme has no weights object")
        if weights.get("type", "int") != "int":
            raise ValueError(f"weights of type {weights.get('type')!r} are not read; only int")
        return weights

    @staticmethod
    def describe(qconfig: Mapping[str, Any], headers: Mapping[str, TensorHeader],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        weights = CompressedTensorsFormat._weights(qconfig)
        bits = config_int(weights, "num_bits", default=8)
        if bits not in BITS:
            raise ValueError(f"quantization_config says num_bits {bits}; pack-quantized checkpoints are read with "
                             "2, 4 or 8 bits (other widths do not fill int32 words, and 3-bit "
                             "packing differs between compressed-tensors releases)")
        sym = config_bool(weights, "symmetric", True)
        strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "channel")
        if strategy not in ("group", "channel"):
            raise ValueError(f"strategy {strategy!r} is not read; only group and channel")
        group_size = config_group_size(weights, "group_size", default=-1) if strategy == "group" else -1
        if strategy == "group" and group_size == -1:
            raise ValueError("the group strategy needs a positive group_size")
        need(headers, "weight_shape", "integer", (2,))
        shape = read("weight_shape").tolist()
        if any(v <= 0 for v in shape):
            raise ValueError(f"weight_shape holds {shape}; a Linear's sizes are positive")
        out_features, in_features = (int(v) for v in shape)
        if group_size != -1 and in_features % group_size:
            raise ValueError(f"weight_shape's {in_features} inputs are not a multiple of the group size {group_size}")
        n_groups = 1 if group_size == -1 else in_features // group_size
        try:
            words_in = packed_length(in_features, bits)
            words_out = packed_length(out_features, bits) if not sym else 0
        except ValueError:
            raise ValueError(f"weight_shape {shape} does not fill whole int32 words of {bits}-bit codes") from None
        need(headers, "weight_packed", torch.int32, (out_features, words_in),
             meaning=f"{bits}-bit codes for weight_shape {shape}")
        need(headers, "weight_scale", "floating", (out_features, n_groups),
             meaning=f"{n_groups} group(s) for weight_shape {shape}")
        if not sym:
            need(headers, "weight_zero_point", torch.int32, (words_out, n_groups),
                 meaning=f"{bits}-bit zero points of {n_groups} group(s) for weight_shape {shape}")
        return ModuleHeader(bits, group_size, sym, (out_features, in_features))

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        header = CompressedTensorsFormat.describe(qconfig, headers_of(tensors), tensors.__getitem__)
        bits, sym = header.bits, header.sym
        out_features, in_features = header.shape
        scale = float16_scales("weight_scale", tensors["weight_scale"])               # (out, G)
        n_groups = scale.shape[1]
        codes = unpack_int32(tensors["weight_packed"], bits, in_features, dim=1)       # (out, in)
        if sym:
            zero = torch.full((out_features, n_groups), 2 ** (bits - 1), dtype=torch.int32)
        else:
            zero = unpack_int32(tensors["weight_zero_point"], bits, out_features, dim=0).to(torch.int32)
        spec = QuantSpec(method=config_method(qconfig, "rtn"), bits=bits, group_size=header.group_size, sym=sym,
                         format="compressed-tensors")
        return QuantizedWeight(codes=codes.contiguous(), scale=scale.contiguous(), zero=zero.contiguous(),
                               g_idx=None, spec=spec)

    @staticmethod
    def _scheme(spec: QuantSpec, targets: list[str]) -> dict[str, Any]:
        # §4.4: QuantizationArgs forbids unknown keys, so nothing of ours goes inside `weights`.
        channel = spec.group_size == -1
        weights: dict[str, Any] = {
            "num_bits": spec.bits, "type": "int", "symmetric": spec.sym,
            "strategy": "channel" if channel else "group", "group_size": None if channel else spec.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
        }
        return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
                "format": "pack-quantized"}

    @staticmethod
    def quantization_config(facts: ConfigFacts) -> dict[str, Any]:
        from .vllm import FUSED, fused_name

        spec, dense_modules = facts.spec, facts.dense_modules
        groups = {"group_0": CompressedTensorsFormat._scheme(spec, ["Linear"])}
        by_setting: dict[tuple, list[str]] = {}
        for name, own in sorted(facts.overrides.items()):
            by_setting.setdefault((own.bits, own.group_size, own.sym), []).append(name)
        for (bits, group_size, sym), names in by_setting.items():
            merged = {fused_name(n) for n in names} - {None}
            targets = names + sorted(m for m in merged if m is not None and all(
                f"{m.rpartition('.')[0]}.{leaf}" in names for leaf in FUSED[m.rpartition(".")[2]]))
            groups[f"group_{len(groups)}"] = CompressedTensorsFormat._scheme(
                spec.replace(bits=bits, group_size=group_size, sym=sym), targets)
        config: dict[str, Any] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": sorted(dense_modules),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_VERSION,
        }
        config["meta"] = facts.meta
        return config


def module_group(qconfig: Mapping[str, Any], module: str) -> dict[str, Any]:
    """`quantization_config` with only the config group that applies to `module` (full name): the
    first whose targets hold its name (or a "re:" pattern matching it), else the first targeting
    the Linear class, as vLLM and compressed-tensors match them. Unchanged when there is one group
    or none applies (describe then says what is wrong)."""
    import re

    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict) or len(groups) < 2:
        return dict(qconfig)

    def names(target: Any) -> bool:
        if not isinstance(target, str):
            return False
        if target.startswith("re:"):
            try:
                return re.match(target[3:], module) is not None
            except re.error:
                return False
        return target == module
    for by_class in (False, True):
        for key, group in groups.items():
            targets = group.get("targets") if isinstance(group, dict) else None
            if isinstance(targets, list) and any(t == "Linear" if by_class else names(t) for t in targets):
                return {**qconfig, "config_groups": {key: group}}
    return dict(qconfig)
