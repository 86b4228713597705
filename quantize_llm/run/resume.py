"""Crash-safe resume: every finished block is recorded durably beside the output, so that rerunning
the same command after a kill continues from the first unfinished block.

The state lives in `.<OUT name>.resume/` next to OUT:
    fingerprint.json         what the run depends on (the model's path and headers, calibration
                             tokens, spec, options, tool version, ...); a rerun whose fingerprint
                             differs starts over
    identity.json            each source file's identity (inode, size, change times) when the state
                             was last checked against the weights
    outside.json             content digests of the tensors outside the blocks (embeddings, ...)
    block-00012.safetensors  block 12's tensors exactly as they went to the writer, their order, the
                             block's report, their own digests and the digests of the source
                             tensors the block read, in the metadata; written last, it marks the
                             block done
    inputs-00013.safetensors the calibration inputs of block 13 (calibrated runs), written before
                             block 12's file so that a finished block always has its successor's inputs
Files are written to a temporary name, fsynced and renamed. The writer receives the same tensors
in the same order whether or not a run was interrupted, so the checkpoint is byte-identical.

Which weights a block was computed from is known by content: every source tensor's digest is
recorded with the block that read it. A rerun whose source files are the same files as before
(same inodes, sizes and change times) trusts them; otherwise the finished blocks' source tensors
are read again and compared, and the state is kept only as far as they match.

`OutputLock` (`.<OUT name>.lock`) keeps two runs from writing one output; the resume folder and
the writer's temporary folder are locked too, so no run ever removes files a live run is using.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import OutputError
from ..formats.checkpoint import fsync_path

STATE_VERSION = 2
_CHUNK = 64 * 1024 ** 2


def tensor_digest(tensor: Tensor) -> str:
    """Content digest of a tensor's dtype, shape and bytes (BLAKE2b over 64 MiB chunks hashed side
    by side, then over the chunk digests: the same value whatever the number of threads)."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
    chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [data]
    hash_chunk = lambda c: hashlib.blake2b(c, digest_size=16).digest()  # noqa: E731 (releases the GIL)
    if len(chunks) > 1:
        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            parts = list(pool.map(hash_chunk, chunks))
    else:
        parts = [hash_chunk(chunks[0])]
    head = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.blake2b(head + b"".join(parts), digest_size=16).hexdigest()


class HashingReader:
    """Wraps `read(name)`: remembers the content digest of every tensor read (the first time)."""

    def __init__(self, read: Callable[[str], Tensor]) -> None:
        self._read = read
        self.digests: dict[str, str] = {}

    def __call__(self, name: str) -> Tensor:
        tensor = self._read(name)
        if name not in self.digests:
            self.digests[name] = tensor_digest(tensor)
        return tensor

    def take(self, names: Any) -> dict[str, str]:
        return {n: self.digests[n] for n in names if n in self.digests}


def model_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies the source checkpoint without reading its weights: its resolved path, the hub
    revision when the folder is a hub snapshot, and config.json's bytes plus every weight file's
    name, size and safetensors header (names, dtypes, shapes, offsets) hashed. The weights
    themselves are identified by `files_identity` and the per-block digests."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.name.endswith(".index.json"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                header = f.read(min(n, 100 * 1024 * 1024))
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode() + header)
    info = {"path": str(folder.resolve()), "files_sha256": digest.hexdigest()}
    if folder.parent.name == "snapshots":          # a hub cache entry: the commit it was downloaded at
        info["revision"] = folder.name
    return info


def files_identity(folder: Path) -> dict[str, list[int]]:
    """Per weight file (links followed): inode, size, modification and change times in ns. Equal
    identities mean the same file unchanged; any rewrite, even of equal bytes, changes them."""
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".safetensors":
            st = path.stat()
            found[path.name] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return found


def _durable_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp), fsync it, rename it to `path`, fsync the folder: `path` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _write_json(path: Path, data: Any) -> None:
    _durable_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


