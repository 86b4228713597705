"""A memory, disk and time plan before work starts: printed by `quantize-llm plan` and at the start
of every run, and used to refuse a run whose output cannot fit on the disk.

The figures are estimates from the checkpoint's headers and the settings, not measurements (the
coefficients were fitted to scripts/bench_memory.py on real Llama-3 layer shapes). Memory is
predicted per phase; the peak is the largest:
    calibration text  `self` generation (SelfText): the float model's weights (float32 on a CPU,
                      bfloat16 on a GPU), all of them, or with offloading the share kept in memory
                      and the largest module read from the checkpoint during a pass (or the two
                      weights loading holds at once); one batch's KV cache and logits
    capture           the embedding table as stored while it is read, the rows the calibration
                      tokens use in the work dtype (sequential.embedding_rows), block 0's inputs
    blocks            rtn/nf4: one Linear at a time, the block's codes; calibrated methods: one
                      block's weights in float32, the calibration activations (this block's
                      inputs and the next one's), one batch's MLP temporaries, and the largest
                      solve: with GPTQ's error feedback, the Hessian, factored where it lies
                      (n x n), and the stacked weights with their working copy, codes and error
                      terms (3 x); AWQ's search holds
                      the block's originals as well
    outside           the tensors outside the blocks (embeddings, head), read and written one at
                      a time as stored (on the host)
    verification      streamed from the written shards: the embedding rows again, one block
                      (calibrated runs); one module at a time otherwise
host memory adds the process baseline; device memory (a GPU run) is the same phases without it.
    disk           the output, plus with resume the finished blocks (about the output again)
                   and one block's saved calibration inputs
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROCESS_BASELINE = 450 * 2 ** 20     # python + torch + transformers loaded, measured on CPU
LOGIT_COPIES = 4                     # float32 (batch, vocab) arrays a sampling step holds: logits, scaled, softmax


CGROUP = Path("/sys/fs/cgroup")     # cgroup v2: a container's or a batch job's memory limit


def available_memory() -> int | None:
    """Bytes of host memory this process can still get (MemAvailable plus free swap, and no more
    than its cgroup's memory.max less memory.current where a limit is set), or None."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, max(int(limit) - int((CGROUP / "memory.current").read_text()), 0))
    except (OSError, ValueError):
        pass
    return free


@dataclass(frozen=True)
class SelfText:
    """How `self` calibration text is generated (decided by plan.self_text_plan), and its memory:
    the whole float model loaded at once, or the model offloaded, with at most `budget_bytes` of
    its weights in memory at once: `resident_bytes` stay between forward passes, the rest is read
    from the checkpoint's files module by module during every pass (accelerate's big-model
    offloading), at most `streamed_bytes` at a time. Loading it reads every weight once in the
    generation dtype, even those it leaves on disk, and holds two of them at a time (transformers'
    loading loop): `load_bytes`, on the host."""

    weights_bytes: int               # the float model's weights in the generation dtype
    cache_bytes: int                 # one batch's KV cache and the logits of a sampling step
    budget_bytes: int | None = None  # offloaded: the most weight bytes in memory at once; None: the whole model
    resident_bytes: int = 0          # offloaded: weights kept in memory between passes
    streamed_bytes: int = 0          # offloaded: the largest module read in during a pass
    load_bytes: int = 0              # offloaded: the two largest weights, held at once while loading

    @property
    def offloaded(self) -> bool:
        return self.budget_bytes is not None

    def work_bytes(self, cpu: bool) -> int:
        """The phase's memory on the work device: the whole model with the cache and logits; or,
        offloaded, what stays, one module read in, the cache and logits (on a CPU, loading's two
        weights instead when they are more)."""
        if not self.offloaded:
            return self.weights_bytes + self.cache_bytes
        running = self.streamed_bytes + self.cache_bytes
        return self.resident_bytes + (max(running, self.load_bytes) if cpu else running)

    def host_bytes(self) -> int:
        """The phase's host memory on a GPU: the whole model is read there before it moves;
        offloaded, loading's two weights (a module read at every step is less)."""
        return max(self.load_bytes, self.streamed_bytes) if self.offloaded else self.weights_bytes

    def line(self) -> str:
        from ..formats.checkpoint import human_bytes as gb

        if not self.offloaded:
            return (f"calibration text: generated by the whole float model, loaded at once ({gb(self.weights_bytes)} "
                    f"of weights, KV cache and logits {gb(self.cache_bytes)}; pass --dataset to keep the run to "
                    "one block, or --generation-memory to offload the model)")
        return (f"calibration text: generated by the float model offloaded to disk, at most "
                f"{gb(self.budget_bytes or 0)} of its {gb(self.weights_bytes)} of weights in memory at once "
                f"({gb(self.resident_bytes)} kept, the rest read from the checkpoint's files at every step, up to "
                f"{gb(self.streamed_bytes)} at a time; loading holds up to {gb(self.load_bytes)} more for a moment; KV "
                f"cache and logits {gb(self.cache_bytes)}); slower than the whole model")


def kv_cache_bytes(config: dict, batch: int, seqlen: int, itemsize: int) -> int:
    """Bytes of the KV cache of `batch` sequences of `seqlen` tokens, and of one sampling step's
    float32 logits: keys and values of every layer, kv heads x head size each (multi-query and
    grouped-query attention included; a sliding window or a compressed cache holds less)."""
    nested = config.get("text_config")
    text: dict = nested if isinstance(nested, dict) else config
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers") or 0)
    heads = int(text.get("num_attention_heads") or text.get("n_head") or 0)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    hidden = int(text.get("hidden_size") or text.get("d_model") or text.get("n_embd") or 0)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    vocab = int(text.get("vocab_size") or config.get("vocab_size") or 0)
    return 2 * layers * kv_heads * head_dim * batch * seqlen * itemsize + LOGIT_COPIES * 4 * batch * vocab


@dataclass
class ResourcePlan:
    blocks: int
    output_bytes: int
    resume_bytes: int
    host_peak_bytes: int
    device_peak_bytes: int | None
    activation_bytes: int          # calibration activations held at once (inputs + next inputs)
    block_bytes: int               # the largest block's weights in float32
    hessian_bytes: int             # the largest Hessian and its factorization workspace
    host_phases: dict[str, int] | None = None     # predicted host peak per phase (baseline included)
    device_phases: dict[str, int] | None = None   # predicted device peak per phase (a GPU run)
    self_text: SelfText | None = None   # how `self` calibration text is generated, when it is
    activations: str = "device"    # where calibration activations are kept: device, host or disk
    offload_bytes: int = 0         # disk: a block's inputs and outputs in files beside the output
    narrow: bool = False           # the block's quantized Linears held as stored, one input group per pass
    paired: bool = False           # --qep: the float model's activations kept beside the quantized model's
    flops: dict[str, float] | None = None   # a calibrated run's floating-point operations per phase (compute_flops)

    @property
    def disk_bytes(self) -> int:
        return self.output_bytes + self.resume_bytes + self.offload_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "disk_bytes": self.disk_bytes}

    def lines(self) -> list[str]:
        from ..formats.checkpoint import human_bytes as gb
        out = [f"disk: {gb(self.disk_bytes)} (output {gb(self.output_bytes)}"
               + (f", resume state {gb(self.resume_bytes)}" if self.resume_bytes else "")
               + (f", calibration activations {gb(self.offload_bytes)})" if self.offload_bytes else ")"),
               f"host memory peak: about {gb(self.host_peak_bytes)} (one block {gb(self.block_bytes)}, "
               f"calibration activations {gb(self.activation_bytes)}, Hessian {gb(self.hessian_bytes)})"]
        if self.device_peak_bytes is not None:
            out.append(f"device memory peak: about {gb(self.device_peak_bytes)}")
        if self.host_phases and len(self.host_phases) > 1:
            out.append("host memory by phase: " + ", ".join(f"{k} {gb(v)}" for k, v in self.host_phases.items()))
        if self.device_phases and len(self.device_phases) > 1:
            out.append("device memory by phase: " + ", ".join(f"{k} {gb(v)}" for k, v in self.device_phases.items()))
        if self.activations == "host":
            out.append(f"calibration activations: kept on the host ({gb(self.activation_bytes)} do not fit the "
                       "device beside a block); each batch goes to the device as it is used")
        elif self.activations == "disk":
            out.append(f"calibration activations: kept in files beside the output ({gb(self.activation_bytes)} "
                       "do not fit in memory beside a block); each batch is read as it is used")
        if self.narrow:
            out.append("block weights: the quantized Linears held as stored and widened to float32 one call at a "
                       "time, one input group observed per pass, solved Linears served from their codes (a "
                       "float32 block does not fit beside its Hessians); the same result, more forward passes")
        if self.paired:
            out.append("calibration activations: the float model's kept beside the quantized model's (--qep), "
                       "each block run from both")
        if self.flops:
            out.append(f"compute: about {_flop_text(sum(self.flops.values()))} in matrix products ("
                       + ", ".join(f"{k} {_flop_text(v)}" for k, v in self.flops.items() if v) + ")")
        if self.self_text is not None:
            out.append(self.self_text.line())
        return out


