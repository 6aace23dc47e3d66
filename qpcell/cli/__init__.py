"""Command line: ``qpcell VERB ...``. The only layer that prints.

Every user error is one line on stderr naming the file and the problem, exit code 1;
``--debug`` (anywhere on the command line) shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer

from qpcell import __version__
from qpcell.cli._app import app, err_console
from qpcell.errors import QpcellError

# Each module adds its commands to ``app`` when imported; a module that is not written
# yet is simply absent.
_COMMAND_MODULES = ("doctor", "importer", "evaluate", "train", "predict", "qupath", "demo")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qpcell {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """Deep-learning cell detection and classification for QuPath point annotations."""


for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"qpcell.cli.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"qpcell.cli.{_name}":
            raise


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qpcell`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="qpcell", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except QpcellError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a user
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc} "
                          "(run again with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
