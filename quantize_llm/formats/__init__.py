"""Registry of on-disk formats by name."""
from __future__ import annotations

from ..errors import SpecError
from .awq import AWQFormat
from .base import Format
from .bnb import BnbFormat
from .gptq import GPTQFormat
from .outlier import OutlierFormat

FORMATS: dict[str, type[Format]] = {GPTQFormat.name: GPTQFormat, AWQFormat.name: AWQFormat,
                                    BnbFormat.name: BnbFormat, OutlierFormat.name: OutlierFormat}


def get_format(name: str) -> type[Format]:
    if name not in FORMATS:
        raise SpecError(f"unknown format {name!r}", f"choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def format_for_config(qconfig: dict) -> type[Format]:
    """The reader for a checkpoint's `quantization_config`."""
    method = str(qconfig.get("quant_method", "")).lower()
    by_method = {fmt.quant_method: fmt for fmt in FORMATS.values()}
    if method not in by_method:
        raise SpecError(f"quant_method {method!r} is not a format this tool reads",
                        f"readable: {', '.join(sorted(by_method))}")
    return by_method[method]
