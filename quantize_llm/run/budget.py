"""`--target-bpw` / `--target-size`: the best per-module settings for a size budget.

The objective: the predicted increase of the KL divergence of the model's final logits, summed
over modules, sum_m alpha_m * E_m(setting_m), where

- E_m(s) = tr(D H D^T) / tokens, the output error of module m rounded with setting s on the
  calibration inputs (D = W - Q, H = X^T X; algorithms/solve.energy), measured for every candidate
  setting (bits 2/3/4/8 x group 32/64/128/per channel, and asym where the run is asymmetric) by
  rounding to nearest, a cheap proxy for the method's own error;
- alpha_m = KL_m / E_m(probe), the measured effect of that module on the output: KL_m is the KL
  divergence of the final logits with module m alone rounded to the probe setting (3-bit group
  128), on a few calibration sequences, against the unquantized model.

With `Budget(proxy="gptq")` E_m(s) estimates GPTQ's own error instead, without a solve
(gptq_error_estimate): rounding to nearest ignores what GPTQ's error feedback recovers where a
module's inputs are correlated, and overstates some modules' errors many times more than others'.

It is the second-order (additive) picture of the loss: each module's error enters the KL through
its own sensitivity. Without calibration data (rtn) E_m is the squared weight error and alpha_m 1.
`core/allocate.solve` picks the settings minimizing it within the budget, counted in exact stored
bits (the format encodes each candidate: codes, scales, zeros, g_idx). The choice becomes
per-module overrides the format records (GPTQ `dynamic`), so the plan, the vLLM preflight and the
model card see it like any override. Measurements are cached in `.<OUT>.budget.pt` beside OUT.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.allocate import Allocation, solve
from ..core.qweight import QuantizedWeight
from ..core.spec import QuantSpec
from ..errors import SpecError

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
PROBE = (3, 128, True)          # the setting each module is rounded to alone to measure its effect
KL_SEQUENCES = 4                # calibration sequences the effect is measured on
KL_TOKENS = 256                 # their first tokens
PROXIES = ("rtn", "gptq")       # Budget.proxy


@dataclass(frozen=True)
class Budget:
    """A size budget: bits per weight of the quantized block Linears, or bytes of the whole checkpoint."""

    bpw: float | None = None
    size: int | None = None
    # E_m(s) with calibration data: "rtn", the output error of rounding to nearest; "gptq", the
    # solve-free estimate of GPTQ's own output error (gptq_error_estimate)
    proxy: str = "rtn"

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size is None):
            raise SpecError("give one of --target-bpw and --target-size")
        if self.proxy not in PROXIES:
            raise SpecError(f"budget proxy {self.proxy!r} is not known", f"choose one of {', '.join(PROXIES)}")
        if self.bpw is not None and not 2.0 <= self.bpw <= 16.0:
            raise SpecError(f"--target-bpw {self.bpw} is outside [2, 16]", "3.5 to 4.5 is the useful range")
        if self.size is not None and self.size <= 0:
            raise SpecError(f"--target-size {self.size} must be positive")

    def label(self) -> str:
        return f"{self.bpw:g} bits per weight" if self.bpw is not None else f"{(self.size or 0) / 1e9:.3f} GB"


def setting_label(bits: int, group_size: int, sym: bool) -> str:
    return f"w{bits}{'g' + str(group_size) if group_size != -1 else '-channel'}{'' if sym else '-asym'}"


def candidates(spec: QuantSpec, fmt: Any, strict_vllm: bool) -> list[tuple[int, int, bool]]:
    """The settings a module may get: the format holds them (and vLLM serves them, with --strict-vllm)."""
    from ..formats.vllm import setting_reason

    out = []
    for sym in ((True,) if spec.sym else (True, False)):
        for bits in BITS:
            for group in GROUPS:
                s = spec.replace(bits=bits, group_size=group, sym=sym, overrides=())
                if fmt.supports(s) is not None:
                    continue
                if strict_vllm and setting_reason(s, fmt.name) is not None:
                    continue
                out.append((bits, group, sym))
    if not out:
        raise SpecError(f"no candidate setting of the {fmt.name} format fits the budget search"
                        + (" that vLLM serves" if strict_vllm else ""))
    return out


_BITS_CACHE: dict[tuple, int | None] = {}


def exact_bits(fmt: Any, spec: QuantSpec, out_features: int, in_features: int,
               dtype: torch.dtype | None = None) -> int | None:
    """Stored bits of one module with `spec` in `fmt` (every tensor the format writes), or None
    when the format cannot hold that shape. `dtype`: the stored weight's (compressed-tensors keeps
    scales in it)."""
    key = (fmt.name, spec.bits, spec.group_size, spec.sym, spec.act_order, out_features, in_features, dtype)
    if key not in _BITS_CACHE:
        if fmt.check_shape(spec, out_features, in_features) is not None:
            _BITS_CACHE[key] = None
        else:
            groups = spec.n_groups(in_features)
            spec = spec.replace(min_zero=fmt.min_zero(spec))
            qw = QuantizedWeight(codes=torch.zeros(out_features, in_features, dtype=torch.uint8),
                                 # 1 + 2^-10: a float16 scale bfloat16 cannot hold (compressed-tensors then
                                 # stores float32 scales for a bfloat16 model, as it does for most real ones)
                                 scale=torch.full((out_features, groups), 1 + 2 ** -10, dtype=torch.float16),
                                 zero=torch.full((out_features, groups), 2 ** (spec.bits - 1), dtype=torch.int32),
                                 g_idx=(torch.arange(in_features, dtype=torch.int32) // spec.effective_group_size(
                                     in_features)) if spec.act_order else None, spec=spec, source_dtype=dtype)
            _BITS_CACHE[key] = 8 * sum(t.numel() * t.element_size() for t in fmt.encode(qw).values())
    return _BITS_CACHE[key]


@dataclass
class Measurement:
    """Per module: its output error under every candidate setting and its measured sensitivity."""

    key: str
    modules: list[str]
    settings: list[tuple[int, int, bool]]
    error: list[list[float]]        # [module][setting]
    sensitivity: list[float]        # alpha_m (1.0 without data)
    probe_kl: list[float]           # KL_m at the probe setting (empty without data)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("key", "modules", "settings", "error", "sensitivity", "probe_kl",
                                              "seconds")}


@dataclass(frozen=True)
class Choice:
    """The allocation of one budget: each module's setting, and what it predicts."""

    budget: Budget
    modules: tuple[str, ...]
    params: tuple[int, ...]
    settings: tuple[tuple[int, int, bool], ...]   # per module
    bits: int                       # exact stored bits of the allocated modules
    limit: int                      # the budget in bits for those modules
    predicted: float                # sum of alpha * E (predicted KL)
    exact: bool
    bound: float                    # a lower bound on the optimum (== predicted when exact)
    uniform: tuple[tuple[str, float, float], ...] = field(default=())   # (setting, bpw, predicted) per uniform one

    @property
    def bpw(self) -> float:
        return self.bits / max(sum(self.params), 1)

    def base(self) -> tuple[int, int, bool]:
        """The setting most weights get: the run's spec; the others become overrides."""
        count: Counter = Counter()
        for s, n in zip(self.settings, self.params, strict=True):
            count[s] += n
        return count.most_common(1)[0][0]

    def apply(self, spec: QuantSpec) -> QuantSpec:
        """`spec` with the base setting and one override per module that differs (after the
        job's own overrides, which keep precedence)."""
        bits, group, sym = self.base()
        own = tuple((f"^{re.escape(m)}$", (("bits", s[0]), ("group_size", s[1]), ("sym", s[2])))
                    for m, s in zip(self.modules, self.settings, strict=True) if s != (bits, group, sym))
        return spec.replace(bits=bits, group_size=group, sym=sym, overrides=spec.overrides + own)

    def lines(self) -> list[str]:
        """The allocation as people read it: the mix of settings, bits per kind and per block."""
        mix: Counter = Counter()
        for s, n in zip(self.settings, self.params, strict=True):
            mix[setting_label(*s)] += n
        total = sum(self.params)
        lines = [f"budget {self.budget.label()}: {self.bpw:.4f} bits per weight exact "
                 f"({self.bits / 8 / 1e6:.3f} MB of {self.limit / 8 / 1e6:.3f} MB), predicted loss {self.predicted:.5g}"
                 + ("" if self.exact else f" (sizes coarsened; optimum at least {self.bound:.5g})"),
                 "  settings: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in mix.most_common())]
        kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        blocks: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for m, s, n in zip(self.modules, self.settings, self.params, strict=True):
            kind = m.rsplit(".", 1)[-1]
            block = re.search(r"\.(\d+)\.", m)
            kinds[kind][0] += n * s[0]
            kinds[kind][1] += n
            blocks[block.group(1) if block else "-"][0] += n * s[0]
            blocks[block.group(1) if block else "-"][1] += n
        lines.append("  code bits per kind: " + ", ".join(f"{k} {v[0] / v[1]:.2f}" for k, v in kinds.items()))
        lines.append("  code bits per block: " + " ".join(f"{v[0] / v[1]:.1f}" for v in blocks.values()))
        return lines

    def table(self) -> list[tuple[str, str]]:
        """(module, setting) for the model card."""
        return [(m, setting_label(*s)) for m, s in zip(self.modules, self.settings, strict=True)]


def cache_path(output: Path) -> Path:
    return output.parent / f".{output.name}.budget.pt"


def measurement_key(model_fp: Any, job: Any, settings: list[tuple[int, int, bool]]) -> str:
    cal = job.calibration
    data = {"model": model_fp, "method": job.spec.method, "act_order": job.spec.act_order,
            "calibration": None if cal is None or job.spec.method == "rtn" else
            [cal.source, cal.nsamples, cal.seqlen, getattr(cal, "seed", 0), getattr(cal, "text_column", "text")],
            "settings": settings, "probe": PROBE, "kl": [KL_SEQUENCES, KL_TOKENS], "version": 1}
    proxy = getattr(job.budget, "proxy", "rtn")
    if proxy != "rtn":       # (absent for the first proxy: caches made before there was a choice stay valid)
        data["proxy"] = proxy
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`w` rounded to nearest on `spec`'s min-max grid (float16 scales), dequantized (float32)."""
    from ..core.primitives import rtn_group_params

    scale, zero = rtn_group_params(w, spec.bits, spec.group_size, spec.sym, spec.min_zero)
    gs = spec.effective_group_size(w.shape[1])
    s = scale.float().repeat_interleave(gs, dim=1)[:, :w.shape[1]]
    z = zero.float().repeat_interleave(gs, dim=1)[:, :w.shape[1]]
    return s * (torch.round(w.float() / s) + z).clamp_(0, spec.maxq).sub_(z)


class BlockShortcut:
    """Logits with one module changed, without recomputing the blocks before it.

    A module in decoder block i changes nothing before block i, so the KL probe of that module
    replays the float model's recorded outputs of blocks 0 .. i-1 (each returns what it returned in
    the unchanged pass) and computes blocks i onward: on average half the blocks of a full forward.
    It applies only when every module lies in one numbered list of blocks (`model.layers.3...`);
    `check` compares a replayed pass with the recorded logits and falls back to full forwards when
    they differ (a model whose blocks are not one chain, e.g. one reading an earlier block's state)."""

    def __init__(self, model: Any, paths: list[str]) -> None:
        self.model = model
        found = [re.match(r"^(.*?)\.(\d+)\.", p) for p in paths]
        lists = {m.group(1) for m in found if m is not None}
        self.enabled = len(lists) == 1 and all(m is not None for m in found)
        self.index: dict[str, int] = {}
        self.blocks: list[Any] = []
        if self.enabled:
            container = model.get_submodule(lists.pop())
            self.enabled = isinstance(container, torch.nn.ModuleList)
            self.blocks = list(container) if self.enabled else []
            self.index = {p: int(m.group(2)) for p, m in zip(paths, found, strict=True) if m is not None}
        self.outputs: list[Any] = []

    def record(self, tokens: torch.Tensor) -> torch.Tensor:
        """The unchanged model's logits; each block's output is kept for the replays."""
        self.outputs = [None] * len(self.blocks)

        def keep(i: int):
            def fn(module: Any, args: tuple, output: Any) -> None:
                self.outputs[i] = output
            return fn

        handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(self.blocks)]
        try:
            return self.model(tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()

    def logits(self, tokens: torch.Tensor, path: str) -> torch.Tensor:
        """The logits with the blocks before `path`'s block replayed from the recording."""
        skip = self.index.get(path, 0) if self.enabled else 0
        for i in range(skip):
            self.blocks[i].forward = lambda *a, _out=self.outputs[i], **k: _out
        try:
            return self.model(tokens, use_cache=False).logits
        finally:
            for i in range(skip):
                del self.blocks[i].forward

    def check(self, tokens: torch.Tensor, base: torch.Tensor) -> None:
        """Replay all but the last block and compare with `base` (log-probabilities); off if they differ."""
        if not self.enabled or len(self.blocks) < 2 or any(o is None for o in self.outputs):
            self.enabled = False
            return
        last = max(self.index.values())
        probe = next(p for p, i in self.index.items() if i == last)
        replayed = torch.log_softmax(self.logits(tokens, probe).float(), dim=-1)
        self.enabled = last > 0 and torch.allclose(replayed, base, rtol=1e-4, atol=1e-4)


def gptq_column_weights(h: torch.Tensor, damp: float) -> torch.Tensor:
    """1 / U_jj^2 per input column, U the upper Cholesky factor of (H + damp * mean(diag H) I)^-1.

    GPTQ rounds column j after the earlier columns' error was fed into it and pays
    (w_j - q_j)^2 / U_jj^2 for it; U_jj^2 is the variance of column j's input left unexplained
    by the columns before it, far below H_jj where inputs are correlated."""
    h = h.double()
    damped = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    dead = torch.diag(h) == 0
    damped[dead, dead] = 1.0
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    return (1.0 / torch.diag(u) ** 2).float()


def gptq_error_estimate(d: torch.Tensor, column_weights: torch.Tensor) -> float:
    """GPTQ's output error tr(D H D^T) estimated without a solve: sum_j ||D[:, j]||^2 / U_jj^2
    (gptq_column_weights), D the error of rounding to nearest (the rounding errors of GPTQ's
    updated weights are about as large). Measured on SmolLM2-135M (scripts/bench_budget_proxy.py):
    1.3 to 1.9 times GPTQ's error on every module and setting tried, where tr(D H D^T) of rounding
    to nearest is 4.7 to 72 times it (attention output projections at the top of that range)."""
    return float(((d.float() ** 2).sum(0) * column_weights).sum())


@torch.no_grad()
def measure(folder: Path, modules: list[tuple[str, str]], spec: QuantSpec, fmt: Any,
            settings: list[tuple[int, int, bool]], calibration: Any, batch_size: int, device: torch.device,
            key: str, trust_remote_code: bool = False, proxy: str = "rtn") -> Measurement:
    """Measure every module's error under every setting, and (with `calibration`) its sensitivity.

    modules: (stored name, module path in the model) of each module to allocate. proxy: what E_m(s)
    is (Budget.proxy); the sensitivity alpha_m always divides the probe's KL by the probe's actual
    output error, so alpha_m * E_m(s) predicts the KL of whatever error E_m(s) estimates."""
    from ..algorithms.solve import energy
    from ..eval.evaluate import load_for_eval

    start = time.perf_counter()
    model: Any
    model, tokenizer = load_for_eval(str(folder), device=device, trust_remote_code=trust_remote_code)
    linears: list[Any] = [model.get_submodule(path) for _, path in modules]
    specs = [spec.replace(bits=b, group_size=g, sym=s, overrides=(), min_zero=0) for b, g, s in settings]
    specs = [s.replace(min_zero=fmt.min_zero(s)) for s in specs]
    if calibration is None:
        error = []
        for lin in linears:
            w = lin.weight.float()
            error.append([float(((w - _rtn(w, s)) ** 2).sum()) for s in specs])
        return Measurement(key, [m for m, _ in modules], settings, error, [1.0] * len(modules), [],
                           time.perf_counter() - start)
    from ..calibration.data import load_calibration

    context = getattr(model.config, "max_position_embeddings", None)
    tokens = load_calibration(calibration, tokenizer, model_loader=lambda: model, max_context=context).tokens
    hessians: dict[int, torch.Tensor] = {}
    count = [0]

    def hook(i: int):
        def fn(module: Any, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if i not in hessians:
                hessians[i] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            hessians[i].addmm_(x.t(), x)
        return fn

    handles = [lin.register_forward_pre_hook(hook(i)) for i, lin in enumerate(linears)]
    try:
        for batch in tokens.split(batch_size):
            model(batch.to(device), use_cache=False)
            count[0] += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    error = []
    probe = spec.replace(bits=PROBE[0], group_size=PROBE[1], sym=PROBE[2], overrides=(), min_zero=0)
    probe = probe.replace(min_zero=fmt.min_zero(probe))
    probe_error = []
    for i, lin in enumerate(linears):
        h = hessians.pop(i) / count[0]
        w = lin.weight.float()
        if proxy == "gptq":
            from ..algorithms.gptq import GPTQOptions

            cw = gptq_column_weights(h, GPTQOptions().damp)
            error.append([gptq_error_estimate(w - _rtn(w, s), cw) for s in specs])
        else:
            error.append([max(energy(w - _rtn(w, s), h), 0.0) for s in specs])
        probe_error.append(max(energy(w - _rtn(w, probe), h), 0.0))
    # the effect of each module on the output: KL of the final logits with it alone at the probe setting
    kl_tokens = tokens[:KL_SEQUENCES, :KL_TOKENS].to(device)
    shortcut = BlockShortcut(model, [path for _, path in modules])
    base = torch.log_softmax(shortcut.record(kl_tokens).float(), dim=-1)
    shortcut.check(kl_tokens, base)
    kls = []
    for (_, path), lin in zip(modules, linears, strict=True):
        original = lin.weight.data.clone()
        lin.weight.data.copy_(_rtn(original.float(), probe).to(original.dtype))
        logq = torch.log_softmax(shortcut.logits(kl_tokens, path).float(), dim=-1)
        lin.weight.data.copy_(original)
        kls.append(max(float((base.exp() * (base - logq)).sum(-1).mean()), 0.0))
    sensitivity = [kl / e if e > 0 else 0.0 for kl, e in zip(kls, probe_error, strict=True)]
    return Measurement(key, [m for m, _ in modules], settings, error, sensitivity, kls, time.perf_counter() - start)


def load_or_measure(output: Path, key: str, **kwargs: Any) -> Measurement:
    """The cached measurement beside OUT when it was made for the same inputs, else a new one (saved)."""
    path = cache_path(output)
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            if data.get("key") == key:
                return Measurement(**{k: data[k] for k in ("key", "modules", "settings", "error", "sensitivity",
                                                           "probe_kl", "seconds")})
        except Exception:   # noqa: BLE001  # a damaged or foreign cache is measured again
            pass
    m = measure(key=key, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({**m.to_dict(), "settings": [list(s) for s in m.settings]}, tmp)
    tmp.replace(path)
    return m


def tied_groups(modules: list[str]) -> list[list[int]]:
    """Indices of `modules` that must share one setting: the parts vLLM runs as one module
    (formats/vllm.FUSED: q/k/v, gate/up of a block), each other module alone; in first-seen order."""
    from ..formats.vllm import fused_name

    groups: dict[str, list[int]] = {}
    for i, name in enumerate(modules):
        groups.setdefault(fused_name(name) or name, []).append(i)
    return list(groups.values())


def allocate(m: Measurement, budget: Budget, sizes: list[list[int | None]], params: list[int],
             fixed_bits: int = 0) -> Choice:
    """The cheapest settings within `budget` (sizes[module][setting]: exact bits, None = cannot
    hold). `fixed_bits`: what the rest of the checkpoint takes (counted against --target-size).
    Modules vLLM merges (tied_groups) are one item: one setting, their sizes and costs summed."""
    total = sum(params)
    limit = math.floor(budget.bpw * total) if budget.bpw is not None else 8 * (budget.size or 0) - fixed_bits
    settings = [tuple(s) for s in m.settings]
    groups = tied_groups(list(m.modules))
    items, index = [], []
    for group in groups:
        opts = [(sum(sizes[i][k] or 0 for i in group), sum(m.sensitivity[i] * m.error[i][k] for i in group), k)
                for k in range(len(settings)) if all(sizes[i][k] is not None for i in group)]
        items.append([(s, c) for s, c, _ in opts])
        index.append([k for _, _, k in opts])
    a: Allocation = solve(items, limit)
    chosen = [0] * len(m.modules)
    for g, group in enumerate(groups):
        for i in group:
            chosen[i] = index[g][a.choice[g]]
    uniform = []
    for k, s in enumerate(settings):
        column = [sz[k] for sz in sizes]
        if all(b is not None for b in column):
            bits = sum(b or 0 for b in column)
            uniform.append((setting_label(s[0], s[1], bool(s[2])), bits / total,
                            sum(m.sensitivity[i] * m.error[i][k] for i in range(len(m.modules)))))
    return Choice(budget, tuple(m.modules), tuple(params), tuple(settings[k] for k in chosen),  # type: ignore[misc]
                  a.bits, limit, a.cost, a.exact, a.bound, tuple(sorted(uniform, key=lambda u: u[1])))


def plan_budget(job: Any, fmt: Any, spec: QuantSpec, folder: Path, blocks: list, reader: Any,
                memory_of: dict[str, str], device: torch.device) -> Choice:
    """The allocation for `job.budget` over the plan's blocks (measured or read from the cache)."""
    from .resume import model_fingerprint

    if not fmt.per_module:
        raise SpecError(f"the {fmt.name} format has one setting for every layer, so it cannot hold a per-module "
                        "allocation", "use --format gptq (it records them as `dynamic` entries)")
    if spec.codebook != "int":
        raise SpecError("--target-bpw allocates integer grids, not the nf4/fp4 codebooks")
    quantized = [lp for b in blocks for lp in b.linears if lp.quantize]
    units = [lp for lp in quantized if lp.spec is None]
    if any(lp.expert is not None for lp in units):
        raise SpecError("--target-bpw does not allocate experts stored fused yet",
                        "quantize with one setting, or keep the experts dense")
    base = spec.replace(min_zero=0, overrides=())
    settings = candidates(base, fmt, job.strict_vllm)
    from ..formats.vllm import shape_problems

    # a group size vLLM cannot load for this module's shape is not a candidate for it
    sizes = [[None if shape_problems(fmt.name, g, lp.out_features, lp.in_features) else
              exact_bits(fmt, base.replace(bits=b, group_size=g, sym=s), lp.out_features, lp.in_features,
                         reader.dtype(lp.name + ".weight"))
              for b, g, s in settings] for lp in units]
    key = measurement_key(model_fingerprint(folder), job, settings)
    calibration = job.calibration if spec.method != "rtn" else None
    modules = [(lp.name, memory_of.get(lp.name + ".weight", lp.name + ".weight").removesuffix(".weight"))
               for lp in units]
    m = load_or_measure(job.output, key, folder=folder, modules=modules, spec=base, fmt=fmt, settings=settings,
                        calibration=calibration, batch_size=job.batch_size, device=device,
                        trust_remote_code=job.trust_remote_code, proxy=job.budget.proxy)
    fixed = 8 * (reader.total_bytes - sum(reader.nbytes(lp.name + ".weight") for lp in quantized))
    fixed += sum(exact_bits(fmt, lp.spec.replace(min_zero=0), lp.out_features, lp.in_features,
                            reader.dtype(lp.name + ".weight")) or 0
                 for lp in quantized if lp.spec is not None)
    return allocate(m, job.budget, sizes, [lp.out_features * lp.in_features for lp in units], fixed)
