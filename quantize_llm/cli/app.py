"""The command line's app and its one error boundary, `main()`.

The commands live beside this file, one thin function each: quantize.py (rtn, gptq, awq, outlier,
nf4), jobs.py (run, plan), tools.py (convert, inspect, eval, generate, env); options.py defines the
options they share, report.py what they print. Exit codes: 0 done, 1 the run failed, 2 bad input,
130 interrupted.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback

import typer

try:  # typer vendors its own copy of click from 0.2x on; its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer
    import click  # type: ignore[no-redef]
from rich.console import Console
from rich.text import Text

from ..errors import QuantizeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Quantize LLM weights into checkpoints that transformers "
                  "and vLLM load.")


def _fail(message: str, code: int) -> None:
    """The one line every failure ends with (user data in it is printed as text, never as markup)."""
    Console(stderr=True, highlight=False).print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise SystemExit(code)


INTERRUPTED = "interrupted; nothing was written"
DEBUG_ON = ("1", "true", "yes", "on")


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's pre-emption) ends the run like Ctrl-C: temp files removed, exit 130."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and maps every expected failure to one line and an exit code."""
    debug = os.environ.get("QUANTIZE_LLM_DEBUG", "").strip().lower() in DEBUG_ON
    if argv is None:   # the real command line, not a test calling main() in-process
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(args=argv, prog_name="quantize-llm", standalone_mode=False,
                   obj=list(sys.argv[1:] if argv is None else argv))
    except QuantizeError as exc:
        if debug:
            traceback.print_exc()
        _fail(exc.one_line(), exc.exit_code)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:
        exc.show()
        raise SystemExit(2) from None
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        command = f" {ctx.info_name}" if ctx and ctx.parent else ""
        _fail(f"{exc.format_message()} (see quantize-llm{command} --help)", 2)
    except (KeyboardInterrupt, getattr(click.exceptions, "Abort", KeyboardInterrupt)):
        _fail(INTERRUPTED, 130)
    except Exception as exc:  # noqa: BLE001  (the one boundary: no traceback without QUANTIZE_LLM_DEBUG)
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(rerun with QUANTIZE_LLM_DEBUG=1 for a traceback, and report it)", 1)
    if code == 130:  # typer turns KeyboardInterrupt into exit code 130 itself
        _fail(INTERRUPTED, 130)
    raise SystemExit(code if isinstance(code, int) else 0)


# The commands add themselves to `app` as their modules are imported.
from . import jobs, quantize, tools  # noqa: E402,F401
