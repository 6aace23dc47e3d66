"""The "GeoJSON project": a folder that is the Java-free twin of a QuPath project.

Layout::

    folder/
        <stem>.png | .tif | .svs | .ome.tif | ...   one image per annotation file
        <stem>.geojson                               its QuPath GeoJSON (same stem)
        classes.json                                 optional: class names, colours, order
        metadata.json                                optional: pixel sizes

``classes.json`` is QuPath's own format, ``{"pathClasses": [{"name": ..., "color": ...}]}``,
with ``color`` a packed signed ARGB int (what QuPath writes) or ``[r, g, b]``.
``metadata.json`` is ``{"mpp": 0.5, "images": {"<stem>": {"mpp": 0.25}}}`` (µm per pixel;
the per-image value wins).

The Groovy scripts, the importers and ``qpcell train`` all use this layout.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qpcell import __version__
from qpcell.errors import QpcellError
from qpcell.io.atomic import atomic_write_text, new_file_mode
from qpcell.io.geojson import (
    QuPathObjects,
    parse_color,
    read_geojson,
    resolve_source,
    to_annotated_image,
    write_points,
)
from qpcell.points import AnnotatedImage, CellClass, default_color

__all__ = [
    "IMAGE_SUFFIXES",
    "GeoJSONProject",
    "find_image",
    "image_size",
    "natural_key",
    "read_classes_json",
    "read_project",
    "check_new_folder",
    "scan_images",
    "split_image_name",
    "write_classes_json",
    "write_project",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs",
                                   ".ome.tif", ".ome.tiff", ".ndpi", ".mrxs", ".scn", ".vsi",
                                   ".bif")
"""Image file endings recognised (case-insensitive); ``a.ome.tif`` has the stem ``a``."""

_LONGEST_FIRST = sorted(IMAGE_SUFFIXES, key=len, reverse=True)
CLASSES_FILE = "classes.json"
METADATA_FILE = "metadata.json"
ANNOTATION_SUFFIX = ".geojson"


def natural_key(text: str) -> list:
    """Sort key that puts ``img2`` before ``img10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def split_image_name(filename: str) -> tuple[str, str] | None:
    """``"a.ome.tif"`` -> ``("a", ".ome.tif")``; ``None`` if it is not an image name."""
    lower = filename.lower()
    for suffix in _LONGEST_FIRST:
        if lower.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], filename[-len(suffix):]
    return None


def scan_images(folder: str | Path) -> dict[str, Path]:
    """``stem -> path`` of every image file in ``folder`` (not recursive, hidden files skipped).

    Raises
    ------
    QpcellError
        If two images share a stem (``a.png`` and ``a.tif``): which one is meant is unclear.
    """
    folder = Path(folder)
    found: dict[str, list[Path]] = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        split = split_image_name(entry.name)
        if split is not None and entry.is_file():
            found.setdefault(split[0], []).append(Path(entry.path))
    clashes = {s: p for s, p in found.items() if len(p) > 1}
    if clashes:
        stem, paths = next(iter(clashes.items()))
        raise QpcellError(f"{len(clashes)} image name(s) are used by more than one file, e.g. "
                          f"{', '.join(p.name for p in paths)}; keep one image per name", folder)
    return {s: p[0] for s, p in found.items()}


def find_image(folder: str | Path, stem: str) -> Path | None:
    """The image ``<stem><suffix>`` in ``folder`` for any suffix in :data:`IMAGE_SUFFIXES`
    (case-insensitive), or ``None``. Raises QpcellError if two files match."""
    folder = Path(folder)
    hits = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return None
    for entry in entries:
        split = split_image_name(entry.name)
        if split is not None and split[0] == stem and entry.is_file():
            hits.append(Path(entry.path))
    if len(hits) > 1:
        raise QpcellError(f"more than one image is named {stem!r}: "
                          f"{', '.join(sorted(p.name for p in hits))}", folder)
    return hits[0] if hits else None


