"""QuPath projects: a Java-free reader of the project files, and a thin paquo adapter.

Two layers, kept apart on purpose:

* **Java-free** (plain JSON, always available): ``project.qpproj`` (image list, URIs, names,
  entry IDs), ``classifiers/classes.json`` (class names and colours, packed signed ARGB ints),
  ``data/<id>/server.json`` (image size and pixel calibration) and ``data/<id>/summary.json``
  (object counts). :func:`read_project_info` returns all of it; ``qpcell doctor`` shows it.
* **paquo** (needs a QuPath installation; paquo starts QuPath's JVM): the objects themselves
  live in ``data/<id>/data.qpdata``, a Java-serialised file only QuPath can read. The adapter
  only asks paquo for GeoJSON features (annotations) or hands it GeoJSON features (detections);
  everything else is the plain code in :mod:`qpcell.io.geojson` and :mod:`qpcell.annotate`.
  Every paquo object is used by duck typing, so tests drive this layer with fakes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlsplit

from qpcell.errors import QpcellError
from qpcell.io.geojson import parse_color
from qpcell.points import RGB, AnnotatedImage, CellClass, default_color

log = logging.getLogger("qpcell")

QUPATH_MISSING = ("QuPath not found: install QuPath 0.4-0.6 and set PAQUO_QUPATH_DIR "
                  "(or use the Groovy export and a GeoJSON project folder)")
PAQUO_MISSING = ("paquo is not installed: pip install 'qpcell[qupath]' (or use the Groovy "
                 "export and a GeoJSON project folder)")

PROJECT_FILE = "project.qpproj"

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


def _load_json(path: Path, what: str) -> Any:
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
    data = _load_json(path, "classes file")
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


def _as_pure(text: str) -> PurePath:
    """A stored path string as the path type of the machine that wrote it."""
    if re.match(r"^[A-Za-z]:[\\/]|^\\\\|^//[^/]", text):
        return PureWindowsPath(text)
    return PurePosixPath(text)


def _candidates(original: PurePath | None, roots: Sequence[tuple[str, str]],
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


def _choose(candidates: Sequence[Path], fallback: Sequence[Path]) -> Path | None:
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
    candidates = _candidates(original, roots, old_project, project_dir)
    fallback = _candidates(original, roots, None, project_dir)
    return _choose(candidates, fallback)


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
    data = _load_json(qpproj, "project file")
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
                s_uri, s_metadata, s_provider = _builder_parts(_load_json(server_json,
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
                summary = _load_json(summary_json, "summary.json")
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
    return ProjectInfo(path=qpproj, version=str(version) if version else None,
                       images=tuple(images), classes=tuple(classes), warnings=tuple(warnings))


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


# --------------------------------------------------------------------------------------
# QuPath installation and paquo (the only part that starts Java)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuPathInstall:
    """A QuPath installation as paquo would find it (``found`` False: none)."""

    found: bool
    path: Path | None = None
    version: str | None = None
    source: str = ""
    detail: str = ""


def _qupath_version_from_dir(app_dir: Path) -> str | None:
    for jar in sorted(app_dir.glob("qupath-core-*.jar")):
        m = re.match(r"qupath-core-(\d+\.\d+\.\d+(?:-[\w.]+)?)\.jar$", jar.name)
        if m:
            return m.group(1)
    for jar in sorted(app_dir.glob("qupath-*.jar")):
        m = re.search(r"-(\d+\.\d+\.\d+(?:-[\w.]+)?)\.jar$", jar.name)
        if m:
            return m.group(1)
    return None


def find_qupath_installation() -> QuPathInstall:
    """Find QuPath the way paquo does (PAQUO_QUPATH_DIR, .paquo.toml, default folders),
    without starting a JVM."""
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath
    except ImportError as err:
        return QuPathInstall(False, detail=f"paquo not importable ({err})")
    try:
        kwargs = to_kwargs(settings)
    except Exception as err:  # noqa: BLE001 - dynaconf config errors have many types
        return QuPathInstall(False, detail=f"paquo configuration error: {err}")
    if os.environ.get("PAQUO_QUPATH_DIR"):
        source = "PAQUO_QUPATH_DIR"
    elif kwargs.get("qupath_dir"):
        source = ".paquo.toml (qupath_dir)"
    else:
        source = "paquo's default search folders"
    try:
        app_dir, _runtime, _jvm, _opts = find_qupath(**kwargs)
    except (ValueError, FileNotFoundError, IsADirectoryError, OSError) as err:
        where = kwargs.get("qupath_dir") or ", ".join(map(str, kwargs.get("qupath_search_dirs")
                                                           or []))
        return QuPathInstall(False, source=source,
                             detail=f"{err} (looked in: {where})" if where else str(err))
    app_dir = Path(app_dir)
    root = app_dir.parent.parent if app_dir.name == "app" else app_dir
    return QuPathInstall(True, path=root, version=_qupath_version_from_dir(app_dir),
                         source=source)


def import_paquo_project_class() -> type:
    """``paquo.projects.QuPathProject``, or a one-line :class:`QpcellError`.

    Importing ``paquo.projects`` starts QuPath's JVM. Without QuPath paquo raises
    ``ValueError("no valid qupath installation found")`` from ``paquo.jpype_backend``; a broken
    installation raises ``FileNotFoundError``/``OSError``/``RuntimeError`` from JPype.
    """
    try:
        import paquo  # noqa: F401
    except ImportError:
        raise QpcellError(PAQUO_MISSING) from None
    try:
        from paquo.projects import QuPathProject
    except ImportError as err:
        raise QpcellError(f"paquo cannot be imported ({err}); reinstall it: "
                          "pip install 'qpcell[qupath]'") from None
    except (ValueError, FileNotFoundError, IsADirectoryError) as err:
        log.debug("paquo: %s", err)
        raise QpcellError(QUPATH_MISSING) from None
    except (OSError, RuntimeError) as err:
        raise QpcellError(f"QuPath's Java could not start through paquo ({err}); check "
                          "PAQUO_QUPATH_DIR points to QuPath 0.4-0.6") from None
    return QuPathProject


def paquo_qupath_version() -> str | None:
    """The QuPath version paquo runs (only after :func:`import_paquo_project_class`)."""
    try:
        from paquo.java import qupath_version
    except Exception:  # noqa: BLE001 - Java missing or not started
        return None
    return None if qupath_version is None else str(qupath_version)


@contextmanager
def open_paquo_project(path: str | Path, mode: str = "r") -> Iterator[Any]:
    """A paquo ``QuPathProject`` (``mode`` "r" read-only, "r+" read/write).

    In "r+" mode the project file (image list, classes) is saved when the block ends without
    an error: ``project.save(images=False)``. Image data is saved by whoever changed it
    (``entry.save()``): paquo's own ``with project:`` would open every image of the project
    to ask whether it changed.
    """
    qpproj = project_file(path)
    project_class = import_paquo_project_class()
    try:
        project = project_class(qpproj, mode=mode)
    except FileNotFoundError:
        raise QpcellError("no such project file", qpproj) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise QpcellError(f"QuPath cannot open this project: {err}", qpproj) from None
    yield project
    if mode != "r":
        project.save(images=False)


def paquo_color_to_rgb(color: Any) -> RGB | None:
    """A paquo ``QuPathColor`` (or anything with ``to_rgb()``, or an (r, g, b)) as RGB."""
    if color is None:
        return None
    if hasattr(color, "to_rgb"):
        color = color.to_rgb()
    try:
        r, g, b = (int(c) for c in tuple(color)[:3])
    except (TypeError, ValueError):
        return None
    return (r, g, b)


def paquo_classes(project: Any) -> list[CellClass]:
    """The project's path classes (``project.path_classes``) as :class:`CellClass` es."""
    out: list[CellClass] = []
    seen: set[str] = set()
    for pc in project.path_classes:
        name = getattr(pc, "id", None) or pc.name  # derived classes: "Tumor: Positive"
        if not name or name in seen:
            continue
        seen.add(name)
        out.append(CellClass(name, paquo_color_to_rgb(pc.color) or default_color(len(out))))
    return out