class OutputLock:
    """An exclusive lock on OUT (`.<OUT name>.lock` beside it), held from before any work until the
    run ends however it ends (the kernel drops it when the process dies, so a file left by a killed
    run never blocks the next). The file says who holds it. Use as a context manager."""

    def __init__(self, output: Path, emit: Callable[[str, dict], None] = lambda kind, data: None) -> None:
        self.output = Path(output).absolute()
        self.path = self.output.parent / f".{self.output.name}.lock"
        self.emit = emit
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock {self.path}: {exc.strerror}",
                                  "choose a writable -o") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputError(f"another run{holder} is writing {self.output} right now (lock {self.path})",
                                  "wait for it to finish, or choose another -o") from None
            except OSError as exc:        # a filesystem without locks (some network filesystems)
                os.close(fd)
                self.emit("warning", {"message": f"cannot lock {self.path} ({exc.strerror}): a second run of "
                                                 "this output at the same time would not be noticed"})
                return
            try:                          # the file we locked must still be the one at the path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the file while still holding the lock, then let go: a run waiting on the same
        path re-checks that what it locked is still the file at the path."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (process {int(info['pid'])} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class ResumeState:
    """The resume folder of one output. `open()` decides between resuming and starting over."""

    def __init__(self, output: Path, fingerprint: dict[str, Any], enabled: bool = True,
                 emit: Callable[[str, dict], None] = lambda kind, data: None,
                 identity: dict[str, Any] | None = None) -> None:
        self.output = Path(output).absolute()
        self.folder = self.output.parent / f".{self.output.name}.resume"
        self.fingerprint = {"state_version": STATE_VERSION, **fingerprint}
        self.identity = identity or {}
        self.enabled = enabled
        self.emit = emit
        self.done = 0                                  # blocks finished and recorded
        self.identity_changed = False                  # the source files are not provably the same
        self._lock_fd: int | None = None

    # --- start -----------------------------------------------------------------------------------
    def open(self, calibrated: bool = False) -> int:
        """Prepare the folder; returns how many leading blocks are already done (0: fresh start).

        calibrated: a block can only be resumed from with its saved calibration inputs."""
        if self.folder.exists():
            self._lock_folder()
            reason = None
            if not self.enabled:
                reason = "--no-resume was given"
            else:
                try:
                    old = json.loads((self.folder / "fingerprint.json").read_text())
                except (OSError, ValueError):
                    old = None
                if not isinstance(old, dict):
                    reason = "its fingerprint is missing or unreadable"
                elif old != self.fingerprint:
                    changed = sorted(k for k in set(old) | set(self.fingerprint)
                                     if old.get(k) != self.fingerprint.get(k))
                    reason = f"{', '.join(changed)} changed since it was saved"
            if reason is None:
                self.done = self._finished_blocks(calibrated)
                if self.done:
                    try:
                        old_identity = json.loads((self.folder / "identity.json").read_text())
                    except (OSError, ValueError):
                        old_identity = None
                    self.identity_changed = old_identity != self.identity
                    self.emit("resume", {"from_block": self.done, "folder": str(self.folder)})
                return self.done
            self.emit("warning", {"message": f"starting over: the saved progress in {self.folder} is discarded "
                                             f"because {reason}"})
            self._remove()
        if not self.enabled:
            return 0
        try:
            self.folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create the resume folder {self.folder}: {exc.strerror}",
                              "choose a writable -o, or pass --no-resume") from None
        self._lock_folder()
        _write_json(self.folder / "fingerprint.json", self.fingerprint)
        _write_json(self.folder / "identity.json", self.identity)
        return 0

    def _lock_folder(self) -> None:
        """Hold the folder for this run: one that a live run holds is never touched."""
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another run is using the saved progress in {self.folder} right now",
                              "wait for it to finish, or choose another -o") from None
        except OSError:
            pass                                       # no locks here; OUT's lock still guards it
        self._lock_fd = fd

    def _finished_blocks(self, calibrated: bool) -> int:
        """The number of consecutive blocks from 0 whose file is whole; a damaged block file and
        every later one are removed (and said so)."""
        n = 0
        while (self.folder / f"block-{n:05d}.safetensors").exists():
            problem = self._check_block(n)
            if problem is not None:
                later = sorted(self.folder.glob("block-*.safetensors"))
                self.emit("warning", {"message": f"saved block {n} in {self.folder} is damaged ({problem}); it and "
                                                 f"the {len(later) - n - 1} after it are computed again"})
                self._truncate(n)
                break
            n += 1
        if calibrated and n and not (self.folder / f"inputs-{n:05d}.safetensors").exists():
            self.emit("warning", {"message": f"starting over: the saved calibration inputs of block {n} are "
                                             f"missing from {self.folder}"})
            self._truncate(0)
            n = 0
        return n

    def _check_block(self, index: int) -> str | None:
        """Why block `index`'s file cannot be used, or None: it must parse as safetensors, carry its
        metadata, and hold exactly the bytes whose digests it recorded."""
        from ..errors import CheckpointError
        from ..models.load import SafetensorsFile

        try:
            with SafetensorsFile(self.folder / f"block-{index:05d}.safetensors") as f:
                meta = f.metadata
                order = json.loads(meta["order"])
                json.loads(meta["meta"])
                digests = json.loads(meta["digests"])
                if sorted(order) != sorted(f.names()) or set(digests) != set(order):
                    return "its tensors and its records disagree"
                for name in order:
                    if tensor_digest(f.read(name)) != digests[name]:
                        return f"tensor {name} does not hold the bytes that were saved"
        except CheckpointError as exc:
            return exc.message.split(": ", 1)[-1]
        except (KeyError, ValueError, TypeError):
            return "its records are missing or unreadable"
        return None

    def _truncate(self, index: int) -> None:
        """Forget block `index` and every block after it."""
        for path in self.folder.glob("block-*.safetensors"):
            try:
                n = int(path.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if n >= index:
                path.unlink(missing_ok=True)
        if index == 0:
            for path in self.folder.glob("inputs-*.safetensors"):
                path.unlink(missing_ok=True)
        self.done = index

    # --- the weights behind the saved blocks ------------------------------------------------------
    def check_sources(self, read: Callable[[str], Tensor], outside: list[str]) -> int:
        """When the source files are not provably the ones the saved blocks were computed from
        (`identity_changed`), read the tensors those blocks read and compare their digests; keep
        the blocks as far as they match (for calibrated runs, all or none: later blocks' inputs
        depend on every earlier one). Returns the number of blocks still done."""
        if not self.done or not self.identity_changed:
            return self.done
        saved_outside = self._outside()
        changed = next((n for n in outside if n in saved_outside and tensor_digest(read(n)) != saved_outside[n]), None)
        keep = 0 if changed is not None else self.done
        if changed is None:
            for index in range(self.done):
                _, meta = self.load_block(index)
                source = meta.get("source", {})
                changed = next((n for n in sorted(source) if tensor_digest(read(n)) != source[n]), None)
                if changed is not None:
                    keep = index
                    break
        if changed is not None:
            calibrated = (self.folder / f"inputs-{self.done:05d}.safetensors").exists()
            keep = 0 if calibrated else keep
            self.emit("warning", {"message": f"the weights changed since the saved progress in {self.folder} "
                                             f"(tensor {changed}); continuing from block {keep}"})
            self._truncate(keep)
        _write_json(self.folder / "identity.json", self.identity)
        self.identity_changed = False
        return self.done

    def _outside(self) -> dict[str, str]:
        try:
            data = json.loads((self.folder / "outside.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_outside(self, digests: dict[str, str]) -> None:
        """Record the digests of the tensors outside the blocks (once per state)."""
        if self.enabled and not (self.folder / "outside.json").exists():
            _write_json(self.folder / "outside.json", digests)

    # --- per block -------------------------------------------------------------------------------
    def save_block(self, index: int, tensors: list[tuple[str, Tensor]], meta: dict[str, Any],
                   next_inputs: Sequence[Tensor] | None, source: dict[str, str] | None = None) -> None:
        """Record block `index` as done: its successor's inputs first, then its tensors.

        source: the digests of the checkpoint tensors the block was computed from."""
        if not self.enabled:
            return
        from safetensors.torch import save_file

        from ..calibration.activations import save_batches

        if next_inputs is not None:   # written a batch at a time (they may be kept on disk)
            _durable_write(self.folder / f"inputs-{index + 1:05d}.safetensors",
                           lambda p: save_batches(p, next_inputs))
        named = {name: t.detach().to("cpu").clone() for name, t in tensors}   # clone: unshare g_idx etc.
        metadata = {"order": json.dumps([name for name, _ in tensors]),
                    "meta": json.dumps({**meta, "source": source or {}}),
                    "digests": json.dumps({name: tensor_digest(t) for name, t in named.items()})}
        _durable_write(self.folder / f"block-{index:05d}.safetensors",
                       lambda p: save_file(named, str(p), metadata=metadata))
        old_inputs = self.folder / f"inputs-{index:05d}.safetensors"
        old_inputs.unlink(missing_ok=True)
        self.done = index + 1

    def load_block(self, index: int) -> tuple[list[tuple[str, Tensor]], dict[str, Any]]:
        """Block `index`'s tensors in the order they were written, and its metadata."""
        from safetensors import safe_open

        with safe_open(str(self.folder / f"block-{index:05d}.safetensors"), "pt") as f:
            metadata = f.metadata()
            order = json.loads(metadata["order"])
            return [(name, f.get_tensor(name)) for name in order], json.loads(metadata["meta"])

    def load_inputs(self, index: int) -> Sequence[Tensor] | None:
        """The saved calibration inputs of block `index` (each batch read when it is asked for), or
        None when none were saved."""
        path = self.folder / f"inputs-{index:05d}.safetensors"
        if not path.exists():
            return None
        return SavedBatches(path)

    def clear(self) -> None:
        """The run finished (or failed on input that will fail again): the state is not needed."""
        if self.folder.exists():
            self._remove()

    def close(self) -> None:
        """Let go of the folder (kept for a rerun)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()


class SavedBatches(Sequence[Tensor]):
    """The batches of a file save_batches wrote, each read from it when asked for."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), "pt") as f:
            self._count = len(list(f.keys()))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: Any) -> Any:
        from safetensors import safe_open

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -self._count <= i < self._count:
            raise IndexError(i)
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(str(i % self._count))


def tokens_fingerprint(tokens: Tensor | None) -> str | None:
    if tokens is None:
        return None
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
