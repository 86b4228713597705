"""The command line (`quantize-llm`): the Typer app and its one error boundary, `main`."""
from .app import app, main

__all__ = ["app", "main"]
