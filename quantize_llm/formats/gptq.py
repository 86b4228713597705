"""The GPTQ layout (FORMATS.md §1), as AutoGPTQ/GPTQModel write it and transformers/vLLM read it.

Per Linear: qweight int32 (in*b/32, out) packed along in; qzeros int32 (G, out*b/32) packed along
out; scales float16 (G, out); g_idx int32 (in,). Zero points are written in the v1 convention
(stored field = zero - 1, §1.5); v1 cannot store a zero of 0, so asymmetric results are produced
with zeros of at least 1 (`min_zero`), the writer rule of §1.5. Both v1 and v2 are read.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.packing import pack_int32, packed_length, unpack_int32
from ..core.primitives import default_g_idx, to_float16
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
from .vllm import FUSED, fused_name

V1, V2 = "gptq", "gptq_v2"
BITS = (2, 3, 4, 8)


def _checkpoint_format(qconfig: Mapping[str, Any]) -> str:
    fmt = str(qconfig.get("checkpoint_format") or qconfig.get("format") or V1).lower()
    if fmt not in (V1, V2):
        raise ValueError(f"checkpoint_format {fmt!r} is not gptq or gptq_v2")
    return fmt


class GPTQFormat:
    name: ClassVar[str] = "gptq"
    quant_method: ClassVar[str] = "gptq"
    tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales", "g_idx")
    markers: ClassVar[tuple[str, ...]] = ("qweight",)
    per_module: ClassVar[bool] = True     # per-module bits/group/sym via `dynamic` (GPTQModel, vLLM)
    bias_dtype: ClassVar[torch.dtype | None] = torch.float16    # §1.2: the bias is float16
    config_file: ClassVar[str | None] = "quantize_config.json"  # §1.1: AutoGPTQ/GPTQModel read it first
    description: ClassVar[str] = "GPTQ layout that transformers (with optimum and gptqmodel) and vLLM load"

    @staticmethod
    def supports(spec: QuantSpec) -> str | None:
        if spec.codebook != "int":
            return f"the gptq format stores integer grids, not the {spec.codebook} codebook; use the bnb format"
        if spec.bits not in BITS:
            return f"the gptq format stores 2, 3, 4 or 8-bit integers, not {spec.bits}-bit"
        return None

    @staticmethod
    def check_shape(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
        # §1.2: the packers of AutoGPTQ/GPTQModel and the 3-bit block layout need both multiples of 32.
        if in_features % 32 or out_features % 32:
            return (f"shape [{out_features}, {in_features}]: the gptq format needs in_features and "
                    "out_features to be multiples of 32")
        return None

    @staticmethod
    def min_zero(spec: QuantSpec) -> int:
        return 0 if spec.sym else 1

    @staticmethod
    def encode(qw: QuantizedWeight) -> dict[str, Tensor]:
        bits = qw.spec.bits
        if qw.spec.sym and bool((qw.grid_zero != 2 ** (bits - 1)).any()):
            raise ValueError("a symmetric result must have every zero equal to 2^(bits-1)")
        if bool((qw.grid_zero < 1).any()):
            raise ValueError("the gptq v1 format cannot store a zero point of 0")
        codes = qw.codes.t().contiguous()                               # (in, out)
        return {
            "qweight": pack_int32(codes, bits, dim=0),                  # (in*b/32, out)
            "qzeros": pack_int32((qw.grid_zero - 1).t().contiguous(), bits, dim=1),  # (G, out*b/32)
            "scales": to_float16(qw.grid_scale.t().contiguous(), "scale"),   # (G, out)
            "g_idx": qw.group_index().to(torch.int32).contiguous(),     # (in,)
        }

    @staticmethod
    def describe(qconfig: Mapping[str, Any], headers: Mapping[str, TensorHeader],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        bits = config_int(qconfig, "bits")
        if bits not in BITS:
            raise ValueError(f"quantization_config says bits {bits}, which the gptq layout cannot hold "
                             "(it stores 2, 3, 4 or 8-bit codes)")
        group_size = config_group_size(qconfig, "group_size", default=-1)
        sym = config_bool(qconfig, "sym", True)
        config_bool(qconfig, "desc_act", False)
        _checkpoint_format(qconfig)
        rows, out_features = need(headers, "qweight", torch.int32, ndim=2)
        if rows == 0 or out_features == 0 or rows * 32 % bits:
            raise ValueError(f"qweight has shape [{rows}, {out_features}], which holds no whole number of "
                             f"{bits}-bit codes per output")
        in_features = rows * 32 // bits
        n_groups = 1 if group_size == -1 else -(-in_features // group_size)
        groups = f"{n_groups} group(s) of {group_size} over {in_features} inputs, {out_features} outputs"
        need(headers, "scales", "floating", (n_groups, out_features), meaning=groups)
        try:
            zero_words = packed_length(out_features, bits)
        except ValueError:
            raise ValueError(f"qweight has {out_features} outputs, which {bits}-bit qzeros cannot pack") from None
        need(headers, "qzeros", torch.int32, (n_groups, zero_words), meaning=groups)
        if "g_idx" in headers:
            need(headers, "g_idx", "integer", (in_features,), meaning="one group index per input")
        return ModuleHeader(bits, group_size, sym, (out_features, in_features))

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        header = GPTQFormat.describe(qconfig, headers_of(tensors), tensors.__getitem__)
        bits, group_size = header.bits, header.group_size
        out_features, in_features = header.shape
        scales = float16_scales("scales", tensors["scales"])                       # (G, out)
        n_groups = scales.shape[0]
        codes = unpack_int32(tensors["qweight"], bits, in_features, dim=0).t().contiguous()   # (out, in)
        zero = unpack_int32(tensors["qzeros"], bits, out_features, dim=1).to(torch.int32)  # (G, out)
        if _checkpoint_format(qconfig) == V1:
            zero = zero + 1          # v1 readers add one to the stored field (§1.5)
        g_idx = tensors.get("g_idx")
        if g_idx is not None:
            lo, hi = int(g_idx.min()), int(g_idx.max())
            if lo < 0 or hi >= n_groups:
                raise ValueError(f"g_idx holds group {lo if lo < 0 else hi}, outside the {n_groups} group(s) "
                                 "of the scales")
            g_idx = g_idx.to(torch.int32)
            if torch.equal(g_idx, default_g_idx(in_features, group_size)):
                g_idx = None
        spec = QuantSpec(method=config_method(qconfig, "gptq"), bits=bits, group_size=group_size, sym=header.sym,
                         act_order=config_bool(qconfig, "desc_act", False), format="gptq")
        return QuantizedWeight(codes=codes, scale=scales.t().contiguous(), zero=zero.t().contiguous(), g_idx=g_idx,
                               spec=spec)

    @staticmethod
    def quantization_config(facts: ConfigFacts) -> dict[str, Any]:
        """§1.7: the GPTQModel keys. Dense Linears are implied by modules_in_block_to_quantize and
        `dynamic` (`-:` for a Linear left dense in some blocks only, `+:` with a module's own grid)."""
        spec, record = facts.spec, facts.record
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "desc_act": spec.act_order,
            "sym": spec.sym,
            "lm_head": facts.lm_head,
            "checkpoint_format": V1,
            "format": V1,
            "static_groups": bool(record.static_groups),
            "true_sequential": record.true_sequential is not False,
            "pack_dtype": "int32",
            "modules_in_block_to_quantize": facts.modules_in_block,
            "meta": facts.meta,
        }
        if record.damp is not None:
            config["damp_percent"] = record.damp
        config.update(record.keys)
        dynamic: dict[str, dict] = {f"-:^{re.escape(name)}$": {} for name in facts.excluded}
        dynamic.update({f"+:^{re.escape(name)}$": {"bits": own.bits, "group_size": own.group_size, "sym": own.sym}
                        for name, own in facts.overrides.items()})
        # vLLM looks a merged q/k/v (gate/up) up under its merged name: a rule for it where every
        # part has the same own setting (parts that differ are refused by the vLLM preflight)
        merged: dict[str, set] = {}
        for name, own in facts.overrides.items():
            fused = fused_name(name)
            if fused is not None:
                merged.setdefault(fused, set()).add((own.bits, own.group_size, own.sym))
        for fused, settings in sorted(merged.items()):
            parts = [f"{fused.rpartition('.')[0]}.{leaf}" for leaf in FUSED[fused.rpartition(".")[2]]]
            if len(settings) == 1 and all(p in facts.overrides for p in parts):
                bits, group_size, sym = next(iter(settings))
                dynamic[f"+:^{re.escape(fused)}$"] = {"bits": bits, "group_size": group_size, "sym": sym}
        if dynamic:
            config["dynamic"] = dynamic
        return config
