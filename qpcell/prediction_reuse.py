"""When an earlier prediction in an output folder may stand for a new one.

``qpcell predict`` skips an image whose ``<stem>.geojson`` is already in the output folder
(unless ``--overwrite``). Output names are image stems, so a stem alone does not say which
image or which model made the file: another image of the same name (another folder, another
QuPath project entry) or a model retrained into the same folder would silently get stale
cells. Each image's entry in ``predictions.json`` therefore records the source file
(resolved path, size in bytes, modification time in ns) and a SHA-256 of the model's files
(its ``config.json`` and weights, not its folder path); an earlier result is reused only when
both match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The files of a model folder (and of each part of a pipeline) that decide its output.
MODEL_FILES = ("config.json", "weights.safetensors")
#: Keys of a ``predictions.json`` image entry written by :func:`stamp`.
SOURCE_KEY = "source"
MODEL_KEY = "model_sha256"


def source_fingerprint(image: str | Path) -> dict[str, Any] | None:
    """``{"path", "size", "mtime_ns"}`` of an image file (``None`` if it cannot be read)."""
    try:
        path = Path(image).resolve()
        st = path.stat()
    except OSError:
        return None
    return {"path": str(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


@lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...], root: str) -> str:
    digest = hashlib.sha256()
    for rel, _size, _mtime in files:
        digest.update(rel.encode("utf-8") + b"\0")
        with open(Path(root) / rel, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(folder: str | Path) -> str | None:
    """SHA-256 over a model folder's ``config.json`` and weights (pipeline parts included).

    ``None`` when ``folder`` is not a folder holding such files (e.g. a model built in
    memory), so its results are reused only for a predictor that has no fingerprint either.
    Hashes are cached per file size and modification time.
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    files = []
    for path in sorted(root.rglob("*")):
        if path.name in MODEL_FILES and path.is_file():
            st = path.stat()
            files.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    if not files:
        return None
    return _hash_files(tuple(files), str(root))


def predictor_fingerprint(predictor: Any) -> str | None:
    """The model fingerprint of a :class:`qpcell.predict.Predictor` (named by its folder)."""
    info = getattr(predictor, "info", None) or {}
    if isinstance(info, Mapping) and info.get(MODEL_KEY):
        return str(info[MODEL_KEY])
    return model_fingerprint(getattr(predictor, "name", ""))


def stamp(image: str | Path, model_sha: str | None) -> dict[str, Any]:
    """What a ``predictions.json`` image entry records to make its result reusable."""
    return {SOURCE_KEY: source_fingerprint(image), MODEL_KEY: model_sha}


def reusable(entry: Mapping | None, image: str | Path, model_sha: str | None,
             mpp: float | None = None) -> bool:
    """True iff ``entry`` (from ``predictions.json``) was made from this very file by this
    very model: same resolved path, size and modification time, same model fingerprint, and
    the pixel size ``mpp`` (µm/px) when one is asked for.

    Entries written before qpcell recorded these (or without an entry) are not reusable.
    """
    if not isinstance(entry, Mapping) or SOURCE_KEY not in entry:
        return False
    if mpp is not None and entry.get("mpp") != mpp:
        return False
    source = source_fingerprint(image)
    return source is not None and entry.get(SOURCE_KEY) == source \
        and entry.get(MODEL_KEY) == model_sha
