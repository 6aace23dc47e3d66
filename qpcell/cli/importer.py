"""``qpcell import``: point tables -> a GeoJSON project folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from qpcell.cli._app import app, console, print_warning
from qpcell.errors import QpcellError

MAX_WARNINGS = 50


def print_warnings(warnings: list[str], limit: int = MAX_WARNINGS) -> None:
    """Each warning as one yellow line on stderr (at most ``limit``, then a count)."""
    for w in warnings[:limit]:
        print_warning(w)
    if len(warnings) > limit:
        print_warning(f"... and {len(warnings) - limit} more warnings")


@app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(
        metavar="LABELS_OR_DATASET_DIR",
        help="A dataset folder holding labels/ (and images/), a folder of point tables, or "
             "one table. NuCLS-style datasets: point at train/ or test/.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="GeoJSON project folder to write.")],
    images: Annotated[Path | None, typer.Option(
        "--images", help="Folder of the images (default: images/ beside labels/).")] = None,
    fmt: Annotated[str, typer.Option(
        "--format",
        help="Table format: txt ('x y class', whitespace), csv ('x,y,class') or auto.")
    ] = "auto",
    classes: Annotated[str | None, typer.Option(
        "--classes",
        help="Names of class ids 0,1,2,... e.g. 'stroma,epithelium,other' (default: a "
             "classes.txt beside or above the labels, else the ids themselves).")] = None,
    mpp: Annotated[float | None, typer.Option(
        "--mpp", help="Pixel size in µm per pixel, recorded in metadata.json.")] = None,
    link: Annotated[bool, typer.Option(
        "--link", help="Symlink the images instead of copying them.")] = False,
    on_conflict: Annotated[str, typer.Option(
        "--on-conflict", help="Points of different classes at one spot: error (stop and "
        "name the first), drop (drop them all) or first (keep the first in the table); "
        "drop and first report how many were affected.")] = "error",
) -> None:
    """Turn point tables (x, y, class per cell) into a GeoJSON project for training.

    Writes OUT/<image>.png (or .tif, ...), OUT/<image>.geojson, classes.json, metadata.json.

    Check the points in QuPath: File > Import objects, then pick the .geojson.
    """
    from qpcell.io.geojson import CONFLICTS
    from qpcell.io.project import check_new_folder, write_project
    from qpcell.io.tables import TABLE_FORMATS, import_tables

    if on_conflict not in CONFLICTS:
        raise QpcellError(f"--on-conflict {on_conflict!r}: choose from {', '.join(CONFLICTS)}")
    check_new_folder(out)
    if fmt not in TABLE_FORMATS:
        raise QpcellError(f"--format must be one of {', '.join(TABLE_FORMATS)}, not {fmt!r}")
    names = None
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
        if any(not n for n in names):
            raise QpcellError(f"--classes {classes!r} has an empty class name")
    result = import_tables(source, images, fmt=fmt, class_names=names, mpp=mpp,
                           conflicts=on_conflict)
    write_project(out, result.images, copy_images=not link)
    print_warnings(result.warnings)

    counts = result.counts()
    console.print(f"Imported {len(result.images)} images into {escape(str(out))}",
                  highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("class")
    table.add_column("points", justify="right")
    for name, n in counts.items():
        table.add_row(escape(name), f"{n:,}")
    table.add_row("[bold]total[/]", f"[bold]{sum(counts.values()):,}[/]")
    console.print(table)
    console.print(f"classes from {escape(result.class_source)}; images "
                  f"{'linked' if link else 'copied'} from {escape(str(result.images_dir))}"
                  + (f"; {mpp} µm/px" if mpp is not None else "; pixel size not set (--mpp)"),
                  highlight=False, soft_wrap=True)
