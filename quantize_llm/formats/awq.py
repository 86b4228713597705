"""The AutoAWQ GEMM layout (FORMATS.md §2), as AutoAWQ writes it and transformers/vLLM read it.

Per Linear: qweight int32 (in, out/8) packed along OUT in the interleaved nibble order
[0, 2, 4, 6, 1, 3, 5, 7]; qzeros int32 (in/gs, out/8), raw zero points (no minus one), same order;
scales float16 (in/gs, out), not interleaved; no g_idx. 4-bit only, in % group_size == 0,
out % 8 == 0. A symmetric result is stored with every zero at 8 (the layout always has zeros).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from ..packing import pack_awq, unpack_awq
from ..primitives import to_float16
from ..qweight import QuantizedWeight
from ..spec import QuantSpec
from .base import ModuleHeader


class AWQFormat:
    name: ClassVar[str] = "awq"
    quant_method: ClassVar[str] = "awq"
    tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")
    markers: ClassVar[tuple[str, ...]] = ("qweight",)
    bias_dtype: ClassVar[torch.dtype | None] = torch.float16    # AutoAWQ models are float16 throughout
    config_file: ClassVar[str | None] = None                    # §2.1: config.json only
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
            return "the awq format has no g_idx, so it cannot hold act-order results; drop --act-order or use --format gptq"
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
            "qzeros": pack_awq(qw.zero.t().contiguous()),                 # (G, out/8)
            "scales": to_float16(qw.scale.t().contiguous(), "scale"),     # (G, out)
        }

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"the awq GEMM layout is 4-bit, the config says {bits}")
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not read; only the GEMM layout is")
        if not qconfig.get("zero_point", True):
            raise ValueError("AWQ GEMM checkpoints without zero points are not read")
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
        group_size = int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))
        gs = in_features if group_size == -1 else group_size
        n_groups = in_features // gs
        if in_features % gs or scales.shape != (n_groups, out_features) or qzeros.shape != (n_groups, out_features // 8):
            raise ValueError(f"qzeros {list(qzeros.shape)} / scales {list(scales.shape)} do not match "
                             f"{in_features} inputs in groups of {gs}")
        codes = unpack_awq(qweight).t().contiguous()                      # (out, in)
        zero = unpack_awq(qzeros).t().contiguous().to(torch.int32)        # (out, G)
        spec = QuantSpec(method=str((qconfig.get("meta") or {}).get("method", "awq")), bits=4,
                         group_size=group_size, sym=False, format="awq")
        return QuantizedWeight(codes=codes, scale=scales.t().contiguous().to(torch.float16), zero=zero,
                               g_idx=None, spec=spec)

    @staticmethod
    def describe(qconfig: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        in_features, words = shapes["qweight"]
        return ModuleHeader(4, int(qconfig.get("group_size", qconfig.get("q_group_size", 128))), False,
                            (words * 8, in_features))

    @staticmethod
    def quantization_config(spec: QuantSpec, modules_in_block: list[list[str]], extra: Mapping[str, Any], *,
                            dense_modules: Sequence[str] = (), dtype: str | None = None) -> dict[str, Any]:
        # §2.4: bits/group_size (not w_bit/q_group_size) and zero_point are what transformers and
        # vLLM read; every Linear left dense is listed (§2.5 pitfall 6).
        config: dict[str, Any] = {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": spec.group_size,
            "bits": 4,
            "version": "gemm",
            "modules_to_not_convert": list(dense_modules) or None,
        }
        if "meta" in extra:
            config["meta"] = extra["meta"]
        return config