def image_size(path: str | Path) -> tuple[int, int] | None:
    """``(width, height)`` of a PNG, JPEG or plain TIFF from its header; ``None`` when not
    cheaply known (whole-slide formats, unreadable files)."""
    path = Path(path)
    split = split_image_name(path.name)
    if split is None or split[1].lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        return None
    try:
        from PIL import Image

        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except Exception:  # noqa: BLE001 - a header we cannot read just means "unknown"
        return None


# ----------------------------------------------------------------------- classes.json


def _rgb_to_packed(rgb: Sequence[int]) -> int:
    r, g, b = (int(c) for c in rgb)
    v = (255 << 24) | (r << 16) | (g << 8) | b
    return v - (1 << 32)  # Java's signed int, as QuPath writes it


def read_classes_json(path: str | Path) -> tuple[CellClass, ...]:
    """Classes from a QuPath ``classes.json`` (``{"pathClasses": [{name, color}]}``, colour a
    packed signed ARGB int or ``[r, g, b]``; a bare list of ``{name, color}`` also works).
    A class without a usable colour gets :func:`~qpcell.points.default_color`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise QpcellError("file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QpcellError(f"is not valid JSON ({err})", path) from None
    items = data.get("pathClasses") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise QpcellError('is not a QuPath class list: expected {"pathClasses": [...]}', path)
    classes: list[CellClass] = []
    seen: set[str] = set()
    for k, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name.strip():
            raise QpcellError(f"class {k + 1} has an empty or missing name", path)
        if name in seen:
            raise QpcellError(f"class {name!r} is listed twice", path)
        seen.add(name)
        color = parse_color(item.get("color")) if isinstance(item, dict) else None
        classes.append(CellClass(name, color or default_color(k)))
    return tuple(classes)


def write_classes_json(path: str | Path, classes: Sequence[CellClass]) -> None:
    """Write ``classes`` as QuPath's ``classes.json`` (packed signed ARGB colours), atomically."""
    data = {"pathClasses": [{"name": c.name, "color": _rgb_to_packed(c.color)}
                            for c in classes]}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _read_metadata(path: Path) -> tuple[float | None, dict[str, float]]:
    if not path.is_file():
        return None, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QpcellError(f"is not valid JSON ({err})", path) from None
    if not isinstance(data, dict):
        raise QpcellError('expected {"mpp": ..., "images": {...}}', path)

    def mpp_of(value, where: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value) or value <= 0:
            raise QpcellError(f"{where}: pixel size {value!r} is not a positive number", path)
        return float(value)

    default = mpp_of(data.get("mpp"), "mpp")
    per_image = {}
    images = data.get("images") or {}
    if not isinstance(images, dict):
        raise QpcellError("'images' is not an object", path)
    for stem, meta in images.items():
        value = mpp_of(meta.get("mpp") if isinstance(meta, dict) else meta, f"image {stem!r}")
        if value is not None:
            per_image[stem] = value
    return default, per_image


# --------------------------------------------------------------------------- projects


@dataclass
class GeoJSONProject:
    """A GeoJSON project read into memory.

    Attributes
    ----------
    root
        The folder.
    classes
        The classes the labels index (``classes.json`` order and colours when present).
    images
        One :class:`~qpcell.points.AnnotatedImage` per annotation file, in natural order
        of their names.
    warnings
        Every warning of every file, one line each, naming the file.
    """

    root: Path
    classes: tuple[CellClass, ...]
    images: list[AnnotatedImage]
    warnings: list[str] = field(default_factory=list)


