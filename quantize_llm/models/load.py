"""Resolve MODEL (local folder | hub id | hub cache entry), read safetensors lazily, build skeletons.

Only safetensors weights are read, through our own header parser that applies every check of
FORMATS.md §5.2 before a byte of tensor data is touched: no pickle, no mmap, no remote code.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ModelError
from .sources import FP8Source, fp8_block

log = logging.getLogger(__name__)

MAX_HEADER = 100_000_000          # safetensors MAX_HEADER_SIZE (§5.2 rule 1)
MAX_INDEX = 10 * 1024 * 1024      # huggingface_hub refuses larger index files (§5.2 rule 8)
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# What a quantization run needs from a hub repo: never pickle weights, remote code (*.py) only with
# --trust-remote-code. A multimodal model's processor files and extra chat templates come too.
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX, "tokenizer*",
                "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                "chat_template*", "*.tiktoken", "README.md", "LICENSE*", "preprocessor_config.json",
                "processor_config.json", "video_preprocessor_config.json", "additional_chat_templates/*"]
REPAIR = "re-download the checkpoint, or re-save it with save_pretrained"

# safetensors dtype -> (bits per element, torch dtype; None where torch has no equivalent).
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    code: (bits, getattr(torch, name, None)) for code, bits, name in [
        ("BOOL", 8, "bool"), ("U8", 8, "uint8"), ("I8", 8, "int8"), ("I16", 16, "int16"),
        ("U16", 16, "uint16"), ("I32", 32, "int32"), ("U32", 32, "uint32"), ("I64", 64, "int64"),
        ("U64", 64, "uint64"), ("F16", 16, "float16"), ("BF16", 16, "bfloat16"),
        ("F32", 32, "float32"), ("F64", 64, "float64"), ("C64", 64, "complex64"),
        ("F8_E4M3", 8, "float8_e4m3fn"), ("F8_E5M2", 8, "float8_e5m2"),
        ("F8_E8M0", 8, "float8_e8m0fnu"), ("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"), ("F4", 4, ""), ("F6_E2M3", 6, ""), ("F6_E3M2", 6, "")]}


class _Closing:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(_Closing):
    """One .safetensors file (FORMATS.md §5.1), validated on construction, read tensor by tensor.

    The header is checked against §5.2 rules 1-7; a violation is a CheckpointError naming the file
    and the problem. Tensors are read with positioned reads into a fresh CPU buffer (no mmap), so
    resident memory holds only what the caller keeps. One file handle, opened by the first read
    and kept until close().
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        # name -> (dtype code, shape, absolute file offset, byte length), in data-offset order
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._file: Any = None
        self._lock = threading.Lock()   # seek + readinto must not interleave between threads
        try:
            with open(self.path, "rb") as f:
                self._size = os.fstat(f.fileno()).st_size
                self._parse(f)
        except (OSError, ValueError) as e:   # ValueError: a NUL in the path
            raise CheckpointError(f"cannot open {self.path}: {e}", "check the path and permissions") from None

    def _bad(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid safetensors file: {problem}", REPAIR)

    def _parse(self, f: Any) -> None:
        size = self._size
        if size < 8:
            raise self._bad(f"truncated ({size} bytes, shorter than the 8-byte header length)")
        n = int.from_bytes(f.read(8), "little")                         # u64 little-endian
        if n > MAX_HEADER:
            raise self._bad(f"header too large ({n} bytes, the limit is {MAX_HEADER})")
        if 8 + n > size:
            raise self._bad(f"header larger than the file ({n} bytes, {size - 8} present); truncated?")
        raw = f.read(n)
        if not raw.startswith(b"{"):
            raise self._bad("the header is not a JSON object (it must start with '{')")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError:
            raise self._bad("the header is not valid UTF-8") from None
        except (ValueError, RecursionError) as e:
            raise self._bad(f"the header is not valid JSON ({e})") from None
        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise self._bad("__metadata__ must map strings to strings")
            self.metadata = meta
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise self._bad(f"tensor {name!r} needs dtype, shape and data_offsets")
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(code, str) or code not in DTYPES:
                raise self._bad(f"tensor {name!r} has unknown dtype {code!r}")
            if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
                raise self._bad(f"tensor {name!r} has shape {shape!r}; need non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))
                    and offsets[0] <= offsets[1]):
                raise self._bad(f"tensor {name!r} has data_offsets {offsets!r}; need [begin, end], "
                                "begin <= end")
            bits = DTYPES[code][0] * math.prod(shape)                   # Python ints: no overflow
            if bits % 8 or offsets[1] - offsets[0] != bits // 8:
                raise self._bad(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but "
                                f"{code}{shape} needs {bits / 8:g}")
            spans.append((offsets[0], offsets[1], name, code, tuple(shape)))
        # Contiguous from 0, no holes, no overlaps, nothing after (§5.2 rule 5: no polyglot files).
        pos, start = 0, 8 + n
        for begin, end, name, code, shape in sorted(spans):
            if begin != pos:
                kind = "a hole" if begin > pos else "an overlap"
                raise self._bad(f"tensor {name!r} starts at data byte {begin}, expected {pos} "
                                f"({kind} between tensors)")
            self._entries[name] = (code, shape, start + begin, end - begin)
            pos = end
        if start + pos != size:
            raise self._bad(f"{size - start - pos} trailing bytes after the last tensor" if start + pos < size
                            else f"truncated (the tensors need {start + pos} bytes, the file has {size})")

    def names(self) -> list[str]:
        """Tensor names in file (data-offset) order."""
        return list(self._entries)

    def _entry(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        if name not in self._entries:
            raise CheckpointError(f"{self.path} has no tensor named {name!r}", "see .names()")
        return self._entries[name]

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)[0]
        dtype = DTYPES[code][1]
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} in {self.path} has dtype {code}, which torch cannot "
                                  "hold", "convert the checkpoint to F16/BF16/F32 first")
        return dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def nbytes(self, name: str) -> int:
        """Storage size of the tensor in bytes."""
        return self._entry(name)[3]

    def read(self, name: str) -> Tensor:
        """A new CPU tensor of dtype(name) and shape(name), bytes as stored; the file stays open."""
        _, shape, offset, nbytes = self._entry(name)
        dtype = self.dtype(name)
        buf = torch.empty(nbytes, dtype=torch.uint8)                    # (nbytes,) uint8
        view, done = memoryview(buf.numpy()), 0  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        with self._lock:
            f = self._handle()
            f.seek(offset)
            while done < nbytes:            # raw reads may be short (Linux caps one near 2 GiB)
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.path} ended inside tensor {name!r} (truncated while "
                                          "open?)", REPAIR)
                done += got
        return buf.view(dtype).reshape(shape)                           # little-endian host assumed

    def _handle(self) -> Any:
        if self._file is None:
            f = open(self.path, "rb", buffering=0)
            if os.fstat(f.fileno()).st_size != self._size:
                f.close()
                raise CheckpointError(f"{self.path} changed size since its header was read",
                                      "do not modify a checkpoint while it is being read")
            self._file = f
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CheckpointReader(_Closing):
    """A checkpoint folder: config.json plus one safetensors file or an indexed set of shards.

    Every header, the index (§5.2 rules 8-10) and the tensor-to-shard map are validated on
    construction; a shard file is opened by the first read of one of its tensors and kept open
    until close(). `.config` is the parsed config.json, `.files` the shard paths (sorted).

    An FP8 source (sources.py) reads as the bfloat16 checkpoint it stands for: its weights dequantized,
    its scales no tensors, and its quantization_config moved from `.config` to `.source_quantization`
    (None for every other checkpoint).
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.config: dict[str, Any] = _read_config(self.folder)
        self.files, weight_map = _find_weights(self.folder)
        self._shards = [SafetensorsFile(p) for p in self.files]
        self._where: dict[str, SafetensorsFile] = {}
        for shard in self._shards:
            for name in shard.names():
                if name in self._where:
                    raise CheckpointError(f"tensor {name} is in both {self._where[name].path.name} and "
                                          f"{shard.path.name} of {self.folder}", REPAIR)
                self._where[name] = shard
        self.source_quantization, self._fp8 = None, None
        if fp8_block(self.config.get("quantization_config"))[0]:
            self.source_quantization = self.config["quantization_config"]
            self.config = {k: v for k, v in self.config.items() if k != "quantization_config"}
            self._fp8 = FP8Source(self.source_quantization, list(self._where), lambda n: self._where[n].dtype(n),
                                  lambda n: self._where[n].shape(n), self.folder)
        if weight_map is None:
            return
        for name, file in weight_map.items():   # §5.2 rule 10: trust the shards, not the index
            if name not in self._where or self._where[name].path != self.folder / file:
                raise CheckpointError(f"{INDEX} maps tensor {name} to {file}, which does not hold it",
                                      f"the index and the shards disagree; {REPAIR}")
        extra = [name for name in self._where if name not in weight_map]
        if extra:
            log.warning("%s: %d tensors are in the shards but not in %s (e.g. %s); reading them anyway",
                        self.folder, len(extra), INDEX, extra[0])

    def names(self) -> list[str]:
        """Every tensor: shards in `.files` order, each in its file order."""
        return list(self._where) if self._fp8 is None else self._fp8.names(list(self._where))

    def _shard(self, name: str) -> SafetensorsFile:
        if name not in self._where or self._fp8 is not None and name in self._fp8.hidden:
            raise CheckpointError(f"the checkpoint in {self.folder} has no tensor named {name!r}",
                                  "check that the architecture matches the weights")
        return self._where[name]

    def dtype(self, name: str) -> torch.dtype:
        stored = self._shard(name).dtype(name)
        return stored if self._fp8 is None else self._fp8.dtype(name, stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def nbytes(self, name: str) -> int:
        stored = self._shard(name).nbytes(name)
        return stored if self._fp8 is None else self._fp8.nbytes(name, stored)

    def shard_name(self, name: str) -> str:
        """The file name of the shard that holds tensor `name`."""
        return self._shard(name).path.name

    def read(self, name: str, check_finite: bool = False) -> Tensor:
        """The tensor on CPU as stored (dtype(name), shape(name)); with check_finite, a floating
        tensor holding NaN or Inf is a CheckpointError naming it."""
        shard = self._shard(name)
        tensor = shard.read(name)
        if self._fp8 is not None and name in self._fp8.scale_of:
            scale = self._fp8.scale_of[name]
            tensor = self._fp8.dequantize(tensor, self._where[scale].read(scale))
        if check_finite and (tensor.is_floating_point() or tensor.is_complex()):
            nan, inf = _count_nonfinite(tensor)
            if nan or inf:
                raise CheckpointError(f"tensor {name} in {shard.path} holds {nan} NaN and {inf} Inf "
                                      "values", "the checkpoint is damaged or diverged; re-download it "
                                      "or use another revision")
        return tensor

    @property
    def total_bytes(self) -> int:
        """Sum of tensor storage sizes (headers excluded), like the index's total_size (of the
        bfloat16 view, for an FP8 source)."""
        return sum(self.nbytes(n) for n in self.names())

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: the safetensors spec forbids duplicate keys (§5.2 rule 2)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _count_nonfinite(tensor: Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating or complex tensor, in chunks to bound temporaries."""
    nan = inf = 0
    for chunk in tensor.reshape(-1).split(1 << 24):
        if chunk.element_size() == 1:   # float8 has no isnan/isinf kernels; float32 holds every value
            chunk = chunk.float()
        nan += int(torch.isnan(chunk).sum())
        inf += int(torch.isinf(chunk).sum())
    return nan, inf


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", REPAIR) from None


