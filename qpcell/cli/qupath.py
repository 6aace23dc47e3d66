"""``qpcell annotate-back``: write ``qpcell predict`` detections into a QuPath project."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from qpcell.annotate import AnnotateReport, annotate_back, check_options, rgb_hex
from qpcell.cli._app import app, console

DRY_RUN_NOTE = "dry run: nothing was written"


def split_names(value: str | Sequence[str] | None) -> list[str] | None:
    """``--images a.svs,b.svs`` (or repeated) as a list; ``None`` when not given."""
    if not value:
        return None
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    return names or None


def print_annotate_report(report: AnnotateReport) -> None:
    """The tables and notes ``annotate-back`` prints (also for ``predict --project``)."""
    title = ("Would write (dry run)" if report.dry_run else "Written") + f" into {report.project}"
    table = Table(title=title, title_justify="left")
    for name, justify in (("image", "left"), ("file", "left"), ("cells", "right"),
                          ("per class", "left"), ("replaced", "right"), ("kept", "right"),
                          ("status", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for r in report.results:
        per_class = "\n".join(f"{escape(k)} {v}" for k, v in r.counts.items() if v)
        table.add_row(escape(r.name), escape(r.prediction.name), str(r.added), per_class or "-",
                      "?" if r.removed is None else str(r.removed),
                      "?" if r.kept is None else str(r.kept), r.status)
    console.print(table)
    console.print("cells: new qpcell detections; replaced: qpcell's earlier detections "
                  "removed; kept: other detections left as they were", style="dim",
                  highlight=False)
    if report.classes:
        classes = Table(title="Classes", title_justify="left")
        classes.add_column("class", overflow="fold")
        classes.add_column("colour")
        classes.add_column("in project")
        new = {c.name for c in report.new_classes}
        for c in report.classes:
            hexa = rgb_hex(c.color)
            classes.add_row(escape(c.name), f"[{hexa}]■[/] {hexa}",
                            ("added" if not report.dry_run else "will be added")
                            if c.name in new else "yes")
        console.print(classes)
    measured = [r for r in report.results if r.measured or r.hotspots]
    if measured:
        console.print("read-outs ('qpcell: Num <class>', '<class> %', 'per mm^2', 'positive "
                      "%') on " + "; ".join(f"{r.name}: {r.measured} annotation(s)"
                                           + (f", {r.hotspots} hotspot(s)" if r.hotspots else "")
                                           for r in measured), highlight=False, soft_wrap=True)
    if report.backup is not None:
        console.print(f"backup of the changed image data: {escape(str(report.backup))}",
                      highlight=False)
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    if report.dry_run:
        console.print(DRY_RUN_NOTE)


def run_annotate_back(predictions: Path, project: Path, *, images: list[str] | None = None,
                      dry_run: bool = False, shape: str = "circle", radius_um: float = 4.0,
                      image_root: list[str] | None = None,
                      positive_classes: str | None = None,
                      negative_classes: str | None = None) -> AnnotateReport:
    """Write a folder of predictions into ``project`` and print what happened.

    This is what ``annotate-back`` runs; a command that predicts first (``--model``) calls
    it with its output folder.
    """
    report = annotate_back(predictions, project, images=images, dry_run=dry_run, shape=shape,
                           radius_um=radius_um, image_root=image_root or None,
                           positive_classes=positive_classes, negative_classes=negative_classes)
    print_annotate_report(report)
    return report


def predict_project(model: Path, project: Path, out: Path, *, images: list[str] | None,
                    image_root: list[str] | None, device: str | None, overwrite: bool,
                    mpp: float | None = None, positive_classes: str | None = None,
                    negative_classes: str | None = None) -> None:
    """Run ``model`` on every image of a QuPath project (read without Java) into ``out``.

    ``mpp`` (µm/px) replaces the pixel size the project records for every image.
    """
    from qpcell.cli.predict import readout_options, run_prediction
    from qpcell.errors import QpcellError
    from qpcell.io.qupath_project import image_stem, read_project_info, select_images
    from qpcell.predict import PredictionJob

    info = read_project_info(project, image_root=image_root or None)
    entries = select_images(info.images, images) if images else info.images
    missing = [e.name for e in entries if not e.exists]
    if missing:
        raise QpcellError(f"image file(s) not found: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} (use --image-root OLD=NEW)",
                          project)
    jobs = [PredictionJob(image_stem(e.name), e.path, None, mpp or e.mpp) for e in entries]
    readouts = readout_options(model, positive_classes, negative_classes, None, 500, True)
    run_prediction(model, project, out, device=device, overwrite=overwrite, jobs=jobs,
                   readouts=readouts)


@app.command("annotate-back")
def annotate_back_command(
    paths: Annotated[list[Path], typer.Argument(
        help="PREDICTIONS PROJECT: the output folder of qpcell predict (<image>.geojson per "
        "image) and the QuPath project (project.qpproj or its folder); with --model, only "
        "PROJECT.", show_default=False)],
    model: Annotated[Path | None, typer.Option(
        "--model", help="Predict with this model folder first (every project image, whole "
        "image / tissue), then write the cells.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="With --model: where predictions go (default: "
        "<project folder>/qpcell/predictions).")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="With --model: cpu, cuda, mps (default: best available).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="With --model: predict again images already predicted.")] = False,
    mpp: Annotated[float | None, typer.Option(
        "--mpp", help="With --model: the images' pixel size in µm/px, in place of what the "
        "project says (for images QuPath has none for).")] = None,
    images: Annotated[list[str] | None, typer.Option(
        "--images", help="Only these images (name, name without extension, or entry ID); "
        "comma-separated or repeated.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would change, write nothing (works without "
        "QuPath).")] = False,
    shape: Annotated[str, typer.Option(
        "--shape", help="Detection outline: circle or point.")] = "circle",
    radius_um: Annotated[float, typer.Option(
        "--radius-um", help="Circle radius in µm.")] = 4.0,
    image_root: Annotated[list[str] | None, typer.Option(
        "--image-root", help="OLD=NEW prefix to remap moved images (repeatable).")] = None,
    positive_classes: Annotated[str | None, typer.Option(
        "--positive-classes", help="Classes counted positive for 'qpcell: positive %' "
        "(comma-separated; default: those given to qpcell predict).")] = None,
    negative_classes: Annotated[str | None, typer.Option(
        "--negative-classes", help="Classes counted negative (default: all others).")] = None,
) -> None:
    """Write detected cells into a QuPath project as classified detections.

    Each cell becomes a detection with its class, the class colour and the
    measurements 'qpcell: score' and 'qpcell: p(<class>)', placed inside the
    annotation that contains it. A rerun replaces qpcell's earlier detections
    on that image and nothing else. Every area annotation gets the read-outs
    'qpcell: Num <class>', 'qpcell: <class> %', 'qpcell: <class> per mm^2' and,
    with positive classes, 'qpcell: positive %' (its own measurements stay);
    hotspots found by qpcell predict --hotspot-mm2 become annotations classified
    'qpcell hotspot'. The image data is backed up to
    <project>/qpcell-backups/ first. Needs QuPath (found through paquo);
    without it, run groovy/qpcell-detect.groovy inside QuPath instead.
    """
    from qpcell.errors import QpcellError

    check_options(shape, radius_um, mpp)
    if mpp is not None and model is None:
        raise QpcellError("--mpp is for --model (the pixel size to predict at); predictions "
                          "already made carry their own")
    if model is not None:
        if len(paths) != 1:
            raise QpcellError("with --model give only the QuPath project "
                              "(qpcell annotate-back --model MODEL project.qpproj)")
        project = paths[0]
        folder = project if project.is_dir() else project.parent
        predictions = out or folder / "qpcell" / "predictions"
        predict_project(model, project, predictions, images=split_names(images),
                        image_root=image_root, device=device, overwrite=overwrite, mpp=mpp,
                        positive_classes=positive_classes, negative_classes=negative_classes)
    elif len(paths) != 2:
        raise QpcellError("give PREDICTIONS and PROJECT (or --model MODEL and PROJECT)")
    else:
        predictions, project = paths
    run_annotate_back(predictions, project, images=split_names(images), dry_run=dry_run,
                      shape=shape, radius_um=radius_um, image_root=image_root,
                      positive_classes=positive_classes, negative_classes=negative_classes)
