"""The ``gradwatch`` command line: thin typer commands over the library.

Each face keeps its commands in a module of this package (``runs.py``,
``theory.py``, ``lab.py``...) that registers them on :data:`app`. Domain errors
are caught once, by :func:`handle_errors`, and printed without a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from gradwatch import __version__
from gradwatch.errors import GradwatchError

app = typer.Typer(
    name="gradwatch",
    help="Show, explain and fix vanishing and exploding gradients in PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def handle_errors(fn: F) -> F:
    """Print a :class:`GradwatchError` as one red line and exit 1, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GradwatchError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"gradwatch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Show, explain and fix vanishing and exploding gradients in PyTorch models."""


# Command modules register themselves on `app` when imported.
from gradwatch.cli import export as _export  # noqa: E402,F401
from gradwatch.cli import lab as _lab  # noqa: E402,F401
from gradwatch.cli import probe as _probe  # noqa: E402,F401
from gradwatch.cli import report as _report  # noqa: E402,F401
from gradwatch.cli import runs as _runs  # noqa: E402,F401
from gradwatch.cli import theory as _theory  # noqa: E402,F401
from gradwatch.cli import ui as _ui  # noqa: E402,F401
