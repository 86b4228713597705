"""Block 0's inputs are made with the input embedding table cut to the rows the calibration tokens
use (a 128k vocabulary in float32 is gigabytes): the checkpoint written is byte for byte the one the
whole table gives, for plain, scaled (Gemma) and projected (OPT) embeddings, in calibration and in
the streamed verification; a token outside the rows is refused."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from test_cli import cli

import quantize_llm.calibration.sequential as sequential
from quantize_llm.calibration.sequential import embedding_rows, lookup_rows
from quantize_llm.errors import RunError

CAL = ["--nsamples", 4, "--seqlen", 32]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("arch, args", [("llama", ["gptq", "--group-size", 32]),
                                        ("gemma3", ["awq", "--group-size", 32]),
                                        ("opt", ["gptq", "--group-size", 32, "--act-order"])])
def test_cut_table_writes_the_same_checkpoint(tiny_model, tmp_path, calib_file, monkeypatch, arch, args):
    src = tiny_model(arch)
    common = [*args, src, "--dataset", calib_file, *CAL]
    assert cli(*common, "-o", tmp_path / "whole") == 0             # 256 x 64 floats: under the threshold

    shapes: list[tuple[int, ...]] = []
    real = sequential.lookup_rows

    def spy(emb, ids):
        shapes.append(tuple(emb.weight.shape))
        return real(emb, ids)
    monkeypatch.setattr(sequential, "COMPACT_EMBEDDING_BYTES", 0)
    monkeypatch.setattr(sequential, "lookup_rows", spy)
    assert cli(*common, "-o", tmp_path / "cut") == 0
    assert digests(tmp_path / "cut") == digests(tmp_path / "whole")
    assert len(shapes) == 2 and max(s[0] for s in shapes) < 128     # calibration and verification: a few
                                                                    # dozen byte tokens, not 256 rows


def test_rows_and_lookup_match_the_whole_table() -> None:
    class Base(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(1000, 8)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

    base = Base()
    tokens = torch.tensor([[5, 900, 5, 17], [17, 3, 999, 0]])
    assert embedding_rows(base, tokens) is None                     # 32 kB: not worth cutting
    sequential_bytes = sequential.COMPACT_EMBEDDING_BYTES
    try:
        sequential.COMPACT_EMBEDDING_BYTES = 0
        name, ids = embedding_rows(base, tokens)  # type: ignore[misc]
        assert name == "embed.weight" and ids.tolist() == [0, 3, 5, 17, 900, 999]
        assert embedding_rows(base, torch.arange(600)) is None      # more than half the rows: kept whole
    finally:
        sequential.COMPACT_EMBEDDING_BYTES = sequential_bytes
    whole = base.embed(tokens)
    base.embed.weight = torch.nn.Parameter(base.embed.weight.detach()[ids])
    handle = lookup_rows(base.embed, ids)
    assert torch.equal(base.embed(tokens), whole)
    assert torch.equal(base.embed(input=tokens), whole)
    with pytest.raises(RunError, match="a token outside the calibration text"):
        base.embed(torch.tensor([[4]]))
    handle.remove()