def add_paquo_classes(project: Any, new: Sequence[CellClass],
                      path_class_factory: Callable[..., Any] | None = None) -> None:
    """Append ``new`` classes to the project's class list (existing ones are untouched)."""
    if not new:
        return
    if path_class_factory is None:
        from paquo.classes import QuPathPathClass as path_class_factory
    current = list(project.path_classes)
    project.path_classes = current + [path_class_factory(c.name, color=c.color) for c in new]


def hierarchy_features(hierarchy: Any) -> list[dict]:
    """All annotations of a paquo hierarchy as QuPath GeoJSON features (one Java call)."""
    features = hierarchy.to_geojson()
    return [f for f in features if isinstance(f, Mapping)]


def _objects_from_features(features: list[dict], label: str):
    """A :class:`qpcell.io.geojson.QuPathObjects` from GeoJSON features (A's parser)."""
    from qpcell.io.geojson import parse_geojson

    return parse_geojson(list(features), path=label)


@dataclass
class _Loaded:
    image: ProjectImage
    objects: Any


def _merge_classes(project_classes: Sequence[CellClass], used: Sequence[str],
                   file_colors: Mapping[str, RGB]) -> tuple[CellClass, ...]:
    """The classes the points use: in the project's order, then in order of appearance."""
    by_name = {c.name: c for c in project_classes}
    ordered = [c for c in project_classes if c.name in set(used)]
    extra = [n for n in dict.fromkeys(used) if n not in by_name]
    for n in extra:
        ordered.append(CellClass(n, file_colors.get(n) or default_color(len(ordered))))
    return tuple(ordered)


