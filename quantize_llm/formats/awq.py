"""The AutoAWQ GEMM layout (FORMATS.md §2), as AutoAWQ writes it and transformers/vLLM read it.

Per Linear: qweight int32 (in, out/8) packed along OUT in the interleaved nibble order
[0, 2, 4, 6, 1, 3, 5, 7]; qzeros int32 (in/gs, out/8), raw zero points (no minus one), same order;
scales float16 (in/gs, out), not interleaved; no g_idx. 4-bit only, in % group_size == 0,
out % 8 == 0. A symmetric result is stored with every zero at 8 (the layout always has zeros).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.packing import pack_awq, unpack_awq
from ..core.primitives import to_float16
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


class AWQFormat:
    name: ClassVar[str] = "awq"
    quant_method: ClassVar[str] = "awq"
    tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")
    markers: ClassVar[tuple[str, ...]] = ("qweight",)
    bias_dtype: ClassVar[torch.dtype | None] = torch.float16    # AutoAWQ models are float16 throughout
    config_file: ClassVar[str | None] = None                    # §2.1: config.json only
    per_module: ClassVar[bool] = False    # one setting for the whole checkpoint
    description: ClassVar[str] = "AutoAWQ GEMM layout that transformers (with gptqmodel) and vLLM load"

    @staticmethod
    def supports(spec: QuantSpec) -> str | None:
        if spec.codebook != "int":
            return f"the awq format stores integer grids, not the {spec.codebook} codebook; use the bnb format"
        if spec.bits != 4:
            return f"the awq format stores 4-bit codes only, not {spec.bits}-bit; use --format gptq for {spec.bits}-bit"
        if spec.group_size == -1:
            return "the awq format's readers need a group size; use --group-size 128, or --format gptq for per-channel"
        if spec.act_order:
            return ("the awq format has no g_idx, so it cannot hold act-order results; "
                    "drop --act-order or use --format gptq")
        return None

    @staticmethod
    def check_shape(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
        if in_features % spec.group_size:
            return (f"shape [{out_features}, {in_features}]: in_features is not a multiple of the group size "
                    f"{spec.group_size}, which the awq format needs")
        if out_features % 8:
            return f"shape [{out_features}, {in_features}]: the awq format needs out_features to be a multiple of 8"
        return None

    @staticmethod
    def min_zero(spec: QuantSpec) -> int:
        return 0

    @staticmethod
    def encode(qw: QuantizedWeight) -> dict[str, Tensor]:
        if qw.spec.bits != 4:
            raise ValueError("the awq format stores 4-bit codes only")
        if qw.g_idx is not None:
            raise ValueError("the awq format cannot store a g_idx (act-order)")
        return {
            "qweight": pack_awq(qw.codes.t().contiguous()),               # (in, out/8)
            "qzeros": pack_awq(qw.grid_zero.t().contiguous()),            # (G, out/8)
            "scales": to_float16(qw.grid_scale.t().contiguous(), "scale"),  # (G, out)
        }

    @staticmethod
    def describe(qconfig: Mapping[str, Any], headers: Mapping[str, TensorHeader],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        bits = config_int(qconfig, "bits", "w_bit", default=4)
        if bits != 4:
            raise ValueError(f"quantization_config says bits {bits}, but the AWQ GEMM layout holds 4-bit codes only")
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not read; only the GEMM layout is")
        if not config_bool(qconfig, "zero_point", True):
            raise ValueError("AWQ GEMM checkpoints without zero points are not read")
        group_size = config_group_size(qconfig, "group_size", "q_group_size", default=128)
        in_features, words = need(headers, "qweight", torch.int32, ndim=2)
        out_features = words * 8
        if in_features == 0 or words == 0:
            raise ValueError(f"qweight has shape [{in_features}, {words}], an empty layer")
        gs = in_features if group_size == -1 else group_size
        if in_features % gs:
            raise ValueError(f"qweight has {in_features} inputs, not a multiple of the group size {gs}")
        groups = f"{in_features // gs} group(s) of {gs} over {in_features} inputs, {out_features} outputs"
        need(headers, "scales", "floating", (in_features // gs, out_features), meaning=groups)
        need(headers, "qzeros", torch.int32, (in_features // gs, words), meaning=groups)
        return ModuleHeader(4, group_size, False, (out_features, in_features))

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        header = AWQFormat.describe(qconfig, headers_of(tensors), tensors.__getitem__)
        scales = float16_scales("scales", tensors["scales"])                      # (G, out)
        codes = unpack_awq(tensors["qweight"]).t().contiguous()                   # (out, in)
        zero = unpack_awq(tensors["qzeros"]).t().contiguous().to(torch.int32)     # (out, G)
        spec = QuantSpec(method=config_method(qconfig, "awq"), bits=4, group_size=header.group_size, sym=False,
                         format="awq")
        return QuantizedWeight(codes=codes, scale=scales.t().contiguous(), zero=zero, g_idx=None, spec=spec)

    @staticmethod
    def quantization_config(facts: ConfigFacts) -> dict[str, Any]:
        # §2.4: bits/group_size (not w_bit/q_group_size) and zero_point are what transformers and
        # vLLM read; every Linear left dense is listed (§2.5 pitfall 6).
        spec, dense_modules = facts.spec, facts.dense_modules
        config: dict[str, Any] = {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": spec.group_size,
            "bits": 4,
            "version": "gemm",
            "modules_to_not_convert": list(dense_modules) or None,
        }
        config["meta"] = facts.meta
        return config
