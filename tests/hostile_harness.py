"""The hostile-input matrix's harness: run the CLI the way a user would, then check what it left.

Every case of `tests/hostile/` asserts the same four things:
  - the exit code (2 bad input, 1 a run that failed, 0 where the input is fine);
  - stderr holds exactly one `error:` line, and no traceback;
  - nothing the user had changed (`tree` before and after, contents hashed);
  - nothing half-written remains (no temporary folder, no stray output).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from quantize_llm.cli.app import main


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The one `error:` line (assert_refused has checked there is exactly one)."""
        return next(line for line in self.err.splitlines() if line.startswith("error:"))


def run_cli(capsys, *args: object) -> Result:
    """`quantize-llm ARGS` in this process; capsys collects what it printed."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` (relative) with what it is: a folder and its mode, a file's size,
    SHA-256 and mode, or a link's target."""
    root = Path(root)
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", path.stat().st_mode & 0o7777)
            else:
                found[rel] = ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest(),
                              path.stat().st_mode & 0o7777)
    return found


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    """Exit `code`, exactly one `error:` line holding every needle (case-insensitive), no traceback."""
    assert "Traceback" not in result.err, result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line, got:\n{result.err}"
    assert result.code == code, f"exit {result.code}, expected {code}: {result.err}"
    assert "internal error" not in errors[0], errors[0]
    for needle in needles:
        assert re.search(needle, errors[0], re.IGNORECASE), f"{needle!r} not in {errors[0]!r}"


def assert_untouched(before: dict[str, tuple], root: Path, *, new: Iterable[str] = ()) -> None:
    """Everything in `before` is still there, unchanged, and nothing appeared but `new` (paths
    relative to `root`, and anything below them)."""
    after = tree(root)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed or removed: {changed[:5]}"
    allowed = tuple(new)
    added = sorted(k for k in after if k not in before
                   and not any(k == a or k.startswith(a.rstrip("/") + "/") for a in allowed))
    assert not added, f"left behind: {added[:5]}"


def half_written(root: Path) -> list[str]:
    """Temporary outputs, resume state and locks anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if re.search(r"\.tmp-|\.resume$|\.lock$|\.old-", p.name))


def refused(capsys, root: Path, args: list[object], code: int = 2, needles: tuple[str, ...] = (),
            cwd: Path | None = None) -> Result:
    """Run ARGS (from `cwd` when given) and check the whole contract of a refusal: exit code, one
    line, everything under `root` as it was, nothing half-written."""
    before = tree(root)
    saved = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = run_cli(capsys, *args)
    finally:
        os.chdir(saved)
    assert_one_line_error(result, code, *needles)
    assert_untouched(before, root)
    assert half_written(root) == []
    return result


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
