"""``qpcell predict``: a model folder + images or slides -> detections (GeoJSON, CSV, overlay)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from qpcell.cli._app import app, console, err_console
from qpcell.errors import QpcellError


def run_prediction(model: Path, source: Path, out: Path, *, regions: str = "annotations",
                   device: str | None = None, batch_size: int = 4, tile_size: int = 512,
                   mpp: float | None = None, overwrite: bool = False, tissue: bool = True,
                   workers: int | None = None, show: bool = True,
                   region_geoms: list | None = None, jobs: list | None = None) -> list:
    """Load ``model``, predict every image of ``source`` into ``out``, show progress.

    ``region_geoms`` (shapely, full-resolution px) limits every image to those regions;
    ``jobs`` (``qpcell.predict.PredictionJob``) replaces the images found in ``source``.
    """
    from qpcell.checkpoint import load_model
    from qpcell.device import describe
    from qpcell.predict import Predictor, collect_jobs, predict_to_folder

    if tile_size % 16 or tile_size < 64:
        raise QpcellError(f"--tile-size {tile_size} must be a multiple of 16, at least 64")
    if batch_size < 1:
        raise QpcellError(f"--batch-size {batch_size} must be at least 1")
    bundle = load_model(model, device=device)
    if jobs is None:
        jobs = collect_jobs(source, regions=regions, mpp=mpp)
    if region_geoms is not None:
        for job in jobs:
            job.regions = list(region_geoms)
    predictor = Predictor.from_bundle(bundle, name=str(Path(model).resolve()))
    if show:
        console.print(f"model [bold]{bundle.name}[/] ({len(bundle.classes)} classes, "
                      f"{bundle.mpp or 'native'} µm/px) on {describe(bundle.device)}; "
                      f"{len(jobs)} image(s)", highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not show) as progress:
        images_task = progress.add_task("images", total=len(jobs))
        tiles_task = progress.add_task("tiles", total=1)

        def on_event(event) -> None:
            if event.kind == "start":
                progress.reset(tiles_task, total=max(event.total, 1),
                               description=f"tiles of {event.name}")
            elif event.kind == "tiles":
                progress.update(tiles_task, completed=event.done, total=max(event.total, 1))
            elif event.kind in ("done", "skip"):
                progress.advance(images_task)
                for warning in event.result.warnings:
                    err_console.print(f"[yellow]warning:[/] {event.name}: {warning}",
                                      highlight=False)

        results = predict_to_folder(jobs, predictor, out, overwrite=overwrite,
                                    tile_size=tile_size, batch_size=batch_size, tissue=tissue,
                                    workers=workers, on_event=on_event)
    if show:
        names = [c.name for c in bundle.classes]
        table = Table(title=f"Cells found ({out})")
        table.add_column("image")
        for n in names:
            table.add_column(n, justify="right")
        table.add_column("total", justify="right")
        table.add_column("", style="dim")
        for r in results:
            table.add_row(r.name, *(str(r.counts.get(n, 0)) for n in names), str(r.n_cells),
                          "skipped (exists)" if r.skipped else f"{r.seconds:.1f}s")
        console.print(table)
    return results


@app.command("predict")
def predict_command(
    model: Path = typer.Argument(..., help="Model folder written by `qpcell train`."),
    source: Path = typer.Argument(..., help="An image or slide, a folder of them, or a "
                                  "GeoJSON project folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    regions: str = typer.Option("annotations", help="'annotations': only inside the "
                                "unclassified polygon annotations of a GeoJSON project "
                                "(or --regions-file); 'none': the whole image / tissue."),
    regions_file: Path | None = typer.Option(None, help="QuPath GeoJSON whose polygon "
                                             "annotations limit the prediction (one image)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, mps (default: best "
                                      "available)."),
    batch_size: int = typer.Option(4, help="Tiles per forward pass."),
    tile_size: int = typer.Option(512, help="Tile side in px at the model's scale."),
    mpp: float | None = typer.Option(None, help="Pixel size (µm/px) of the images, overriding "
                                     "what the files say."),
    tissue: bool = typer.Option(True, help="Skip tiles without tissue (large images)."),
    workers: int | None = typer.Option(None, help="Post-processing threads."),
    overwrite: bool = typer.Option(False, help="Redo images whose outputs exist."),
) -> None:
    """Detect and classify cells; write QuPath GeoJSON, CSV and overlay PNGs."""
    region_geoms = None
    if regions_file is not None:
        from qpcell.io.geojson import read_geojson

        region_geoms = read_geojson(regions_file).regions
        if not region_geoms:
            raise QpcellError("holds no unclassified polygon annotations to use as regions",
                              regions_file)
    run_prediction(model, source, out, regions=regions, device=device, batch_size=batch_size,
                   tile_size=tile_size, mpp=mpp, overwrite=overwrite, tissue=tissue,
                   workers=workers, region_geoms=region_geoms)
