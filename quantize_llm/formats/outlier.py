"""quantize-llm's outlier-split layout (docs/outlier-format.md): the GPTQ layout for the low-bit
part plus float16 outliers, `quant_method: "quantize_llm_outlier"`.

Per Linear, beside the GPTQ tensors (qweight, qzeros (v1: zero - 1), scales, g_idx):
    weight mode   outlier_row_ptr int32 (out+1,), outlier_col_idx int16 (int32 when in > 32768)
                  (nnz,), outlier_values float16 (nnz,)  -- CSR over the output rows
    channel mode  outlier_columns int32 (k,), outlier_values float16 (out, k)
Where an outlier sits the codes hold the zero point, so W = dequant(codes) + outliers exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.primitives import to_float16
from ..core.qweight import Outliers, QuantizedWeight
from ..core.spec import QuantSpec
from .base import ConfigFacts, ModuleHeader, TensorHeader, check_finite, headers_of, need
from .gptq import GPTQFormat

QUANT_METHOD = "quantize_llm_outlier"
OUTLIER_TENSORS = ("outlier_row_ptr", "outlier_col_idx", "outlier_columns", "outlier_values")


class OutlierFormat:
    name: ClassVar[str] = "outlier"
    quant_method: ClassVar[str] = QUANT_METHOD
    tensor_names: ClassVar[tuple[str, ...]] = GPTQFormat.tensor_names + OUTLIER_TENSORS
    markers: ClassVar[tuple[str, ...]] = ("qweight",)
    per_module: ClassVar[bool] = True     # per-module bits/group/sym via `dynamic` (GPTQModel, vLLM)
    bias_dtype: ClassVar[torch.dtype | None] = torch.float16
    config_file: ClassVar[str | None] = None
    description: ClassVar[str] = ("quantize-llm outlier-split layout (the GPTQ layout plus float16 outliers), "
                                  "which quantize-llm's loader runs")

    @staticmethod
    def supports(spec: QuantSpec) -> str | None:
        return GPTQFormat.supports(spec)

    @staticmethod
    def check_shape(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
        reason = GPTQFormat.check_shape(spec, out_features, in_features)
        return reason.replace("gptq", "outlier") if reason else None

    @staticmethod
    def min_zero(spec: QuantSpec) -> int:
        return GPTQFormat.min_zero(spec)

    @staticmethod
    def encode(qw: QuantizedWeight) -> dict[str, Tensor]:
        if qw.outliers is None:
            raise ValueError("the outlier format stores results of the outlier split")
        tensors = GPTQFormat.encode(replace(qw, outliers=None))
        o = qw.outliers.to("cpu")
        if o.mode == "weight":
            tensors.update(outlier_row_ptr=o.csr_row_ptr.to(torch.int32).contiguous(),
                           outlier_col_idx=o.csr_col_idx.contiguous(),
                           outlier_values=to_float16(o.values, "outlier value").contiguous())
        else:
            tensors.update(outlier_columns=o.channel_columns.to(torch.int32).contiguous(),
                           outlier_values=to_float16(o.values, "outlier value").contiguous())
        return tensors

    @staticmethod
    def describe(qconfig: Mapping[str, Any], headers: Mapping[str, TensorHeader],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        header = GPTQFormat.describe(qconfig, headers, read)
        out_features = header.shape[0]
        mode = qconfig.get("outlier_mode", "weight")
        if mode == "weight":
            need(headers, "outlier_row_ptr", "integer", (out_features + 1,), meaning="one entry per output, plus one")
            (nnz,) = need(headers, "outlier_values", "floating", ndim=1)
            need(headers, "outlier_col_idx", "integer", (nnz,), meaning="one column per outlier value")
        elif mode == "channel":
            (k,) = need(headers, "outlier_columns", "integer", ndim=1)
            need(headers, "outlier_values", "floating", (out_features, k), meaning=f"{k} column(s) of every output")
        else:
            raise ValueError(f"outlier_mode {mode!r} is not weight or channel")
        return header

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        OutlierFormat.describe(qconfig, headers_of(tensors), tensors.__getitem__)
        qw = GPTQFormat.decode({k: v for k, v in tensors.items() if k in GPTQFormat.tensor_names}, qconfig)
        out_features, in_features = qw.shape
        values = tensors["outlier_values"]
        check_finite("outlier_values", values)
        if qconfig.get("outlier_mode", "weight") == "weight":
            row_ptr, col_idx = tensors["outlier_row_ptr"].to(torch.int32), tensors["outlier_col_idx"]
            nnz = values.numel()
            if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr[1:] < row_ptr[:-1]).any()):
                raise ValueError("outlier_row_ptr / outlier_col_idx do not form a CSR matrix over the rows")
            if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= in_features):
                raise ValueError(f"an outlier column index is outside [0, {in_features})")
            outliers = Outliers("weight", values, row_ptr=row_ptr, col_idx=col_idx)
        else:
            columns = tensors["outlier_columns"].to(torch.int32)
            if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= in_features):
                raise ValueError(f"an outlier column is outside [0, {in_features})")
            outliers = Outliers("channel", values, columns=columns)
        return replace(qw, spec=qw.spec.replace(format="outlier"), outliers=outliers)

    @staticmethod
    def quantization_config(facts: ConfigFacts) -> dict[str, Any]:
        """The GPTQ keys (the codes are the GPTQ layout) under our own quant_method, plus the split's
        keys (mode, fraction or threshold, inner algorithm, value dtype) from the method's record."""
        config = GPTQFormat.quantization_config(facts)
        config["quant_method"] = QUANT_METHOD
        return config
