"""Atomic file writes: a reader never sees a half-written file.

New files get the permissions any program's files get (``0666`` less the umask), not the
``0600`` of a bare temporary file, so QuPath or a colleague under another account can read
them; a file that is replaced keeps its own permissions. A write that fails for lack of space
or permission names the file it was writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from qpcell.errors import QpcellError

_UMASK_LOCK = threading.Lock()
#: OS errors that are about the place written to, not about the data (named by the file).
_PLACE_ERRORS = {errno.ENOSPC: "no space left on the device",
                 errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "the disk is read-only",
                 errno.EACCES: "no permission to write there",
                 errno.EPERM: "no permission to write there",
                 errno.EFBIG: "the file is too large for this disk"}


def current_umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode(path: str | Path) -> int:
    """Permission bits for writing ``path``: its own if it exists, else ``0666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def _place_error(err: OSError, path: Path) -> QpcellError | None:
    reason = _PLACE_ERRORS.get(err.errno)
    if reason is None:
        return None
    return QpcellError(f"cannot write: {reason} ({err.strerror}); free space, fix the "
                       "permissions or choose another output folder", path)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success.

    If the block raises, the temporary file is removed and ``path`` is untouched.

    Raises
    ------
    QpcellError
        Naming ``path``, when the disk is full or read-only or the folder not writable.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise (_place_error(err, path) or err) from None
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, mode, **kwargs) as handle:
            try:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as err:
                problem = _place_error(err, path)
                if problem is None:
                    raise
                raise problem from None
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def leftover_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Temporary files :func:`atomic_open` left in ``folder`` for the files ``names`` when its
    process was killed (``.<name>.XXXXXXXX.tmp``)."""
    folder = Path(folder)
    wanted = set(names)
    pattern = re.compile(r"^\.(.+)\.[A-Za-z0-9_]{8}\.tmp$")
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            match = pattern.match(entry.name)
            if match and match.group(1) in wanted and entry.is_file(follow_symlinks=False):
                found.append(Path(entry.path))
    return sorted(found)


def remove_leftover_temporaries(folder: str | Path, names: Iterable[str]) -> tuple[int, int]:
    """Delete :func:`leftover_temporaries`; returns (files removed, bytes freed)."""
    removed = freed = 0
    for path in leftover_temporaries(folder, names):
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            removed += 1
            freed += size
    return removed, freed
