"""Write a checkpoint folder: safetensors shards, the index, config.json, then one atomic rename.

The only module that knows about shards, the index file, the temp folder and the rename
(FORMATS.md §5). Tensors are streamed: `add` appends a tensor's bytes to per-shard temporary data
files (one per alignment class, so the final buffer needs no padding) and forgets them; closing a
shard writes the header and concatenates those files. Nothing appears at OUT until `finish` renames
the finished temp folder into place; any failure before that leaves OUT as it was.
"""
from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import logging
import os
import secrets
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from torch import Tensor

from ..errors import OutputError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_ALIGNMENTS = (8, 4, 2, 1)                        # data buffer order: descending itemsize (§5.1)
_COPY_CHUNK = 16 * 1024**2
# Files carried from the source folder beside the weights (tokenizer, processor of a multimodal model,
# chat templates, generation settings, license), and the folder of extra chat templates.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                 "chat_template.json", "generation_config.json", "preprocessor_config.json",
                 "processor_config.json", "video_preprocessor_config.json", "*.tiktoken", "LICENSE*")
# Folders of a checkpoint whose plain files are carried into the output under the same folder name.
CARRIED_FOLDERS = ("additional_chat_templates",)
_OVERWRITE_HINT = "pass --overwrite to replace it, or choose another -o"

