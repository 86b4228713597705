"""models/load.py: our safetensors reader against safetensors' own, every §5.2 rejection, MODEL
resolution (local folder, fake offline hub cache) and meta-device skeletons."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantize_llm.errors import CheckpointError, ModelError
from quantize_llm.models.load import CheckpointReader, SafetensorsFile, build_skeleton, resolve_model

TINY_LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    """Write a safetensors file by hand: u64 header length, header bytes, data buffer."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)
    return path


def checkpoint(folder: Path, shards: dict[str, dict[str, torch.Tensor]],
               weight_map: dict | None = None, config: dict = TINY_LLAMA_CONFIG) -> Path:
    """A folder with config.json, the given shard files and (if given) an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    if weight_map is not None:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def assert_matches_safe_open(reader: CheckpointReader) -> None:
    """Every tensor, dtype, shape and byte equals what safetensors.safe_open reads."""
    seen = []
    for path in reader.files:
        with safe_open(str(path), framework="pt") as ref:
            for name in ref.keys():
                want = ref.get_tensor(name)
                got = reader.read(name, check_finite=True)
                assert got.dtype == want.dtype == reader.dtype(name)
                assert tuple(got.shape) == tuple(want.shape) == reader.shape(name)
                assert reader.nbytes(name) == want.numel() * want.element_size()
                flat = (got.reshape(-1), want.reshape(-1))  # compare bits: NaN != NaN, -0.0 == 0.0
                assert torch.equal(*(t.view(torch.uint8) for t in flat)) if want.numel() else True
                seen.append(name)
    assert sorted(seen) == sorted(reader.names())


@pytest.mark.parametrize("dtype,shard", [(torch.float32, "100KB"), (torch.bfloat16, None),
                                         (torch.bfloat16, "60KB")])
def test_reader_matches_safe_open_on_tiny_checkpoints(tiny_model, dtype, shard) -> None:
    folder = tiny_model("llama", dtype=dtype, max_shard_size=shard, tokenizer=False)
    with CheckpointReader(folder) as reader:
        assert len(reader.files) > 1 if shard else reader.files == [folder / "model.safetensors"]
        assert reader.config["model_type"] == "llama"
        assert_matches_safe_open(reader)
        if shard:  # the writer's total_size is an independent count of storage bytes
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert reader.total_bytes == index["metadata"]["total_size"]


def test_reader_handles_every_torch_dtype_and_edge_shapes(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    tensors = {"bool": x > 0, "u8": (x * 50).to(torch.uint8), "i8": (x * 50).to(torch.int8),
               "i16": (x * 900).to(torch.int16), "i32": (x * 9e5).to(torch.int32),
               "i64": (x * 9e9).to(torch.int64), "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
               "f8_e4m3": x.to(torch.float8_e4m3fn), "f8_e5m2": x.to(torch.float8_e5m2),
               "u16": (x.abs() * 900).to(torch.uint16), "u32": (x.abs() * 9e5).to(torch.uint32),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "odd": torch.arange(7, dtype=torch.int16)}
    folder = checkpoint(tmp_path / "ck", {"weights.safetensors": tensors})
    with CheckpointReader(folder) as reader:  # a lone, non-standard name is accepted
        assert_matches_safe_open(reader)
        assert reader.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_safetensors_file_metadata_names_order_and_close(tmp_path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"b": torch.ones(2), "a": torch.zeros(3, dtype=torch.int64)}, str(path), metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        raw = path.read_bytes()
        header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        header.pop("__metadata__")
        assert f.names() == sorted(header, key=lambda n: header[n]["data_offsets"][0])  # file order
        assert torch.equal(f.read("b"), torch.ones(2))
        handle = f._file
        assert handle is not None and not handle.closed
    assert handle.closed and f._file is None
    with pytest.raises(CheckpointError, match="no tensor named 'zz'"):
        SafetensorsFile(path).read("zz")


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,n,problem", [
    (None, b"", None, "truncated"),  # a 5-byte file: not even the header length
    (b'{"a":1}', b"", 10_000, "header larger than the file"),
    (b'{"a":1}', b"", 200_000_000, "header too large"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    (b'{"\xff":1}', b"", None, "UTF-8"),
    (b'{"t":' + json.dumps(F32_2).encode() + b',"t":' + json.dumps(F32_2).encode() + b"}", bytes(8), None,
     "duplicate key 't'"),
    ({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20), None, "a hole"),
    ({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), None, "an overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4), None, "needs 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "begin <= end"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), None, "non-negative"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "needs dtype, shape and data_offsets"),
    ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, bytes(1), None, "multiple|needs 1.5"),
    ({"a": F32_2}, bytes(12), None, "4 trailing bytes"),
    ({"a": F32_2}, bytes(6), None, "truncated"),
    ({"__metadata__": {"format": 1}, "a": F32_2}, bytes(8), None, "__metadata__ must map strings"),
])
def test_bad_safetensors_files_are_refused(tmp_path, header, data, n, problem) -> None:
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x00\x00\x00\x00")
    else:
        raw_file(path, header, data, n)
    with pytest.raises(CheckpointError, match=problem) as err:
        SafetensorsFile(path)
    assert "bad.safetensors" in err.value.message and err.value.hint
    assert "\n" not in err.value.one_line()


def test_valid_handmade_file_with_padding_and_empty_tensor(tmp_path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"}, "e": {"dtype": "I32", "shape": [0, 3],
                         "data_offsets": [0, 0]}, "t": {"dtype": "I32", "shape": [2, 2],
                         "data_offsets": [0, 16]}}).encode() + b"   "
    path = raw_file(tmp_path / "ok.safetensors", header, struct.pack("<4i", 1, -2, 3, -4))
    with SafetensorsFile(path) as f:
        assert torch.equal(f.read("t"), torch.tensor([[1, -2], [3, -4]], dtype=torch.int32))
        assert f.read("e").shape == (0, 3)


def sharded(tmp_path: Path, weight_map: dict) -> Path:
    shards = {"s1.safetensors": {"a": torch.ones(2), "b": torch.zeros(3)},
              "s2.safetensors": {"c": torch.arange(4.0)}}
    return checkpoint(tmp_path / "ck", shards, weight_map)


GOOD_MAP = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}


def test_index_happy_path_and_unmapped_tensor_warning(tmp_path, caplog) -> None:
    with CheckpointReader(sharded(tmp_path, GOOD_MAP)) as reader:
        assert reader.names() == ["a", "b", "c"]
        assert [p.name for p in reader.files] == ["s1.safetensors", "s2.safetensors"]
        assert torch.equal(reader.read("c"), torch.arange(4.0))
    with CheckpointReader(sharded(tmp_path, {"a": "s1.safetensors", "c": "s2.safetensors"})) as reader:
        assert "b" in reader.names() and torch.equal(reader.read("b"), torch.zeros(3))
    assert "not in model.safetensors.index.json" in caplog.text


@pytest.mark.parametrize("shard,problem", [
    ("missing-00003.safetensors", "names shard missing-00003.safetensors, which is missing"),
    ("../evil.safetensors", "outside the checkpoint folder"),
    ("/abs.safetensors", "outside the checkpoint folder"),
    ("C:\\x.safetensors", "outside the checkpoint folder"),
    ("C:x.safetensors", "outside the checkpoint folder"),
    ("sub\\..\\..\\x.safetensors", "outside the checkpoint folder"),
    ("x.bin", "not a .safetensors file"),
    ("x.SAFETENSORS", "not a .safetensors file"),
])
def test_bad_index_shard_names(tmp_path, shard, problem) -> None:
    with pytest.raises(CheckpointError, match=problem) as err:
        CheckpointReader(sharded(tmp_path, dict(GOOD_MAP, c=shard)))
    assert repr(shard) in err.value.message or shard in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("weight_map,problem", [
    (dict(GOOD_MAP, zz="s2.safetensors"), "maps tensor zz to s2.safetensors, which does not hold it"),
    (dict(GOOD_MAP, c="s1.safetensors"), "maps tensor c to s1.safetensors"),
])
def test_index_disagreeing_with_shards(tmp_path, weight_map, problem) -> None:
    with pytest.raises(CheckpointError, match=problem):
        CheckpointReader(sharded(tmp_path, weight_map))


@pytest.mark.parametrize("content,problem", [
    ("{broken", "not valid JSON"), ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {"a": 1}}', "weight_map"), ("[]", "weight_map")])
def test_malformed_index(tmp_path, content, problem) -> None:
    folder = sharded(tmp_path, GOOD_MAP)
    (folder / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=problem):
        CheckpointReader(folder)


def test_oversized_index_is_refused_before_parsing(tmp_path) -> None:
    folder = sharded(tmp_path, GOOD_MAP)
    with open(folder / "model.safetensors.index.json", "r+b") as f:
        f.truncate(10 * 1024 * 1024 + 1)
    with pytest.raises(CheckpointError, match="may not exceed 10 MiB"):
        CheckpointReader(folder)


def test_same_tensor_in_two_shards(tmp_path) -> None:
    folder = checkpoint(tmp_path / "ck", {"s1.safetensors": {"a": torch.ones(2)},
                                          "s2.safetensors": {"a": torch.ones(2), "b": torch.ones(1)}},
                        {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CheckpointError, match="tensor a is in both s1.safetensors and s2.safetensors"):
        CheckpointReader(folder)


def test_pickle_only_no_weights_no_config_and_bad_config(tmp_path) -> None:
    folder = checkpoint(tmp_path / "pk", {})
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="only pickle weights") as err:
        CheckpointReader(folder)
    assert "safe_serialization=True" in err.value.hint
    with pytest.raises(CheckpointError, match="no weights"):
        CheckpointReader(checkpoint(tmp_path / "empty", {}))
    (tmp_path / "empty" / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json: not a Hugging Face checkpoint folder"):
        CheckpointReader(tmp_path / "empty")
    bad = checkpoint(tmp_path / "badcfg", {"model.safetensors": {"a": torch.ones(1)}})
    (bad / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        CheckpointReader(bad)
    several = checkpoint(tmp_path / "several", {"a.safetensors": {"a": torch.ones(1)},
                                                "b.safetensors": {"b": torch.ones(1)}})
    with pytest.raises(CheckpointError, match="2 .safetensors files but no model.safetensors.index.json"):
        CheckpointReader(several)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
@pytest.mark.parametrize("bad,label", [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf")])
def test_check_finite(tmp_path, dtype, bad, label) -> None:
    weights = {"layer.weight": torch.tensor([1.0, bad, 2.0]).to(dtype), "ids": torch.tensor([1, 2])}
    with CheckpointReader(checkpoint(tmp_path / "ck", {"model.safetensors": weights})) as reader:
        assert reader.read("layer.weight").shape == (3,)          # unchecked by default
        assert torch.equal(reader.read("ids", check_finite=True), torch.tensor([1, 2]))
        with pytest.raises(CheckpointError, match=f"tensor layer.weight in .*model.safetensors holds {label}"):
            reader.read("layer.weight", check_finite=True)


def test_resolve_local_paths(tmp_path, monkeypatch) -> None:
    folder = checkpoint(tmp_path / "org" / "name", {"model.safetensors": {"a": torch.ones(1)}})
    assert resolve_model(str(folder)) == folder.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name") == folder.resolve()         # an existing path wins over a hub id
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(folder / "config.json"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path / "plain"))
    for missing in ["./nope", str(tmp_path / "nope"), "~/nope-xyz", "a/b/c", "nope", "org/na me"]:
        with pytest.raises(ModelError, match="no such folder"):
            resolve_model(missing)


def fake_hub_cache(cache: Path, repo: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return checkpoint(root / "snapshots" / commit, {"model.safetensors": {"w": torch.arange(6.0).view(2, 3)}})


def test_resolve_hub_id_from_offline_cache(tmp_path, monkeypatch) -> None:
    snapshot = fake_hub_cache(tmp_path / "hub", "org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = resolve_model("org/tiny")
    assert folder == snapshot
    with CheckpointReader(folder) as reader:
        assert torch.equal(reader.read("w"), torch.arange(6.0).view(2, 3))
    assert resolve_model("org/tiny", revision="0123456789abcdef0123456789abcdef01234567") == snapshot
    with pytest.raises(ModelError, match="org/absent is not in the local Hugging Face cache") as err:
        resolve_model("org/absent")
    assert "HF_HOME" in err.value.hint


def test_network_failure_falls_back_to_cache(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    snapshot = fake_hub_cache(tmp_path / "hub", "org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    real, calls = huggingface_hub.snapshot_download, []

    def flaky(repo_id, *, local_files_only=False, **kw):
        calls.append(local_files_only)
        if not local_files_only:
            raise ConnectionError("no route to host")
        return real(repo_id, local_files_only=True, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", flaky)
    assert resolve_model("org/tiny") == snapshot and calls == [False, True]
    with pytest.raises(ModelError, match="cannot be reached"):
        resolve_model("org/other")


@pytest.mark.parametrize("error,problem", [("GatedRepoError", "gated"),
                                           ("RepositoryNotFoundError", "was not found on the Hugging Face hub")])
def test_hub_repo_errors(monkeypatch, error, problem) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(repo_id, **kw):
        exc = getattr(errors, error).__new__(getattr(errors, error))
        Exception.__init__(exc, "404")
        raise exc

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ModelError, match=problem):
        resolve_model("org/private")


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("phi3", "Phi3ForCausalLM")])
def test_build_skeleton_is_on_meta(tiny_model, arch, cls) -> None:
    folder = tiny_model(arch, dtype=torch.bfloat16, tokenizer=False)
    model = build_skeleton(folder)
    assert type(model).__name__ == cls and not model.training
    params = dict(model.named_parameters())
    assert params and all(p.device.type == "meta" for p in params.values())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert all(b.device.type == "cpu" for b in model.buffers())        # rotary inv_freq stays real
    with CheckpointReader(folder) as reader:                          # the skeleton fits the weights
        for name in reader.names():
            assert tuple(params[name].shape) == reader.shape(name)


def test_build_skeleton_from_dict_drops_quantization_config_and_wraps_errors(tiny_model) -> None:
    folder = tiny_model("llama", tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    model = build_skeleton(folder, config)
    assert not hasattr(model.config, "quantization_config")
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(ModelError, match="transformers cannot build"):
        build_skeleton(folder, dict(config, model_type="no-such-model"))
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="no-such-model")))
    with pytest.raises(ModelError, match="transformers cannot build"):
        build_skeleton(folder)
