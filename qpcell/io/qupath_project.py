"""A QuPath project's own files, read without QuPath or Java.

``project.qpproj`` (image list, URIs, names, entry IDs), ``classifiers/classes.json`` (class
names and colours, packed signed ARGB ints), ``data/<id>/server.json`` (image size and pixel
calibration) and ``data/<id>/summary.json`` (object counts). :func:`read_project_info` returns
all of it; ``qpcell doctor`` shows it. The objects themselves live in ``data/<id>/data.qpdata``,
which only QuPath reads: see :mod:`qpcell.io.paquo`. Also here: image names as file stems,
image URIs as paths, and finding moved images (``--image-root OLD=NEW``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlsplit

from qpcell.errors import QpcellError
from qpcell.io.geojson import parse_color
from qpcell.points import RGB, CellClass, default_color

PROJECT_FILE = "project.qpproj"
#: The newest QuPath (major, minor) whose projects qpcell is tested with: 0.5.1 through paquo
#: in CI; 0.4 and 0.6 project files and GeoJSON through ``../shared/qupath-samples``.
NEWEST_TESTED_QUPATH = (0, 6)

# Characters that cannot be in a file name on Windows, macOS or Linux (plus control chars).
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
_COMPOUND_SUFFIX = re.compile(r"\.ome\.(tiff?|zarr|btf)$", re.IGNORECASE)
_SIMPLE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")


# --------------------------------------------------------------------------------------
# Names, URIs, colours
# --------------------------------------------------------------------------------------

def image_stem(name: str) -> str:
    """An image name without its file extension, safe as a file name.

    ``.ome.tif``/``.ome.tiff``/``.ome.zarr`` count as one extension; otherwise a final
    ``.xxx`` of 1-5 letters or digits is removed. Characters that are not allowed in file
    names become ``_``. ``groovy/qpcell-*.groovy`` use the same rule (``safeStem``).

    Examples: ``"MTA3 (2).svs" -> "MTA3 (2)"``, ``"a.ome.tiff" -> "a"``,
    ``"slide.qptiff - resolution #1" -> "slide.qptiff - resolution #1"``.
    """
    stem = _COMPOUND_SUFFIX.sub("", name)
    if stem == name:
        stem = _SIMPLE_SUFFIX.sub("", name)
    stem = _UNSAFE.sub("_", stem).strip().rstrip(".")
    return stem or "image"


def uri_to_path(uri: str | None) -> PurePath | None:
    """The file a QuPath image URI points to, or ``None`` for a non-file URI.

    Handles ``file:/abs/path``, ``file:///abs/path``, percent escapes (``%20``), Windows
    drive letters (``file:/C:/x.svs`` -> ``C:\\x.svs``) and network shares
    (``file://server/share/x.svs``, ``file:////server/share/x.svs`` -> a UNC path).
    The result is a :class:`~pathlib.PureWindowsPath` for Windows paths, else a
    :class:`~pathlib.PurePosixPath`; no file-system access.
    """
    if not uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        return None
    path = unquote(parts.path)
    if parts.netloc and parts.netloc.lower() != "localhost":
        return PureWindowsPath(f"//{parts.netloc}{path}")
    if re.match(r"^//[^/]+/[^/]+", path):  # file:////server/share/...
        return PureWindowsPath(path)
    if re.match(r"^/[A-Za-z]:([/\\]|$)", path):  # file:/C:/...
        return PureWindowsPath(path[1:])
    return PurePosixPath(path)


def _same_flavour_local(path: PurePath) -> Path | None:
    """``path`` as a local :class:`Path` if it can exist on this machine."""
    if isinstance(path, PureWindowsPath) and os.name != "nt":
        return None
    if isinstance(path, PurePosixPath) and os.name == "nt":
        return None
    return Path(path)


def argb_to_rgb(value: Any) -> RGB | None:
    """A QuPath colour as ``(r, g, b)``: a packed (signed) ARGB int, or ``[r, g, b(, a)]``."""
    return parse_color(value)


def rgb_to_argb(rgb: Sequence[int]) -> int:
    """``(r, g, b)`` as QuPath's packed signed ARGB int (opaque), as classes.json stores it."""
    r, g, b = (int(c) & 255 for c in rgb[:3])
    v = (255 << 24) | (r << 16) | (g << 8) | b
    return v - (1 << 32) if v >= (1 << 31) else v


def _micrometres(quantity: Any) -> float | None:
    """A pixelCalibration length ``{"value": v, "unit": u}`` in µm, or ``None``."""
    if not isinstance(quantity, Mapping):
        return None
    value, unit = quantity.get("value"), str(quantity.get("unit", "")).strip()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        return None
    factor = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
              "micrometer": 1.0, "micrometre": 1.0, "mm": 1000.0, "nm": 0.001}.get(unit)
    if factor is None:  # "px" (uncalibrated) or an unknown unit
        return None
    return float(value) * factor