def estimate(reader: Any, plans: list, config: dict, *, output_bytes: int, calibrated: bool, nsamples: int,
             seqlen: int, batch_size: int, device_type: str, resume: bool, verify: bool = True,
             devices: int = 1, solver: bool | None = None, search: bool = False,
             self_text: SelfText | None = None, room: int | None = None, masks: bool = False,
             paired: bool = False, sequential: bool = True, trials: tuple[int, int] = (20, 11)) -> ResourcePlan:
    """The plan for quantizing `plans` (plan.plan_blocks) of the checkpoint behind `reader`.

    devices: GPUs the run is spread over; the device peak is the first one's (it also holds the
    embeddings and the Hessian sums; each holds a block replica and its share of the activations).
    solver: the method rounds with GPTQ's error feedback (default: any calibrated method);
    search: AWQ's scale search runs per block; masks: the solve keeps a mask of its weights (a byte
    each: the outlier split's); paired: the float model's activations run beside the quantized
    model's (--qep: twice the activations, a second n x n per solve and the block's float weights
    kept beside their quantized values); sequential: each stage's inputs come from the block with
    the earlier stages quantized (true-sequential: a narrow block releases them as it goes);
    trials: AWQ's scale trials per group and clip trials per weight group (compute_flops);
    self_text: how the model generates its calibration text;
    room: the memory the work device has (host memory on a CPU). Where the plan does not fit in
    it, the first of these that does is chosen: calibration activations kept on the host (a GPU
    run) or on disk (a CPU run); the block's quantized Linears held as stored (`narrow`: a
    calibrated method on one device, without fused experts); both."""
    args = (reader, plans, config, output_bytes, calibrated, nsamples, seqlen, batch_size, device_type,
            resume, verify, devices, solver, search, self_text, masks, paired, sequential, trials)
    plan = _estimate(*args, "device")

    def peak(p: ResourcePlan) -> int | None:
        return p.device_peak_bytes if device_type == "cuda" else p.host_peak_bytes

    if not calibrated or room is None or (peak(plan) or 0) <= room:
        return plan
    away = "host" if device_type == "cuda" else "disk"
    narrowable = not paired and devices == 1 and not any(lp.expert for p in plans for lp in p.linears)
    tries = [(away, False)] + ([("device", True), (away, True)] if narrowable else [])
    for where, narrow in tries:   # activations kept away, the block narrow, both: the first that fits
        other = _estimate(*args, where, narrow)
        if (peak(other) or 0) <= room:
            return other
    return plan