def read_qupath_project(path: str | Path, *, images: Sequence[str] | None = None,
                        image_root: Mapping[str, str] | Iterable[str] | None = None,
                        require_files: bool = True, notes: list[str] | None = None,
                        opener: Callable[..., Any] | None = None,
                        ) -> tuple[tuple[CellClass, ...], list[AnnotatedImage]]:
    """The point annotations of a QuPath project, through paquo (read-only).

    Each image entry with point annotations (``Point``/``MultiPoint`` ROIs with a class)
    becomes an :class:`AnnotatedImage`: cells from the points, annotated regions from the
    unclassified area annotations, the pixel size from the project, the image file from its
    URI (remapped by ``image_root``). Images without point annotations are skipped with a note.

    Parameters
    ----------
    images
        Only these entries (image name, name without extension, or entry ID).
    image_root
        ``{OLD: NEW}`` or ``["OLD=NEW"]`` prefix remapping for moved images.
    require_files
        Raise if an image file cannot be found (training needs the pixels).
    notes
        If given, human-readable notes (skipped images, set-aside objects) are appended.
    opener
        ``opener(path, mode)`` -> context manager of a paquo-like project (tests pass fakes).

    Returns
    -------
    classes, images
        The classes used by the points (project order and colours) and the images.

    Raises
    ------
    QpcellError
        QuPath missing (one line), unknown ``images``, or image files not found (listed).
    """
    info = read_project_info(path, image_root=image_root)
    chosen = select_images(info.images, images, info.path)
    notes = notes if notes is not None else []
    by_id = {img.entry_id: img for img in chosen}
    opener = opener or open_paquo_project
    loaded: list[_Loaded] = []
    project_classes: list[CellClass] = list(info.classes)
    with opener(info.path, "r") as project:
        try:
            project_classes = paquo_classes(project) or project_classes
        except Exception as err:  # noqa: BLE001 - fall back to classes.json
            log.debug("paquo path classes: %s", err)
        for entry in project.images:
            img = by_id.get(str(entry.entry_id))
            if img is None:
                continue
            features = hierarchy_features(entry.hierarchy)
            objs = _objects_from_features(features, img.name)
            if len(objs.point_xy) == 0:
                notes.append(f"{img.name}: no point annotations; skipped")
                continue
            loaded.append(_Loaded(img, objs))
    if not loaded:
        return tuple(), []

    used: list[str] = []
    colors: dict[str, RGB] = {}
    for item in loaded:
        for name in item.objects.point_class:
            if name is not None and name not in used:
                used.append(name)
        colors.update({k: tuple(v) for k, v in item.objects.class_colors.items()})
    classes = _merge_classes(project_classes, used, colors)

    missing = [item.image for item in loaded if not item.image.exists]
    if missing and require_files:
        lines = "; ".join(f"{m.name} ({m.original_path or m.uri})" for m in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise QpcellError(
            f"{len(missing)} image file(s) not found: {lines}{more}. Use --image-root OLD=NEW "
            "to say where the images are now", info.path)

    from qpcell.io.geojson import to_annotated_image

    out: list[AnnotatedImage] = []
    for item in loaded:
        img = item.image
        annotated = to_annotated_image(item.objects, img.stem, classes=classes, source="points",
                                       image=img.path if img.exists else None, mpp=img.mpp)
        annotated.metadata.update({"qupath_entry_id": img.entry_id, "qupath_name": img.name,
                                   "qupath_project": str(info.path)})
        notes.extend(annotated.metadata.get("warnings", []))
        if not img.exists:
            notes.append(f"{img.name}: image file not found ({img.original_path or img.uri})")
        out.append(annotated)
    return classes, out


# --------------------------------------------------------------------------------------
# The folder groovy/qpcell-train.groovy writes (Java-free)
# --------------------------------------------------------------------------------------

EXPORT_INDEX = "images.json"
EXPORT_FORMAT = "qpcell-qupath-export"


@dataclass(frozen=True)
class ExportedImage:
    """One image of a QuPath export folder (``images.json`` entry, completed from the project)."""

    stem: str
    name: str
    annotations: Path
    image: Path | None
    exists: bool
    mpp: float | None
    entry_id: str | None
    uri: str | None


def is_qupath_export(path: str | Path) -> bool:
    """True for a folder written by ``groovy/qpcell-train.groovy`` (it has ``images.json``)."""
    index = Path(path) / EXPORT_INDEX
    if not index.is_file():
        return False
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, Mapping) and isinstance(data.get("images"), Mapping)


