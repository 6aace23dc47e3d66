"""The one exception type that the command line turns into a one-line message."""

from __future__ import annotations

from pathlib import Path


class QpcellError(Exception):
    """A problem with the user's input, reported as one line naming the file.

    Parameters
    ----------
    message
        What is wrong, in words a pathologist understands.
    path
        The file or folder the problem is in, if any; it is put in front of the message.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class Interrupted(QpcellError):
    """The user stopped a command (Ctrl-C) and what was done is safe: not a failure.

    The command line prints it as ``interrupted: ...`` (not ``error:``) and exits with 130,
    the shell's code for Ctrl-C. The message says what was kept and how to go on.
    """
