"""A memory, disk and time plan before work starts: printed by `quantize-llm plan` and at the start
of every run, and used to refuse a run whose output cannot fit on the disk.

The figures are estimates from the checkpoint's headers and the settings, not measurements:
    host memory    the process baseline, one block's weights in float32, the calibration
                   activations (this block's inputs and the next one's), the largest Hessian
                   with its factorization workspace, one batch's MLP temporaries, and the
                   embedding table while block 0's inputs are captured
    device memory  the same minus the process baseline, when the work device is a GPU
    disk           the output, plus with resume the finished blocks (about the output again)
                   and one block's saved calibration inputs
    verification   after writing, the quantized checkpoint is loaded whole (its size, the
                   unquantized tensors in float32); the peak is the larger of the two phases
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PROCESS_BASELINE = 450 * 2 ** 20     # python + torch + transformers loaded, measured on CPU


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

    @property
    def disk_bytes(self) -> int:
        return self.output_bytes + self.resume_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "disk_bytes": self.disk_bytes}

    def lines(self) -> list[str]:
        from ..formats.checkpoint import human_bytes as gb
        out = [f"disk: {gb(self.disk_bytes)} (output {gb(self.output_bytes)}"
               + (f", resume state {gb(self.resume_bytes)})" if self.resume_bytes else ")"),
               f"host memory peak: about {gb(self.host_peak_bytes)} (one block {gb(self.block_bytes)}, "
               f"calibration activations {gb(self.activation_bytes)}, Hessian {gb(self.hessian_bytes)})"]
        if self.device_peak_bytes is not None:
            out.append(f"device memory peak: about {gb(self.device_peak_bytes)}")
        return out


def estimate(reader: Any, plans: list, config: dict, *, output_bytes: int, calibrated: bool, nsamples: int,
             seqlen: int, batch_size: int, device_type: str, resume: bool, verify: bool = True,
             devices: int = 1) -> ResourcePlan:
    """The plan for quantizing `plans` (plan.plan_blocks) of the checkpoint behind `reader`.

    devices: GPUs the run is spread over; the device peak is the first one's (it also holds the
    embeddings and the Hessian sums; each holds a block replica and its share of the activations)."""
    block_elems = max(sum(_numel(reader.shape(n)) for n in p.tensors) for p in plans)
    block_bytes = 4 * block_elems
    widest_in = max((lp.in_features for p in plans for lp in p.linears), default=0)
    widest_out = max((lp.out_features for p in plans for lp in p.linears), default=0)
    hidden = int(config.get("hidden_size") or config.get("d_model") or widest_in)
    activation = hessian = temporaries = embeddings = 0
    if calibrated:
        activation = 2 * 4 * nsamples * seqlen * hidden
        hessian = 3 * 4 * widest_in * widest_in
        temporaries = 3 * 4 * min(batch_size, nsamples) * seqlen * widest_out
        embeddings = 4 * max((_numel(reader.shape(n)) for n in reader.names() if "embed" in n), default=0)
    work = block_bytes + activation + hessian + temporaries + embeddings
    checking = 0
    if verify:   # the written checkpoint loaded whole: packed Linears as stored, the rest in float32
        dense = reader.total_bytes - sum(reader.nbytes(f"{lp.name}.weight") for p in plans for lp in p.linears
                                         if lp.quantize)
        checking = output_bytes + 2 * dense + (activation // 2 if calibrated else 0)
    host = PROCESS_BASELINE + (max(work, checking) if device_type == "cpu" else block_bytes // 2)
    device = None
    if device_type == "cuda":
        spread = block_bytes + -(-activation // devices) + hessian + temporaries + embeddings
        device = max(spread, checking)
    resume_bytes = (output_bytes + (activation // 2)) if resume else 0
    return ResourcePlan(blocks=len(plans), output_bytes=output_bytes, resume_bytes=resume_bytes,
                        host_peak_bytes=host, device_peak_bytes=device, activation_bytes=activation,
                        block_bytes=block_bytes, hessian_bytes=hessian)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
