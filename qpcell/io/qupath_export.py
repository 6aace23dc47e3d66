"""The folder ``groovy/qpcell-train.groovy`` writes, read without Java.

``images.json`` lists the exported images (name, entry ID, URI, image file, pixel size),
``<stem>.geojson`` holds each image's annotations and ``classes.json`` the project's classes.
:func:`read_qupath_export` turns it into :class:`~qpcell.points.AnnotatedImage` s as
:func:`qpcell.io.paquo.read_qupath_project` does for a project.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qpcell.errors import QpcellError
from qpcell.io.qupath_project import (
    PROJECT_FILE,
    ProjectInfo,
    as_pure_path,
    candidate_paths,
    first_file,
    load_json,
    merge_point_classes,
    parse_image_root,
    read_path_classes,
    read_project_info,
    uri_to_path,
)
from qpcell.points import RGB, AnnotatedImage, CellClass

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
    data = load_json(index_path, EXPORT_INDEX)
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
            if not as_pure_path(stored).is_absolute():  # relative to the export folder
                options.append(folder / as_path)
            options += candidate_paths(as_pure_path(stored), roots, None, folder.parent)
        options += candidate_paths(uri_to_path(uri), roots, None, folder.parent)
        if from_project is not None and from_project.path is not None:
            options.append(from_project.path)
        image = first_file(options, options)
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
    classes = merge_point_classes(project_classes, used, colors)
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
