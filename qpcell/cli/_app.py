"""The typer application and the consoles; commands register themselves on ``app``."""

from __future__ import annotations

import typer
from rich.console import Console

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