def pixel_size_um(metadata: Mapping | None) -> float | None:
    """Averaged pixel size in µm from a server ``metadata`` dict (QuPath's pixelCalibration)."""
    if not isinstance(metadata, Mapping):
        return None
    calibration = metadata.get("pixelCalibration")
    if not isinstance(calibration, Mapping):
        return None
    w = _micrometres(calibration.get("pixelWidth"))
    h = _micrometres(calibration.get("pixelHeight"))
    if w is None and h is None:
        return None
    if w is None or h is None:
        return w if w is not None else h
    return (w + h) / 2.0


# --------------------------------------------------------------------------------------
# Java-free reading of the project files
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProjectImage:
    """One image entry of a QuPath project, as read from the project's JSON files.

    Attributes
    ----------
    entry_id
        QuPath's entry ID (the ``data/<id>/`` folder name).
    name
        The image name shown in QuPath.
    uri
        The image URI stored in the project (``None`` if the server has none).
    original_path
        The file that URI names, as written on the machine that made the project.
    path
        The local image file: the ``image_root``-remapped path, the stored path, or the path
        relative to a moved project, whichever exists. When none exists: the remapped path
        (if ``image_root`` matched), else the stored path if it can be local here, else
        ``None`` (also for non-file URIs); :attr:`exists` tells which.
    width, height
        Full-resolution size in pixels, if QuPath recorded it.
    mpp
        Pixel size in µm (average of width and height), ``None`` when uncalibrated/unknown.
    server
        The image server QuPath used (``OpenslideServerBuilder``, ``BioFormatsServerBuilder``...).
    data_dir
        ``<project>/data/<id>``.
    summary
        ``data/<id>/summary.json`` (object counts written by QuPath), if present.
    """

    entry_id: str
    name: str
    uri: str | None
    original_path: PurePath | None
    path: Path | None
    width: int | None
    height: int | None
    mpp: float | None
    server: str | None
    data_dir: Path
    summary: Mapping | None = None

    @property
    def stem(self) -> str:
        """:func:`image_stem` of the image name."""
        return image_stem(self.name)

    @property
    def exists(self) -> bool:
        """Whether the image file is on this machine."""
        return self.path is not None and self.path.is_file()

    @property
    def has_data(self) -> bool:
        """Whether QuPath has saved objects for this image (``data/<id>/data.qpdata``)."""
        return (self.data_dir / "data.qpdata").is_file()

    def keys(self) -> list[str]:
        """Names a prediction file ``<key>.geojson`` may use for this image, best first."""
        out = [self.stem, self.name, Path(self.name).stem]
        if self.original_path is not None:
            out += [image_stem(self.original_path.name), self.original_path.stem]
        seen: list[str] = []
        for k in out:
            if k and k not in seen:
                seen.append(k)
        return seen


@dataclass(frozen=True)
class ProjectInfo:
    """What the project files say, without QuPath."""

    path: Path
    version: str | None
    images: tuple[ProjectImage, ...]
    classes: tuple[CellClass, ...]
    warnings: tuple[str, ...] = ()

    @property
    def root(self) -> Path:
        """The project folder."""
        return self.path.parent

    def image(self, entry_id: str) -> ProjectImage:
        for img in self.images:
            if img.entry_id == str(entry_id):
                return img
        raise KeyError(entry_id)


def project_file(path: str | Path) -> Path:
    """``path`` itself if it is a ``.qpproj`` file, else ``path/project.qpproj``.

    Raises
    ------
    QpcellError
        If there is no project file there.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / PROJECT_FILE
        if candidate.is_file():
            return candidate
        raise QpcellError(f"no {PROJECT_FILE} in this folder", path)
    if path.suffix.lower() == ".qpproj" and path.is_file():
        return path
    if not path.exists():
        raise QpcellError("no such file or folder", path)
    raise QpcellError("not a QuPath project (expected project.qpproj or its folder)", path)


def is_qupath_project(path: str | Path) -> bool:
    """True for a ``.qpproj`` file or a folder that holds ``project.qpproj``."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / PROJECT_FILE).is_file()
    return path.suffix.lower() == ".qpproj" and path.is_file()


