"""The GPTQ layout (FORMATS.md §1), as AutoGPTQ/GPTQModel write it and transformers/vLLM read it.

Per Linear: qweight int32 (in*b/32, out) packed along in; qzeros int32 (G, out*b/32) packed along
out; scales float16 (G, out); g_idx int32 (in,). Zero points are written in the v1 convention
(stored field = zero - 1, §1.5); v1 cannot store a zero of 0, so asymmetric results are produced
with zeros of at least 1 (`min_zero`), the writer rule of §1.5. Both v1 and v2 are read.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from ..packing import pack_int32, unpack_int32
from ..primitives import default_g_idx, to_float16
from ..qweight import QuantizedWeight
from ..spec import QuantSpec
from .base import ModuleHeader

V1, V2 = "gptq", "gptq_v2"


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
        if spec.bits not in (2, 3, 4, 8):
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
        if qw.spec.sym and bool((qw.zero != 2 ** (bits - 1)).any()):
            raise ValueError("a symmetric result must have every zero equal to 2^(bits-1)")
        if bool((qw.zero < 1).any()):
            raise ValueError("the gptq v1 format cannot store a zero point of 0")
        codes = qw.codes.t().contiguous()                               # (in, out)
        return {
            "qweight": pack_int32(codes, bits, dim=0),                  # (in*b/32, out)
            "qzeros": pack_int32((qw.zero - 1).t().contiguous(), bits, dim=1),  # (G, out*b/32)
            "scales": to_float16(qw.scale.t().contiguous(), "scale"),   # (G, out)
            "g_idx": qw.group_index().to(torch.int32).contiguous(),     # (in,)
        }

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        bits = int(qconfig["bits"])
        group_size = int(qconfig.get("group_size", -1))
        fmt = str(qconfig.get("checkpoint_format") or qconfig.get("format") or V1).lower()
        if fmt not in (V1, V2):
            raise ValueError(f"checkpoint_format {fmt!r} is not gptq or gptq_v2")
        qweight, scales = tensors["qweight"], tensors["scales"]
        in_features = qweight.shape[0] * 32 // bits
        out_features = qweight.shape[1]
        n_groups = scales.shape[0]
        codes = unpack_int32(qweight, bits, in_features, dim=0).t().contiguous()   # (out, in)
        zero = unpack_int32(tensors["qzeros"], bits, out_features, dim=1).to(torch.int32)  # (G, out)
        if fmt == V1:
            zero = zero + 1          # v1 readers add one to the stored field (§1.5)
        g_idx = tensors.get("g_idx")
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
            if g_idx.shape != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
                raise ValueError(f"g_idx does not index {n_groups} groups over {in_features} inputs")
            if torch.equal(g_idx, default_g_idx(in_features, group_size)):
                g_idx = None
        elif group_size != -1 and n_groups != -(-in_features // group_size):
            raise ValueError(f"{n_groups} scale rows do not match group_size {group_size}")
        spec = QuantSpec(method=str((qconfig.get("meta") or {}).get("method", "gptq")), bits=bits,
                         group_size=group_size, sym=bool(qconfig.get("sym", True)),
                         act_order=bool(qconfig.get("desc_act", False)), format="gptq")
        return QuantizedWeight(codes=codes, scale=scales.t().contiguous().to(torch.float16),
                               zero=zero.t().contiguous(), g_idx=g_idx, spec=spec)

    @staticmethod
    def describe(qconfig: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        bits = int(qconfig["bits"])
        rows, out_features = shapes["qweight"]
        return ModuleHeader(bits, int(qconfig.get("group_size", -1)), bool(qconfig.get("sym", True)),
                            (out_features, rows * 32 // bits))

    @staticmethod
    def quantization_config(spec: QuantSpec, modules_in_block: list[list[str]], extra: Mapping[str, Any], *,
                            dense_modules: Sequence[str] = (), dtype: str | None = None) -> dict[str, Any]:
        # Dense Linears are implied by modules_in_block_to_quantize and `dynamic` (in `extra`).
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "desc_act": spec.act_order,
            "sym": spec.sym,
            "lm_head": False,
            "checkpoint_format": V1,
            "format": V1,
            "static_groups": False,
            "true_sequential": True,
            "pack_dtype": "int32",
            "modules_in_block_to_quantize": modules_in_block,
        }
        config.update(extra)
        return config