def read_export_index(folder: str | Path, *,
                      image_root: Mapping[str, str] | Iterable[str] | None = None,
                      ) -> list[ExportedImage]:
    """The images of a QuPath export folder, with image files and pixel sizes resolved.

    ``images.json`` (written by the Groovy script)::

        {"format": "qpcell-qupath-export", "version": 1,
         "project": "/path/to/project.qpproj",
         "images": {"<stem>": {"name": "slide 1.svs", "entry_id": "3",
                               "uri": "file:/data/slide%201.svs", "image": "/data/slide 1.svs",
                               "mpp": 0.25}}}

    ``<stem>.geojson`` beside it holds the image's annotations. ``image`` and ``mpp`` may be
    null or absent: the image file is then taken from ``uri``, and the pixel size (and a
    moved image's path) from the QuPath project when it is reachable (``data/<id>/server.json``).
    ``image_root`` remaps moved images as for :func:`read_project_info`.

    Raises
    ------
    QpcellError
        If ``images.json`` is missing or malformed, or an annotation file is missing.
    """
    folder = Path(folder)
    index_path = folder / EXPORT_INDEX
    if not index_path.is_file():
        raise QpcellError(f"no {EXPORT_INDEX}: not a folder written by qpcell-train.groovy",
                          folder)
    data = _load_json(index_path, EXPORT_INDEX)
    entries = data.get("images") if isinstance(data, Mapping) else None
    if not isinstance(entries, Mapping):
        raise QpcellError('expected {"images": {"<stem>": {...}}}', index_path)
    roots = parse_image_root(image_root)
    project: ProjectInfo | None = None
    project_path = data.get("project")
    if isinstance(project_path, str) and project_path:
        candidates = [Path(project_path), folder.parent / PROJECT_FILE]
    else:
        candidates = [folder.parent / PROJECT_FILE]
    for candidate in candidates:
        try:
            if candidate.is_file():
                project = read_project_info(candidate, image_root=image_root)
                break
        except (QpcellError, OSError):
            continue
    by_id = {img.entry_id: img for img in project.images} if project else {}

    out: list[ExportedImage] = []
    for stem, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise QpcellError(f"entry {stem!r} is not an object", index_path)
        annotations = folder / f"{stem}.geojson"
        if not annotations.is_file():
            raise QpcellError(f"{annotations.name} is listed but missing", folder)
        entry_id = None if entry.get("entry_id") is None else str(entry.get("entry_id"))
        from_project = by_id.get(entry_id) if entry_id is not None else None
        uri = entry.get("uri") if isinstance(entry.get("uri"), str) else None
        stored = entry.get("image") if isinstance(entry.get("image"), str) else None
        options: list[Path] = []
        if stored:
            as_path = Path(stored).expanduser()
            if not _as_pure(stored).is_absolute():  # relative to the export folder
                options.append(folder / as_path)
            options += _candidates(_as_pure(stored), roots, None, folder.parent)
        options += _candidates(uri_to_path(uri), roots, None, folder.parent)
        if from_project is not None and from_project.path is not None:
            options.append(from_project.path)
        image = _choose(options, options)
        mpp = entry.get("mpp")
        if not (isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and mpp > 0):
            mpp = from_project.mpp if from_project is not None else None
        name = entry.get("name") if isinstance(entry.get("name"), str) else stem
        out.append(ExportedImage(stem=str(stem), name=name, annotations=annotations,
                                 image=image, exists=image is not None and image.is_file(),
                                 mpp=None if mpp is None else float(mpp), entry_id=entry_id,
                                 uri=uri))
    return out


