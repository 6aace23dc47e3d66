"""Writing predictions back into a QuPath project (``qpcell annotate-back``), the pure part.

What happens, per image:

1. the prediction file ``<stem>.geojson`` (from ``qpcell predict``) is matched to a project
   entry: by the image name without extension, then by the image file's stem;
2. its cells are read (:func:`qpcell.io.geojson.to_detections`) and written again as QuPath
   detection features (:func:`qpcell.io.geojson.detections_to_features`) with the
   **project's** class colours and the image's pixel size for the circle radius; prediction
   classes that the project lacks are added to it with the model's colour;
3. qpcell's earlier detections on that image (those with the ``qpcell: score`` measurement)
   are removed, everything else (annotations, other detections) is kept, and the new
   detections are inserted in one bulk call, each inside the annotation that contains it.

Every option is checked, and every feature built, before anything is written. Before the first
write of a run, the data folders of the images about to change (and the project file and
classes) are copied to ``<project>/qpcell-backups/<timestamp>/``. QuPath (through paquo) saves
an image's objects only if it finds the image file at the location the project stores: images
found elsewhere (``--image-root OLD=NEW``, or moved along with the project) are relinked to
where they are now, after the backup, and reported; images not found at all are skipped, and a
run that would write nothing is an error.

The QuPath side is an object with a handful of methods (see
:class:`qpcell.io.paquo.PaquoWriter`); tests pass a fake, so everything here runs without
QuPath.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qpcell.errors import QpcellError
from qpcell.points import RGB, CellClass, Detections, default_color

log = logging.getLogger("qpcell")

BACKUP_DIR = "qpcell-backups"
#: Detection outlines ``annotate-back`` writes.
SHAPES = ("circle", "point")
RELOAD_NOTE = ("QuPath must reload the project to show this: if it is open in QuPath, close "
               "the images (without saving them) and reopen the project; saving a stale image "
               "from QuPath would overwrite these detections.")


def check_options(shape: str, radius_um: float, mpp: float | None = None) -> None:
    """Raise a one-line :class:`QpcellError` for an option a real run would reject.

    Called before anything is read or written, so that a dry run fails as the real run
    would, and a real run fails before the project is backed up or changed.
    ``radius_um`` is in µm, ``mpp`` in µm/px (``None``: not given).
    """
    if shape not in SHAPES:
        raise QpcellError(f"--shape must be {' or '.join(SHAPES)}, not {shape!r}")
    if not (isinstance(radius_um, (int, float)) and math.isfinite(radius_um) and radius_um > 0):
        raise QpcellError(f"--radius-um {radius_um} must be a positive number of µm")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise QpcellError(f"--mpp {mpp} must be a positive pixel size in µm/px")


# --------------------------------------------------------------------------------------
# Which objects are qpcell's
# --------------------------------------------------------------------------------------

def _score_key() -> str:
    from qpcell.io.geojson import QPCELL_SCORE

    return QPCELL_SCORE


def _measurement_names(value: Any) -> set[str]:
    if isinstance(value, Mapping):
        return {str(k) for k in value}
    if isinstance(value, list):  # QuPath 0.2/0.3: [{"name": ..., "value": ...}]
        return {str(m.get("name")) for m in value if isinstance(m, Mapping)}
    return set()


def _object_type(feature: Mapping) -> str | None:
    props = feature.get("properties") or {}
    kind = props.get("objectType", props.get("object_type"))
    if kind is None and isinstance(feature.get("id"), str) and feature["id"].startswith("Path"):
        kind = feature["id"]  # 0.2: the Java class name
    return None if kind is None else str(kind).lower()


_DETECTION_TYPES = {"detection", "cell", "tile", "pathdetectionobject", "pathcellobject",
                    "pathtileobject"}


def is_qpcell_feature(feature: Mapping) -> bool:
    """True iff ``feature`` is a detection (or cell) with the ``qpcell: score`` measurement.

    Annotations are never qpcell's, whatever their measurements.
    """
    if not isinstance(feature, Mapping):
        return False
    kind = _object_type(feature)
    if kind is not None and kind not in _DETECTION_TYPES:
        return False
    props = feature.get("properties") or {}
    return _score_key() in _measurement_names(props.get("measurements"))


@dataclass
class Replacement:
    """What to do with one image's objects.

    Attributes
    ----------
    remove
        Indices (into the existing objects) of qpcell's earlier detections.
    keep
        Indices of every other existing object (annotations, other tools' detections).
    add
        The new detection features.
    """

    remove: list[int]
    keep: list[int]
    add: list[dict]


def plan_replacement(existing: Sequence[Mapping], new: Sequence[Mapping]) -> Replacement:
    """Split ``existing`` objects (GeoJSON-like) into qpcell's (removed) and others (kept).

    Every feature in ``new`` must itself be qpcell's (a detection with the score
    measurement), so that a rerun finds and replaces it.

    Raises
    ------
    QpcellError
        If a new feature is not a qpcell detection.
    """
    remove = [i for i, f in enumerate(existing) if is_qpcell_feature(f)]
    removed = set(remove)
    keep = [i for i in range(len(existing)) if i not in removed]
    add = list(new)
    for i, f in enumerate(add):
        if not is_qpcell_feature(f):
            raise QpcellError(f"new object {i + 1} is not a qpcell detection (no "
                              f"{_score_key()!r} measurement); refusing to write it")
    return Replacement(remove=remove, keep=keep, add=[dict(f) for f in add])


# --------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassMapping:
    """Prediction classes as they will be written into a project.

    Attributes
    ----------
    classes
        The prediction classes, in order, each with the project's colour when the project
        has a class of that name, else the model's colour.
    new
        Classes the project does not have yet (to add, with the model's colour).
    recoloured
        Names whose model colour differs from the project's (the project's wins).
    notes
        E.g. a class that differs from a project class only in upper/lower case.
    """

    classes: tuple[CellClass, ...]
    new: tuple[CellClass, ...]
    recoloured: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def map_classes(prediction: Sequence[CellClass], project: Sequence[CellClass]) -> ClassMapping:
    """Map prediction classes onto a project's classes by exact name."""
    by_name = {c.name: c for c in project}
    by_fold: dict[str, list[str]] = {}
    for c in project:
        by_fold.setdefault(c.name.casefold(), []).append(c.name)
    out: list[CellClass] = []
    new: list[CellClass] = []
    recoloured: list[str] = []
    notes: list[str] = []
    for c in prediction:
        known = by_name.get(c.name)
        if known is not None:
            out.append(CellClass(c.name, known.color))
            if tuple(known.color) != tuple(c.color):
                recoloured.append(c.name)
            continue
        out.append(c)
        new.append(c)
        similar = by_fold.get(c.name.casefold())
        if similar:
            notes.append(f"class {c.name!r} is new although the project has "
                         f"{', '.join(map(repr, similar))} (names must match exactly)")
    return ClassMapping(tuple(out), tuple(new), tuple(recoloured), tuple(notes))


