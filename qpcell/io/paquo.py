"""The paquo layer: QuPath's own Java code reads and writes a project's objects.

The objects of an image live in ``data/<id>/data.qpdata``, a Java-serialised file only QuPath
can read; paquo starts QuPath's JVM to do it. This module finds QuPath the way paquo does,
reads point annotations (:func:`read_qupath_project`) and writes detections
(:class:`PaquoWriter`). It only asks paquo for GeoJSON features (annotations) or hands it
GeoJSON features (detections); everything else is the plain code in :mod:`qpcell.io.geojson`,
:mod:`qpcell.io.qupath_project` and :mod:`qpcell.annotate`. Every paquo object is used by duck
typing, so tests drive this layer with fakes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpcell.errors import QpcellError
from qpcell.io.qupath_project import (
    ProjectImage,
    merge_point_classes,
    project_file,
    read_project_info,
    select_images,
)
from qpcell.points import RGB, AnnotatedImage, CellClass, default_color

log = logging.getLogger("qpcell")

QUPATH_MISSING = ("QuPath not found: install QuPath 0.4-0.6 and set PAQUO_QUPATH_DIR "
                  "(or use the Groovy export and a GeoJSON project folder)")
PAQUO_MISSING = ("paquo is not installed: pip install 'qpcell[qupath]' (or use the Groovy "
                 "export and a GeoJSON project folder)")


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
    notes.extend(info.warnings)
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
    classes = merge_point_classes(project_classes, used, colors)

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

    ``project`` needs ``images`` (entries with ``entry_id``, ``image_name``, ``uri``,
    ``hierarchy``, ``is_readable()``, ``save()``), ``path_classes`` and
    ``update_image_paths(uri2uri=...)``; ``path_class_factory(name, color=)`` makes a path
    class (paquo's ``QuPathPathClass`` by default).

    paquo's ``entry.save()`` writes nothing (it only logs a warning) when the file at the
    entry's stored URI is missing: :meth:`replace` checks that first, and :meth:`relink`
    points an entry at where its file is now.
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

    def relink(self, entry_id: str, path: Path) -> str:
        """Point the entry at the image file ``path``; returns the URI it had.

        The project file is written when the project is closed (:func:`open_paquo_project`).
        """
        entry = self.entry(entry_id)
        old = str(entry.uri)
        try:
            self.project.update_image_paths(uri2uri={old: Path(path).resolve().as_uri()})
        except (NotImplementedError, RuntimeError, ValueError) as err:
            raise QpcellError(f"cannot relink image {entry.image_name!r} to {path}: "
                              f"{err}") from None
        if not self.can_save(entry_id):
            raise QpcellError(f"relinked image {entry.image_name!r} to {path}, but QuPath "
                              "still cannot reach it")
        return old

    def detections(self, entry_id: str, score_key: str) -> tuple[list[Any], list[dict]]:
        return existing_detection_stubs(self.entry(entry_id).hierarchy, score_key)

    def replace(self, entry_id: str, remove: Sequence[Any], add: list[dict],
                update: Callable[[Any], Any] | None = None) -> None:
        """Replace ``remove`` by ``add``, then ``update(hierarchy)`` (e.g. annotation
        read-outs), and save the image's data once.

        Raises
        ------
        QpcellError
            If paquo could not save it (its file is not at the stored URI): paquo itself
            would skip the save with a warning and the change would be lost.
        """
        entry = self.entry(entry_id)
        if not self.can_save(entry_id):
            raise QpcellError(f"image {entry.image_name!r}: its file is not at {entry.uri}, "
                              "so QuPath would not save its objects")
        replace_in_hierarchy(entry.hierarchy, remove, add)
        if update is not None:
            update(entry.hierarchy)
        entry.save()