def _project_classes(root: Path, objs: dict[str, QuPathObjects], source: str,
                     warnings: list[str]) -> tuple[CellClass, ...]:
    """The classes the files use: in classes.json's order and colours, then the others."""
    used: dict[str, tuple[int, int, int] | None] = {}
    for o in objs.values():
        for name in o.class_names(resolve_source(o, source)):
            if used.get(name) is None:
                used[name] = o.class_colors.get(name)
    cfile = root / CLASSES_FILE
    listed = read_classes_json(cfile) if cfile.is_file() else ()
    known = {c.name for c in listed}
    extra = [n for n in used if n not in known]
    if listed and extra:
        warnings.append(f"{cfile}: class{'es' if len(extra) > 1 else ''} "
                        f"{', '.join(map(repr, extra))} used in the annotations but not listed; "
                        "added after the listed classes")
    unused = [c.name for c in listed if c.name not in used]
    if unused:
        warnings.append(f"{cfile}: {len(unused)} listed class(es) have no annotated cell and "
                        f"are left out: {', '.join(map(repr, unused[:10]))}"
                        + (" ..." if len(unused) > 10 else ""))
    ordered = [c for c in listed if c.name in used]
    start = len(ordered)
    return tuple(ordered) + tuple(CellClass(n, used[n] or default_color(start + k))
                                  for k, n in enumerate(extra))


def read_project(folder: str | Path, *, classes: Sequence[CellClass] | None = None,
                 source: str = "auto", require_images: bool = True) -> GeoJSONProject:
    """Read a GeoJSON project folder.

    Parameters
    ----------
    folder
        Images plus ``<stem>.geojson`` per image, optional ``classes.json`` and
        ``metadata.json`` (see the module docstring).
    classes
        Map every file onto these classes (a class name not among them is an error).
        ``None``: the classes the files use, in ``classes.json``'s order and colours when
        it is there (names it does not list come after, with a warning; listed classes no
        cell has are left out, with a warning), else in order of first appearance over the
        files in natural order, coloured as in the files.
    source
        ``"points"``, ``"detections"`` or ``"auto"``, as in
        :func:`~qpcell.io.geojson.to_annotated_image`.
    require_images
        ``True`` (training data): every GeoJSON needs its image and every image its GeoJSON.
        ``False`` (prediction folders): GeoJSON files alone are fine; images are attached
        where found.

    Points outside an image whose size is cheaply known (PNG, JPEG, TIFF) are skipped with
    a warning. All warnings are in ``project.warnings`` and in each image's
    ``metadata["warnings"]``.

    Raises
    ------
    QpcellError
        If the folder has no GeoJSON, images and annotation files do not pair up (listing
        them), or a file is malformed.
    """
    root = Path(folder)
    if not root.is_dir():
        raise QpcellError("is not a folder", root)
    geojsons = {p.name[: -len(ANNOTATION_SUFFIX)]: p for p in root.iterdir()
                if p.name.lower().endswith(ANNOTATION_SUFFIX) and not p.name.startswith(".")
                and p.is_file()}
    if not geojsons:
        raise QpcellError("holds no <image name>.geojson annotation files", root)
    images = scan_images(root)
    if require_images:
        no_image = sorted(set(geojsons) - set(images), key=natural_key)
        no_geojson = sorted(set(images) - set(geojsons), key=natural_key)
        problems = []
        if no_image:
            problems.append(f"{len(no_image)} annotation file(s) without an image: "
                            + ", ".join(geojsons[s].name for s in no_image[:5])
                            + (" ..." if len(no_image) > 5 else ""))
        if no_geojson:
            problems.append(f"{len(no_geojson)} image(s) without a .geojson annotation file: "
                            + ", ".join(images[s].name for s in no_geojson[:5])
                            + (" ..." if len(no_geojson) > 5 else "")
                            + " (an image with no cells needs an empty FeatureCollection)")
        if problems:
            raise QpcellError("; ".join(problems), root)
    default_mpp, image_mpp = _read_metadata(root / METADATA_FILE)
    stems = sorted(geojsons, key=natural_key)
    objs = {s: read_geojson(geojsons[s]) for s in stems}
    warnings: list[str] = []
    if classes is None:
        classes = _project_classes(root, objs, source, warnings)
    classes = tuple(classes)
    out = []
    for s in stems:
        img_path = images.get(s)
        img = to_annotated_image(objs[s], s, classes=classes, source=source, image=img_path,
                                 mpp=image_mpp.get(s, default_mpp),
                                 image_size=None if img_path is None else image_size(img_path))
        warnings += img.metadata["warnings"]
        out.append(img)
    return GeoJSONProject(root=root, classes=classes, images=out, warnings=warnings)