# --------------------------------------------------------------------------------------
# Prediction files
# --------------------------------------------------------------------------------------

def prediction_files(folder: str | Path) -> dict[str, Path]:
    """``<stem>.geojson`` files of a ``qpcell predict`` output folder, by stem.

    Raises
    ------
    QpcellError
        If the folder does not exist or holds no ``.geojson`` file.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() in (".geojson", ".json"):
        return {folder.name.rsplit(".", 1)[0]: folder}
    if not folder.is_dir():
        raise QpcellError("no such prediction folder", folder)
    files = {p.name[: -len(".geojson")]: p for p in sorted(folder.iterdir())
             if p.is_file() and p.name.lower().endswith(".geojson")
             and not p.name.startswith(".")}
    if not files:
        raise QpcellError("holds no <image>.geojson predictions (run qpcell predict first)",
                          folder)
    return files


def prediction_index(folder: str | Path) -> dict:
    """``predictions.json`` of a prediction folder (``{}`` when absent or unreadable)."""
    path = Path(folder) / "predictions.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("%s: not read (%s)", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def classes_from_index(index: Mapping) -> list[CellClass]:
    """The model's classes listed in ``predictions.json`` (names or ``{name, color}``)."""
    from qpcell.io.qupath_project import argb_to_rgb

    raw = index.get("classes")
    out: list[CellClass] = []
    if not isinstance(raw, list):
        return out
    for item in raw:
        if isinstance(item, str):
            name, color = item, None
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            name, color = item["name"], argb_to_rgb(item.get("color"))
        else:
            continue
        if name and name not in {c.name for c in out}:
            out.append(CellClass(name, color or default_color(len(out))))
    return out


