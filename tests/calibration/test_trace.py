"""Groups of Linears that share an input, and AWQ's scaling groups, found by running a block.

The references are the per-family maps in models/architectures.py, written by hand from each
family's modeling code: discovery on the real transformers blocks must find the same groups, the
same producers and the same norm forms (w or 1 + w); on synthetic blocks, the cases the maps do not
cover (a non-linearity that must stop a fold, a Linear the forward pass never reaches).
"""
from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS
from torch import nn

from quantize_llm.algorithms.awq import fold_problem
from quantize_llm.calibration.trace import awq_groups, query_key, trace
from quantize_llm.models.architectures import ARCHITECTURES


def first_block(arch: str, **config):
    """Block 0 of a tiny random model (norm weights random too, so their form is observable), and
    a function running it on the inputs it receives in the model."""
    cls_name, kwargs = TINY_CONFIGS[arch]
    cfg = getattr(transformers, cls_name)(**{**kwargs, **config})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
    layers = model.model.decoder.layers if arch == "opt" else model.model.layers
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 12)), use_cache=False)
    handle.remove()
    args, kwargs = seen["call"]
    block = layers[0]
    return model, block, lambda: block(*args, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt"])
def test_traced_groups_are_the_family_map(arch):
    model, block, forward = first_block(arch)
    expected = ARCHITECTURES[type(model).__name__]
    names = tuple(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
    layout = trace(block, names, forward)
    assert layout.groups == expected.sequential and layout.unused == ()


@pytest.mark.parametrize("arch,kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 4), ("gemma", 4),
                                           ("gemma2", 4), ("gemma3", 2), ("opt", None), ("phi3", 4)])
def test_measured_awq_groups_are_the_family_map(arch, kv_heads):
    config = {} if kv_heads is None else {"num_key_value_heads": kv_heads}
    model, block, forward = first_block(arch, **config)
    expected = ARCHITECTURES[type(model).__name__]
    names = tuple(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
    found = awq_groups(block, trace(block, names, forward), forward)
    # The map's entries that fold in this block without splitting a fused output (Phi-3's chunks).
    foldable = [e for e in expected.awq if e.prev_chunk == (1, 0) and fold_problem(block, e) is None]
    assert [(e.prev, e.layers, e.inspect, e.norm_offset) for e in found] == \
           [(e.prev, e.layers, e.inspect, e.norm_offset) for e in foldable]
    assert set(query_key(names)) == set(expected.awq_no_clip)


class Synthetic(nn.Module):
    """A norm of the 1 + w kind feeding two Linears; one pair of Linears joined by a GELU (no
    fold through it), one by a ReLU (a positive scale passes through), and a Linear never used."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.c, self.d = nn.Linear(width, width), nn.Linear(width, width)
        self.spare = nn.Linear(width, width)

    def forward(self, x):
        h = self.norm(x)
        h = 1.0 * h * 1.0   # a new tensor object with the same values is not the norm's output
        y = self.norm(x)
        y = y + 0 * y.detach()
        return self.c(torch.nn.functional.gelu(self.a(h))) + self.d(torch.relu(self.b(self.norm(x))))


def test_synthetic_block_folds_only_through_per_channel_operations():
    torch.manual_seed(0)
    block = Synthetic().eval()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 16)
    names = ("a", "b", "c", "d", "spare")
    layout = trace(block, names, lambda: block(x))
    assert layout.groups == (("a",), ("c",), ("b",), ("d",)) and layout.unused == ("spare",)   # call order
    found = {e.layers: e for e in awq_groups(block, layout, lambda: block(x))}
    # b reads the norm's own output (LayerNorm multiplies by w and adds a bias that is scaled too);
    # a reads a copy, so nothing is folded into it; d follows b through a ReLU; c follows a GELU.
    assert set(found) == {("b",), ("d",)}
    assert found[("b",)].prev == "norm" and found[("b",)].norm_offset == 0.0
    assert found[("d",)].prev == "b"


class OnePlusNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


def test_a_norm_that_multiplies_by_one_plus_weight_is_measured_as_such():
    block = nn.Module()
    block.norm, block.q, block.k = OnePlusNorm(8), nn.Linear(8, 8), nn.Linear(8, 4)
    with torch.no_grad():
        block.norm.weight.uniform_(-0.3, 0.3)
    x = torch.randn(3, 8)
    forward = lambda: (block.q(block.norm(x)), block.k(block.norm(x)))  # noqa: E731
    layout = trace(block, ("q", "k"), forward)
    assert layout.groups == (("q",), ("k",))   # two calls of the norm: two tensors
    entries = awq_groups(block, layout, forward)
    assert [(e.prev, e.layers, e.norm_offset) for e in entries] == [("norm", ("q",), 1.0), ("norm", ("k",), 1.0)]
