"""Quantization algorithms (rtn, gptq, awq, nf4, outlier), registered by name on import."""
from __future__ import annotations

from . import awq, gptq, nf4, outlier, rtn  # noqa: F401  (each registers its class)
from .registry import ALGORITHMS, get_algorithm, register

__all__ = ["ALGORITHMS", "get_algorithm", "register"]