# torch dtype -> safetensors dtype string (§5.1); the optional ones exist only in newer torch.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64", torch.complex64: "C64",
}
for _attr, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("float8_e8m0fnu", "F8_E8M0"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
                     ("float8_e5m2fnuz", "F8_E5M2FNUZ")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[getattr(torch, _attr)] = _code


def human_bytes(n: float) -> str:
    """A byte count for messages, in the largest unit that keeps it at or above 1 (1 GB = 1e9)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def check_output(out: Path | str, *, overwrite: bool, protect: Iterable[Path | str] = (),
                 allow_existing: bool = False) -> Path:
    """The absolute OUT, refused (OutputError) wherever writing it could destroy something.

    Whatever the flags: the current folder or one of its parents (`-o ""`, `-o .`, `-o ..`), the
    filesystem root and the home folder, a folder equal to, inside or holding one of `protect`
    (the model being read: resolved paths, so links count), a name or path too long for the
    filesystem. Without `overwrite`, an existing OUT; with it, an existing OUT that is not a
    checkpoint folder (config.json) and not empty: --overwrite replaces checkpoints, nothing else.
    `allow_existing` skips the missing-parent and already-exists checks (a recipe validated before
    its jobs run: an earlier job may create them).
    """
    raw = str(out)
    if not raw.strip():
        raise OutputError("the output folder is empty (-o \"\")", "name the folder to write, e.g. -o model-w4")
    path = Path(os.path.abspath(Path(raw).expanduser()))
    name_max = _pathconf(path.parent, "PC_NAME_MAX", 255)
    longest = f".{path.name}.tmp-xxxxxxxx"            # the temporary folder's name is the longest we make
    if len(longest.encode()) > name_max:
        raise OutputError(f"the output folder's name is {len(path.name.encode())} bytes long; this filesystem "
                          f"allows {name_max - (len(longest.encode()) - len(path.name.encode()))} here",
                          "choose a shorter name for -o")
    path_max = _pathconf(path.parent, "PC_PATH_MAX", 4096)
    if len(str(path).encode()) + 64 > path_max:       # room for the longest file name inside it
        raise OutputError(f"the output path is {len(str(path).encode())} bytes long; the system allows "
                          f"{path_max} with the files inside it", "choose a shorter path for -o")
    real = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        what = "the current folder" if real == cwd else "a parent of the current folder"
        raise OutputError(f"-o {raw} is {what}: writing there would replace everything in it",
                          "name a new folder, e.g. -o model-w4")
    if real == Path(real.anchor) or real == Path(os.path.realpath(Path.home())):
        raise OutputError(f"-o {raw} is {'the filesystem root' if real == Path(real.anchor) else 'your home folder'}",
                          "name a new folder, e.g. -o model-w4")
    for source in protect:
        src = Path(os.path.realpath(source))
        if real == src or src in real.parents or real in src.parents:
            how = "is" if real == src else "is inside" if src in real.parents else "holds"
            raise OutputError(f"-o {raw} {how} the model folder {src}: the output would replace or mix with "
                              "the model being read", "write the output outside the model folder")
    if not path.parent.is_dir() and not allow_existing:
        raise OutputError(f"the parent folder {path.parent} does not exist or is not a folder",
                          "create it first, or choose another -o")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{path} is a file, not a folder", "choose another -o")
        if not overwrite and not allow_existing:
            raise OutputError(f"{path} already exists", _OVERWRITE_HINT)
        if not (path / CONFIG_FILE).is_file() and any(path.iterdir()):
            raise OutputError(f"{path} exists and holds no checkpoint (no config.json): --overwrite replaces "
                              "checkpoint folders only", "remove it yourself, or choose another -o")
    return path


def local_folder(model: str) -> list[Path]:
    """[MODEL's folder] when MODEL names one on this machine (else [], e.g. for a hub id): what
    `check_output` protects before the model is resolved."""
    path = Path(str(model)).expanduser()
    return [path] if path.is_dir() else []


def _pathconf(folder: Path, name: str, default: int) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.pathconf(probe, name)
    except (OSError, ValueError):
        return default


def _lock_folder(folder: Path) -> int | None:
    """An exclusive lock held on `folder` for as long as the returned descriptor is open (None where
    the filesystem has no locks): it tells later runs that a live process owns the folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale(out: Path | str, keep: Path | None = None) -> list[Path]:
    """Remove the temporary folders that killed runs writing `out` left behind, sparing `keep`
    and any folder a live run still holds (its lock cannot be taken). Returns what was removed."""
    out = Path(out).absolute()
    removed = []
    for stale in sorted(out.parent.glob(f".{glob_escape(out.name)}.tmp-*")):
        if not stale.is_dir() or stale.is_symlink() or (keep is not None and stale.resolve() == keep.resolve()):
            continue
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue                                  # a live run is writing it
        except OSError:
            pass                                      # no locks here: the caller holds OUT's lock
        finally:
            os.close(fd)
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class _Shard:
    """One shard being written: a buffered temp data file per alignment class, plus the metadata."""

    def __init__(self, folder: Path, index: int) -> None:
        self.folder, self.index = folder, index
        self.files: dict[int, BinaryIO] = {}
        # per alignment class, in append order: (name, safetensors dtype, shape, byte length)
        self.entries: dict[int, list[tuple[str, str, list[int], int]]] = {a: [] for a in _ALIGNMENTS}
        self.nbytes = 0

    def data_path(self, align: int) -> Path:
        return self.folder / f"shard-{self.index:05d}.align{align}.bin"

    def append(self, name: str, dtype: str, shape: list[int], data: memoryview, align: int) -> None:
        if align not in self.files:
            self.files[align] = open(self.data_path(align), "wb", buffering=1024**2)
        self.files[align].write(data)
        self.entries[align].append((name, dtype, shape, len(data)))
        self.nbytes += len(data)

    def close(self, path: Path) -> None:
        """Write the safetensors file at `path` (header, then data by descending alignment)."""
        for f in self.files.values():
            f.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for align in _ALIGNMENTS:                  # each class's total is a multiple of the next one's
            for name, dtype, shape, length in self.entries[align]:
                header[name] = {"dtype": dtype, "shape": shape,
                                "data_offsets": [offset, offset + length]}
                offset += length
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)            # §5.4.2: pad with spaces so the buffer is 8-aligned
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for align in _ALIGNMENTS:
                if align in self.files:
                    with open(self.data_path(align), "rb") as src:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
        self.discard()

    def discard(self) -> None:
        for align, f in self.files.items():
            try:
                f.close()
            except OSError:           # the buffer could not be flushed (disk full): drop it anyway
                pass
            self.data_path(align).unlink(missing_ok=True)
        self.files = {}


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (best effort: some filesystems refuse folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _names_code(folder: Path) -> bool:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("auto_map"))


def carried_name(fname: str) -> bool:
    """Whether `fname` may name an extra file of a checkpoint: a plain file name, or a plain file name
    inside one of CARRIED_FOLDERS ("additional_chat_templates/tool_use.jinja", not hidden); nothing
    that could leave the folder (no "..", no absolute path, no backslash, no deeper folder)."""
    folder, _, name = fname.rpartition("/")
    if "/" in fname and (folder not in CARRIED_FOLDERS or name.startswith(".")):
        return False
    return (bool(name) and name not in (".", "..") and "\\" not in name and os.sep not in name
            and "\0" not in name and not Path(name).is_absolute())


def carried_files(folder: Path) -> dict[str, Path]:
    """The files of `folder` to copy beside the weights: CARRIED_FILES, and the plain files directly
    inside its CARRIED_FOLDERS (as "additional_chat_templates/NAME"; nothing deeper, nothing hidden);
    where config.json's auto_map names code of the model's own, its Python files too (the written
    config.json keeps the auto_map)."""
    files = {}
    patterns = CARRIED_FILES + (("*.py",) if _names_code(folder) else ())
    for path in sorted(folder.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pat) for pat in patterns):
            files[path.name] = path
    for sub in CARRIED_FOLDERS:
        if (folder / sub).is_dir():
            for path in sorted((folder / sub).iterdir()):
                if path.is_file() and carried_name(f"{sub}/{path.name}"):
                    files[f"{sub}/{path.name}"] = path
    return files


