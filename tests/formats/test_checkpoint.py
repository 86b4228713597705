"""CheckpointWriter: files read back by safetensors' own reader and by transformers (FORMATS.md §5)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantize_llm.errors import OutputError
from quantize_llm.formats.checkpoint import CheckpointWriter


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.u8": torch.randint(0, 256, (5,), dtype=torch.uint8, generator=g),
        "b.f32": torch.randn(3, 7, generator=g),
        "c.bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "d.f16": torch.randn(9, generator=g).half(),
        "e.i32": torch.randint(-1000, 1000, (2, 3, 3), dtype=torch.int32, generator=g),
        "f.bool": torch.rand(11, generator=g) > 0.5,
        "g.i64": torch.randint(-2**40, 2**40, (3,), dtype=torch.int64, generator=g),
        "h.scalar": torch.tensor(3.5, dtype=torch.float64),
        "i.empty": torch.empty(0, 4, dtype=torch.float16),
        "j.transposed": torch.randn(6, 5, generator=g).t(),      # non-contiguous
        "k.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    }


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                assert k not in out
                out[k] = f.get_tensor(k)
    return out


def header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n]


def write(out: Path, tensors: dict[str, torch.Tensor], **kw) -> CheckpointWriter:
    with CheckpointWriter(out, **kw) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.finish(config={"model_type": "test"})
    return w


def test_single_file_round_trip_mixed_dtypes(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    w = write(tmp_path / "out", tensors)
    assert w.shard_files == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert w.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    back = read_all(tmp_path / "out")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]            # no temp folder left


def test_header_padding_and_alignment(tmp_path: Path) -> None:
    write(tmp_path / "out", mixed_tensors())
    path = tmp_path / "out" / "model.safetensors"
    n, text = header(path)
    assert n % 8 == 0 and text.startswith(b"{")
    assert text.rstrip(b" ").endswith(b"}")                          # padded with spaces, not NULs
    meta = json.loads(text)
    assert meta.pop("__metadata__") == {"format": "pt"}
    spans = sorted(v["data_offsets"] for v in meta.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # no holes
    assert 8 + n + spans[-1][1] == path.stat().st_size
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    for name, v in meta.items():
        assert (8 + n + v["data_offsets"][0]) % itemsize[v["dtype"]] == 0, name


def test_sharding_and_index(tmp_path: Path) -> None:
    tensors = {f"t{i:02d}": torch.full((64,), float(i)) for i in range(10)}   # 256 bytes each
    tensors["big"] = torch.arange(1000, dtype=torch.int64)                     # over the limit
    w = write(tmp_path / "out", tensors, max_shard_bytes=600)
    n = len(w.shard_files)
    assert n >= 5 and w.shard_files[0] == f"model-00001-of-{n:05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert list(index["weight_map"]) == sorted(tensors)
    for name, fname in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / fname), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
    for fname in w.shard_files:  # every shard within the limit unless it holds one oversized tensor
        with safe_open(str(tmp_path / "out" / fname), framework="pt") as f:
            keys = list(f.keys())
            size = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
            assert size <= 600 or len(keys) == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_transformers_loads_sharded_plain_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=64 * 1024) as w:
        for name, t in model.state_dict().items():
            w.add(name, t)
        w.finish(config=model.config.to_dict())
    assert len(w.shard_files) > 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_existing_output_refused_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError) as e:
        CheckpointWriter(out)
    assert "already exists" in e.value.message and "--overwrite" in e.value.hint
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_old_content(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")                           # an earlier checkpoint
    (out / "old.txt").write_text("old")
    assert write(out, {"x": torch.ones(2)}, overwrite=True).shard_files == ["model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]            # no temp or trash folder


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        CheckpointWriter(tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_in_block_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    with pytest.raises(type(exc)), CheckpointWriter(tmp_path / "out", max_shard_bytes=16) as w:
        w.add("a", torch.ones(8))
        w.add("b", torch.ones(8))                                   # one closed shard on disk
        assert w.tmp_dir.is_dir()
        raise exc
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), CheckpointWriter(out, overwrite=True) as w:
        w.add("a", torch.ones(8))
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "old.txt"]


def test_block_without_finish_leaves_nothing(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("a", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_parent(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root ignores permission bits; a parent that is a file fails for everyone
        parent = tmp_path / "file"
        parent.write_text("x")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
    try:
        with pytest.raises(OutputError):
            CheckpointWriter(parent / "out")
    finally:
        parent.chmod(0o755)
    with pytest.raises(OutputError, match="does not exist"):
        CheckpointWriter(tmp_path / "missing" / "out")


def test_finish_rejects_unsafe_file_names(tmp_path: Path) -> None:
    for bad in ["../x", "sub/x", "/abs", "..", "config.json"]:
        with pytest.raises(ValueError), CheckpointWriter(tmp_path / "out") as w:
            w.finish(config={}, files={bad: "x"})
    assert list(tmp_path.iterdir()) == []


def test_extra_files_and_duplicate_names(tmp_path: Path) -> None:
    src = tmp_path / "tok.json"
    src.write_text('{"a": 1}')
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("x", torch.zeros(2))
        with pytest.raises(ValueError, match="duplicate"):
            w.add("x", torch.zeros(2))
        w.finish(config={}, files={"a.txt": "hi", "b.bin": b"\x00\x01", "tok.json": src})
    out = tmp_path / "out"
    assert (out / "a.txt").read_text() == "hi" and (out / "b.bin").read_bytes() == b"\x00\x01"
    assert (out / "tok.json").read_text() == '{"a": 1}'


def test_disk_space_check(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="disk space"):
        CheckpointWriter(tmp_path / "out", expected_bytes=10**18)
    assert list(tmp_path.iterdir()) == []
