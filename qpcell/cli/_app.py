"""The typer application, the consoles, and the one way qpcell prints errors and warnings.

Messages hold user text (file names such as QuPath's ``slide1 [d=2,x=0].png``, class names,
coordinates such as ``[x, y]``): :func:`print_error`, :func:`print_warning` and
:func:`print_note` style only their prefix and print the message as plain text, so rich never
reads a bracket in it as markup.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(
    name="qpcell",
    help="Deep-learning cell detection and classification for QuPath point annotations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

console = Console()
err_console = Console(stderr=True)


def _line(prefix: str, style: str, message: object) -> Text:
    return Text.assemble((prefix, style), " ", str(message))


def print_error(message: object) -> None:
    """``error: MESSAGE`` on stderr (the message is never read as markup)."""
    err_console.print(_line("error:", "bold red", message), highlight=False, soft_wrap=True)


def print_warning(message: object) -> None:
    """``warning: MESSAGE`` on stderr (the message is never read as markup)."""
    err_console.print(_line("warning:", "yellow", message), highlight=False, soft_wrap=True)


def print_note(message: object) -> None:
    """``note: MESSAGE`` on stderr (the message is never read as markup)."""
    err_console.print(_line("note:", "yellow", message), highlight=False, soft_wrap=True)


def print_stopped(message: object) -> None:
    """MESSAGE in yellow on stderr: a stop the user asked for (Ctrl-C), not a failure."""
    err_console.print(Text(str(message), "yellow"), highlight=False, soft_wrap=True)
