"""Command line: ``qpcell VERB ...``. The only layer that prints.

Every user error is one line on stderr naming the file and the problem, exit code 1;
``--debug`` (anywhere on the command line) shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

import click
import typer
import typer.exceptions

from qpcell import __version__
from qpcell.cli._app import app, print_error, print_stopped
from qpcell.errors import Interrupted, QpcellError

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


#: Exit code of a command the user stopped with Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
_CLICK_ERRORS = (click.ClickException, typer.exceptions.TyperException)
_CLICK_EXITS = (click.exceptions.Exit, typer.exceptions.Exit)
_CLICK_ABORTS = (click.exceptions.Abort, typer.exceptions.Abort)


class _CtrlC:
    """SIGINT handler: the first Ctrl-C stops the command (``KeyboardInterrupt``), so it can
    save its state and say so; a second one while that happens is answered with a line
    instead of a traceback; a third quits at once."""

    def __init__(self) -> None:
        self.presses = 0

    def __call__(self, signum, frame) -> None:
        self.presses += 1
        if self.presses == 1:
            raise KeyboardInterrupt
        if self.presses == 2:
            os.write(2, b"\nstopping: finishing what is being saved; press Ctrl-C once more "
                        b"to quit at once (the file being written is then not saved)\n")
            return
        os._exit(EXIT_INTERRUPTED)


def _install_ctrl_c() -> _CtrlC | None:
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handler = _CtrlC()
        signal.signal(signal.SIGINT, handler)
        return handler
    return None


_STOPPED = ("interrupted (Ctrl-C): the files already written are complete, the one being "
            "written was left out; run the same command again to go on")


def _interrupted_message(exc: Interrupted) -> str:
    """The interruption message, plus what a model folder it names holds."""
    from qpcell.checkpoint import describe_kept

    kept = describe_kept(exc.path) if exc.path is not None else None
    return f"{exc}" + (f"; {kept}" if kept else "")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qpcell`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    ctrl_c = _install_ctrl_c()
    try:
        code = _run(args, debug, ctrl_c)
    finally:
        if ctrl_c is not None and argv is not None:  # called from Python: give Ctrl-C back
            signal.signal(signal.SIGINT, signal.default_int_handler)
        elif ctrl_c is not None:
            # Everything is written. Python's shutdown resets a handler of its own to the
            # default, so a Ctrl-C from now on would kill the process by the signal instead
            # of letting it exit with the code chosen above; an ignored signal stays ignored.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def _run(args: list[str], debug: bool, ctrl_c: _CtrlC | None) -> int:
    """Run the command line; every way it can end becomes an exit code and at most a line."""
    try:
        code = app(args=args, prog_name="qpcell", standalone_mode=False)
    except _CLICK_EXITS as exc:
        return exc.exit_code
    except _CLICK_ABORTS:
        print_stopped("aborted")
        return EXIT_INTERRUPTED
    except _CLICK_ERRORS as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print_stopped(_STOPPED)
        return EXIT_INTERRUPTED
    except Interrupted as exc:
        if debug:
            raise
        print_stopped(_interrupted_message(exc))
        return EXIT_INTERRUPTED
    except QpcellError as exc:
        if debug:
            raise
        print_error(exc)
        return 1
    except OSError as exc:
        if debug:
            raise
        print_error(_os_error_message(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a user
        if debug:
            raise
        print_error(f"{type(exc).__name__}: {exc} (run again with --debug for the traceback)")
        return 1
    if code == EXIT_INTERRUPTED and (ctrl_c is None or ctrl_c.presses):
        print_stopped(_STOPPED)  # typer turns a KeyboardInterrupt into this exit code
    return code if isinstance(code, int) else 0


def _os_error_message(exc: OSError) -> str:
    """An operating-system error (disk full, no permission) as one line naming the file."""
    import errno

    what = exc.strerror or str(exc)
    where = exc.filename
    hint = {errno.ENOSPC: "free some space or choose another --out folder",
            errno.EDQUOT: "free some space or choose another --out folder",
            errno.EACCES: "check the folder's permissions or choose another --out folder",
            errno.EPERM: "check the folder's permissions or choose another --out folder",
            errno.EROFS: "the disk is read-only; choose another --out folder"}.get(exc.errno)
    text = f"{where}: {what}" if where else what
    return text + (f" ({hint})" if hint else "")