def load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise QpcellError(f"{what} is not valid JSON ({err.msg}, line {err.lineno})",
                          path) from None
    except UnicodeDecodeError:
        raise QpcellError(f"{what} is not UTF-8 text", path) from None
    except OSError as err:
        raise QpcellError(f"cannot read {what}: {err.strerror or err}", path) from None


def read_path_classes(path: str | Path) -> tuple[list[CellClass], list[str]]:
    """Classes from a QuPath ``classes.json`` (``{"pathClasses": [{"name", "color"}]}``).

    Colours may be packed signed ARGB ints (as QuPath writes them) or ``[r, g, b]``.
    Returns the classes (in file order, duplicates dropped) and warnings.
    """
    path = Path(path)
    data = load_json(path, "classes file")
    entries = data.get("pathClasses") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise QpcellError('expected {"pathClasses": [...]}', path)
    classes: list[CellClass] = []
    warnings: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            warnings.append(f"{path.name}: class #{i + 1} is not an object; skipped")
            continue
        name = entry.get("name")
        if name is None and isinstance(entry.get("names"), list):  # derived class, 0.4+ style
            name = ": ".join(str(n) for n in entry["names"])
        if not isinstance(name, str) or not name.strip():
            warnings.append(f"{path.name}: class #{i + 1} has no name; skipped")
            continue
        if name in seen:
            warnings.append(f"{path.name}: class {name!r} is listed twice; kept the first")
            continue
        seen.add(name)
        rgb = argb_to_rgb(entry.get("color", entry.get("colorRGB")))
        classes.append(CellClass(name, rgb if rgb is not None else default_color(len(classes))))
    return classes, warnings


def _builder_parts(server: Any) -> tuple[str | None, Mapping | None, str | None]:
    """``(uri, metadata, provider)`` from a server builder, unwrapping nested builders.

    server.json comes compact without ``builderType`` (0.4), wrapped in
    ``{"builder": {...}}`` (0.5) or with ``builderType`` at the top (0.6); transformed servers
    (rotated, cropped...) nest the original under ``builder``. The outermost metadata wins
    (it is what QuPath shows); the URI is the innermost one.
    """
    uri = provider = None
    metadata: Mapping | None = None
    node = server
    for _ in range(16):  # nesting depth guard
        if not isinstance(node, Mapping):
            break
        if metadata is None and isinstance(node.get("metadata"), Mapping):
            metadata = node["metadata"]
        if uri is None and isinstance(node.get("uri"), str):
            uri = node["uri"]
            provider = node.get("providerClassName")
        if uri is not None:
            break
        node = node.get("builder")
    if uri is None and isinstance(server, Mapping):  # e.g. sparse/concatenated servers
        for key in ("builders", "regions", "servers"):
            for child in server.get(key) or []:
                child_uri, child_md, child_provider = _builder_parts(
                    child.get("builder", child) if isinstance(child, Mapping) else child)
                if child_uri:
                    return child_uri, metadata or child_md, child_provider
    if isinstance(provider, str):
        provider = provider.rsplit(".", 1)[-1]
    return uri, metadata, provider if isinstance(provider, str) else None


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_image_root(spec: Mapping[str, str] | Iterable[str] | Iterable[tuple[str, str]] | None,
                     ) -> list[tuple[str, str]]:
    """``--image-root OLD=NEW`` values (or a ``{old: new}`` dict) as ``[(old, new), ...]``."""
    if not spec:
        return []
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for item in spec:
            if isinstance(item, str):
                old, sep, new = item.partition("=")
                if not sep or not old.strip() or not new.strip():
                    raise QpcellError(f"--image-root {item!r}: expected OLD=NEW, e.g. "
                                      "'C:/Users/me/slides=/data/slides'")
                items.append((old.strip(), new.strip()))
            else:
                old, new = item
                items.append((str(old), str(new)))
    return [(str(o), str(n)) for o, n in items]


