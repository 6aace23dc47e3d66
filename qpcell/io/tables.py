"""Point tables in: ``x y class`` text files and ``x,y,class`` CSV files.

Two public dataset layouts are the models:

* EndoNuke: ``images/<id>.png``, ``labels/<id>.txt`` with one ``x y class`` line per cell
  (whitespace separated, class an integer id) and ``classes.txt`` (one name per line, line
  ``k`` names id ``k``);
* NuCLS (as shipped with CellViT++): ``train/`` and ``test/``, each holding ``images/`` and
  ``labels/<name>.csv`` with ``x,y,class`` lines, and ``classes.txt`` two levels up.

x is the column and y the row, in pixels of the image. The class column is an integer id
(mapped to a name through the class list) or a class name. A CSV may start with a header
row naming its columns (``x``, ``y`` and ``class`` / ``label`` / ``type`` / ``name``).

:func:`read_point_table` reads one table; :func:`import_tables` pairs a folder of tables
with its images and returns :class:`~qpcell.points.AnnotatedImage` objects ready for
:func:`~qpcell.io.project.write_project`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qpcell.errors import QpcellError
from qpcell.io.geojson import MAX_COORDINATE_PX, QuPathObjects, to_annotated_image
from qpcell.io.project import image_size, natural_key, scan_images
from qpcell.points import AnnotatedImage, CellClass, make_classes

__all__ = [
    "TABLE_FORMATS",
    "TableImport",
    "find_class_names",
    "import_tables",
    "read_class_names",
    "read_point_table",
    "read_tables",
    "resolve_dataset",
]

TABLE_FORMATS = ("auto", "txt", "csv")
_SUFFIX_FORMAT = {".txt": "txt", ".tsv": "txt", ".csv": "csv"}
_NOT_LABELS = {"classes.txt", "readme.txt", "license.txt", "labels.txt"}
_CLASS_COLUMNS = ("class", "label", "class_name", "classname", "type", "cell_type", "name",
                  "category")
_INT = re.compile(r"^[+-]?\d+(\.0*)?$")


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a ``classes.txt``: one per line, line ``k`` names class id ``k``.

    Blank lines and ``#`` comments are skipped.

    Raises
    ------
    QpcellError
        If the file is missing or empty, or a name is repeated.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise QpcellError("file not found", path) from None
    except UnicodeDecodeError:
        raise QpcellError("is not a text (UTF-8) file", path) from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise QpcellError("lists no class names", path)
    seen = set()
    for n in names:
        if n in seen:
            raise QpcellError(f"class {n!r} is listed twice", path)
        seen.add(n)
    return names


def _table_format(path: Path, fmt: str, first_line: str | None) -> str:
    if fmt not in TABLE_FORMATS:
        raise QpcellError(f"table format must be one of {', '.join(TABLE_FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    if path.suffix.lower() == ".csv":
        return "csv"
    return "csv" if first_line is not None and "," in first_line else "txt"


def _rows(lines: list[str], fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank, non-comment line."""
    numbered = [(k + 1, ln) for k, ln in enumerate(lines)
                if ln.strip() and not ln.lstrip().startswith("#")]
    if fmt == "txt":
        for k, ln in numbered:
            yield k, ln.split()
    else:
        reader = csv.reader(io.StringIO("\n".join(ln for _, ln in numbered)))
        for (k, _), fields in zip(numbered, reader, strict=False):
            yield k, [f.strip() for f in fields]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _looks_like_qupath_measurements(first_line: str) -> bool:
    """A header row as QuPath's measurement export writes it (Image, Name, Class, Parent,
    ROI, Centroid X µm, ...)."""
    cells = [c.strip().lower() for c in re.split(r"\t|,", first_line)]
    if any(c.startswith("centroid x") for c in cells):
        return True
    return {"image", "class", "roi"} <= set(cells) or {"image", "class", "parent"} <= set(cells)


