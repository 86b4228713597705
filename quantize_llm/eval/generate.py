"""`quantize-llm generate`: text from a checkpoint (quantized through our loader, or not), timed.

Tokens per second count the new tokens over the whole call (prompt processing included), with
the device synchronized before the clock stops; the first call's one-time costs (kernel build or
cache read, CUDA context) are paid by a one-token warm-up before timing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import UsageError

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    backend: str                       # what ran the quantized Linears: "cuda kernels", "pytorch", or "dense"
    device: str
    dtype: str

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def generate(model: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, chat: bool = False, device: str = "auto", backend: str = "auto", dtype: str = "auto",
             ignore_eos: bool = False, trust_remote_code: bool = False) -> Generation:
    """Greedy (temperature 0) or sampled continuation of `prompt`; see the module docstring."""
    from ..core.devices import resolve_device
    from ..runtime.qlinear import NF4Linear, QuantLinear
    from .evaluate import load_for_eval

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} must be at least 1", "pass --max-new-tokens 64")
    if temperature < 0:
        raise UsageError(f"--temperature {temperature} is negative", "use 0 for greedy decoding or a value like 0.7")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p} must be in (0, 1]", "use 1 to sample from the whole distribution")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype} is not supported", f"choose one of {', '.join(DTYPES)}")
    dev = resolve_device(device)
    work_dtype = DTYPES[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    net, tokenizer = load_for_eval(model, dev, dtype=work_dtype, backend=backend, trust_remote_code=trust_remote_code)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{model} has no chat template", "drop --chat to use the prompt as it is")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UsageError("the prompt is empty after tokenization", "give a non-empty prompt")
    ids = ids.to(dev)
    quantized = [m for m in net.modules() if isinstance(m, (QuantLinear, NF4Linear))]
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    if ignore_eos:
        kw.update(min_new_tokens=max_new_tokens)
    with torch.no_grad():
        net.generate(ids, attention_mask=torch.ones_like(ids),  # type: ignore[operator]  # a transformers model
                     **{**kw, "max_new_tokens": 1, "min_new_tokens": None})
        _sync(dev)
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = net.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # type: ignore[operator]
        _sync(dev)
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=int(ids.shape[1]),
                      new_tokens=int(new.numel()), seconds=seconds, backend=_backend(quantized, dev, backend),
                      device=str(dev), dtype=str(work_dtype).removeprefix("torch."))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _backend(quantized: list, dev: torch.device, backend: str) -> str:
    if not quantized:
        return "dense"
    if backend == "torch" or dev.type != "cuda":
        return "pytorch"
    from ..runtime import cuda

    return "cuda kernels" if cuda.status().available else "pytorch"
