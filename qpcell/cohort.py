"""Cohorts on a Dask cluster: many slides, one task each, the output folder of ``qpcell predict``.

How the work is cut
-------------------
Every image is one Dask task (:func:`start_image`): a worker opens it, plans its tiles
(:func:`qpcell.predict.plan_tiles`) and, when the plan holds at most ``block_tiles`` tiles,
predicts it and writes its outputs. A bigger slide comes back as its plan: the client cuts the
plan's tiles (raster order) into blocks of ``block_tiles`` tiles, rounded to whole batches
(:func:`split_plan`), submits one task per block (:func:`run_block`, i.e.
:func:`qpcell.predict.run_plan` on part of the plan) and one task (:func:`finish_image`) that
concatenates the blocks' cells in order and writes the outputs. Each cell is kept only by the
tile whose core holds its centre, and every tile is in exactly one block, so the blocks give
the cells of the single-process run, in the same order, from the same batches of tiles.

The output folder
-----------------
The same files as :func:`qpcell.predict.predict_to_folder`. The **workers** write every image's
files (each atomically; the GeoJSON last: it marks the image done; an image's old GeoJSON is
removed before it is predicted again). The **client** alone writes ``predictions.json``, after
each image, so it has one writer. Finished images are skipped on the client before anything is
submitted (unless ``overwrite``). Client and workers must see the model folder, the images and
the output folder at the same paths (one machine, or a shared file system); paths are made
absolute on the client.

Models on workers
-----------------
No torch module is ever pickled: each worker process loads the model folder itself, once
(:func:`load_predictor`, cached by path, device and the files' modification times). Torch uses
``usable cores // Dask threads on that host`` threads per worker (:func:`worker_threads`); on a
machine with several GPUs, worker ``i`` of a local cluster takes GPU ``i mod n``.

Failures
--------
Each task is retried ``retries`` times (Dask ``retries=``); a worker that dies is replaced and
its task rerun by the scheduler. An image that still fails is reported as a
:class:`SlideFailure` and the other images go on; the run never stops at the first failure.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from qpcell.distributed import usable_cores
from qpcell.errors import QpcellError
from qpcell.io.readouts import SUMMARY_CSV, ReadoutOptions, image_readouts, write_summary_csv
from qpcell.points import CellClass, Detections
from qpcell.predict import (
    SUMMARY_FILE,
    ImageResult,
    PredictionJob,
    Predictor,
    TilePlan,
    output_paths,
    plan_tiles,
    run_plan,
    settle_pixel_size,
    start_summary,
)
from qpcell.prediction_reuse import predictor_fingerprint, reusable, stamp

#: Slides with more tiles than this (after skipping empty ones) are split into blocks.
DEFAULT_BLOCK_TILES = 256


@dataclass(frozen=True)
class CohortOptions:
    """How each image is predicted on the cluster (the options of ``qpcell predict``).

    Attributes
    ----------
    device
        Torch device on the workers (``None`` = best available there).
    backend
        Inference backend (:mod:`qpcell.inference`).
    views
        Test-time views (:mod:`qpcell.views`; ``None``: the model's own).
    tile_size, batch_size, halo, tissue, overlay_max_pixels
        As in :func:`qpcell.predict.predict_to_folder`.
    post_workers
        Post-processing threads per image (default: the worker's torch threads).
    torch_threads
        Torch threads per worker process (default: :func:`worker_threads`).
    block_tiles
        Slides with more tiles are split into blocks of about this many tiles.
    retries
        Extra attempts of a failed task before its image is reported as failed.
    readouts
        Counts per region, positive %, hotspots and the report (as ``qpcell predict``).
    """

    device: str | None = None
    backend: str = "fast"
    views: str | None = None
    tile_size: int = 512
    batch_size: int = 4
    halo: int | None = None
    tissue: bool = True
    overlay_max_pixels: int | None = None
    post_workers: int | None = None
    torch_threads: int | None = None
    block_tiles: int = DEFAULT_BLOCK_TILES
    retries: int = 1
    readouts: ReadoutOptions = field(default_factory=ReadoutOptions)


@dataclass
class SlideFailure:
    """An image that failed after all its attempts; ``error`` is one line."""

    name: str
    image: Path
    error: str


@dataclass
class CohortEvent:
    """Progress of :func:`predict_cohort`, in the order things happen on the client.

    ``kind``: ``"skip"`` (already done; ``result`` set), ``"split"`` (a big slide was cut into
    ``blocks`` blocks), ``"done"`` (``result`` set) or ``"fail"`` (``error`` set). ``index``
    and ``n_images`` count images in job order.
    """

    kind: str
    name: str
    index: int
    n_images: int
    result: ImageResult | None = None
    error: str | None = None
    blocks: int = 0


@dataclass
class CohortResult:
    """Every image's outcome, in job order, and the wall time of the run (s)."""

    items: list[ImageResult | SlideFailure]
    seconds: float = 0.0

    @property
    def results(self) -> list[ImageResult]:
        """Images predicted or skipped."""
        return [r for r in self.items if isinstance(r, ImageResult)]

    @property
    def failures(self) -> list[SlideFailure]:
        """Images that failed."""
        return [r for r in self.items if isinstance(r, SlideFailure)]


# --------------------------------------------------------------------------------------------
# on the workers
# --------------------------------------------------------------------------------------------

_CACHE: dict[str, tuple[tuple, Predictor]] = {}
_CACHE_LOCK = threading.Lock()


def _worker() -> tuple[str | None, int | None, int]:
    """``(host, index, nthreads)`` of the Dask worker running this code; ``(None, None, 1)``
    outside one. ``index`` is the worker's name when it is a number (local clusters)."""
    try:
        from distributed import get_worker
        from distributed.comm import get_address_host

        worker = get_worker()
    except (ImportError, ValueError):
        return None, None, 1
    name = worker.name
    index = name if isinstance(name, int) else (int(name) if str(name).isdigit() else None)
    return get_address_host(worker.address), index, int(worker.state.nthreads)


def worker_threads(torch_threads: int | None = None,
                   host_threads: dict[str, int] | None = None) -> int:
    """Torch threads for this worker process.

    ``torch_threads`` when given; else the usable cores shared among the Dask threads of
    every worker on this host (``host_threads``: host -> total threads, from the scheduler;
    a worker not listed counts its own threads only).
    """
    if torch_threads:
        return int(torch_threads)
    host, _, nthreads = _worker()
    share = (host_threads or {}).get(host, nthreads) if host else nthreads
    return max(1, usable_cores() // max(1, share))


def _worker_device(requested: str | None):
    """The device for this worker: a local cluster's worker ``i`` takes GPU ``i mod n``."""
    import torch

    from qpcell.device import pick_device

    device = pick_device(requested)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        _, index, _ = _worker()
        if index is not None:
            device = torch.device("cuda", index % torch.cuda.device_count())
    return device


def _stamp(folder: Path) -> tuple:
    """Modification times of a model folder's descriptions and weights (cache key)."""
    from qpcell.checkpoint import CONFIG, WEIGHTS

    files = [p for p in folder.rglob("*") if p.name in (CONFIG, WEIGHTS)]
    return tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


def load_predictor(model: str | Path, device: str | None = None,
                   threads: int | None = None, backend: str = "fast",
                   views: str | None = None) -> Predictor:
    """The model folder ``model`` as a :class:`~qpcell.predict.Predictor`, loaded once per
    process (reloaded when its files change); ``threads`` sets torch's CPU threads, ``views``
    the test-time views (None: the model's own)."""
    import torch

    from qpcell.checkpoint import load_model

    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))
    folder = Path(model).resolve()
    dev = _worker_device(device)
    key = f"{folder}|{dev}|{backend}|{views}"
    stamp = _stamp(folder) if folder.is_dir() else ()
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        for k in [k for k in _CACHE if k.startswith(f"{folder}|")]:
            del _CACHE[k]  # one model version per folder: frees a replaced model's memory
        predictor = Predictor.from_bundle(load_model(folder, device=dev), name=str(folder),
                                          backend=backend, views=views)
        _CACHE[key] = (stamp, predictor)
        return predictor


@dataclass
class SlideInfo:
    """What the first task learnt about an image, for its summary entry."""

    width: int
    height: int
    mpp: float | None
    mpp_source: str | None
    tiles: int
    tiles_total: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class SplitSlide:
    """Returned by :func:`start_image` for a slide to be predicted block by block."""

    info: SlideInfo
    plan: TilePlan
    seconds: float


@dataclass
class DoneImage:
    """An image whose outputs are written: its result and its ``predictions.json`` entry."""

    result: ImageResult
    entry: dict


def _open(job: PredictionJob, predictor: Predictor | None = None):
    from qpcell.io.slides import open_slide

    slide = open_slide(job.image, mpp=job.mpp)
    if predictor is not None:
        settle_pixel_size(slide, predictor)
    return slide


def start_image(job: PredictionJob, model: str, out: str, options: CohortOptions,
                host_threads: dict[str, int] | None = None) -> DoneImage | SplitSlide:
    """First task of an image (on a worker): plan it; predict and write it when small."""
    threads = worker_threads(options.torch_threads, host_threads)
    predictor = load_predictor(model, options.device, threads, options.backend,
                               options.views)
    t0 = time.perf_counter()
    output_paths(Path(out), job.name)["geojson"].unlink(missing_ok=True)  # the marker first
    with _open(job, predictor) as slide:
        warns = settle_pixel_size(slide, predictor)
        plan = plan_tiles(slide, mpp=predictor.mpp, tile_size=options.tile_size,
                          halo=options.halo, reach_px=predictor.reach_px, regions=job.regions,
                          tissue=options.tissue)
        info = SlideInfo(slide.width, slide.height, slide.mpp, slide.mpp_source, len(plan),
                         plan.n_total, warns)
        if len(plan) > options.block_tiles:
            return SplitSlide(info, plan, time.perf_counter() - t0)
        det = run_plan(slide, plan, predictor.map_fn, predictor.postprocess_fn,
                       classes=predictor.classes, batch_size=options.batch_size,
                       workers=options.post_workers or threads,
                       batch_cells=predictor.batch_cells, readers=predictor.readers)
        return _write_outputs(job, Path(out), det, info, options, slide, t0, 0.0)


def run_block(job: PredictionJob, model: str, plan: TilePlan, options: CohortOptions,
              host_threads: dict[str, int] | None = None) -> tuple[Detections, float]:
    """Cells of one block of a slide's tiles (on a worker): ``(cells, seconds)``."""
    import shapely

    threads = worker_threads(options.torch_threads, host_threads)
    predictor = load_predictor(model, options.device, threads, options.backend,
                               options.views)
    t0 = time.perf_counter()
    if plan.regions is not None:
        shapely.prepare(plan.regions)  # preparation does not survive pickling
    with _open(job, predictor) as slide:
        det = run_plan(slide, plan, predictor.map_fn, predictor.postprocess_fn,
                       classes=predictor.classes, batch_size=options.batch_size,
                       workers=options.post_workers or threads,
                       batch_cells=predictor.batch_cells, readers=predictor.readers)
    return det, time.perf_counter() - t0


def finish_image(job: PredictionJob, out: str, info: SlideInfo, classes: tuple[CellClass, ...],
                 options: CohortOptions, seconds: float, *blocks: tuple[Detections, float]
                 ) -> DoneImage:
    """Last task of a split slide (on a worker): join the blocks' cells, write the outputs."""
    t0 = time.perf_counter()
    det = Detections.concatenate([b[0] for b in blocks], classes, mpp=info.mpp)
    seconds += sum(b[1] for b in blocks)
    with _open(job) as slide:  # for the overlay of a small image and the report's thumbnail
        slide.assume_mpp(info.mpp, info.mpp_source or "assumed")  # as the first task settled it
        return _write_outputs(job, Path(out), det, info, options, slide, t0, seconds)


def _write_outputs(job: PredictionJob, out: Path, det: Detections, info: SlideInfo,
                   options: CohortOptions, slide, t0: float, seconds: float) -> DoneImage:
    """CSV, overlay (small images), read-outs, then the GeoJSON marker; as
    predict_to_folder does."""
    from qpcell.io.geojson import write_detections
    from qpcell.io.outputs import OVERLAY_MAX_PIXELS, write_csv, write_overlay

    paths = output_paths(out, job.name)
    limit = OVERLAY_MAX_PIXELS if options.overlay_max_pixels is None else \
        options.overlay_max_pixels
    warns = list(info.warnings)
    written = {"csv": paths["csv"]}
    write_csv(paths["csv"], det)
    if info.width * info.height <= limit:
        write_overlay(paths["overlay"], slide.full_image(), det)
        written["overlay"] = paths["overlay"]
    else:
        paths["overlay"].unlink(missing_ok=True)
        warns.append(f"no overlay: the image has {info.width}x{info.height} px "
                     f"(overlays only up to {limit:,} px)")
    figures = image_readouts(out, job, slide, det.classes, [det.xy], [det.labels],
                             options.readouts, written)
    warns += figures.pop("warnings")
    write_detections(paths["geojson"], det, mpp=info.mpp)
    written["geojson"] = paths["geojson"]
    seconds += time.perf_counter() - t0
    result = ImageResult(job.name, job.image, det.counts(), mpp=info.mpp, seconds=seconds,
                         tiles=info.tiles, outputs=written, warnings=warns, readouts=figures)
    entry = {"image": str(job.image), "mpp": info.mpp, "mpp_source": info.mpp_source,
             "size": [info.width, info.height], "regions": job.regions is not None,
             "tiles": info.tiles, "tiles_total": info.tiles_total, "n_cells": result.n_cells,
             "counts": result.counts, "seconds": round(seconds, 3),
             "outputs": {k: p.name for k, p in written.items()}, "warnings": warns,
             "readouts": figures}
    return DoneImage(result, entry)


# --------------------------------------------------------------------------------------------
# on the client
# --------------------------------------------------------------------------------------------

def split_plan(plan: TilePlan, block_tiles: int, batch_size: int = 1) -> list[TilePlan]:
    """Cut a plan's tiles, in their raster order, into blocks of about ``block_tiles`` tiles.

    The block size is rounded up to a multiple of ``batch_size``, so every batch of tiles is
    the one a single pass would run. Every tile is in exactly one block.
    """
    if block_tiles < 1 or batch_size < 1:
        raise QpcellError(f"block size {block_tiles} and batch size {batch_size} must be "
                          f"at least 1")
    size = -(-int(block_tiles) // batch_size) * batch_size
    return [replace(plan, cores=plan.cores[i:i + size]) for i in range(0, len(plan.cores), size)]


def _require_distributed():
    try:
        import distributed
    except ImportError:
        raise QpcellError("Dask distributed is not installed: pip install "
                          "'qpcell[cluster]' (or dask[distributed])") from None
    return distributed


def host_threads(client) -> dict[str, int]:
    """Dask threads per host of the workers connected to ``client``."""
    from distributed.comm import get_address_host

    totals: Counter = Counter()
    for address, worker in client.scheduler_info().get("workers", {}).items():
        totals[get_address_host(address)] += int(worker.get("nthreads", 1))
    return dict(totals)


@contextmanager
def cohort_client(*, workers: int | None = None, scheduler: str | None = None,
                  threads_per_worker: int = 1, processes: bool = True,
                  timeout: float = 30.0, quiet: bool = True) -> Iterator:
    """A Dask client: on a new local cluster of ``workers`` processes, or on the scheduler at
    ``scheduler`` (an address such as ``tcp://host:8786`` or a scheduler file).

    ``quiet`` keeps a local cluster's workers from logging the tracebacks of failed tasks
    (:func:`predict_cohort` reports every failure itself).

    Raises
    ------
    QpcellError
        Dask is not installed, the options are invalid, or the scheduler cannot be reached.
    """
    distributed = _require_distributed()
    if (workers is None) == (scheduler is None):
        raise QpcellError("give either a number of local workers or a scheduler address")
    if scheduler is not None:
        kwargs = ({"scheduler_file": scheduler} if Path(scheduler).is_file()
                  else {"address": scheduler})
        try:
            client = distributed.Client(**kwargs, timeout=f"{timeout}s")
        except (OSError, TimeoutError, ValueError) as err:
            raise QpcellError(f"cannot reach the Dask scheduler at {scheduler} "
                              f"({type(err).__name__}: {err})") from None
        try:
            yield client
        finally:
            client.close()
        return
    if workers < 1 or threads_per_worker < 1:
        raise QpcellError(f"{workers} workers with {threads_per_worker} threads each: both "
                          "must be at least 1")
    cluster = distributed.LocalCluster(n_workers=int(workers),
                                       threads_per_worker=int(threads_per_worker),
                                       processes=processes, dashboard_address=":0",
                                       silence_logs=logging.CRITICAL if quiet else logging.WARN)
    try:
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _one_line(err: BaseException) -> str:
    text = str(err) if isinstance(err, QpcellError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def _counts_of_geojson(path: Path, classes: Sequence[CellClass]) -> dict[str, int]:
    from qpcell.io.geojson import read_geojson

    counts = {c.name: 0 for c in classes}
    for name in read_geojson(path).detection_class:
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _absolute(job: PredictionJob) -> PredictionJob:
    return replace(job, image=Path(job.image).resolve())


def predict_cohort(jobs: Sequence[PredictionJob], model: str | Path, out: str | Path, client, *,
                   overwrite: bool = False, options: CohortOptions = CohortOptions(),
                   predictor: Predictor | None = None,
                   on_event: Callable[[CohortEvent], None] | None = None) -> CohortResult:
    """Predict every job into ``out`` on the Dask cluster of ``client`` (see the module notes).

    Parameters
    ----------
    jobs
        Images (:func:`qpcell.predict.collect_jobs`).
    model
        The model folder; every worker loads it from this path.
    out
        Output folder (the layout of :func:`qpcell.predict.predict_to_folder`).
    client
        A ``distributed.Client`` (:func:`cohort_client`).
    predictor
        The model as loaded on the client (its name, classes and pixel size go into
        ``predictions.json``); default: loaded here on the CPU.
    on_event
        Called with a :class:`CohortEvent` for every image skipped, split, done or failed.

    Returns
    -------
    CohortResult
        Failed images are in it, not raised: the caller decides how to report them.

    Raises
    ------
    QpcellError
        Two jobs share a name, or ``out`` holds predictions of another model (and not
        ``overwrite``).
    """
    from distributed import as_completed

    from qpcell.io.outputs import write_json

    t_start = time.perf_counter()
    model = str(Path(model).resolve())
    if predictor is None:
        from qpcell.checkpoint import load_model

        predictor = Predictor.from_bundle(load_model(model, device="cpu"), name=model,
                                          views=options.views)
    out = Path(out)
    if options.retries < 0 or options.block_tiles < 1:
        raise QpcellError(f"retries {options.retries} must be at least 0 and block tiles "
                          f"{options.block_tiles} at least 1")
    summary = start_summary(out, jobs, predictor, overwrite)
    summary["readouts"] = options.readouts.to_json()
    summary_path = out / SUMMARY_FILE
    emit = on_event or (lambda event: None)
    n = len(jobs)
    items: list[ImageResult | SlideFailure | None] = [None] * n
    workers_out = str(out.resolve())
    threads = host_threads(client)
    token = uuid.uuid4().hex[:8]
    pending: dict[str, tuple[int, str]] = {}  # future key -> (job index, stage)
    live: dict = {}  # future key -> future, of the start and finish tasks under way
    queue = as_completed()

    def submit(fn, *args, index: int, stage: str, part: str = ""):
        key = f"qpcell-{stage}-{token}-{index}{part}"
        future = client.submit(fn, *args, key=key, retries=options.retries, pure=False)
        if stage != "block":  # a block is held by its finish task, and released with it
            pending[future.key] = (index, stage)
            live[future.key] = future
            queue.add(future)
        return future

    model_sha = predictor_fingerprint(predictor)
    for index, job in enumerate(jobs):
        paths = output_paths(out, job.name)
        entry = summary["images"].get(job.name) or {}
        if paths["geojson"].is_file() and not overwrite and reusable(entry, job.image,
                                                                     model_sha, job.mpp):
            counts = entry.get("counts")
            if counts is None:
                counts = _counts_of_geojson(paths["geojson"], predictor.classes)
            res = ImageResult(job.name, job.image, counts, skipped=True, mpp=entry.get("mpp"),
                              outputs={k: p for k, p in paths.items() if p.is_file()},
                              readouts=entry.get("readouts") or {})
            items[index] = res
            emit(CohortEvent("skip", job.name, index, n, result=res))
            continue
        submit(start_image, _absolute(job), model, workers_out, options, threads, index=index,
               stage="start")

    try:
        for future in queue:
            index, stage = pending.pop(future.key)
            live.pop(future.key, None)
            job = jobs[index]
            if future.status != "finished":
                err = future.exception() if future.status == "error" else None
                items[index] = SlideFailure(job.name, job.image,
                                            _one_line(err) if err else future.status)
                emit(CohortEvent("fail", job.name, index, n, error=items[index].error))
                future.release()
                continue
            value = future.result()
            future.release()
            if isinstance(value, SplitSlide):
                blocks = split_plan(value.plan, options.block_tiles, options.batch_size)
                parts = [submit(run_block, _absolute(job), model, b, options, threads,
                                index=index, stage="block", part=f"-{k}")
                         for k, b in enumerate(blocks)]
                submit(finish_image, _absolute(job), workers_out, value.info,
                       tuple(predictor.classes), options, value.seconds, *parts, index=index,
                       stage="finish")
                emit(CohortEvent("split", job.name, index, n, blocks=len(blocks)))
                continue
            result = replace(value.result, image=job.image, outputs={
                k: out / Path(v).name for k, v in value.result.outputs.items()})
            summary["images"][job.name] = {**value.entry, "image": str(job.image),
                                           **stamp(job.image, model_sha)}
            write_json(summary_path, summary)
            write_summary_csv(out / SUMMARY_CSV, summary["images"])
            items[index] = result
            emit(CohortEvent("done", job.name, index, n, result=result))
    except BaseException:
        client.cancel(list(live.values()))
        raise
    finally:
        if not summary_path.is_file():
            write_json(summary_path, summary)
            write_summary_csv(out / SUMMARY_CSV, summary["images"])
    return CohortResult([it for it in items if it is not None], time.perf_counter() - t_start)


__all__ = ["CohortOptions", "CohortEvent", "CohortResult", "SlideFailure", "DEFAULT_BLOCK_TILES",
           "predict_cohort", "cohort_client", "split_plan", "load_predictor", "worker_threads",
           "usable_cores", "host_threads", "start_image", "run_block",
           "finish_image", "SlideInfo", "SplitSlide", "DoneImage"]