def _read_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json: not a Hugging Face checkpoint folder",
                         "pass the folder save_pretrained wrote, or a hub id such as org/name")
    config = _load_json(folder / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object", REPAIR)
    return config


def _find_weights(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(shard paths, weight_map or None); refuses folders with no or only pickle weights."""
    if (folder / INDEX).is_file():
        return _read_index(folder, folder / INDEX)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], None
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:                 # a lone file under another name (e.g. a converted download)
        return found, None
    if found:
        raise CheckpointError(f"{folder} holds {len(found)} .safetensors files but no {INDEX}",
                              "restore the index file, or keep a single model.safetensors")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder} has only pickle weights ({', '.join(pickles[:3])}); only "
                              "safetensors is read because unpickling can run arbitrary code",
                              "convert once with transformers: AutoModelForCausalLM.from_pretrained("
                              "folder).save_pretrained(out, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no weights (no .safetensors file)",
                          "pass a folder with model.safetensors, or safetensors shards and their index")


def _read_index(folder: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    """Validate an index (§5.2 rules 8-9); the shard paths (sorted) and its weight_map."""
    if index.stat().st_size > MAX_INDEX:
        raise CheckpointError(f"{index} is {index.stat().st_size} bytes; an index may not exceed 10 MiB",
                              REPAIR)
    data = _load_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} needs a \"weight_map\" object of tensor name -> shard file", REPAIR)
    shards = sorted(set(weight_map.values()))
    for name in shards:
        _check_shard_name(folder, index, name)
    for name in shards:
        if not (folder / name).is_file():
            raise CheckpointError(f"{index} names shard {name}, which is missing from {folder}",
                                  "download the missing shard (e.g. hf download ORG/NAME --local-dir DIR)")
    return [folder / name for name in shards], weight_map


def _check_shard_name(folder: Path, index: Path, name: str) -> None:
    """A shard must be a relative *.safetensors path inside the folder, by POSIX and Windows rules."""
    escapes = any(p.is_absolute() or p.drive or p.root or ".." in p.parts
                  for p in (PurePosixPath(name), PureWindowsPath(name)))
    root = os.path.abspath(folder)
    # Lexical check only: hub cache snapshots are symlinks into ../blobs, which is legitimate.
    if escapes or os.path.commonpath([root, os.path.abspath(os.path.join(root, name))]) != root:
        raise CheckpointError(f"{index} names shard {name!r} outside the checkpoint folder",
                              "shard names must be plain relative file names; this index is unsafe")
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{index} names shard {name!r}, which is not a .safetensors file",
                              "only safetensors is read; convert with save_pretrained(safe_serialization=True)")


def resolve_model(model: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """The checkpoint folder for MODEL: an existing local folder, or a hub id (downloaded or cached).

    Only config, tokenizer, processor, safetensors and index files are fetched (HUB_PATTERNS), and
    the repo's Python files with `trust_remote_code`. Offline
    (HF_HUB_OFFLINE=1 or no network) the local hub cache answers; neither is a ModelError.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{model} is a file; MODEL must be a checkpoint folder or a hub id",
                             "pass the folder that holds config.json")
        if revision is not None:
            log.warning("revision %s ignored: %s is a local folder", revision, model)
        _read_config(path)
        return path.resolve()
    if model.startswith((".", "/", "~")) or model.count(os.sep) > 1 or not HUB_ID.fullmatch(model):
        raise ModelError(f"no such folder: {model}", "check the path; hub ids look like org/name")
    folder = Path(_snapshot(model, revision, HUB_PATTERNS + ["*.py"] if trust_remote_code else HUB_PATTERNS))
    if not (folder / "config.json").is_file():
        raise ModelError(f"hub repo {model} has no config.json: not a transformers model",
                         "pass the id of a transformers causal-LM repo")
    return folder


def _snapshot(repo_id: str, revision: str | None, patterns: list[str] = HUB_PATTERNS) -> str:
    """huggingface_hub.snapshot_download, retried from the local cache when the hub is unreachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    # huggingface_hub reads these variables once, at import; honour their values at call time.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else None)
    kw: dict[str, Any] = dict(revision=revision, allow_patterns=patterns, cache_dir=cache)
    network_errors = _network_errors()
    try:
        try:
            return snapshot_download(repo_id, local_files_only=offline, **kw)
        except network_errors as e:
            if offline or isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
                raise
            log.info("hub unreachable for %s (%s); trying the local cache", repo_id, type(e).__name__)
            return snapshot_download(repo_id, local_files_only=True, **kw)
    except GatedRepoError:
        raise ModelError(f"{repo_id} is a gated repo on the Hugging Face hub", "accept its terms on the "
                         "model page, then log in (hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id} was not found on the Hugging Face hub",
                         "check the spelling; private repos need hf auth login or HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ModelError(f"revision {revision} of {repo_id} was not found on the Hugging Face hub",
                         "pass an existing branch, tag or commit hash") from None
    except HFValidationError as e:
        raise ModelError(f"{repo_id} is not a valid hub id ({e})", "hub ids look like org/name") from None
    except network_errors:
        raise ModelError(f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached",
                         "connect to the internet (and unset HF_HUB_OFFLINE), point HF_HOME/HF_HUB_CACHE "
                         "at a cache that holds it, or pass a local folder") from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """OSError covers ConnectionError, TimeoutError, requests' errors and the hub's HTTP, offline
    and cache-miss errors; httpx-style transport errors derive from Exception only."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def build_skeleton(folder: Path, config: dict | None = None, *, trust_remote_code: bool = False) -> nn.Module:
    """The model of the folder's config.json (or `config`), parameters on meta, eval mode.

    The class is the one config.json's `architectures` names where transformers has it (so a
    multimodal model keeps its vision tower and its tensor names), else AutoModelForCausalLM, else
    AutoModelForImageTextToText. Parameters take the config's dtype; buffers (e.g. rotary
    inv_freq) stay real on CPU. Any quantization_config is dropped: this is the float model. A
    config whose `auto_map` names code of the model's own runs that code only with
    `trust_remote_code`; without it, transformers' built-in class of the model_type is used, and
    where there is none the model is refused naming the flag.
    """
    import accelerate
    from transformers import CONFIG_MAPPING, AutoConfig

    raw = config if config is not None else _read_config(Path(folder))
    custom = remote_code(raw)
    if custom and not trust_remote_code and raw.get("model_type") not in CONFIG_MAPPING:
        raise ModelError(f"{Path(folder) / 'config.json'} names the model's own code ({custom}), which would run "
                         "to build it", "pass --trust-remote-code if you trust the Python files in that folder")
    remote = bool(custom) and trust_remote_code
    try:
        if config is None or remote:
            cfg = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
        else:
            cfg = CONFIG_MAPPING[config["model_type"]].from_dict(special_floats(dict(config)))
        if getattr(cfg, "quantization_config", None) is not None:
            del cfg.quantization_config
        with accelerate.init_empty_weights():
            model = _instantiate(cfg, remote)
    except (KeyError, ValueError, OSError, ImportError) as e:
        raise ModelError(f"transformers cannot build a causal LM from {Path(folder) / 'config.json'}: "
                         f"{_first_line(e)}", "check model_type and architectures; a newer transformers may "
                         "know it") from None
    except Exception as e:  # noqa: BLE001
        # A value of the wrong type or range: transformers' strict config classes raise their own
        # validation errors (TypeError or huggingface_hub's StrictDataclassError), torch a
        # RuntimeError for a negative size, a zero head count a ZeroDivisionError.
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ModelError(f"{Path(folder) / 'config.json'} does not describe a model transformers can build: "
                         f"{reason}", "sizes and counts must be positive integers; restore the "
                         "config.json the checkpoint was saved with") from None
    return model.eval()


def special_floats(value: Any) -> Any:
    """config.json as transformers reads it: {"__float__": "Infinity"} (how it saves inf and nan) as
    the float, everywhere inside the config."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and isinstance(value["__float__"], str):
            try:
                return float(value["__float__"])
            except ValueError:
                return value
        return {k: special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [special_floats(v) for v in value]
    return value


def _instantiate(cfg: Any, remote: bool = False) -> nn.Module:
    """The model class for `cfg` (see build_skeleton), built from it with random (meta) weights."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

    if remote:
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    for name in getattr(cfg, "architectures", None) or ():
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.config_class is not None \
                and isinstance(cfg, cls.config_class):
            return cls._from_config(cfg)
    try:
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except ValueError:
        return AutoModelForImageTextToText.from_config(cfg, trust_remote_code=False)


def remote_code(config: dict) -> str | None:
    """The code of the model's own that config.json's auto_map names for a causal LM (e.g.
    "modeling_x.XForCausalLM"), or None."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return None
    for key in ("AutoModelForCausalLM", "AutoConfig"):
        ref = auto_map.get(key)
        if isinstance(ref, (list, tuple)):
            ref = next((r for r in ref if r), None)
        if isinstance(ref, str) and ref:
            return ref
    return None


def remote_code_warning(model: str) -> str:
    """The one warning line of --trust-remote-code."""
    return (f"--trust-remote-code: Python code from {model}'s folder will run with your permissions "
            "(where its config.json names code of its own); use it only for code you have read or trust")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def dtype_class(dtype: torch.dtype) -> str:
    """What kind of number a dtype holds: floating, complex, boolean or integer."""
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def check_against_config(reader: CheckpointReader, skeleton: nn.Module, quantized: Iterable[str] = ()) -> None:
    """Refuse a checkpoint whose tensors are not those of the model its config.json describes.

    Compares, from the headers alone, every tensor's name, shape and dtype class (floating vs
    integer) with `skeleton` (build_skeleton of the same config): its parameters and persistent
    buffers. Tensors under the `quantized` module prefixes belong to the format's reader and are
    skipped, as are the expected weights there. A parameter may be missing where transformers ties
    it to one that is present (lm_head to the embeddings) or ignores it on load; a tensor the
    model does not have is allowed where transformers ignores it on load. Anything else is a
    CheckpointError naming the first offending tensor, what config.json expects and what the file
    holds, and how many other tensors are wrong. Every command that reads a checkpoint's dense
    tensors calls this before any work.
    """
    from .weightmap import build as build_map

    quantized = list(quantized)
    under = tuple(f"{p}." for p in quantized)
    stored = [n for n in reader.names() if not n.startswith(under)]
    # Stored names as transformers maps them into the model (renamed, or merged into fused experts).
    weights = build_map(skeleton, stored + [f"{p}.weight" for p in quantized])
    memory = weights.memory_of()
    quantized_memory = {memory.get(f"{p}.weight", f"{p}.weight") for p in quantized}
    under_memory = tuple(m.removesuffix(".weight") + "." for m in quantized_memory if m not in weights.fused)
    expected = {n: t for n, t in skeleton.state_dict(keep_vars=True).items() if not n.startswith(under_memory)}
    params: dict[int, list[str]] = {}          # tied parameters are one object under several names
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), []).append(name)
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})     # target -> source
    present = stored
    have = {memory.get(n, n) for n in stored} | {m for m in quantized_memory if m in weights.fused}
    ignore_missing = _patterns(skeleton, "_keys_to_ignore_on_load_missing")
    ignore_unexpected = _patterns(skeleton, "_keys_to_ignore_on_load_unexpected")

    problems: list[str] = []
    for name in present:
        target = memory.get(name, name)
        if target not in expected or target in weights.fused:   # fused experts: rebuilt and checked when read
            continue
        want = expected[target]
        dtype, shape = reader.dtype(name), tuple(reader.shape(name))
        if shape != tuple(want.shape) or dtype_class(dtype) != dtype_class(want.dtype):
            problems.append(f"tensor {name} is {str(dtype).removeprefix('torch.')} {list(shape)} in "
                            f"{reader.shard_name(name)}, but config.json's model expects "
                            f"{dtype_class(want.dtype)} {list(want.shape)}")
    for names in params.values():
        for name in names:
            if name in have or name.startswith(under_memory) or any(p.search(name) for p in ignore_missing):
                continue
            if any(other in have for other in names) or tied.get(name) in have:
                continue
            problems.append(f"tensor {name}, which config.json's {type(skeleton).__name__} needs, is "
                            "missing from the checkpoint")
    unexpected = [n for n in present
                  if memory.get(n, n) not in expected and not any(p.search(n) for p in ignore_unexpected)]
    quantized_names = _quantized_tensor_names(unexpected)
    if quantized_names and not reader.config.get("quantization_config"):
        raise CheckpointError(f"{reader.folder} holds quantized tensors (such as {quantized_names[0]}) but its "
                              "config.json has no quantization_config, so they cannot be read",
                              "restore the config.json the quantizer wrote, or pass the unquantized model")
    problems += [f"tensor {name} is in the checkpoint, but config.json's {type(skeleton).__name__} has no "
                 "such parameter" for name in unexpected]
    if problems:
        others = len(problems) - 1
        more = "" if not others else f" (and {others} other tensor{'s do' if others > 1 else ' does'} not match)"
        raise CheckpointError(f"the checkpoint in {reader.folder} does not match its config.json: "
                              f"{problems[0]}{more}", "the weights and config.json come from different "
                              "models; restore the config.json these weights were saved with")


def _patterns(model: nn.Module, attribute: str) -> list[re.Pattern]:
    compiled = []
    for pattern in getattr(model, attribute, None) or ():
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError):
            continue
    return compiled


def _quantized_tensor_names(names: list[str]) -> list[str]:
    """The names among `names` that are a quantized module's tensors in some format we read."""
    from ..formats import FORMATS
    from ..formats.reading import marked_module

    markers = {m for fmt in FORMATS.values() for m in fmt.markers}
    return [n for n in names if n in markers or marked_module(n, markers) is not None]