class CheckpointWriter:
    """Stream tensors into safetensors shards inside a temp folder next to `out`; rename on finish.

    with CheckpointWriter(out, overwrite=False, max_shard_bytes=2 * 1024**3) as w:
        w.add("model.embed_tokens.weight", tensor)      # any device, dtype, layout; bytes not kept
        ...
        w.finish(config=config_dict, files={"quantize_config.json": text})

    Raises OutputError up front for an OUT that `check_output` refuses (the current folder, the
    model being read (`protect`), an existing folder without overwrite, ...), when its parent is
    missing or not writable, or when `expected_bytes` (x1.1) exceed the free space. Leaving the
    block by an exception (KeyboardInterrupt included) or without `finish` removes the temp folder.
    The temp folder is locked while the writer lives, so a later run never removes it as stale.
    """

    def __init__(self, out: Path | str, *, overwrite: bool = False,
                 max_shard_bytes: int = 2 * 1024**3, expected_bytes: int | None = None,
                 protect: Iterable[Path | str] = ()) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out = out = check_output(out, overwrite=overwrite, protect=protect)
        self.overwrite, self.max_shard_bytes = overwrite, max_shard_bytes
        parent = out.parent
        if expected_bytes is not None:
            free, need = shutil.disk_usage(parent).free, int(expected_bytes * 1.1)
            if free < need:
                raise OutputError(f"not enough disk space in {parent}: the checkpoint needs about "
                                  f"{human_bytes(need)}, {human_bytes(free)} is free",
                                  "free some space, or choose another -o")
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        except OSError as e:
            raise OutputError(f"cannot write into {parent}: {e.strerror}",
                              "choose a writable folder with -o") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o777 & ~umask)          # mkdtemp makes 0700; OUT honours the umask
        self._lock_fd = _lock_folder(self._tmp)
        self._shard = _Shard(self._tmp, 1)
        self._shard_paths: list[Path] = []         # closed shards, provisional names in the temp folder
        self._where: dict[str, tuple[int, int]] = {}  # name -> (1-based shard index, bytes)
        self._total = 0
        self._final_names: list[str] = []
        self._done = False

    # --- context manager -------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._done:
            if exc_type is None:
                log.warning("checkpoint for %s abandoned: finish() was never called", self.out)
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far; OUT is untouched. Safe to call more than once, and
        when the disk is full (closing a buffered file then fails again)."""
        self._shard.discard()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._release()
        self._done = True

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- properties --------------------------------------------------------------------------------
    @property
    def tmp_dir(self) -> Path:
        return self._tmp

    @property
    def total_bytes(self) -> int:
        """Tensor bytes added so far (the index's `total_size`; headers excluded)."""
        return self._total

    @property
    def shard_files(self) -> list[str]:
        """Final shard file names; empty until `finish` has run."""
        return list(self._final_names)

    def sizes_by_name(self) -> dict[str, int]:
        """Bytes of each tensor added so far, by name."""
        return {name: size for name, (_, size) in self._where.items()}

    # --- writing -----------------------------------------------------------------------------------
    def add(self, name: str, tensor: Tensor) -> None:
        """Append `tensor` (any device/layout; not modified) to the current shard as `name`."""
        if self._done:
            raise RuntimeError("this CheckpointWriter is finished or aborted")
        if not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._where:
            raise ValueError(f"duplicate tensor name {name!r}")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        align = min(tensor.element_size(), 8)
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard.nbytes and self._shard.nbytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,): C order (§5.4.4)
        # (nbytes,) raw little-endian bytes
        data = memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        self._shard.append(name, SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), data, align)
        self._where[name] = (self._shard.index, nbytes)
        self._total += nbytes

    def _close_shard(self) -> None:
        path = self._tmp / f"shard-{self._shard.index:05d}.safetensors"
        self._shard.close(path)
        self._shard_paths.append(path)
        self._shard = _Shard(self._tmp, self._shard.index + 1)

    def finish(self, *, config: dict, files: dict[str, bytes | str | Path] | None = None,
               verify: Callable[[Path], None] | None = None) -> Path:
        """Close the last shard, write the index, config.json and `files`, then move into OUT.

        `files` maps a plain file name (no folders) to its content; a Path is copied. `verify(folder)`
        runs on the complete temporary folder before the rename; if it raises, nothing is moved
        into OUT (the temporary folder is removed when the writer's block exits).
        """
        if self._done:
            raise RuntimeError("this CheckpointWriter is finished or aborted")
        files = dict(files or {})
        for fname in files:
            if not carried_name(fname):
                raise ValueError(f"extra file name {fname!r} must be a plain file name, or one inside "
                                 f"{' or '.join(CARRIED_FOLDERS)}/")
            if fname in (CONFIG_FILE, INDEX_FILE) or fname.endswith(".safetensors"):
                raise ValueError(f"extra file name {fname!r} clashes with a checkpoint file")
        if any(self._shard.entries.values()) or not self._shard_paths:  # no tensors -> one empty file
            self._close_shard()
        n = len(self._shard_paths)
        self._final_names = [SINGLE_FILE] if n == 1 else [
            f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for path, final in zip(self._shard_paths, self._final_names, strict=True):
            path.rename(self._tmp / final)
        if n > 1:  # §5.3: total_size is the tensor bytes; transformers needs "metadata" to exist
            weight_map = {k: self._final_names[i - 1] for k, (i, _) in sorted(self._where.items())}
            index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
            (self._tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (self._tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        for fname, content in files.items():
            if "/" in fname:
                (self._tmp / fname).parent.mkdir(exist_ok=True)
            if isinstance(content, Path):
                shutil.copy2(content, self._tmp / fname)
            elif isinstance(content, str):
                (self._tmp / fname).write_text(content)
            else:
                (self._tmp / fname).write_bytes(content)
        self._sync()
        if verify is not None:
            verify(self._tmp)
        self._move_into_place()
        self._release()
        self._done = True
        return self.out

    def _sync(self) -> None:
        """fsync every file and the folder, so the rename never exposes unwritten data (best effort)."""
        for path in [*self._tmp.iterdir(), self._tmp]:
            fsync_path(path)

    def _move_into_place(self) -> None:
        out = self.out
        if out.exists() or out.is_symlink():
            if not self.overwrite:  # appeared while we were writing
                raise OutputError(f"{out} already exists", _OVERWRITE_HINT)
            trash = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.rename(out, trash)
            try:
                os.rename(self._tmp, out)
            except BaseException:
                os.rename(trash, out)
                raise
            if trash.is_symlink() or not trash.is_dir():
                trash.unlink()
            else:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self._tmp, out)