def _norm(text: str) -> str:
    return text.replace("\\", "/").rstrip("/")


def _remap(original: PurePath, roots: Sequence[tuple[str, str]]) -> Path | None:
    """Replace the longest matching ``OLD`` prefix of ``original`` by ``NEW``."""
    text = _norm(str(original))
    windows = isinstance(original, PureWindowsPath)
    best: tuple[int, Path] | None = None
    for old, new in roots:
        prefix = _norm(old)
        # a file: URI given as OLD is compared by the path it names
        if prefix.lower().startswith("file:"):
            as_path = uri_to_path(old)
            prefix = _norm(str(as_path)) if as_path is not None else prefix
        a, b = (text.lower(), prefix.lower()) if windows else (text, prefix)
        if a == b or a.startswith(b + "/"):
            rest = text[len(prefix):].lstrip("/")
            candidate = Path(new).expanduser().joinpath(*rest.split("/")) if rest else Path(new)
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), candidate)
    return None if best is None else best[1]


def _moved_with_project(original: PurePath, old_project: PurePath | None,
                        new_project_dir: Path) -> Path | None:
    """Where the image is if it moved together with the project (as QuPath checks)."""
    if old_project is None or type(old_project) is not type(original):
        return None
    old_dir = old_project.parent.parts
    img = original.parts
    fold = (lambda s: s.lower()) if isinstance(original, PureWindowsPath) else (lambda s: s)
    common = 0
    for a, b in zip(old_dir, img, strict=False):
        if fold(a) != fold(b):
            break
        common += 1
    if common == 0:
        return None
    rel = [".."] * (len(old_dir) - common) + list(img[common:])
    return Path(os.path.normpath(new_project_dir.joinpath(*rel)))


def as_pure_path(text: str) -> PurePath:
    """A stored path string as the path type of the machine that wrote it."""
    if re.match(r"^[A-Za-z]:[\\/]|^\\\\|^//[^/]", text):
        return PureWindowsPath(text)
    return PurePosixPath(text)


def candidate_paths(original: PurePath | None, roots: Sequence[tuple[str, str]],
                old_project: PurePath | None, project_dir: Path) -> list[Path]:
    """Where the image may be: remapped, as stored, moved along with the project."""
    if original is None:
        return []
    out: list[Path] = []
    remapped = _remap(original, roots)
    if remapped is not None:
        out.append(remapped)
    local = _same_flavour_local(original)
    if local is not None:
        out.append(local)
    moved = _moved_with_project(original, old_project, project_dir)
    if moved is not None:
        out.append(moved)
    return out


def first_file(candidates: Sequence[Path], fallback: Sequence[Path]) -> Path | None:
    """The first existing candidate; else the first fallback (where we looked), or None."""
    for c in candidates:
        if c.is_file():
            return c
    return fallback[0] if fallback else None


def _locate(original: PurePath | None, roots: Sequence[tuple[str, str]],
            old_project: PurePath | None, project_dir: Path) -> Path | None:
    """The local image file: remapped, as stored, or moved along with the project.

    Not found: the remapped path if ``roots`` matched, else the stored path if it can be a
    local path here, else ``None``; never the moved-project guess.
    """
    candidates = candidate_paths(original, roots, old_project, project_dir)
    fallback = candidate_paths(original, roots, None, project_dir)
    return first_file(candidates, fallback)


