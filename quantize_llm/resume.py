"""Crash-safe resume: every finished block is recorded durably beside the output, so that rerunning
the same command after a kill continues from the first unfinished block.

The state lives in `.<OUT name>.resume/` next to OUT:
    fingerprint.json         what the run depends on (model files, calibration tokens, spec,
                             options, tool version, ...); a rerun whose fingerprint differs starts over
    block-00012.safetensors  block 12's tensors exactly as they went to the writer, their order and
                             the block's report in the metadata; written last, it marks the block done
    inputs-00013.safetensors the calibration inputs of block 13 (calibrated runs), written before
                             block 12's file so that a finished block always has its successor's inputs
Files are written to a temporary name, fsynced and renamed. The writer receives the same tensors
in the same order whether or not a run was interrupted, so the checkpoint is byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import OutputError
from .formats.checkpoint import fsync_path

STATE_VERSION = 1


def model_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies the source checkpoint without reading its weights: the hub revision when the
    folder is a hub snapshot, and config.json's bytes plus every weight file's name, size and
    safetensors header (names, dtypes, shapes, offsets) hashed."""
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
    info = {"files_sha256": digest.hexdigest()}
    if folder.parent.name == "snapshots":          # a hub cache entry: the commit it was downloaded at
        info["revision"] = folder.name
    return info


def _durable_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), fsync it, rename it to `path`, fsync the folder: `path` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


class ResumeState:
    """The resume folder of one output. `open()` decides between resuming and starting over."""

    def __init__(self, output: Path, fingerprint: dict[str, Any], enabled: bool = True,
                 emit: Callable[[str, dict], None] = lambda kind, data: None) -> None:
        self.output = Path(output).absolute()
        self.folder = self.output.parent / f".{self.output.name}.resume"
        self.fingerprint = {"state_version": STATE_VERSION, **fingerprint}
        self.enabled = enabled
        self.emit = emit
        self.done = 0                                  # blocks finished and recorded

    # --- start -----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock on OUT for this process's lifetime (released when it exits, however
        it exits), so that two runs of the same job cannot write the same output and resume state."""
        import fcntl

        path = self.output.parent / f".{self.output.name}.lock"
        try:
            self._lock = open(path, "a+")
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another run is writing {self.output} right now (lock {path})",
                              "wait for it to finish, or choose another -o") from None
        except OSError:
            self._lock = None      # a filesystem without locks: carry on unprotected

    def unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            Path(lock.name).unlink(missing_ok=True)
            self._lock = None

    def open(self, writing: Path | None = None) -> int:
        """Prepare the folder; returns how many leading blocks are already done (0: fresh start).

        writing: this run's own temp output folder, spared when a killed run's are removed."""
        if self.folder.exists():
            # a killed run leaves its writer's temp folder behind; this run writes a new one
            for stale in self.output.parent.glob(f".{self.output.name}.tmp-*"):
                if writing is None or stale.resolve() != Path(writing).resolve():
                    shutil.rmtree(stale, ignore_errors=True)
            reason = None
            if not self.enabled:
                reason = "--no-resume was given"
            else:
                try:
                    old = json.loads((self.folder / "fingerprint.json").read_text())
                except (OSError, ValueError):
                    old = None
                if old is None:
                    reason = "its fingerprint is missing or unreadable"
                elif old != self.fingerprint:
                    changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                    reason = f"{', '.join(changed)} changed since it was saved"
            if reason is None:
                self.done = self._finished_blocks()
                if self.done:
                    self.emit("resume", {"from_block": self.done, "folder": str(self.folder)})
                return self.done
            self.emit("warning", {"message": f"starting over: the saved progress in {self.folder} is discarded "
                                             f"because {reason}"})
            shutil.rmtree(self.folder, ignore_errors=True)
        if not self.enabled:
            return 0
        try:
            self.folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create the resume folder {self.folder}: {exc.strerror}",
                              "choose a writable -o, or pass --no-resume") from None
        _durable_write(self.folder / "fingerprint.json",
                       lambda p: p.write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n"))
        return 0

    def _finished_blocks(self) -> int:
        """The number of consecutive blocks from 0 whose file exists (with its successor's inputs)."""
        n = 0
        while (self.folder / f"block-{n:05d}.safetensors").exists():
            n += 1
        return n

    # --- per block -------------------------------------------------------------------------------
    def save_block(self, index: int, tensors: list[tuple[str, Tensor]], meta: dict[str, Any],
                   next_inputs: list[Tensor] | None) -> None:
        """Record block `index` as done: its successor's inputs first, then its tensors."""
        if not self.enabled:
            return
        from safetensors.torch import save_file

        if next_inputs is not None:
            batches = {str(i): t.detach().to("cpu").contiguous() for i, t in enumerate(next_inputs)}
            _durable_write(self.folder / f"inputs-{index + 1:05d}.safetensors",
                           lambda p: save_file(batches, str(p)))
        named = {name: t.detach().to("cpu").clone() for name, t in tensors}   # clone: unshare g_idx etc.
        metadata = {"order": json.dumps([name for name, _ in tensors]), "meta": json.dumps(meta)}
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

    def load_inputs(self, index: int) -> list[Tensor] | None:
        """The saved calibration inputs of block `index`, or None when none were saved."""
        from safetensors.torch import load_file

        path = self.folder / f"inputs-{index:05d}.safetensors"
        if not path.exists():
            return None
        batches = load_file(str(path))
        return [batches[str(i)] for i in range(len(batches))]

    def clear(self) -> None:
        """The run finished: the state is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def tokens_fingerprint(tokens: Tensor | None) -> str | None:
    if tokens is None:
        return None
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