def _estimate(reader: Any, plans: list, config: dict, output_bytes: int, calibrated: bool, nsamples: int,
              seqlen: int, batch_size: int, device_type: str, resume: bool, verify: bool, devices: int,
              solver: bool | None, search: bool, self_text: SelfText | None, masks: bool, paired: bool,
              sequential: bool, trials: tuple[int, int], where: str, narrow: bool = False) -> ResourcePlan:
    solver = calibrated if solver is None else solver
    block_elems = max(sum(_numel(reader.shape(n)) for n in p.tensors) for p in plans)
    block_bytes = 4 * block_elems
    widest_in = max((lp.in_features for p in plans for lp in p.linears), default=0)
    widest_out = max((lp.out_features for p in plans for lp in p.linears), default=0)
    hidden = int(config.get("hidden_size") or config.get("d_model") or widest_in)
    activation = batches = hessian = temporaries = embeddings = solve = 0
    largest = max((lp.out_features * lp.in_features for p in plans for lp in p.linears), default=0)
    phases: dict[str, int] = {}
    stored_embeddings = max((reader.nbytes(n) for n in reader.names() if "embed" in n), default=0)
    if calibrated:
        streams = 2 if paired else 1
        activation = streams * 2 * 4 * nsamples * seqlen * hidden
        batches = streams * 2 * 4 * min(batch_size, nsamples) * seqlen * hidden   # one batch in and out
        hessian = 4 * widest_in * widest_in
        temporaries = 3 * 4 * min(batch_size, nsamples) * seqlen * widest_out
        embeddings = 4 * _cut_table(reader, nsamples * seqlen)
        solve = max((_stage_bytes(p, solver) for p in plans), default=0)
        if search:   # AWQ keeps the originals of the Linears it scales while it searches
            solve += block_bytes // 2
        if paired:   # (X_f - X)^T X beside the Hessian, the target's factor, the float weights kept
            solve += 2 * hessian + block_bytes
        if self_text is not None:
            phases["calibration text"] = self_text.work_bytes(device_type == "cpu")
        held = batches if where == "disk" else activation   # on disk: the batches at work
        phases["capture"] = embeddings + stored_embeddings + held // 2
        work = max(_narrow_bytes(reader, p, masks, sequential, search, solver, nsamples * seqlen) for p in plans) \
            if narrow else block_bytes + solve
        phases["blocks"] = work + held + temporaries
    else:   # one Linear at a time (as stored, in float32, its rounding's temporaries) and the block's
        # codes, a byte per weight (fitted to scripts/bench_memory.py at 405B shapes: 6.3 GB)
        linear_elems = max(sum(lp.out_features * lp.in_features for lp in p.linears) for p in plans)
        phases["blocks"] = linear_elems + 4 * largest
    # Tensors outside the blocks (embeddings, head) are read and written one at a time, as stored.
    inside = {n for p in plans for n in p.tensors}
    outside = max((reader.nbytes(n) for n in reader.names() if n not in inside), default=0)
    phases["outside"] = 5 * outside // 4
    checking = 0
    if verify:   # streamed from the written shards
        if calibrated:
            packed = block_bytes // 6   # a block's codes, scales and dense tensors as written
            largest_linear = 4 * max((lp.out_features * lp.in_features for p in plans for lp in p.linears),
                                     default=0)
            checking = embeddings + stored_embeddings + packed + 2 * largest_linear + activation // (2 * nsamples) \
                * min(batch_size, nsamples)
        else:   # each module decoded back (its codes, unpacked in slices)
            checking = 2 * largest
        phases["verification"] = checking
    work = max(phases.values())
    host = PROCESS_BASELINE + (work if device_type == "cpu" else block_bytes // 2)
    device = None
    device_phases: dict[str, int] = {}
    if device_type == "cuda":
        device_phases = {k: v for k, v in phases.items() if k != "outside"}   # written from the host
        if calibrated:
            held = batches if where == "host" else -(-activation // devices)
            device_phases["capture"] = embeddings + stored_embeddings + held // 2
            device_phases["blocks"] = (max(_narrow_bytes(reader, p, masks, sequential, search, solver,
                                                         nsamples * seqlen) for p in plans) if narrow
                                       else block_bytes + solve) + held + temporaries
        device = max(device_phases.values())
        host_phases = {"outside": phases["outside"],   # the Hessian a solve factors in place is kept here
                       "blocks": block_bytes // 2 + (activation if where == "host" else 0)
                       + (hessian if solver else 0)}
        if self_text is not None:
            host_phases["calibration text"] = self_text.host_bytes()
        host = PROCESS_BASELINE + max(host_phases.values())
    else:
        host_phases = phases
    resume_bytes = (output_bytes + (activation // 2)) if resume else 0
    flops = compute_flops(plans, config, nsamples * seqlen, seqlen, solver=solver, search=search,
                          sequential=sequential, paired=paired, search_tokens=min(nsamples, 16) * seqlen,
                          grid=trials[0], clip_trials=trials[1]) \
        if calibrated else None
    return ResourcePlan(blocks=len(plans), output_bytes=output_bytes, resume_bytes=resume_bytes,
                        host_peak_bytes=host, device_peak_bytes=device, activation_bytes=activation,
                        block_bytes=block_bytes, hessian_bytes=hessian,
                        host_phases={k: PROCESS_BASELINE + v for k, v in host_phases.items()},
                        device_phases=device_phases or None, self_text=self_text, activations=where,
                        offload_bytes=activation if where == "disk" else 0, narrow=narrow,
                        paired=paired and calibrated, flops=flops)


def _stage_bytes(plan: Any, solver: bool) -> int:
    """The largest solve of a block: Linears under one parent reading inputs of one width are
    stacked (q/k/v, gate/up). With error feedback: the Hessian, which LAPACK factors where it lies
    (1 x n x n; its copy goes to a file, or to the host from a GPU: solve.Spill), the stacked
    weights, their working copy, codes and the error terms measured after (3 x); without it (a
    clip search on the Hessian): the Hessian and the weights twice. (A Hessian shared by Linears
    with different settings is copied for all but the last: one n x n more.)"""
    stages = _stage_weights(plan)
    if not stages:
        return 0
    k_h, k_w = (1, 3) if solver else (1, 2)
    return max(4 * (k_h * n * n + k_w * elems) for (_, n), elems in stages.items())


def _stage_weights(plan: Any) -> dict[tuple[str, int], int]:
    """The block's input groups in order, (parent module, input width) -> the weights quantized in
    it: Linears under one parent reading inputs of one width share a Hessian (q/k/v, gate/up)."""
    stages: dict[tuple[str, int], int] = {}
    for lp in plan.linears:
        if lp.quantize:
            key = (lp.local.rpartition(".")[0], lp.in_features)
            stages[key] = stages.get(key, 0) + lp.out_features * lp.in_features
    return stages


def _narrow_bytes(reader: Any, plan: Any, masks: bool = False, sequential: bool = True, search: bool = False,
                  solver: bool = True, tokens: int = 0) -> int:
    """A block's peak with its quantized Linears held as stored (sequential.py, Calibration.narrow):
    input groups (Linears under one parent reading inputs of one width) are observed one pass
    each, in the block's order, and solved in turn, their codes (a byte per weight) kept. While a
    group's Hessian (4 n^2) is gathered, the Linears not yet solved are held as stored (every one
    of them without `sequential`, when later groups see the block unchanged) and one Linear at a
    time is widened to float32 for its call (from its codes once solved). Its solve adds the
    working float32 copy (the Linears sharing the input stacked into it) and the codes (and,
    `masks`, a byte per weight of the outlier split's mask); a solved group's originals are
    released after its solve (`sequential`), else before the last group's solve. After the solves
    the block runs on its codes, each Linear dequantized to float32 for its call (three copies of
    the largest, as in the error measurement).

    search (AWQ): first the scale search over the stored block: a group's trial weights in float32
    and one Linear widened for the inspected module's call, or for a lone Linear its inputs (`tokens`
    rows) or Hessian, whichever is smaller; then each group's Linears take their scaled weight in
    float32 in place of the stored one, and round one Linear at a time (`solver`: GPTQ on a clamped
    copy, two float32 copies of it)."""
    quantized = {f"{lp.name}.weight": lp for lp in plan.linears if lp.quantize}
    dense = sum(4 * _numel(reader.shape(n)) for n in plan.tensors if n not in quantized)
    stages: dict[tuple[str, int], list[Any]] = {}
    for lp in quantized.values():
        stages.setdefault((lp.local.rpartition(".")[0], lp.in_features), []).append(lp)
    if not stages:
        return dense
    stored = {key: sum(reader.nbytes(f"{lp.name}.weight") for lp in linears) for key, linears in stages.items()}
    unsolved = sum(stored.values())
    codes = peak = 0
    largest = max(lp.out_features * lp.in_features for lp in quantized.values())
    if search:
        for (_, n), linears in stages.items():
            elems = sum(lp.out_features * lp.in_features for lp in linears)
            alone = 4 * min(n * n, tokens * n) if len(linears) == 1 else 4 * largest
            peak = max(peak, dense + unsolved + 4 * elems + alone)
    for i, ((key, n), linears) in enumerate(zip(stages, stages.values(), strict=True)):
        elems = sum(lp.out_features * lp.in_features for lp in linears)
        scaled = 4 * elems - stored[(key, n)] if search else 0
        observed = dense + unsolved + scaled + codes + 4 * n * n
        last = i == len(stages) - 1
        held = dense + (unsolved if sequential or not last else stored[(key, n)]) + scaled + codes + 4 * n * n
        if search:
            work = elems + (8 * max(lp.out_features * lp.in_features for lp in linears) if solver else 0)
        else:
            work = 4 * elems + elems + (elems if masks else 0)
        peak = max(peak, observed + 4 * largest, held + work)
        codes += elems
        if sequential:
            unsolved -= stored[(key, n)]
    return max(peak, dense + codes + 3 * 4 * largest)


def compute_flops(plans: list, config: dict, tokens: int, seqlen: int, *, solver: bool, search: bool,
                  sequential: bool = True, paired: bool = False, search_tokens: int = 0,
                  clip_trials: int = 11, grid: int = 20) -> dict[str, float]:
    """Floating-point operations of a calibrated run's matrix products, per phase, summed over the
    blocks (what its time on a device follows once the weights are read; elementwise work such as
    rounding and the clip search's trials is left out). Per block, with the quantized Linears in
    input groups (stages: q/k/v, o, gate/up, down; n the group's input width, E its weights):

    forward    each stage's pass runs the block up to the stage (true-sequential; else one pass up
               to the last), then one whole pass makes the next block's inputs: 2 x tokens x E per
               Linear run, and 4 x tokens x seqlen x (heads x head_dim) for the attention scores
               and their use once a pass is past the first group; twice with the float stream (qep)
    hessians   2 x tokens x n^2 per group (twice with qep: (X_f - X)^T X besides)
    factorizations  GPTQ: factor, invert and factor H again (4/3 n^3; LAPACK or cuSOLVER)
    solves     GPTQ: the error feedback (E n), the output energy ||W X||^2 (2 E n) and with qep the
               corrected target (4 E n); without
               error feedback (AWQ's rounding): the clip trials on each group's Hessian block
               (clip_trials x 2 x E x 128) and the output error (4 E n)
    search     AWQ: one pass gathering statistics, then `grid` trials per group: the inspected
               module run on search_tokens (a lone Linear: its error from whichever is smaller,
               its inputs or its Hessian)
    """
    heads = int(config.get("num_attention_heads") or 0)
    hidden = int(config.get("hidden_size") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    attention = 4 * tokens * seqlen * heads * head_dim
    out = {"forward": 0.0, "hessians": 0.0, "factorizations": 0.0, "solves": 0.0, "search": 0.0}
    streams = 2 if paired else 1
    for plan in plans:
        stages = _stage_weights(plan)
        if not stages:
            continue
        sizes = list(stages.values())
        total = sum(sizes)
        passes = range(len(sizes)) if sequential else [len(sizes) - 1]
        forward = sum(2 * tokens * sum(sizes[:i]) + (attention if i else 0) for i in passes)
        out["forward"] += streams * (forward + 2 * tokens * total + attention)
        out["hessians"] += streams * sum(2 * tokens * n * n for (_, n) in stages)
        for (parent, n), elems in stages.items():
            if solver:
                out["factorizations"] += 4 / 3 * n ** 3
                out["solves"] += 3 * elems * n + (4 * elems * n if paired else 0)
            else:
                out["solves"] += clip_trials * 2 * elems * min(128, n) + 4 * elems * n
            if search:
                lone = sum(1 for lp in plan.linears if lp.quantize and lp.in_features == n
                           and lp.local.rpartition(".")[0] == parent) == 1
                under = sum(lp.out_features * lp.in_features for lp in plan.linears
                            if lp.local.startswith(parent + ".")) if parent else total
                out["search"] += grid * (2 * elems * min(n, tokens) if lone else 2 * search_tokens * under)
        if search:
            out["search"] += 2 * tokens * total + attention
    return out


def _flop_text(flops: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops / 1e6:.3g} MFLOP"


def _cut_table(reader: Any, tokens: int) -> int:
    """Elements of the largest embedding table while block 0's inputs are made: cut to the rows
    `tokens` calibration tokens can use where sequential.embedding_rows cuts it."""
    from ..calibration.sequential import COMPACT_EMBEDDING_BYTES

    shapes = [reader.shape(n) for n in reader.names() if "embed" in n]
    if not shapes:
        return 0
    shape = max(shapes, key=_numel)
    if len(shape) == 2 and 4 * _numel(shape) >= COMPACT_EMBEDDING_BYTES and 2 * min(tokens, shape[0]) <= shape[0]:
        return min(tokens, shape[0]) * shape[1]
    return _numel(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
