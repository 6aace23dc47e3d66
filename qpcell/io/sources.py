"""Where training data come from: a QuPath project, its Groovy export, or a GeoJSON project."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qpcell.errors import QpcellError
from qpcell.points import AnnotatedImage, CellClass


def load_source(path: str | Path, *, classes: Sequence[CellClass] | None = None,
                images: Sequence[str] | None = None, image_root: dict[str, str] | None = None,
                notes: list[str] | None = None,
                ) -> tuple[tuple[CellClass, ...], list[AnnotatedImage]]:
    """Annotated images and their class list from ``path``.

    Parameters
    ----------
    path
        A QuPath project (``project.qpproj`` or its folder; read through paquo, needs
        QuPath), the folder ``groovy/qpcell-train.groovy`` exports (``images.json`` +
        GeoJSON, no QuPath needed), or a GeoJSON project folder (images + ``<stem>.geojson``,
        as ``qpcell import`` writes).
    classes
        Class list to map a GeoJSON project's names onto (default: the project's own).
    images
        Only these image names (stems), if given.
    image_root
        ``{old_prefix: new_prefix}`` to remap moved image files of a QuPath project.
    notes
        If given, receives one line per image skipped and why.
    """
    from qpcell.io.paquo import read_qupath_project
    from qpcell.io.qupath_export import is_qupath_export, read_qupath_export
    from qpcell.io.qupath_project import is_qupath_project

    path = Path(path)
    if not path.exists():
        raise QpcellError("no such file or folder", path)
    if is_qupath_project(path):
        found_classes, found = read_qupath_project(path, images=images, image_root=image_root,
                                                   notes=notes)
    elif is_qupath_export(path):
        found_classes, found = read_qupath_export(path, images=images, image_root=image_root,
                                                  notes=notes)
    elif path.is_dir():
        from qpcell.io.project import read_project

        project = read_project(path, classes=classes, source="points")
        found_classes, found = project.classes, list(project.images)
        if notes is not None:
            notes.extend(project.warnings)
        if images:
            wanted = set(images)
            missing = sorted(wanted - {a.name for a in found})
            if missing:
                raise QpcellError(f"--images names images that are not in the project: {missing}",
                                  path)
            found = [a for a in found if a.name in wanted]
    else:
        raise QpcellError("expected a QuPath project (project.qpproj), a qpcell export folder "
                          "or a GeoJSON project folder (images + <stem>.geojson)", path)
    if not found:
        raise QpcellError("no annotated images found", path)
    return tuple(found_classes), found
