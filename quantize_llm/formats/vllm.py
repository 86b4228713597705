"""vLLM-compatibility preflight: before any work, say when a combination will not get vLLM's fast
(Marlin) kernels, or will not load in vLLM at all, with the reason and the alternative.

The rules follow FORMATS.md §1.8-1.9, §2.4 and §4.5: Marlin serves GPTQ and compressed-tensors
checkpoints with symmetric 4- or 8-bit codes (GPTQ's Marlin path ignores zero points), AWQ with
4-bit codes and zero points, for group sizes -1, 32, 64 and 128, with input widths divisible by the
group size (and by 128) and output widths by 64; everything else runs on slower kernels or not at all.
"""
from __future__ import annotations

from typing import Any, Iterable

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_IN = 128          # vLLM's Marlin kernels tile the input dimension by 128 ...
MARLIN_MIN_OUT = 64          # ... and the output dimension by 64


def preflight(spec: Any, fmt_name: str, shapes: Iterable[tuple[str, int, int, Any]]) -> list[str]:
    """Reasons the run's checkpoint will be slow or unloadable in vLLM; [] when all is well.

    shapes: (module name, out_features, in_features, the module's own spec or None) per quantized Linear.
    """
    if fmt_name == "outlier":
        return ["vLLM cannot load the outlier-split format (only quantize-llm's loader runs it); "
                "use the outlier split for research, gptq/awq/compressed-tensors for serving"]
    if fmt_name == "bnb":
        return []
    reasons: list[str] = []
    seen: set[str] = set()

    def add(reason: str) -> None:
        if reason not in seen:
            seen.add(reason)
            reasons.append(reason)

    for name, out_f, in_f, own in shapes:
        s = own or spec
        if fmt_name in ("gptq", "compressed-tensors"):
            if s.bits not in (4, 8):
                add(f"{s.bits}-bit codes run on vLLM's slow gptq kernel, not Marlin; use --bits 4 or 8")
            elif not s.sym and fmt_name == "gptq":
                add("asymmetric GPTQ checkpoints run on vLLM's slow gptq kernel (Marlin's GPTQ path assumes "
                    "zero = 2^(bits-1)); use --sym for Marlin, or --format compressed-tensors")
        if s.group_size not in MARLIN_GROUP_SIZES:
            add(f"group size {s.group_size} is not one of Marlin's {', '.join(map(str, MARLIN_GROUP_SIZES))}; "
                "use --group-size 128 (or 64, 32, -1)")
        if s.group_size != -1 and in_f % s.group_size:
            add(f"{name}: in_features {in_f} is not a multiple of the group size {s.group_size}, which vLLM "
                "requires; choose a group size that divides it")
        if in_f % MARLIN_MIN_IN or out_f % MARLIN_MIN_OUT:
            add(f"{name}: shape [{out_f}, {in_f}] does not tile into Marlin's {MARLIN_MIN_OUT} x {MARLIN_MIN_IN} "
                "blocks, so vLLM falls back to a slower kernel for it")
        if s.act_order and s.group_size != -1 and fmt_name == "gptq" and not (s.bits in (4, 8) and s.sym):
            add("act-order with groups outside Marlin makes vLLM's exllama path reorder weights at load time; "
                "prefer --static-groups")
    return reasons