def read_point_table(path: str | Path, *, fmt: str = "auto",
                     class_names: Sequence[str] | None = None
                     ) -> tuple[np.ndarray, list[str]]:
    """Read one point table.

    Parameters
    ----------
    path
        A ``x y class`` text file or a ``x,y,class`` CSV (optionally with a header row).
    fmt
        ``"txt"`` (whitespace separated), ``"csv"`` (comma separated) or ``"auto"``
        (``.csv`` files and files whose first line has a comma are CSV).
    class_names
        Names of the integer class ids (id ``k`` -> ``class_names[k]``); a class written as
        a name must then be one of them. ``None``: ids become their own names (``"0"``,
        ``"1"``, ...) and names are taken as written.

    Returns
    -------
    xy, names
        ``(N, 2)`` float64 points (x = column, y = row, pixels) and the class name of each.

    Raises
    ------
    QpcellError
        Naming ``file:line`` for a line that does not parse, a NaN or infinite coordinate,
        an empty class, a class id beyond ``class_names`` or a name not in it.

    Examples
    --------
    >>> xy, names = read_point_table("labels/1010.txt", class_names=["stroma", "epithelium",
    ...                              "other"])                          # doctest: +SKIP
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise QpcellError("file not found", path) from None
    except UnicodeDecodeError:
        raise QpcellError("is not a text (UTF-8) file, so not a point table", path) from None
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), None)
    if first is not None and _looks_like_qupath_measurements(first):
        raise QpcellError("this looks like a QuPath measurement table (Measure > Export "
                          "measurements), not a point table; export the points instead: "
                          "File > Export objects as GeoJSON (or the qpcell Groovy export), "
                          "then use the GeoJSON project", path)
    fmt = _table_format(path, fmt, first)
    names_list = list(class_names) if class_names is not None else None
    name_set = set(names_list) if names_list is not None else None
    cols = (0, 1, 2)
    width: int | None = 3
    xs: list[float] = []
    ys: list[float] = []
    out: list[str] = []
    layout = "x y class" if fmt == "txt" else "x,y,class"

    for n_row, (k, fields) in enumerate(_rows(lines, fmt)):
        where = f"{path}:{k}"
        if n_row == 0 and len(fields) >= 3 and not (_is_number(fields[0])
                                                    and _is_number(fields[1])):
            header = [f.lower() for f in fields]
            if "x" in header and "y" in header:
                cls_col = next((header.index(c) for c in _CLASS_COLUMNS if c in header), None)
                if cls_col is None:
                    raise QpcellError(f"the header has no class column (one of "
                                      f"{', '.join(_CLASS_COLUMNS)})", where)
                cols, width = (header.index("x"), header.index("y"), cls_col), len(fields)
                continue
        if len(fields) != width:
            raise QpcellError(f"expected {width} columns ({layout}), found {len(fields)}: "
                              f"{' '.join(fields)[:80]!r}", where)
        try:
            x, y = float(fields[cols[0]]), float(fields[cols[1]])
        except ValueError:
            raise QpcellError(f"x and y must be numbers, found {fields[cols[0]]!r} and "
                              f"{fields[cols[1]]!r}", where) from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise QpcellError(f"the point ({x}, {y}) has a NaN or infinite coordinate", where)
        if max(abs(x), abs(y)) > MAX_COORDINATE_PX:
            raise QpcellError(f"the point ({x:g}, {y:g}) lies beyond any image (coordinates "
                              f"up to {MAX_COORDINATE_PX:.0f} px)", where)
        cls = fields[cols[2]]
        if not cls:
            raise QpcellError("empty class name", where)
        if _INT.match(cls):
            idx = int(float(cls))
            if idx < 0:
                raise QpcellError(f"class index {idx} is negative", where)
            if names_list is not None:
                if idx >= len(names_list):
                    raise QpcellError(f"class index {idx} is beyond the {len(names_list)} "
                                      f"classes ({', '.join(names_list)}); ids start at 0",
                                      where)
                cls = names_list[idx]
            else:
                cls = str(idx)
        elif _is_number(cls):
            raise QpcellError(f"class {cls!r} is neither an integer id nor a name", where)
        elif name_set is not None and cls not in name_set:
            raise QpcellError(f"class {cls!r} is not one of the classes "
                              f"({', '.join(names_list)})", where)  # type: ignore[arg-type]
        xs.append(x)
        ys.append(y)
        out.append(cls)
    xy = np.column_stack([np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)])
    return xy.reshape(-1, 2), out


# ---------------------------------------------------------------------------- datasets


@dataclass
class TableImport:
    """The result of :func:`import_tables`; iterates over its images.

    Attributes
    ----------
    images
        One :class:`~qpcell.points.AnnotatedImage` per label table, natural order.
    classes
        The class list every image shares.
    warnings
        One line each: skipped or duplicate points, images without a table, ...
    labels_dir, images_dir
        Where the tables and the images were found.
    class_source
        Where the class names came from (``--classes``, a ``classes.txt`` path, or
        ``"class ids"`` / ``"class names in the tables"``).
    """

    images: list[AnnotatedImage]
    classes: tuple[CellClass, ...]
    warnings: list[str] = field(default_factory=list)
    labels_dir: Path | None = None
    images_dir: Path | None = None
    class_source: str = ""

    def __iter__(self) -> Iterator[AnnotatedImage]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> AnnotatedImage:
        return self.images[k]

    def counts(self) -> dict[str, int]:
        """Points per class name over all images."""
        total = dict.fromkeys((c.name for c in self.classes), 0)
        for img in self.images:
            for name, n in img.counts().items():
                total[name] += n
        return total


def _has_tables(folder: Path) -> bool:
    return any(p.suffix.lower() in _SUFFIX_FORMAT and p.name.lower() not in _NOT_LABELS
               and not p.name.startswith(".") for p in folder.iterdir() if p.is_file())


def resolve_dataset(source: str | Path, images: str | Path | None = None
                    ) -> tuple[list[Path] | Path, Path]:
    """Where the label tables and the images of ``source`` are.

    ``source`` may be a dataset folder holding ``labels/`` (and usually ``images/``), a
    folder of label tables, or one table file. Without ``images``: ``<dataset>/images``,
    else ``images/`` beside the labels folder, else the labels folder itself.

    Returns
    -------
    labels, images_dir
        The labels folder (or ``[file]`` for a single table) and the images folder.
    """
    source = Path(source)
    if not source.exists():
        raise QpcellError("no such file or folder", source)
    if source.is_file():
        labels: list[Path] | Path = [source]
        base = source.parent
    elif (source / "labels").is_dir():
        labels = base = source / "labels"
    elif _has_tables(source):
        labels = base = source
    else:
        subsets = sorted(p.name for p in source.iterdir()
                         if p.is_dir() and (p / "labels").is_dir())
        if subsets:
            raise QpcellError(f"holds the subsets {', '.join(s + '/' for s in subsets)}; import "
                              f"one of them, e.g. {source / subsets[0]}", source)
        raise QpcellError("holds no labels/ folder and no .txt/.csv point tables", source)
    if images is not None:
        images_dir = Path(images)
        if not images_dir.is_dir():
            raise QpcellError("images folder not found", images_dir)
    elif (source / "images").is_dir():
        images_dir = source / "images"
    elif (base.parent / "images").is_dir():
        images_dir = base.parent / "images"
    else:
        images_dir = base
    return labels, images_dir


def find_class_names(source: str | Path, labels_dir: Path) -> Path | None:
    """The ``classes.txt`` that names the class ids: in ``source``, beside the labels or up
    to two folders above them (``nucls-example/classes.txt`` for ``nucls-example/train``)."""
    source = Path(source)
    candidates = [source if source.is_dir() else source.parent, labels_dir,
                  labels_dir.parent, labels_dir.parent.parent]
    for folder in dict.fromkeys(candidates):
        if (folder / "classes.txt").is_file():
            return folder / "classes.txt"
    return None


def import_tables(source: str | Path, images: str | Path | None = None, *, fmt: str = "auto",
                  class_names: Sequence[str] | None = None, mpp: float | None = None,
                  check_bounds: bool = True, conflicts: str = "error") -> TableImport:
    """Read a folder of point tables and pair each table with its image (same stem).

    Parameters
    ----------
    source
        Dataset folder (with ``labels/``), labels folder, or one table; see
        :func:`resolve_dataset`.
    images
        Images folder; default: found beside the labels (:func:`resolve_dataset`).
    fmt
        ``"txt"``, ``"csv"`` or ``"auto"`` (see :func:`read_point_table`).
    class_names
        Names of class ids 0, 1, ...; ``None``: a ``classes.txt`` found by
        :func:`find_class_names`, else the ids (or names) in the tables.
    mpp
        Pixel size (µm/px) to record for every image.
    check_bounds
        Skip points outside the image, with a warning, when its size is cheaply known.
    conflicts
        Points of different classes at one spot: ``"error"``, ``"drop"`` (both go) or
        ``"first"`` (the first in the table stays); see
        :func:`~qpcell.io.geojson.drop_duplicate_points`.

    Returns
    -------
    TableImport
        Images (ready for :func:`~qpcell.io.project.write_project`), classes, warnings.
        Each image's points are grouped by class (in table order within a class): the
        order in which a written project reads back.

    Raises
    ------
    QpcellError
        If a table has no image, a line does not parse, a class id is beyond the class
        list, or two classes are annotated at the same spot.
    """
    if fmt not in TABLE_FORMATS:
        raise QpcellError(f"table format must be one of {', '.join(TABLE_FORMATS)}, not {fmt!r}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise QpcellError(f"pixel size {mpp} µm is not a positive number")
    labels, images_dir = resolve_dataset(source, images)
    if isinstance(labels, list):
        tables, labels_dir = labels, labels[0].parent
    else:
        labels_dir = labels
        wanted = {".txt", ".tsv", ".csv"} if fmt == "auto" else (
            {".txt", ".tsv"} if fmt == "txt" else {".csv"})
        tables = [p for p in labels_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in wanted
                  and p.name.lower() not in _NOT_LABELS and not p.name.startswith(".")]
    if not tables:
        raise QpcellError(f"holds no {'point tables' if fmt == 'auto' else fmt + ' files'}",
                          labels_dir)
    tables.sort(key=lambda p: natural_key(p.name))
    by_stem: dict[str, Path] = {}
    for t in tables:
        if t.stem in by_stem:
            raise QpcellError(f"two tables for one image: {by_stem[t.stem].name} and {t.name}",
                              labels_dir)
        by_stem[t.stem] = t

    found = scan_images(images_dir)
    missing = [s for s in by_stem if s not in found]
    if missing:
        raise QpcellError(f"no image for {len(missing)} label table(s): "
                          f"{', '.join(by_stem[s].name for s in missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} (looked for <name>.png, .tif, "
                          f"... in {images_dir})")
    warnings: list[str] = []
    unlabelled = sorted((s for s in found if s not in by_stem), key=natural_key)
    if unlabelled and isinstance(labels, Path):
        warnings.append(f"{images_dir}: {len(unlabelled)} image(s) have no label table and were "
                        f"not imported: {', '.join(found[s].name for s in unlabelled[:5])}"
                        f"{' ...' if len(unlabelled) > 5 else ''}")

    if class_names is not None:
        names_given: list[str] | None = list(class_names)
        class_source = "--classes"
    else:
        cfile = find_class_names(source, labels_dir)
        names_given = read_class_names(cfile) if cfile is not None else None
        class_source = str(cfile) if cfile is not None else ""
    if names_given is not None:
        classes = make_classes(names_given)

    read = {s: read_point_table(t, fmt=fmt, class_names=names_given)
            for s, t in by_stem.items()}
    if names_given is None:
        used = list(dict.fromkeys(n for _, names in read.values() for n in names))
        if all(_INT.match(n) for n in used):
            used.sort(key=int)
            class_source = "class ids"
        else:
            class_source = "class names in the tables"
        classes = make_classes(used)

    out = []
    for stem, (xy, names) in read.items():
        image = found[stem]
        objs = QuPathObjects(point_xy=xy, point_class=list(names), path=by_stem[stem])
        img = to_annotated_image(objs, stem, classes=classes, source="points", image=image,
                                 mpp=mpp, image_size=image_size(image) if check_bounds else None,
                                 conflicts=conflicts)
        # grouped by class (stable), the order write_points stores and reading gives back
        order = np.argsort(img.labels, kind="stable")
        img.xy, img.labels = img.xy[order], img.labels[order]
        img.metadata["table"] = str(by_stem[stem])
        warnings += img.metadata["warnings"]
        out.append(img)
    return TableImport(images=out, classes=classes, warnings=warnings, labels_dir=labels_dir,
                       images_dir=images_dir, class_source=class_source)


def read_tables(source: str | Path, *, fmt: str = "auto",
                class_names: Sequence[str] | None = None) -> TableImport:
    """Point tables as annotations without images (for scoring; :func:`import_tables` pairs
    them with images for training).

    ``source`` is what ``qpcell import`` accepts (a dataset folder with ``labels/``, a folder
    of tables or one table); class ids are named by ``class_names``, else a ``classes.txt``
    found by :func:`find_class_names`, else the ids themselves.

    Raises
    ------
    QpcellError
        As :func:`read_point_table`, naming ``file:line``; or if there is no table.
    """
    labels, _ = resolve_dataset(source)
    if isinstance(labels, list):
        tables, labels_dir = labels, labels[0].parent
    else:
        labels_dir = labels
        tables = sorted((p for p in labels_dir.iterdir()
                         if p.is_file() and p.suffix.lower() in _SUFFIX_FORMAT
                         and p.name.lower() not in _NOT_LABELS and not p.name.startswith(".")),
                        key=lambda p: natural_key(p.name))
    if not tables:
        raise QpcellError("holds no point tables", labels_dir)
    class_source = "--classes"
    if class_names is None:
        cfile = find_class_names(source, labels_dir)
        class_names = read_class_names(cfile) if cfile is not None else None
        class_source = str(cfile) if cfile is not None else "class ids"
    read = {t.stem: read_point_table(t, fmt=fmt, class_names=class_names) for t in tables}
    used = list(class_names) if class_names is not None else sorted(
        {n for _, names in read.values() for n in names},
        key=lambda n: (0, int(n), "") if _INT.match(n) else (1, 0, n))
    classes = make_classes(used)
    images, warnings = [], []
    for table, (stem, (xy, names)) in zip(tables, read.items(), strict=True):
        objs = QuPathObjects(point_xy=xy, point_class=list(names), path=table)
        img = to_annotated_image(objs, stem, classes=classes, source="points")
        warnings += img.metadata["warnings"]
        images.append(img)
    return TableImport(images=images, classes=classes, warnings=warnings,
                       labels_dir=labels_dir, class_source=class_source)