def read_project_info(path: str | Path, *,
                      image_root: Mapping[str, str] | Iterable[str] | None = None) -> ProjectInfo:
    """Read a QuPath project's JSON files (no QuPath, no Java).

    Parameters
    ----------
    path
        ``project.qpproj`` or the folder holding it.
    image_root
        ``{OLD: NEW}`` or ``["OLD=NEW", ...]``: image paths starting with ``OLD`` are looked
        up under ``NEW`` (for images moved since the project was made).

    Raises
    ------
    QpcellError
        If the project file is missing or not a QuPath project.
    """
    qpproj = project_file(path)
    data = load_json(qpproj, "project file")
    if not isinstance(data, Mapping) or not isinstance(data.get("images", []), list):
        raise QpcellError('not a QuPath project file (no "images" list)', qpproj)
    roots = parse_image_root(image_root)
    project_dir = qpproj.parent
    warnings: list[str] = []
    old_project = uri_to_path(data.get("uri")) if isinstance(data.get("uri"), str) else None

    classes: list[CellClass] = []
    classes_json = project_dir / "classifiers" / "classes.json"
    if classes_json.is_file():
        classes, class_warnings = read_path_classes(classes_json)
        warnings += class_warnings

    images: list[ProjectImage] = []
    for i, entry in enumerate(data.get("images") or []):
        if not isinstance(entry, Mapping):
            warnings.append(f"image #{i + 1} in {qpproj.name} is not an object; skipped")
            continue
        entry_id = str(entry.get("entryID", i + 1))
        data_dir = project_dir / "data" / entry_id
        uri, metadata, provider = _builder_parts(entry.get("serverBuilder"))
        server_json = data_dir / "server.json"
        if server_json.is_file():
            try:
                s_uri, s_metadata, s_provider = _builder_parts(load_json(server_json,
                                                                          "server.json"))
            except QpcellError as err:
                warnings.append(str(err))
            else:
                uri = uri or s_uri
                provider = provider or s_provider
                if s_metadata is not None:  # what QuPath saved last, incl. user-set pixel size
                    metadata = s_metadata
        summary = None
        summary_json = data_dir / "summary.json"
        if summary_json.is_file():
            try:
                summary = load_json(summary_json, "summary.json")
            except QpcellError as err:
                warnings.append(str(err))
        name = entry.get("imageName")
        if not isinstance(name, str) or not name:
            md_name = metadata.get("name") if isinstance(metadata, Mapping) else None
            name = md_name if isinstance(md_name, str) and md_name else f"entry {entry_id}"
        original = uri_to_path(uri)
        md = metadata if isinstance(metadata, Mapping) else {}
        images.append(ProjectImage(
            entry_id=entry_id, name=name, uri=uri, original_path=original,
            path=_locate(original, roots, old_project, project_dir),
            width=_int_or_none(md.get("width")), height=_int_or_none(md.get("height")),
            mpp=pixel_size_um(md), server=provider, data_dir=data_dir,
            summary=summary if isinstance(summary, Mapping) else None))
    version = data.get("version")
    newer = version_newer_than_tested(version)
    if newer:
        warnings.append(newer)
    return ProjectInfo(path=qpproj, version=str(version) if version else None,
                       images=tuple(images), classes=tuple(classes), warnings=tuple(warnings))


def version_newer_than_tested(version: Any) -> str | None:
    """A warning when a project was written by a QuPath newer than qpcell is tested with."""
    m = re.match(r"(\d+)\.(\d+)", str(version or ""))
    if m is None or (int(m.group(1)), int(m.group(2))) <= NEWEST_TESTED_QUPATH:
        return None
    tested = ".".join(map(str, NEWEST_TESTED_QUPATH))
    return (f"the project was written by QuPath {version}, newer than qpcell is tested with "
            f"(0.4-{tested}): check what qpcell reads from it, and report a problem if "
            "something is missing")


def select_images(images: Sequence[ProjectImage], names: Sequence[str] | None,
                  where: Path | None = None) -> list[ProjectImage]:
    """The entries named in ``names`` (image name, its stem, or entry ID); all if ``None``."""
    if not names:
        return list(images)
    wanted: list[ProjectImage] = []
    missing: list[str] = []
    for name in names:
        hits = [img for img in images
                if name in (img.name, img.stem, Path(img.name).stem)
                or (name.isdigit() and name == img.entry_id)]
        if not hits:
            missing.append(name)
        for img in hits:
            if img not in wanted:
                wanted.append(img)
    if missing:
        known = ", ".join(repr(i.name) for i in images[:10]) + (" ..." if len(images) > 10 else "")
        raise QpcellError(f"--images: no image named {', '.join(map(repr, missing))} in the "
                          f"project (images: {known})", where)
    return wanted


def merge_point_classes(project_classes: Sequence[CellClass], used: Sequence[str],
                   file_colors: Mapping[str, RGB]) -> tuple[CellClass, ...]:
    """The classes the points use: in the project's order, then in order of appearance."""
    by_name = {c.name: c for c in project_classes}
    ordered = [c for c in project_classes if c.name in set(used)]
    extra = [n for n in dict.fromkeys(used) if n not in by_name]
    for n in extra:
        ordered.append(CellClass(n, file_colors.get(n) or default_color(len(ordered))))
    return tuple(ordered)

