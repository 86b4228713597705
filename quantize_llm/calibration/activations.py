"""Calibration activations kept where they fit: one tensor per batch, on the work device, on the host
while the blocks run on a GPU ("host"), or in files on disk ("disk"); reading batch i gives it on
the device that runs it. The plan decides where (run/resources.py): a 70B model's 128 x 2048
calibration tokens are 17 GB of float32 activations (a block's inputs and the next block's), more
than a 24 GB GPU has beside a block and its Hessians, and 405B's are 34 GB.

With "host" and "disk" at most the batches being worked on are on the device: the runner reads a
batch, runs it, and stores the block's output batch by batch.
"""
from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PLACES = ("device", "host", "disk")

_names = itertools.count()


class Activations(Sequence[Tensor]):
    """Per-batch activations stored at `where`; batch i is read on devices[i % len(devices)]."""

    def __init__(self, where: str, devices: tuple[torch.device, ...], folder: Path | None = None) -> None:
        if where not in PLACES:
            raise ValueError(f"activations cannot be kept on {where!r}")
        if where == "disk" and folder is None:
            raise ValueError("activations kept on disk need a folder")
        self.where, self.devices, self.folder = where, devices, folder
        self._items: list[Any] = []              # tensors, or (path, shape, dtype) on disk
        self._tag = f"act{next(_names):06d}"

    @classmethod
    def of(cls, tensors: Iterable[Tensor], where: str, devices: tuple[torch.device, ...],
           folder: Path | None = None) -> Activations:
        out = cls(where, devices, folder)
        for t in tensors:
            out.append(t)
        return out

    def like(self) -> Activations:
        """An empty store of the same kind (the next block's inputs)."""
        return Activations(self.where, self.devices, self.folder)

    def on(self, device: torch.device) -> Activations:
        """The same batches, every one read on `device` (shares storage; nothing is copied now)."""
        view = Activations(self.where, (device,), self.folder)
        view._items = self._items
        return view

    def append(self, x: Tensor) -> None:
        if self.where == "device":
            self._items.append(x.to(self.device_of(len(self._items))))
        elif self.where == "host":
            self._items.append(x.detach().to("cpu"))
        else:
            from safetensors.torch import save_file

            assert self.folder is not None
            path = self.folder / f"{self._tag}-{len(self._items):05d}.safetensors"
            save_file({"x": x.detach().to("cpu").contiguous()}, str(path))
            self._items.append((path, tuple(x.shape), x.dtype))

    def device_of(self, i: int) -> torch.device:
        return self.devices[i % len(self.devices)]

    def shape(self, i: int) -> tuple[int, ...]:
        item = self._items[i]
        return item[1] if isinstance(item, tuple) else tuple(item.shape)

    def dtype(self, i: int) -> torch.dtype:
        item = self._items[i]
        return item[2] if isinstance(item, tuple) else item.dtype

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self._items[i]
        if isinstance(item, tuple):
            from safetensors.torch import load_file

            return load_file(str(item[0]))["x"].to(self.device_of(i))
        return item.to(self.device_of(i), non_blocking=self.where == "host")

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]

    def release(self) -> None:
        """Let go of every batch, deleting the files of disk-kept ones (the store is empty afterwards;
        views made by `on` keep theirs)."""
        for item in self._items:
            if isinstance(item, tuple):
                item[0].unlink(missing_ok=True)
        self._items = []

    clear = release


class Paired(Sequence[Tensor]):
    """The quantized model's activations followed by the float model's, 2n batches (the next
    inputs of a --qep block, as the resume state saves them)."""

    def __init__(self, quantized: Sequence[Tensor], float_: Sequence[Tensor]) -> None:
        if len(quantized) != len(float_):
            raise ValueError("paired activations need as many float batches as quantized ones")
        self.parts = (quantized, float_)

    def __len__(self) -> int:
        return 2 * len(self.parts[0])

    def _part(self, i: int) -> tuple[Sequence[Tensor], int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        n = len(self.parts[0])
        return self.parts[i // n], i % n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        part, j = self._part(i)
        return part[j]

    def shape(self, i: int) -> tuple[int, ...]:
        part, j = self._part(i)
        return part.shape(j) if isinstance(part, Activations) else tuple(part[j].shape)

    def dtype(self, i: int) -> torch.dtype:
        part, j = self._part(i)
        return part.dtype(j) if isinstance(part, Activations) else part[j].dtype


def save_batches(path: Path, batches: Sequence[Tensor]) -> None:
    """Write `batches` to one safetensors file under the keys "0", "1", ..., one batch in memory at
    a time (safetensors' save_file wants them all at once): the header is made from the shapes and
    dtypes first, then each batch's bytes are appended in order. load_file reads it back."""
    if isinstance(batches, (Activations, Paired)):
        shapes = [(batches.shape(i), batches.dtype(i)) for i in range(len(batches))]
    else:
        shapes = [(tuple(t.shape), t.dtype) for t in batches]
    header: dict[str, Any] = {}
    offset = 0
    for i, (shape, dtype) in enumerate(shapes):
        size = _nbytes(shape, dtype)
        header[str(i)] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                                       # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i in range(len(shapes)):
            t = batches[i].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()
