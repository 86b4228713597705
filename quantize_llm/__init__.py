"""quantize-llm: quantize LLM weights into checkpoints that transformers and vLLM load.

Public API: `quantize()`, `load_quantized()`, `QuantSpec`, `__version__`.
"""
from __future__ import annotations

from ._version import __version__
from .core.spec import QuantSpec


def quantize(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """Quantize a model; see `quantize_llm.run.execute.quantize` for the arguments."""
    from .run.execute import quantize as _quantize

    return _quantize(*args, **kwargs)


def load_quantized(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """Load a quantized checkpoint; see `quantize_llm.runtime.load.load_quantized`."""
    from .runtime.load import load_quantized as _load

    return _load(*args, **kwargs)


__all__ = ["QuantSpec", "__version__", "load_quantized", "quantize"]
