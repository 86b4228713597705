"""Turn pipeline events into what people and batch jobs see.

Progress goes to stderr: a rich bar with ETA on a terminal, one plain line per block otherwise.
`--log-json FILE` adds one JSON object per event and line (`-` = stdout), flushed as written.
While a Reporter is open, transformers' own log lines, progress bars and warnings stay quiet
(`quiet_transformers`): they are not ours to report.
"""
from __future__ import annotations

import json
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def open_log(path: Path) -> IO[str]:
    """--log-json FILE opened for appending; a folder or an unwritable path is bad input."""
    from ..errors import UsageError

    if path.is_dir():
        raise UsageError(f"--log-json {path} is a folder", "give a file name, e.g. --log-json run.jsonl")
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--log-json {path}: cannot write it ({exc.strerror})",
                         "give a file in a writable folder") from None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within: transformers logs errors only and shows no progress bars of its own (weight loading,
    shard writing), and deprecation warnings (FutureWarning, DeprecationWarning) and other Python
    warnings raised from transformers are not shown. Everything is restored on exit. Download bars
    of huggingface_hub stay as they were."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars, hub_bars = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                 not are_progress_bars_disabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()          # which turns huggingface_hub's off too
    if hub_bars:
        enable_progress_bars()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
            if not hub_bars:
                from huggingface_hub.utils import disable_progress_bars

                disable_progress_bars()


# A warning about one module ("vLLM: model.layers.3.mlp.up_proj: shape [1536, 576] does not ..."):
# the same finding for many modules is shown once, naming the first and counting the others.
MODULE_FINDING = re.compile(r"(?P<head>[\w ]+: |)(?P<module>\w+(?:\.\w+)+): (?P<finding>.+)", re.DOTALL)


class Reporter:
    """Callable event handler: `reporter(kind, data)`; use as a context manager."""

    def __init__(self, log_json: Path | None = None, *, stderr: IO[str] | None = None,
                 label: str = "quantizing", job: str | None = None) -> None:
        self.stderr = stderr or sys.stderr
        self.console = Console(file=self.stderr, stderr=True)
        self.interactive = self.stderr.isatty()
        self.label = label
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.log: IO[str] | None = None
        self.log_path = log_json
        self.job = job                      # recipe job name, added to every JSON event
        self.quiet = ExitStack()
        self.text_task: TaskID | None = None   # the bar of self-generated calibration text
        self.text_shown = 0                 # tenths of it reported on plain stderr
        self.module_warnings: dict[tuple[str, str], list[str]] = {}   # (head, finding) -> the modules

    def __enter__(self) -> Reporter:
        if self.log_path is not None:
            self.log = sys.stdout if str(self.log_path) == "-" else open_log(Path(self.log_path))
        self.quiet.enter_context(quiet_transformers())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.quiet.close()
        self._show_module_warnings()
        if self.progress is not None:
            self.progress.stop()
        if self.log is not None and self.log is not sys.stdout:
            self.log.close()

    def __call__(self, kind: str, data: dict) -> None:
        if self.log is not None:
            head = {"event": kind, "time": round(time.time(), 3), **({"job": self.job} if self.job else {})}
            self.log.write(json.dumps({**head, **data}, default=str) + "\n")
            self.log.flush()
        if kind != "warning":
            self._show_module_warnings()    # in order: the findings held before this event
        getattr(self, f"_on_{kind}", lambda d: None)(data)

    def _on_start(self, data: dict) -> None:
        total = data.get("total", data.get("blocks"))
        unit = data.get("unit", "blocks")
        if self.interactive:
            self.progress = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total, unit=unit)
        else:
            self.stderr.write(f"{self.label} {data.get('model')} -> {data.get('output')}: {total} {unit} "
                              f"on {data.get('device')}\n")
            self.stderr.flush()

    def _on_block(self, data: dict) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)
        elif not self.interactive:
            self.stderr.write(f"block {data['index'] + 1}/{data['blocks']} done in {data['seconds']:.2f}s "
                              f"(peak RSS {data['peak_rss_mb']:.0f} MiB)\n")
            self.stderr.flush()

    def _on_plan(self, data: dict) -> None:
        for line in data["lines"]:
            self.console.print(f"plan: {line}", highlight=False, soft_wrap=True, markup=False)

    def _on_eta(self, data: dict) -> None:
        if not self.interactive:   # the bar shows its own ETA
            self.console.print(f"plan: the first block took {data['first_block_seconds']:.1f} s; expected total "
                               f"about {data['expected_seconds'] / 60:.1f} min", highlight=False, soft_wrap=True,
                               markup=False)

    def _on_resume(self, data: dict) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=data["from_block"])
        self.console.print(f"resuming: blocks 1-{data['from_block']} were finished by an earlier run "
                           f"(saved in {data['folder']})", highlight=False, soft_wrap=True, markup=False)

    def _on_calibration_text(self, data: dict) -> None:
        """Self-generated calibration text: `tokens` of `total` written so far."""
        done, total = data["tokens"], data["total"]
        if self.progress is not None:
            if self.text_task is None:
                self.text_task = self.progress.add_task("calibration text", total=total, unit="tokens")
            self.progress.update(self.text_task, completed=done)
        elif not self.interactive and 10 * done // total > self.text_shown:
            self.text_shown = 10 * done // total
            self.stderr.write(f"calibration text: {done}/{total} tokens written\n")
            self.stderr.flush()

    def _on_window(self, data: dict) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)
        elif not self.interactive and ((data["index"] + 1) % 10 == 0 or data["index"] + 1 == data["total"]):
            self.stderr.write(f"window {data['index'] + 1}/{data['total']}\n")
            self.stderr.flush()

    def _on_done(self, data: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _on_warning(self, data: dict) -> None:
        found = MODULE_FINDING.fullmatch(data["message"])
        if found is None:
            self._show_module_warnings()
            self._warn(data["message"])
        else:           # held until the burst ends, then one line per finding (--log-json keeps each)
            self.module_warnings.setdefault((found["head"], found["finding"]), []).append(found["module"])

    def _show_module_warnings(self) -> None:
        """The findings held by _on_warning: "vLLM: NAME and 29 more modules: FINDING"."""
        for (head, finding), modules in self.module_warnings.items():
            more = f" and {len(modules) - 1} more module{'s' if len(modules) > 2 else ''}" if len(modules) > 1 else ""
            self._warn(f"{head}{modules[0]}{more}: {finding}")
        self.module_warnings.clear()

    def _warn(self, message: str) -> None:
        self.console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False, soft_wrap=True)