def _place_image(src: Path, dest: Path, copy: bool) -> None:
    """Copy or symlink ``src`` to ``dest`` atomically (nothing to do if it is already there);
    a copy gets the permissions of a new file (the umask), not the temporary file's 0600."""
    if dest.exists() and dest.resolve() == src.resolve():
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.fchmod(fd, new_file_mode(dest))
    os.close(fd)
    try:
        if copy:
            shutil.copyfile(src, tmp)
        else:
            os.unlink(tmp)
            os.symlink(src.resolve(), tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def check_new_folder(folder: str | Path) -> None:
    """Refuse to write a new project into a folder that already holds files.

    Old images or annotation files left there would be trained on as if they belonged to
    the new project, and the user's annotations must never be overwritten.

    Raises
    ------
    QpcellError
        If ``folder`` is a file, or a folder holding anything but hidden files.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise QpcellError("is a file, not a folder", folder)
    if not folder.is_dir():
        return
    held = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if held:
        raise QpcellError(f"already holds {len(held)} file(s) ({', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}); a re-import there would mix "
                          "old and new images: choose a new --out folder (or move the old "
                          "one away)", folder)


def write_project(folder: str | Path, images: Sequence[AnnotatedImage], *,
                  copy_images: bool = True) -> Path:
    """Write ``images`` as a GeoJSON project that :func:`read_project` reads back exactly.

    Writes ``<name>.geojson`` for each image (:func:`~qpcell.io.geojson.write_points`),
    the image itself as ``<name><suffix>`` (copied, or a symlink to the original when
    ``copy_images`` is False; images with ``image=None`` get only their GeoJSON),
    ``classes.json`` (every class of every image, first colour wins) and ``metadata.json``
    (pixel sizes). Every file is written atomically.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    QpcellError
        If two images share a name, a name is not a plain file name, or an image file is
        missing or not of a known type.
    """
    root = Path(folder)
    names = [img.name for img in images]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise QpcellError(f"image names are not unique: {', '.join(dupes[:5])}")
    for img in images:
        if not img.name or img.name.startswith(".") or any(c in img.name for c in "/\\\0"):
            raise QpcellError(f"{img.name!r} cannot be used as a file name")
        if img.image is not None:
            src = Path(img.image)
            if not src.is_file():
                raise QpcellError(f"image of {img.name!r} not found", src)
            if split_image_name(src.name) is None:
                raise QpcellError(f"not an image type qpcell knows ({', '.join(IMAGE_SUFFIXES)})",
                                  src)
    root.mkdir(parents=True, exist_ok=True)
    classes: dict[str, CellClass] = {}
    for img in images:
        for c in img.classes:
            classes.setdefault(c.name, c)
    for img in images:
        if img.image is not None:
            src = Path(img.image)
            suffix = split_image_name(src.name)[1]  # type: ignore[index]
            _place_image(src, root / f"{img.name}{suffix}", copy_images)
        write_points(root / f"{img.name}{ANNOTATION_SUFFIX}", img)
    write_classes_json(root / CLASSES_FILE, list(classes.values()))
    mpps = {img.name: img.mpp for img in images if img.mpp is not None}
    meta: dict = {"written_by": f"qpcell {__version__}"}
    if mpps and len(mpps) == len(images) and len(set(mpps.values())) == 1:
        meta["mpp"] = next(iter(mpps.values()))
    meta["images"] = {n: {"mpp": v} for n, v in mpps.items()}
    atomic_write_text(root / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    return root