def read_qupath_export(folder: str | Path, *, images: Sequence[str] | None = None,
                       image_root: Mapping[str, str] | Iterable[str] | None = None,
                       require_files: bool = True, notes: list[str] | None = None,
                       ) -> tuple[tuple[CellClass, ...], list[AnnotatedImage]]:
    """The point annotations of a folder written by ``groovy/qpcell-train.groovy``.

    Like :func:`read_qupath_project`, without Java: classes in the order and colours of the
    export's ``classes.json`` (the project's classes) restricted to those the points use;
    regions from unclassified area annotations; image files and pixel sizes from
    :func:`read_export_index`. ``images`` selects by image name, stem or entry ID.

    Raises
    ------
    QpcellError
        Unknown ``images``, or image files not found (listed) when ``require_files``.
    """
    from qpcell.io.geojson import read_geojson, to_annotated_image

    folder = Path(folder)
    notes = notes if notes is not None else []
    exported = read_export_index(folder, image_root=image_root)
    if images:
        wanted = set(images)
        unknown = wanted - {e.name for e in exported} - {e.stem for e in exported} - {
            e.entry_id for e in exported if e.entry_id}
        if unknown:
            raise QpcellError(f"--images: {', '.join(map(repr, sorted(unknown)))} not in "
                              f"{EXPORT_INDEX}", folder)
        exported = [e for e in exported
                    if e.name in wanted or e.stem in wanted or e.entry_id in wanted]
    project_classes: list[CellClass] = []
    if (folder / "classes.json").is_file():
        project_classes, class_warnings = read_path_classes(folder / "classes.json")
        notes.extend(class_warnings)
    loaded = []
    for e in exported:
        objs = read_geojson(e.annotations)
        if len(objs.point_xy) == 0:
            notes.append(f"{e.name}: no point annotations; skipped")
            continue
        loaded.append((e, objs))
    if not loaded:
        return tuple(), []
    used: list[str] = []
    colors: dict[str, RGB] = {}
    for _, objs in loaded:
        for name in objs.point_class:
            if name is not None and name not in used:
                used.append(name)
        colors.update({k: tuple(v) for k, v in objs.class_colors.items()})
    classes = _merge_classes(project_classes, used, colors)
    missing = [e for e, _ in loaded if not e.exists]
    if missing and require_files:
        lines = "; ".join(f"{m.name} ({m.image or m.uri})" for m in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise QpcellError(f"{len(missing)} image file(s) not found: {lines}{more}. Use "
                          "--image-root OLD=NEW to say where the images are now", folder)
    out: list[AnnotatedImage] = []
    for e, objs in loaded:
        annotated = to_annotated_image(objs, e.stem, classes=classes, source="points",
                                       image=e.image if e.exists else None, mpp=e.mpp)
        annotated.metadata.update({"qupath_entry_id": e.entry_id, "qupath_name": e.name})
        notes.extend(annotated.metadata.get("warnings", []))
        out.append(annotated)
    return classes, out


# --------------------------------------------------------------------------------------
# Writing detections through paquo
# --------------------------------------------------------------------------------------

def existing_detection_stubs(hierarchy: Any, score_key: str) -> tuple[list[Any], list[dict]]:
    """The hierarchy's detections and a minimal GeoJSON-like stub of each.

    A stub is ``{"properties": {"objectType": "detection", "measurements": {...}}}`` holding
    only ``score_key`` when the object has it: one cheap Java call per object instead of a
    full GeoJSON conversion (a slide can hold 10^5 detections).
    """
    objects = list(hierarchy.detections)
    stubs = []
    for obj in objects:
        measurements = obj.measurements
        m = {score_key: float(measurements[score_key])} if score_key in measurements else {}
        stubs.append({"type": "Feature",
                      "properties": {"objectType": "detection", "measurements": m}})
    return objects, stubs


def replace_in_hierarchy(hierarchy: Any, remove: Sequence[Any], add: list[dict]) -> None:
    """Remove ``remove`` (paquo objects) and insert ``add`` (GeoJSON features) in bulk.

    Runs inside ``hierarchy.no_autoflush()``: one ``removeObjects`` call and one
    ``load_geojson`` call (QuPath's ``insertPathObjects``, which puts each detection inside
    the annotation that contains it) per image.
    """
    with hierarchy.no_autoflush():
        if remove:
            proxy = hierarchy.detections  # a local name: ``h.detections -= x`` would setattr
            proxy -= list(remove)
        if add:
            try:
                hierarchy.load_geojson(add, raise_on_skip=True)
            except ValueError as err:
                raise QpcellError(f"QuPath rejected detections: {err}") from None


@dataclass
class PaquoWriter:
    """The few paquo calls ``annotate-back`` makes, on a project opened by paquo.

    ``project`` needs ``images`` (entries with ``entry_id``, ``image_name``, ``hierarchy``,
    ``is_readable()``, ``save()``) and ``path_classes``; ``path_class_factory(name, color=)``
    makes a path class (paquo's ``QuPathPathClass`` by default).
    """

    project: Any
    path_class_factory: Callable[..., Any] | None = None
    _entries: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._entries = {str(e.entry_id): e for e in self.project.images}

    def classes(self) -> list[CellClass]:
        return paquo_classes(self.project)

    def add_classes(self, new: Sequence[CellClass]) -> None:
        add_paquo_classes(self.project, new, self.path_class_factory)

    def entry(self, entry_id: str) -> Any:
        try:
            return self._entries[str(entry_id)]
        except KeyError:
            raise QpcellError(f"paquo does not list image entry {entry_id}") from None

    def can_save(self, entry_id: str) -> bool:
        """paquo saves an image's objects only if it can reach the image file."""
        try:
            return bool(self.entry(entry_id).is_readable())
        except QpcellError:
            raise
        except Exception as err:  # noqa: BLE001 - odd URIs make paquo raise anything
            log.debug("is_readable: %s", err)
            return False

    def detections(self, entry_id: str, score_key: str) -> tuple[list[Any], list[dict]]:
        return existing_detection_stubs(self.entry(entry_id).hierarchy, score_key)

    def replace(self, entry_id: str, remove: Sequence[Any], add: list[dict],
                update: Callable[[Any], Any] | None = None) -> None:
        """Replace detections, then ``update(hierarchy)`` (e.g. annotation read-outs), then
        save the image once."""
        entry = self.entry(entry_id)
        replace_in_hierarchy(entry.hierarchy, remove, add)
        if update is not None:
            update(entry.hierarchy)
        entry.save()