def _probability_names(measurements: Iterable[Mapping]) -> list[str]:
    from qpcell.io.geojson import probability_key

    pre, _, suf = probability_key("\x00").partition("\x00")
    names: dict[str, None] = {}
    for m in measurements:
        for key in m:
            if key.startswith(pre) and key.endswith(suf) and len(key) > len(pre) + len(suf):
                names.setdefault(key[len(pre): len(key) - len(suf)], None)
    return list(names)


def read_prediction(path: str | Path, classes: Sequence[CellClass] = (), *,
                    notes: list[str] | None = None) -> Detections:
    """The cells of one prediction file, with every class it mentions.

    ``classes`` (e.g. from ``predictions.json``) fixes the order and colours of known
    classes; others follow in order of appearance (probability measurements, then cell
    classes), coloured as in the file. Unclassified detections are dropped (a line is
    appended to ``notes``).

    Raises
    ------
    QpcellError
        If the file holds objects but none is a qpcell detection.
    """
    from qpcell.io.geojson import read_geojson, to_detections

    path = Path(path)
    objs = read_geojson(path)
    n = len(objs.detection_xy)
    if n == 0 and (len(objs.point_xy) or objs.regions):
        raise QpcellError("holds annotations, not detections: is this a prediction of "
                          "qpcell predict?", path)
    score = _score_key()
    if n and not any(score in m for m in objs.detection_measurements):
        raise QpcellError(f"its detections have no {score!r} measurement: not written by "
                          "qpcell predict", path)
    order = list(classes)
    names = {c.name for c in order}
    for name in _probability_names(objs.detection_measurements) + objs.class_names(
            "detections"):
        if name not in names:
            names.add(name)
            order.append(CellClass(name, objs.class_colors.get(name)
                                   or default_color(len(order))))
    det = to_detections(objs, order)
    dropped = n - len(det)
    if dropped and notes is not None:
        notes.append(f"{path.name}: {dropped} unclassified detection(s) skipped")
    return det


# --------------------------------------------------------------------------------------
# Matching prediction files to project images
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    """A prediction file and the project image it belongs to."""

    stem: str
    prediction: Path
    image: Any  # qpcell.io.qupath_project.ProjectImage


def match_predictions(files: Mapping[str, Path], images: Sequence[Any],
                      ) -> tuple[list[Match], list[str]]:
    """Pair ``<stem>.geojson`` files with project images.

    A stem matches an image whose name without extension is the stem (also the plain name
    and :func:`pathlib.Path.stem` of it); failing that, an image whose file's stem is the
    stem. Returns the matches and the stems that matched nothing.

    Raises
    ------
    QpcellError
        If a stem fits several images equally well, or two files fit one image.
    """
    name_keys: dict[str, list[Any]] = {}
    file_keys: dict[str, list[Any]] = {}
    for img in images:
        keys = img.keys()
        n_name = 3  # stem, name, Path(name).stem; the rest are the file's
        for k in dict.fromkeys(keys[:n_name]):
            name_keys.setdefault(k, []).append(img)
        for k in dict.fromkeys(keys[n_name:]):
            file_keys.setdefault(k, []).append(img)
    matches: list[Match] = []
    unmatched: list[str] = []
    taken: dict[str, str] = {}
    for stem, path in files.items():
        hits = name_keys.get(stem) or file_keys.get(stem) or []
        unique = list({id(h): h for h in hits}.values())
        if not unique:
            unmatched.append(stem)
            continue
        if len(unique) > 1:
            raise QpcellError(f"{path.name} fits several images: "
                              f"{', '.join(repr(i.name) for i in unique)}; rename the "
                              "images in QuPath or pass --images")
        img = unique[0]
        if img.entry_id in taken:
            raise QpcellError(f"{path.name} and {taken[img.entry_id]} both fit image "
                              f"{img.name!r}; keep one of them")
        taken[img.entry_id] = path.name
        matches.append(Match(stem, path, img))
    return matches, unmatched


