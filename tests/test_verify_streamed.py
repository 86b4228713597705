"""The verification after writing streams the written checkpoint block by block: it never loads the
whole quantized model, and never holds two blocks' tensors at once."""
from __future__ import annotations

import gc
import re
import weakref

import pytest
from test_cli import cli

import quantize_llm.runtime.load as runtime_load
from quantize_llm.models.load import CheckpointReader
from quantize_llm.runtime.qlinear import NF4Linear, OutlierLinear, QuantLinear

CAL = ["--nsamples", 8, "--seqlen", 32]
BLOCK = re.compile(r"\.layers\.(\d+)\.")


@pytest.mark.parametrize("arch, args", [("llama", ["gptq", "--group-size", 32]),
                                        ("qwen2", ["gptq", "--group-size", -1, "--act-order"]),
                                        ("opt", ["awq", "--group-size", 32])])
def test_verification_reads_the_shards_one_block_at_a_time(tiny_model, tmp_path, calib_file, monkeypatch,
                                                             capsys, arch, args):
    src = tiny_model(arch, config={"num_hidden_layers": 4})

    def whole(*a, **k):
        raise AssertionError("verification loaded the whole quantized model")
    monkeypatch.setattr(runtime_load, "load_quantized", whole)

    live: list[tuple[int, weakref.ref]] = []        # (block, tensor) read from the written folder
    modules: weakref.WeakSet = weakref.WeakSet()    # quantized Linears built from the written folder
    seen = {"reads": 0, "blocks": set(), "most_blocks": 0, "most_modules": 0}
    real_read = CheckpointReader.read

    def read(self, name, *a, **k):
        t = real_read(self, name, *a, **k)
        if self.folder.name.startswith(".out.tmp"):     # the written checkpoint, before the rename
            m = BLOCK.search(name)
            held = {b for b, ref in live if ref() is not None} | ({int(m.group(1))} if m else set())
            if len(held) > 1:                           # what reference cycles keep is not held
                gc.collect()
                held = {b for b, ref in live if ref() is not None} | ({int(m.group(1))} if m else set())
            if m:
                live.append((int(m.group(1)), weakref.ref(t)))
                seen["blocks"].add(int(m.group(1)))
            seen["reads"] += 1
            seen["most_blocks"] = max(seen["most_blocks"], len(held))
            seen["most_modules"] = max(seen["most_modules"], len(modules))
        return t
    monkeypatch.setattr(CheckpointReader, "read", read)
    for cls in (QuantLinear, NF4Linear, OutlierLinear):
        real = cls.from_quantized.__func__

        def built(klass, *a, _real=real, **k):
            module = _real(klass, *a, **k)
            modules.add(module)
            return module
        monkeypatch.setattr(cls, "from_quantized", classmethod(built))

    assert cli(args[0], src, "-o", tmp_path / "out", *args[1:], "--dataset", calib_file, *CAL) == 0
    assert "last block matches the run" in capsys.readouterr().out
    assert seen["blocks"] == {0, 1, 2, 3} and seen["reads"] > 0
    assert seen["most_blocks"] == 1                 # one block's tensors at a time
    assert 0 < seen["most_modules"] <= 7            # at most one block's Linears built
