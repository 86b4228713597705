"""Registry of on-disk formats by name."""
from __future__ import annotations

from ..errors import SpecError
from .awq import AWQFormat
from .base import Format, damaged
from .bnb import BnbFormat
from .compressed_tensors import CompressedTensorsFormat
from .gptq import GPTQFormat
from .outlier import OutlierFormat

FORMATS: dict[str, type[Format]] = {GPTQFormat.name: GPTQFormat, AWQFormat.name: AWQFormat,
                                    BnbFormat.name: BnbFormat, OutlierFormat.name: OutlierFormat,
                                    CompressedTensorsFormat.name: CompressedTensorsFormat}


def get_format(name: str) -> type[Format]:
    if name not in FORMATS:
        raise SpecError(f"unknown format {name!r}", f"choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def format_for_config(qconfig: dict) -> type[Format]:
    """The reader for a checkpoint's `quantization_config`."""
    if not isinstance(qconfig, dict):
        raise damaged("config.json", f"quantization_config is {type(qconfig).__name__} {qconfig!r:.60}, "
                                     "not an object")
    method = str(qconfig.get("quant_method", "")).lower()
    by_method = {fmt.quant_method: fmt for fmt in FORMATS.values()}
    if method not in by_method:
        raise SpecError(f"quant_method {method!r} is not a format this tool reads",
                        f"readable: {', '.join(sorted(by_method))}")
    return by_method[method]


def module_qconfig(qconfig: dict, module: str) -> dict:
    """`quantization_config` as it applies to one module: the first positive `dynamic` entry
    ("+:regex" or a bare regex, matched with re.match as GPTQModel does) whose pattern matches
    the module's full name overrides bits / group_size / sym / desc_act; for compressed-tensors,
    the config group that targets the module (compressed_tensors.module_group)."""
    import re

    if qconfig.get("quant_method") == "compressed-tensors":
        from .compressed_tensors import module_group

        return module_group(qconfig, module)
    dynamic = qconfig.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ValueError(f"quantization_config's dynamic is {type(dynamic).__name__}, not an object of "
                         "regex -> settings")
    for key, changes in dynamic.items():
        if key.startswith("-:") or not isinstance(changes, dict):
            continue
        pattern = key[2:] if key.startswith("+:") else key
        try:
            matched = re.match(pattern, module) is not None
        except re.error:
            continue
        if matched:
            return {**qconfig, **{k: v for k, v in changes.items() if k in ("bits", "group_size", "sym", "desc_act")}}
    return qconfig