# --------------------------------------------------------------------------------------
# Backups
# --------------------------------------------------------------------------------------

def backup_project_data(project_root: str | Path, entry_ids: Sequence[str], *,
                        stamp: str | None = None) -> Path:
    """Copy ``data/<id>/`` of each entry, ``project.qpproj`` and ``classifiers/`` aside.

    The copy goes to ``<project>/qpcell-backups/<timestamp>/`` (same layout as the
    project), built in a hidden temporary folder and renamed into place, so a backup folder
    is always complete. Returns the backup folder.

    Raises
    ------
    QpcellError
        If the copy fails (nothing is written to the project then).
    """
    root = Path(project_root)
    stamp = stamp or datetime.now().strftime("%Y%m%d-%H%M%S")
    backups = root / BACKUP_DIR
    backups.mkdir(parents=True, exist_ok=True)
    tmp = backups / f".{stamp}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for entry_id in entry_ids:
            src = root / "data" / str(entry_id)
            if src.is_dir():
                shutil.copytree(src, tmp / "data" / str(entry_id))
        for rel in ("project.qpproj", "classifiers"):
            src = root / rel
            if src.is_dir():
                shutil.copytree(src, tmp / rel)
            elif src.is_file():
                shutil.copy2(src, tmp / rel)
        dest = backups / stamp
        k = 1
        while dest.exists():
            dest = backups / f"{stamp}-{k}"
            k += 1
        os.replace(tmp, dest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QpcellError(f"backup failed, nothing written: {err}", backups) from None
    return dest


def restore_project_data(project_root: str | Path, backup: str | Path,
                         entry_ids: Sequence[str]) -> None:
    """Put ``data/<id>/`` of each entry back as :func:`backup_project_data` copied it
    (removed if the backup has none: the image had no saved data)."""
    root, backup = Path(project_root), Path(backup)
    for entry_id in entry_ids:
        src, dest = backup / "data" / str(entry_id), root / "data" / str(entry_id)
        if dest.exists():
            shutil.rmtree(dest)
        if src.is_dir():
            shutil.copytree(src, dest)


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------

@dataclass
class ImageResult:
    """What happened to one image."""

    name: str
    entry_id: str
    prediction: Path
    counts: dict[str, int]
    added: int = 0
    removed: int | None = None  # qpcell detections replaced (None: not known)
    kept: int | None = None  # other detections left as they were
    status: str = "written"
    relinked: str | None = None  # the image file the entry was relinked to
    measured: int = 0  # annotations given qpcell's read-out measurements
    hotspots: int = 0  # hotspot annotations written


@dataclass
class AnnotateReport:
    """The outcome of :func:`annotate_back`."""

    project: Path
    dry_run: bool
    results: list[ImageResult] = field(default_factory=list)
    classes: tuple[CellClass, ...] = ()
    new_classes: tuple[CellClass, ...] = ()
    unmatched: list[str] = field(default_factory=list)
    backup: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def written(self) -> list[ImageResult]:
        return [r for r in self.results if r.status.startswith("written")]


class Writer:
    """What :func:`annotate_back` needs from QuPath (implemented by ``PaquoWriter``)."""

    def classes(self) -> list[CellClass]: ...  # pragma: no cover
    def add_classes(self, new: Sequence[CellClass]) -> None: ...  # pragma: no cover
    def can_save(self, entry_id: str) -> bool: ...  # pragma: no cover
    def relink(self, entry_id: str, path: Path) -> str: ...  # pragma: no cover
    def detections(self, entry_id: str, score_key: str
                   ) -> tuple[list[Any], list[dict]]: ...  # pragma: no cover
    def replace(self, entry_id: str, remove: Sequence[Any],
                add: list[dict]) -> None: ...  # pragma: no cover


def _paquo_session(project: Path, mode: str, opener: Callable | None,
                   writer_factory: Callable | None):
    from qpcell.io import paquo as qp

    opener = opener or qp.open_paquo_project
    writer_factory = writer_factory or qp.PaquoWriter
    return opener(project, mode), writer_factory


def _paquo_version() -> str | None:
    from qpcell.io.paquo import paquo_qupath_version

    return paquo_qupath_version()


def _major_minor(version: str | None) -> tuple[int, int] | None:
    import re

    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_note(qupath: str | None, project: str | None) -> str | None:
    """A warning when the QuPath that writes is newer than the one that made the project."""
    a, b = _major_minor(qupath), _major_minor(project)
    if a is None or b is None or a <= b:
        return None
    return (f"the project was made with QuPath {project}; paquo runs QuPath {qupath}, which "
            f"saves the changed images in its own format: QuPath {b[0]}.{b[1]} may not "
            "open them any more (the backup has the old files)")


def annotate_back(predictions: str | Path, project: str | Path, *,
                  images: Sequence[str] | None = None, dry_run: bool = False,
                  shape: str = "circle", radius_um: float = 4.0,
                  image_root: Mapping[str, str] | Iterable[str] | None = None,
                  opener: Callable[..., Any] | None = None,
                  writer_factory: Callable[[Any], Writer] | None = None,
                  stamp: str | None = None, positive_classes: Sequence[str] | str | None = None,
                  negative_classes: Sequence[str] | str | None = None) -> AnnotateReport:
    """Write the detections in a ``qpcell predict`` output folder into a QuPath project.

    Parameters
    ----------
    predictions
        The prediction folder (``<stem>.geojson`` per image, optional ``predictions.json``).
    project
        ``project.qpproj`` or its folder.
    images
        Only these project images (name, name without extension, or entry ID).
    dry_run
        Report what would change; write nothing. Works without QuPath (then the number of
        earlier detections to replace is unknown).
    shape, radius_um
        Detection outline: ``"circle"`` of ``radius_um`` µm (using the image's pixel size)
        or ``"point"``.
    image_root
        ``OLD=NEW`` remapping of moved image files: paquo saves an image only if it finds it,
        so entries whose files are found this way are relinked (after the backup).
    opener, writer_factory
        ``opener(project_path, mode)`` -> context manager of a paquo-like project and
        ``writer_factory(project)`` -> :class:`Writer`; defaults use paquo (tests pass fakes).
    stamp
        Backup folder name (default: the current time).
    positive_classes, negative_classes
        For the ``qpcell: positive %`` measurement of each area annotation (default: those
        given to ``qpcell predict``, in ``predictions.json``); see :mod:`qpcell.readouts`.

    Raises
    ------
    QpcellError
        A bad option, no prediction matches an image, QuPath is missing (a real run), no
        matched image file is found (nothing would be written), or a write fails.
    """
    from qpcell.io.geojson import detections_to_features
    from qpcell.io.qupath_project import read_project_info, select_images

    check_options(shape, radius_um)
    info = read_project_info(project, image_root=image_root)
    report = AnnotateReport(project=info.path, dry_run=dry_run)
    report.notes += list(info.warnings)
    files = prediction_files(predictions)
    index = prediction_index(predictions) if Path(predictions).is_dir() else {}
    index_classes = classes_from_index(index)
    chosen = select_images(info.images, images, info.path)
    matches, unmatched = match_predictions(files, chosen)
    report.unmatched = unmatched
    if images:
        hit = {m.image.entry_id for m in matches}
        for img in chosen:
            if img.entry_id not in hit:
                report.notes.append(f"{img.name}: no prediction file for it in {predictions}")
    elif unmatched:
        report.notes.append(f"{len(unmatched)} prediction file(s) fit no project image: "
                            f"{', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}")
    if not matches:
        names = ", ".join(repr(i.name) for i in chosen[:8])
        raise QpcellError(f"no prediction file fits a project image (files: "
                          f"{', '.join(list(files)[:8])}; images: {names})", predictions)

    detections = {m.image.entry_id: read_prediction(m.prediction, index_classes,
                                                    notes=report.notes)
                  for m in matches}
    pred_classes: list[CellClass] = []
    for det in detections.values():
        for c in det.classes:
            if c.name not in {p.name for p in pred_classes}:
                pred_classes.append(c)

    def features_for(m: Match, mapping: ClassMapping) -> list[dict]:
        det = detections[m.image.entry_id]
        colors = {c.name: c.color for c in mapping.classes}
        recoloured = Detections(det.xy, det.labels, det.scores, det.class_probs,
                                tuple(CellClass(c.name, colors[c.name]) for c in det.classes),
                                det.mpp)
        return detections_to_features(recoloured, shape=shape, radius_um=radius_um,
                                      mpp=m.image.mpp if m.image.mpp else det.mpp)

    def result_for(m: Match) -> ImageResult:
        det = detections[m.image.entry_id]
        return ImageResult(m.image.name, m.image.entry_id, m.prediction, det.counts(),
                           added=len(det))

    score = _score_key()
    if dry_run:
        mapping = map_classes(pred_classes, info.classes)
        report.classes, report.new_classes = mapping.classes, mapping.new
        report.notes += list(mapping.notes)
        report.results = [result_for(m) for m in matches]
        for r in report.results:
            r.status = "dry run"
        try:
            session, factory = _paquo_session(info.path, "r", opener, writer_factory)
            with session as qp_project:
                writer = factory(qp_project)
                for m, r in zip(matches, report.results, strict=True):
                    if not writer.can_save(r.entry_id):
                        r.status = ("dry run: would relink" if m.image.exists
                                    else "would be skipped: image file not found")
                    _, stubs = writer.detections(r.entry_id, score)
                    plan = plan_replacement(stubs, [])
                    r.removed, r.kept = len(plan.remove), len(plan.keep)
        except QpcellError as err:
            report.notes.append(f"earlier detections not counted: {err}")
        return report

    session, factory = _paquo_session(info.path, "r+", opener, writer_factory)
    with session as qp_project:
        writer = factory(qp_project)
        if opener is None:
            note = version_note(_paquo_version(), info.version)
            if note:
                report.notes.append(note)
        try:
            project_classes = list(writer.classes()) or list(info.classes)
        except Exception as err:  # noqa: BLE001 - fall back to classes.json
            log.debug("project classes through paquo: %s", err)
            project_classes = list(info.classes)
        mapping = map_classes(pred_classes, project_classes)
        report.classes, report.new_classes = mapping.classes, mapping.new
        report.notes += list(mapping.notes)

        todo: list[Match] = []
        relink: list[Match] = []
        for m in matches:
            if writer.can_save(m.image.entry_id):
                todo.append(m)
                continue
            if m.image.exists:  # found through --image-root or beside the moved project
                relink.append(m)
                todo.append(m)
                continue
            r = ImageResult(m.image.name, m.image.entry_id, m.prediction, {}, added=0,
                            status="skipped: image file not found")
            report.results.append(r)
            report.notes.append(
                f"{m.image.name}: QuPath (through paquo) saves objects only for images it can "
                f"open, and {m.image.original_path or m.image.uri} is not there; pass "
                "--image-root OLD=NEW (the part of the path to replace), relink the image in "
                f"QuPath, or import {m.prediction} with File > Import objects")
        if not todo:
            raise QpcellError(
                f"nothing written: none of the {len(matches)} matched image file(s) was found "
                f"(first: {matches[0].image.original_path or matches[0].image.uri}); pass "
                "--image-root OLD=NEW or relink the images in QuPath", info.path)
        features = {m.image.entry_id: features_for(m, mapping) for m in todo}
        report.backup = backup_project_data(info.root, [m.image.entry_id for m in todo],
                                            stamp=stamp)
        relinked: dict[str, str] = {}
        touched: list[str] = []
        try:
            for m in relink:
                old = writer.relink(m.image.entry_id, m.image.path)
                relinked[m.image.entry_id] = str(m.image.path)
                report.notes.append(f"{m.image.name}: relinked in the project from {old} to "
                                    f"{m.image.path} (QuPath saves objects only for images "
                                    "it finds; the backup holds the old project file)")
            writer.add_classes(mapping.new)
            rule = _positive_rule(index, pred_classes, positive_classes, negative_classes)
            for m in todo:
                objects, stubs = writer.detections(m.image.entry_id, score)
                plan = plan_replacement(stubs, features[m.image.entry_id])
                update = _readouts_update(detections[m.image.entry_id], m, rule, index)
                touched.append(m.image.entry_id)
                writer.replace(m.image.entry_id, [objects[i] for i in plan.remove], plan.add,
                               update=update)
                r = result_for(m)
                r.added, r.removed, r.kept = len(plan.add), len(plan.remove), len(plan.keep)
                r.measured = update.written.annotations
                r.hotspots = update.written.hotspots_added
                r.relinked = relinked.get(m.image.entry_id)
                if r.relinked:
                    r.status = "written (relinked)"
                report.results.append(r)
        except BaseException as err:
            # the project file (classes, links) is saved only after a run that did not fail;
            # the images saved so far are put back as they were
            restore_project_data(info.root, report.backup, touched)
            if isinstance(err, QpcellError):
                raise QpcellError(f"{err.message} (nothing changed: the images written "
                                  f"before were restored from {report.backup})",
                                  err.path) from None
            raise
    report.notes.append(RELOAD_NOTE)
    return report


def _positive_rule(index: Mapping, classes: Sequence[CellClass],
                   positive: Sequence[str] | str | None, negative: Sequence[str] | str | None):
    """The positive rule given, else the one ``qpcell predict`` used (``predictions.json``)."""
    from qpcell.readouts import positive_rule

    if not positive and not negative:
        saved = index.get("readouts") or {}
        positive, negative = saved.get("positive_classes"), saved.get("negative_classes")
    return positive_rule([c.name for c in classes], positive, negative)


class _ReadoutsUpdate:
    """``update(hierarchy)`` for ``Writer.replace``: qpcell's measurements on the image's
    area annotations and its hotspot annotations (:mod:`qpcell.io.qupath_readouts`)."""

    def __init__(self, det: Detections, mpp: float | None, rule, hotspots: list[dict]):
        from qpcell.io.qupath_readouts import ReadoutsWritten

        self.det, self.mpp, self.rule, self.hotspots = det, mpp, rule, hotspots
        self.written = ReadoutsWritten()

    def __call__(self, hierarchy: Any) -> None:
        from qpcell.io.qupath_readouts import write_annotation_readouts

        self.written = write_annotation_readouts(
            hierarchy, self.det.xy, self.det.labels, [c.name for c in self.det.classes],
            mpp=self.mpp, rule=self.rule, hotspots=self.hotspots)


def _readouts_update(det: Detections, m: Match, rule, index: Mapping) -> _ReadoutsUpdate:
    """The pixel size: the project's, else the prediction's, else what ``qpcell predict``
    recorded in ``predictions.json``."""
    from qpcell.io.qupath_readouts import read_hotspot_features

    entry = (index.get("images") or {}).get(m.prediction.name.rsplit(".", 1)[0]) or {}
    mpp = m.image.mpp or det.mpp or entry.get("mpp")
    return _ReadoutsUpdate(det, float(mpp) if mpp else None, rule,
                           read_hotspot_features(m.prediction))


def rgb_hex(color: RGB) -> str:
    """``#rrggbb`` of an RGB triple (for tables)."""
    r, g, b = (int(c) for c in color)
    return f"#{r:02x}{g:02x}{b:02x}"
