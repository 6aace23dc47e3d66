"""``qpcell predict``: a model folder + images or slides -> detections (GeoJSON, CSV, overlay)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from qpcell.cli._app import app, console, print_note, print_warning
from qpcell.errors import QpcellError


def run_prediction(model: Path, source: Path, out: Path, *, regions: str = "annotations",
                   device: str | None = None, batch_size: int | None = 4, tile_size: int = 512,
                   mpp: float | None = None, overwrite: bool = False, tissue: bool = True,
                   workers: int | None = None, show: bool = True,
                   region_geoms: list | None = None, jobs: list | None = None,
                   cluster: ClusterArgs | None = None, backend: str = "fast",
                   postprocess: str = "auto", readouts=None, views: str | None = None) -> list:
    """Load ``model``, predict every image of ``source`` into ``out``, show progress.

    ``region_geoms`` (shapely, full-resolution px) limits every image to those regions;
    ``jobs`` (``qpcell.predict.PredictionJob``) replaces the images found in ``source``.
    ``backend`` is the inference backend (:mod:`qpcell.inference`); ``views`` the test-time
    views (:mod:`qpcell.views`; None: the model's own); ``postprocess`` where
    the cells are found (:mod:`qpcell.device_cells`); ``batch_size=None`` picks it from the
    free memory of a CUDA device (else 4). ``cluster`` runs the
    images on Dask (:mod:`qpcell.cohort`) instead of in this process:
    images that fail there are listed, the others written, and a :class:`QpcellError`
    summarising the failures is raised at the end. ``readouts``
    (``qpcell.io.readouts.ReadoutOptions``) sets the positive classes and hotspots.
    """
    from qpcell.checkpoint import load_model
    from qpcell.device import describe
    from qpcell.inference import resolve_backend
    from qpcell.predict import Predictor, collect_jobs, predict_to_folder

    if tile_size % 16 or tile_size < 64:
        raise QpcellError(f"--tile-size {tile_size} must be a multiple of 16, at least 64")
    if batch_size is not None and batch_size < 1:
        raise QpcellError(f"--batch-size {batch_size} must be at least 1")
    if cluster is not None:
        return _run_on_cluster(model, source, out, cluster, regions=regions, device=device,
                               batch_size=batch_size or 4, tile_size=tile_size, mpp=mpp,
                               overwrite=overwrite, tissue=tissue, workers=workers, show=show,
                               region_geoms=region_geoms, jobs=jobs, backend=backend,
                               readouts=readouts, views=views)
    bundle = load_model(model, device=device)
    if jobs is None:
        jobs = collect_jobs(source, regions=regions, mpp=mpp)
    if region_geoms is not None:
        for job in jobs:
            job.regions = list(region_geoms)
    predictor = Predictor.from_bundle(bundle, name=str(Path(model).resolve()), backend=backend,
                                      postprocess=postprocess, views=views)
    _remove_leftovers(out, jobs)
    if batch_size is None:
        from qpcell.device_cells import auto_batch_size

        batch_size = auto_batch_size(bundle, tile_size, backend)
    if show:
        console.print(f"model [bold]{escape(bundle.name)}[/] ({len(bundle.classes)} classes, "
                      f"{bundle.mpp or 'native'} µm/px) on {describe(bundle.device)} "
                      f"({resolve_backend(backend, bundle.device)}, batch {batch_size}, "
                      f"views {predictor.info['views']}, "
                      f"cells found on {'the device' if predictor.batch_cells else 'the CPU'}); "
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
                    print_warning(f"{event.name}: {warning}")

        results = predict_to_folder(jobs, predictor, out, overwrite=overwrite,
                                    tile_size=tile_size, batch_size=batch_size, tissue=tissue,
                                    workers=workers, on_event=on_event,
                                    readouts=readouts)
    if show:
        _print_table(out, bundle.classes, results)
    return results


def _print_table(out: Path, classes, items: list) -> None:
    """Cells per class and image; failed images (``SlideFailure``) get their error."""
    names = [c.name for c in classes]
    table = Table(title=f"Cells found ({out})")
    table.add_column("image")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("total", justify="right")
    figures = [_whole_image_figures(getattr(r, "readouts", None)) for r in items]
    extra = [k for k in ("cells/mm²", "positive %", "hotspot %") if any(k in f for f in figures)]
    for k in extra:
        table.add_column(k, justify="right")
    table.add_column("status", style="dim")
    for r, fig in zip(items, figures, strict=True):
        if not hasattr(r, "counts"):
            table.add_row(escape(r.name), *("-" for _ in names), "-", *("-" for _ in extra),
                          f"[red]failed:[/] {escape(str(r.error))}")
            continue
        table.add_row(escape(r.name), *(str(r.counts.get(n, 0)) for n in names), str(r.n_cells),
                      *(fig.get(k, "-") for k in extra),
                      "skipped (exists)" if r.skipped else f"{r.seconds:.1f}s")
    console.print(table)
    if (out / "summary.csv").is_file():
        console.print(f"per region: {out / 'summary.csv'}", style="dim", highlight=False)


def _whole_image_figures(readouts: dict | None) -> dict[str, str]:
    """The whole-image density, positive % and hotspot % of a ``readouts`` entry."""
    out: dict[str, str] = {}
    regions = (readouts or {}).get("regions") or []
    if regions:
        m = regions[0].get("measurements", {})
        if "qpcell: cells per mm^2" in m:
            out["cells/mm²"] = f"{m['qpcell: cells per mm^2']:,.0f}"
        if regions[0].get("positive_percent") is not None:
            out["positive %"] = f"{regions[0]['positive_percent']:.1f}"
    for h in (readouts or {}).get("hotspots") or []:
        if h.get("kind") == "positive" and h.get("positive_percent") is not None:
            out["hotspot %"] = f"{h['positive_percent']:.1f}"
    return out


def _remove_leftovers(out: Path, jobs: list) -> None:
    """Delete the temporary files a killed run left for these images' outputs, with a note."""
    from qpcell.io.atomic import remove_leftover_temporaries
    from qpcell.predict import SUMMARY_FILE, output_paths

    names = [SUMMARY_FILE] + [p.name for j in jobs for p in output_paths(out, j.name).values()]
    removed, freed = remove_leftover_temporaries(out, names)
    if removed:
        print_note(f"{out}: removed {removed} temporary file(s) ({freed / 1e6:.1f} MB) that an "
                   "interrupted run left behind")


@dataclass(frozen=True)
class ClusterArgs:
    """Where ``qpcell predict`` runs on Dask: ``workers`` local processes, or ``scheduler``."""

    workers: int | None = None
    scheduler: str | None = None
    threads_per_worker: int = 1
    torch_threads: int | None = None
    retries: int = 1
    block_tiles: int = 256


def _run_on_cluster(model: Path, source: Path, out: Path, cluster: ClusterArgs, *,
                    regions: str, device: str | None, batch_size: int, tile_size: int,
                    mpp: float | None, overwrite: bool, tissue: bool, workers: int | None,
                    show: bool, region_geoms: list | None, jobs: list | None,
                    backend: str, readouts=None, views: str | None = None) -> list:
    from qpcell.checkpoint import load_model
    from qpcell.cohort import CohortOptions, cohort_client, predict_cohort
    from qpcell.io.readouts import ReadoutOptions
    from qpcell.predict import Predictor, collect_jobs

    bundle = load_model(model, device="cpu")  # checks the model; workers load their own
    if jobs is None:
        jobs = collect_jobs(source, regions=regions, mpp=mpp)
    if region_geoms is not None:
        for job in jobs:
            job.regions = list(region_geoms)
    predictor = Predictor.from_bundle(bundle, name=str(Path(model).resolve()), backend=backend,
                                      views=views)
    _remove_leftovers(out, jobs)
    options = CohortOptions(device=device, backend=backend, views=views, tile_size=tile_size,
                            batch_size=batch_size,
                            tissue=tissue, post_workers=workers,
                            torch_threads=cluster.torch_threads, retries=cluster.retries,
                            block_tiles=cluster.block_tiles,
                            readouts=readouts or ReadoutOptions())
    where = (f"Dask scheduler {cluster.scheduler}" if cluster.scheduler else
             f"a local Dask cluster of {cluster.workers} worker(s) x "
             f"{cluster.threads_per_worker} thread(s)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with cohort_client(workers=cluster.workers, scheduler=cluster.scheduler,
                       threads_per_worker=cluster.threads_per_worker) as client:
        if show:
            n_workers = len(client.scheduler_info().get("workers", {}))
            console.print(f"model [bold]{bundle.name}[/] ({len(bundle.classes)} classes, "
                          f"{bundle.mpp or 'native'} µm/px); {len(jobs)} image(s) on {where} "
                          f"({n_workers} worker(s) connected)", highlight=False)
        with Progress(*columns, console=console, disable=not show) as progress:
            task = progress.add_task("images", total=len(jobs), info="")
            failed = 0

            def on_event(event) -> None:
                nonlocal failed
                if event.kind == "split":
                    progress.console.print(f"{escape(event.name)}: {event.blocks} blocks of "
                                           "tiles", highlight=False)
                    return
                progress.advance(task)
                if event.kind == "fail":
                    failed += 1
                    progress.update(task, info=f"[red]{failed} failed[/]")
                    print_warning(f"failed: {event.name}: {event.error}")
                    return
                for warning in event.result.warnings:
                    print_warning(f"{event.name}: {warning}")

            outcome = predict_cohort(jobs, model, out, client, overwrite=overwrite,
                                     options=options, predictor=predictor, on_event=on_event)
    if show:
        _print_table(out, bundle.classes, outcome.items)
    failures = outcome.failures
    if failures:
        first = failures[0]
        raise QpcellError(f"{len(failures)} of {len(jobs)} image(s) failed (first: "
                          f"{first.name}: {first.error}); the others are in {out}")
    return outcome.results


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
    batch_size: int | None = typer.Option(None, help="Tiles per forward pass (default: from "
                                          "the free memory of a CUDA device, else 4)."),
    tile_size: int = typer.Option(512, help="Tile side in px at the model's scale."),
    backend: str = typer.Option("fast", help="Inference backend: 'fast' (bf16 on CPUs with "
                                "native bf16, else ONNX Runtime; autocast on GPUs), "
                                "'onnxruntime' (float32 CPU), 'torch-bf16', 'torch', 'eager'."),
    mpp: float | None = typer.Option(None, help="Pixel size (µm/px) of the images, overriding "
                                     "what the files say."),
    tissue: bool = typer.Option(True, help="Skip tiles without tissue (large images)."),
    workers: int | None = typer.Option(None, help="Post-processing threads."),
    tta: str = typer.Option("model", help="Test-time views whose maps are averaged: 'model' "
                            "(those its settings were tuned for: 'flips' when trained with "
                            "the default recipe), 'none' (one pass, fastest), 'flips' (4 "
                            "passes), 'dihedral' (8)."),
    postprocess: str = typer.Option("auto", help="Where cells are found in the maps: 'device' "
                                    "(where the model runs; only the cells come back), 'cpu' "
                                    "(numpy, in threads), 'auto' (the device on CUDA)."),
    overwrite: bool = typer.Option(False, help="Redo images whose outputs exist."),
    dask_workers: int | None = typer.Option(None, help="Run the images on a local Dask "
                                            "cluster of this many worker processes (one "
                                            "image per worker at a time).", min=1),
    scheduler: str | None = typer.Option(None, help="Run the images on an existing Dask "
                                         "cluster: scheduler address (tcp://host:8786) or "
                                         "scheduler file. Paths must be the same there."),
    threads_per_worker: int = typer.Option(1, help="With --dask-workers: Dask threads "
                                           "(images at a time) per worker process.", min=1),
    torch_threads: int | None = typer.Option(None, help="On Dask: torch threads per worker "
                                             "(default: the host's cores / its Dask "
                                             "threads).", min=1),
    retries: int = typer.Option(1, help="On Dask: extra attempts of a failed image.", min=0),
    block_tiles: int = typer.Option(256, help="On Dask: slides with more tiles are split "
                                    "into blocks of this many tiles.", min=1),
    positive_classes: str | None = typer.Option(None, help="Classes counted positive, "
                                                "comma-separated (e.g. Ki67-positive): adds "
                                                "the positive % per region."),
    negative_classes: str | None = typer.Option(None, help="Classes counted negative "
                                                "(default: every class not positive)."),
    hotspot_mm2: float | None = typer.Option(None, help="Find hotspots: circles of this "
                                             "area in mm² (px² without a pixel size) with "
                                             "the highest positive % and density.",
                                             min=0.0),
    hotspot_min_cells: int = typer.Option(500, help="Positive + negative cells a positive "
                                          "% hotspot must hold.", min=1),
    report: bool = typer.Option(True, help="Write <image>.report.png (regions, hotspots, "
                                "density maps, figures)."),
) -> None:
    """Detect and classify cells; write QuPath GeoJSON, CSV and overlay PNGs.

    Per image and region (each annotation it ran in) it also counts the cells of each
    class, their share and density, and with --positive-classes (against
    --negative-classes or all others) the positive %
    (e.g. the Ki67 index): summary.csv, <image>.report.png and predictions.json.
    """
    region_geoms = None
    if regions_file is not None:
        from qpcell.io.geojson import read_geojson

        region_geoms = read_geojson(regions_file).regions
        if not region_geoms:
            raise QpcellError("holds no unclassified polygon annotations to use as regions",
                              regions_file)
    if dask_workers is not None and scheduler is not None:
        raise QpcellError("give --dask-workers (a local cluster) or --scheduler (an existing "
                          "one), not both")
    cluster = None
    if dask_workers is not None or scheduler is not None:
        cluster = ClusterArgs(dask_workers, scheduler, threads_per_worker, torch_threads,
                              retries, block_tiles)
    readouts = readout_options(model, positive_classes, negative_classes, hotspot_mm2,
                               hotspot_min_cells, report)
    run_prediction(model, source, out, regions=regions, device=device, batch_size=batch_size,
                   tile_size=tile_size, mpp=mpp, overwrite=overwrite, tissue=tissue,
                   workers=workers, region_geoms=region_geoms, cluster=cluster,
                   backend=backend, postprocess=postprocess, readouts=readouts,
                   views=parse_tta(tta))


def parse_tta(value: str) -> str | None:
    """``--tta``: a set of test-time views (:data:`qpcell.views.VIEWS`), or None for
    ``model`` (the model's own)."""
    from qpcell.views import VIEWS

    if value == "model":
        return None
    if value not in VIEWS:
        raise QpcellError(f"--tta {value!r}: choose from model, {', '.join(VIEWS)}")
    return value


def readout_options(model: Path, positive: str | None, negative: str | None,
                    hotspot_mm2: float | None, min_cells: int, report: bool):
    """``ReadoutOptions`` from the command line, class names checked against the model."""
    from qpcell.io.readouts import ReadoutOptions
    from qpcell.readouts import positive_rule

    rule = None
    if positive or negative:
        from qpcell.checkpoint import classes_from_meta, read_config

        names = [c.name for c in classes_from_meta(read_config(model)["classes"])]
        rule = positive_rule(names, positive, negative)
    if hotspot_mm2 is not None and hotspot_mm2 <= 0:
        raise QpcellError(f"--hotspot-mm2 {hotspot_mm2} must be positive")
    return ReadoutOptions(rule, hotspot_mm2, min_cells, report)
