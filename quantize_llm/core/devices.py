"""Devices: what `--device` names, and work spread over several (`--device cuda:0,cuda:1`).

`resolve_devices` is the one parser of `--device` (auto, cpu, cuda, cuda:N, or a list of them).

Item i of a job always runs on `devices[i % n]` (calibration batch i, solve unit i), one thread per
device taking its items in order. Whatever must be combined in a fixed order (Hessian sums) is
handed back to the caller's thread in item order, so a run on n devices performs the same
arithmetic in the same order as a run on one, and gives the same checkpoint.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar, overload

import torch

from ..errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


def device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device in this thread (new tensors and streams go there)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def move(obj: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """`obj` with every tensor inside dicts, lists and tuples moved to `device`; a tensor shared by
    several places is moved once and stays shared (pass the same `memo` across calls)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))   # keep obj alive so its id is not reused
        return memo[id(obj)][1]
    if isinstance(obj, dict):
        return {k: move(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, tuple):
        moved = [move(v, device, memo) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [move(v, device, memo) for v in obj]
    return obj


class _Stopped(Exception):
    """An item that was not run because another one failed."""


@overload
def spread(devices: Sequence[torch.device], count: int, work: Callable[[int, torch.device], R],
           consume: None = None, ahead: int = 2) -> list[R]: ...


@overload
def spread(devices: Sequence[torch.device], count: int, work: Callable[[int, torch.device], R],
           consume: Callable[[int, R], None], ahead: int = 2) -> None: ...


def spread(devices: Sequence[torch.device], count: int, work: Callable[[int, torch.device], R],
           consume: Callable[[int, R], None] | None = None, ahead: int = 2) -> list[R] | None:
    """Run `work(i, devices[i % n])` for i in range(count).

    Without `consume`, return the results in item order. With it, call `consume(i, result)` in this
    thread, in item order, as results arrive, and keep none; each device then runs at most `ahead`
    items beyond the last consumed one (bounding the memory of pending results). On one device
    everything runs in this thread. The first failure is raised here after the threads stop.
    Worker threads run without autograd.
    """
    n = len(devices)
    if n == 1:
        results = []
        for i in range(count):
            r = work(i, devices[0])
            if consume is None:
                results.append(r)
            else:
                consume(i, r)
        return None if consume is not None else results

    futures: list[Future] = [Future() for _ in range(count)]
    slots = [threading.Semaphore(ahead if consume is not None else count + 1) for _ in range(n)]
    stop = threading.Event()

    def give_up(d: int, first: int) -> None:   # this worker's items from `first` on will not run
        for j in range(first, count, n):
            futures[j].set_exception(_Stopped())

    def worker(d: int) -> None:
        with device_scope(devices[d]), torch.no_grad():   # grad mode is per thread
            for i in range(d, count, n):
                slots[d].acquire()
                if stop.is_set():
                    give_up(d, i)
                    return
                try:
                    futures[i].set_result(work(i, devices[d]))
                except BaseException as exc:   # handed to the caller's thread
                    futures[i].set_exception(exc)
                    give_up(d, i + n)
                    stop.set()
                    return

    threads = [threading.Thread(target=worker, args=(d,), daemon=True, name=f"quantize-llm-{d}-{devices[d]}")
               for d in range(n)]
    for th in threads:
        th.start()
    results = []
    try:
        for i in range(count):
            try:
                r = futures[i].result()
            except _Stopped:   # another item failed first: raise that
                raise next(e for e in (f.exception() for f in futures if f.done())
                           if e is not None and not isinstance(e, _Stopped)) from None
            if consume is None:
                results.append(r)
            else:
                consume(i, r)
                slots[i % n].release()
    finally:
        stop.set()
        for s in slots:                       # wake workers waiting for a slot so they see `stop`
            for _ in range(n + ahead):
                s.release()
        for th in threads:
            th.join()
    return None if consume is not None else results


def map_units(devices: Sequence[torch.device], fn: Callable[[T, torch.device], R], items: Sequence[T]) -> list[R]:
    """[fn(item, device) for each item], item i on devices[i % n], side by side across devices."""
    return spread(devices, len(items), lambda i, dev: fn(items[i], dev))


def resolve_device(device: str) -> torch.device:
    """'auto' -> the first CUDA device when present, else CPU; an unusable device is a UsageError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "," in device:
        raise UsageError(f"--device {device}: this command runs on one device",
                         "give one device, such as cuda:0")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for but CUDA is not available here",
                             "use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible",
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device} is not supported", "use auto, cpu, cuda or cuda:N")
    return dev


def parse_devices(device: str) -> tuple[torch.device, ...] | None:
    """The devices `device` names, checked for form only (nothing about this machine); None for
    "auto". A list names GPUs with their index, each once, or CPU workers (`cpu,cpu`, which exist
    to check on a machine without GPUs that a spread run gives the same checkpoint)."""
    parts = [p.strip() for p in str(device).split(",")]
    if parts == ["auto"]:
        return None
    if len(parts) > 1 and any(not p or p == "auto" for p in parts):
        raise UsageError(f"--device {device}: a list names each device", "write it like cuda:0,cuda:1")
    try:
        devices = tuple(torch.device(p) for p in parts)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    bad = next((d for d in devices if d.type not in ("cpu", "cuda")), None)
    if bad is not None:
        raise UsageError(f"--device {device} is not supported", "use auto, cpu, cuda or cuda:N")
    if len(devices) > 1:
        if len({d.type for d in devices}) > 1:
            raise UsageError(f"--device {device} mixes CPU and GPU", "list GPUs only, such as cuda:0,cuda:1")
        if devices[0].type == "cuda":
            if any(d.index is None for d in devices):
                raise UsageError(f"--device {device}: a GPU in a list needs its index", "write it like cuda:0,cuda:1")
            twice = next((d for i, d in enumerate(devices) if d in devices[:i]), None)
            if twice is not None:
                raise UsageError(f"--device {device} names {twice} twice", "name each GPU once")
    return devices


def resolve_devices(device: str) -> tuple[torch.device, ...]:
    """One device (resolve_device) or a comma-separated list of them for a run spread over several
    (parse_devices), each checked against this machine."""
    devices = parse_devices(device)
    if devices is None or len(devices) == 1:
        return (resolve_device(device.strip()),)
    return tuple(resolve_device(str(d)) for d in devices)
