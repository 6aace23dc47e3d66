"""Cells in whole images and slides: tiles with a halo, batched maps, post-processing, outputs.

How a slide is covered
----------------------
The image is put on the model's pixel grid (``mpp`` µm/px, anchored at the image's (0, 0);
see :mod:`qpcell.io.slides`). That grid is cut into square *cores* of ``tile - 2·halo`` px; each
core is read with a ``halo`` px margin on every side (white beyond the image) and the
``tile`` x ``tile`` pixels go to the map function. The maps are cropped to the part inside the
image and post-processed; a cell is kept only by the tile whose core holds its centre
(half-open bounds ``[x0, x1)``), so every cell is found exactly once and, as long as the halo
covers what post-processing looks at (:func:`default_halo`), exactly where one whole-image
pass would have found it. Centres are then mapped to full-resolution QuPath pixels.

Only tiles whose core meets an annotated region (or, without regions, holds tissue on a
thumbnail, for images over ``TISSUE_MIN_PIXELS``) are read; with regions, only cells inside a
region are kept. Tiles are read in a background thread and post-processed in a thread pool
while the model works on the next batch (:func:`iter_plan`); memory stays bounded by a few
batches of maps, whatever the slide size.

The output folder
-----------------
``predict_to_folder`` writes, per image ``<stem>``: ``<stem>.csv``, ``<stem>.overlay.png``
(images up to :data:`~qpcell.io.outputs.OVERLAY_MAX_PIXELS` only) and, **last**,
``<stem>.geojson``, which marks the image as done: a re-run skips images whose GeoJSON exists
and was made from the same image file by the same model weights (unless ``overwrite``; see
:mod:`qpcell.prediction_reuse`), and an interrupted image (no GeoJSON) is simply predicted
again. A result that is predicted again is written beside the old one and replaces it only when
the image is complete (CSV, overlay, then GeoJSON): an interrupted re-run keeps the earlier
result whole. Every file is written atomically. The CSV and GeoJSON are streamed, tile by tile,
into their temporary files, so the cells of a slide are never all held in memory.
``predictions.json`` (model, classes, pixel sizes, counts per image) is rewritten after each
image. The read-outs per image and region (:mod:`qpcell.io.readouts`: ``summary.csv``,
``<stem>.measurements.tsv``, ``<stem>.report.png``, ``<stem>.hotspots.json``) are written
before the GeoJSON marker.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from qpcell import __version__
from qpcell.config import PAPER_MPP
from qpcell.errors import QpcellError
from qpcell.io.atomic import atomic_open
from qpcell.io.geojson import detections_to_features, read_geojson
from qpcell.io.outputs import (
    OVERLAY_MAX_PIXELS,
    csv_columns,
    read_json,
    write_json,
    write_overlay,
)
from qpcell.io.project import ANNOTATION_SUFFIX, read_project, scan_images, split_image_name
from qpcell.io.readouts import SUMMARY_CSV, ReadoutOptions, image_readouts, write_summary_csv
from qpcell.io.slides import Slide, open_slide, to_full_res
from qpcell.points import CellClass, Detections
from qpcell.prediction_reuse import (
    MODEL_KEY,
    model_fingerprint,
    predictor_fingerprint,
    reusable,
    stamp,
)
from qpcell.views import DEFAULT_VIEWS, VIEWS

MapFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
"""``tiles (B, h, w, 3) uint8 -> (det (B, h, w) float32, cls (B, C, h, w) float32 | None)``."""
PostprocessFn = Callable[[np.ndarray, np.ndarray | None], Detections]
"""``(det (h, w), cls (C, h, w) | None) -> Detections`` in the maps' own pixels."""
BatchCellsFn = Callable[[np.ndarray, np.ndarray, "TilePlan"], list[Detections]]
"""``(tiles (B, T, T, 3) uint8, cores (B, 4), plan) -> one Detections per tile`` (grid px, only
cells in the core): maps and post-processing in one step, e.g.
:class:`qpcell.device_cells.DeviceCells`, which keeps the maps on the model's device."""

#: The halo is at least this many µm (32 px at 0.44 µm/px): context for the network's edges.
MIN_HALO_UM = 32 * PAPER_MPP
#: Tissue detection is used only for images bigger than this (full-resolution pixels).
TISSUE_MIN_PIXELS = 4_000_000
#: Tile sizes are multiples of this (4 poolings by 2).
MULTIPLE = 16


def _ceil_to(v: float, m: int) -> int:
    return int(math.ceil(v / m - 1e-9)) * m


def default_halo(mpp: float | None, reach_px: int = 0) -> int:
    """Halo (px at ``mpp``) covering ``reach_px`` and at least :data:`MIN_HALO_UM` µm.

    Rounded up to a multiple of 8 so that ``tile - 2·halo`` stays a multiple of 16.
    """
    floor_px = MIN_HALO_UM / (mpp if mpp else PAPER_MPP)
    return _ceil_to(max(float(reach_px), floor_px), MULTIPLE // 2)


def _union(regions: Sequence[BaseGeometry] | None) -> BaseGeometry | None:
    if regions is None:
        return None
    geoms = [g for g in regions if g is not None and not g.is_empty]
    u = shapely.union_all(geoms) if geoms else shapely.Polygon()
    shapely.prepare(u)
    return u


@dataclass
class TilePlan:
    """Which tiles of a slide are predicted, on the model's pixel grid.

    Attributes
    ----------
    scale
        Full-resolution pixels per grid pixel.
    read_mpp
        ``mpp`` to pass to :meth:`Slide.read_grid` (``None`` = full resolution).
    grid
        ``(width, height)`` of the image on the grid.
    tile, halo
        Tile side given to the map function and the margin on each side (grid px).
    cores
        ``(N, 4)`` int64 ``(x0, y0, x1, y1)`` of each kept tile's core on the grid.
    n_total
        Number of tiles before skipping empty ones.
    """

    scale: float
    read_mpp: float | None
    grid: tuple[int, int]
    tile: int
    halo: int
    cores: np.ndarray
    n_total: int
    regions: BaseGeometry | None = None

    @property
    def core(self) -> int:
        return self.tile - 2 * self.halo

    def __len__(self) -> int:
        return len(self.cores)


def plan_tiles(slide: Slide, *, mpp: float | None, tile_size: int = 512, halo: int | None = None,
               reach_px: int = 0, regions: Sequence[BaseGeometry] | None = None,
               tissue: bool = True) -> TilePlan:
    """Tile layout for :func:`predict_slide` (see the module notes)."""
    if slide.mpp is not None and mpp is not None:
        read_mpp, scale = mpp, slide.scale_for(mpp)
    else:  # unknown pixel size: the image is taken to be at the model's resolution
        read_mpp, scale = None, 1.0
    gw, gh = slide.grid_size(read_mpp)
    halo = default_halo(mpp, reach_px) if halo is None else int(halo)
    if halo < 0:
        raise QpcellError(f"halo {halo} px is negative")
    tile = min(int(tile_size), _ceil_to(max(gw, gh) + 2 * halo, MULTIPLE))
    if tile % MULTIPLE:
        raise QpcellError(f"tile size {tile_size} is not a multiple of {MULTIPLE}")
    core = tile - 2 * halo
    if core < MULTIPLE:
        raise QpcellError(f"tile size {tile_size} px leaves no room inside a {halo} px halo; "
                          f"use a tile size of at least {2 * halo + 4 * MULTIPLE}")
    xs = np.arange(0, gw, core)
    ys = np.arange(0, gh, core)
    x0, y0 = (a.ravel() for a in np.meshgrid(xs, ys))  # row-major: rows of tiles
    cores = np.stack([x0, y0, np.minimum(x0 + core, gw), np.minimum(y0 + core, gh)], axis=1)
    n_total = len(cores)
    union = _union(regions)
    full = cores.astype(np.float64) * scale  # core boxes in full-resolution px
    if union is not None:
        keep = shapely.intersects(shapely.box(full[:, 0], full[:, 1], full[:, 2], full[:, 3]),
                                  union)
        cores = cores[keep]
    elif tissue and slide.width * slide.height > TISSUE_MIN_PIXELS:
        from qpcell.tissue import MIN_TISSUE_FRACTION, tissue_mask

        frac = tissue_mask(slide).fractions(full)
        cores = cores[frac >= MIN_TISSUE_FRACTION]
    return TilePlan(scale, read_mpp, (gw, gh), tile, halo, cores.astype(np.int64), n_total,
                    union)


def _read_batches(slide: Slide, plan: TilePlan, batch_size: int, stop: threading.Event,
                  readers: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(tiles (B, T, T, 3), cores (B, 4))``, read one batch ahead in a thread
    (the tiles of a batch by ``readers`` threads)."""
    q: queue.Queue = queue.Queue(maxsize=2)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(c: np.ndarray) -> np.ndarray:
        return slide.read_grid(int(c[0]) - plan.halo, int(c[1]) - plan.halo, plan.tile,
                               plan.tile, mpp=plan.read_mpp)

    def work() -> None:
        pool = ThreadPoolExecutor(readers, "qpcell-tile-read") if readers > 1 else None
        try:
            for i in range(0, len(plan.cores), batch_size):
                cores = plan.cores[i:i + batch_size]
                tiles = np.stack(list(pool.map(read, cores) if pool else map(read, cores)))
                if not put((tiles, cores)):
                    return
            put(None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(err)
        finally:
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)

    thread = threading.Thread(target=work, name="qpcell-tile-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _tile_cells(det: np.ndarray, cls: np.ndarray | None, core: np.ndarray, plan: TilePlan,
                postprocess_fn: PostprocessFn) -> Detections:
    """Cells of one tile whose centre lies in its core, in grid coordinates."""
    tx, ty = int(core[0]) - plan.halo, int(core[1]) - plan.halo  # tile origin on the grid
    gw, gh = plan.grid
    vx0, vy0 = max(0, -tx), max(0, -ty)
    vx1, vy1 = min(plan.tile, gw - tx), min(plan.tile, gh - ty)
    d = det[vy0:vy1, vx0:vx1]
    c = None if cls is None else cls[:, vy0:vy1, vx0:vx1]
    cells = postprocess_fn(d, c)
    if not len(cells):
        return cells
    u = cells.xy[:, 0] + (tx + vx0)
    v = cells.xy[:, 1] + (ty + vy0)
    keep = (u >= core[0]) & (u < core[2]) & (v >= core[1]) & (v < core[3])
    return Detections(np.stack([u, v], axis=1)[keep], cells.labels[keep], cells.scores[keep],
                      cells.class_probs[keep], cells.classes)


def predict_slide(slide: Slide, map_fn: MapFn, postprocess_fn: PostprocessFn, *,
                  mpp: float | None, classes: Sequence[CellClass] | None = None,
                  tile_size: int = 512, halo: int | None = None, reach_px: int = 0,
                  batch_size: int = 4, regions: Sequence[BaseGeometry] | None = None,
                  tissue: bool = True, workers: int | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  batch_cells: BatchCellsFn | None = None, readers: int = 1) -> Detections:
    """Detect cells in a whole image or slide, tile by tile.

    Parameters
    ----------
    slide
        The image (:func:`qpcell.io.slides.open_slide`).
    map_fn
        Probability maps of a batch of tiles (:data:`MapFn`), e.g.
        ``ModelBundle.predict_maps``.
    postprocess_fn
        Cells of one tile's maps (:data:`PostprocessFn`), e.g. ``ModelBundle.to_detections``.
    mpp
        µm/px the model works at; ``None`` (or an image of unknown pixel size) = the image's
        own pixels.
    classes
        The class list (for an empty result); default: taken from the first tile's cells.
    tile_size
        Side of the tiles given to ``map_fn`` (multiple of 16; halo included). Images smaller
        than a tile use one smaller tile.
    halo
        Margin on each side of a tile's core, px at ``mpp``; default :func:`default_halo`
        of ``reach_px``.
    reach_px
        How far (px at ``mpp``) post-processing looks around a cell
        (``PostprocessConfig.reach_px``).
    batch_size
        Tiles per ``map_fn`` call.
    regions
        Shapely polygons in full-resolution px: only tiles meeting them are read and only
        cells inside them are kept. ``None`` = the whole image.
    tissue
        Without regions, skip tiles without tissue (images over ``TISSUE_MIN_PIXELS`` only).
    workers
        Post-processing threads (default: up to 8, one per CPU).
    progress
        Called as ``progress(tiles_done, tiles_total)`` after each batch (and once at 0).
    batch_cells
        Maps and post-processing of a batch in one step (:data:`BatchCellsFn`), used
        instead of ``map_fn`` and ``postprocess_fn`` when given.
    readers
        Threads reading the tiles of a batch.

    Returns
    -------
    Detections
        Centres in full-resolution QuPath pixels (rows ordered tile by tile), ``mpp`` =
        the slide's pixel size.
    """
    plan = plan_tiles(slide, mpp=mpp, tile_size=tile_size, halo=halo, reach_px=reach_px,
                      regions=regions, tissue=tissue)
    return run_plan(slide, plan, map_fn, postprocess_fn, classes=classes, batch_size=batch_size,
                    workers=workers, progress=progress, batch_cells=batch_cells,
                    readers=readers)


def iter_plan(slide: Slide, plan: TilePlan, map_fn: MapFn, postprocess_fn: PostprocessFn, *,
              batch_size: int = 4, workers: int | None = None,
              progress: Callable[[int, int], None] | None = None,
              batch_cells: BatchCellsFn | None = None, readers: int = 1
              ) -> Iterator[Detections]:
    """The cells of a :class:`TilePlan`, one :class:`Detections` per tile, in plan order.

    Cells are in full-resolution px (``mpp`` = the slide's), limited to the plan's regions.
    Tiles are read in a background thread and post-processed in a pool of ``workers`` threads
    while ``map_fn`` runs on the next batch; at most ``2·workers + batch_size`` tiles' maps
    are held, and nothing is accumulated here, so memory does not grow with the slide.
    With ``batch_cells`` each batch goes through it instead, in one thread, while the caller
    handles the cells of the batch before.
    """
    if batch_size < 1:
        raise QpcellError(f"batch size {batch_size} must be at least 1")
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    total = len(plan)
    if progress:
        progress(0, total)
    pending: deque[Future] = deque()
    done = 0
    max_pending = 2 * workers + batch_size  # bounds the maps held in memory
    stop = threading.Event()

    def finish(cells: Detections) -> Detections:
        xy = to_full_res(cells.xy, plan.scale)
        out = Detections(xy, cells.labels, cells.scores, cells.class_probs, cells.classes,
                         slide.mpp)
        if plan.regions is not None and len(out):
            out = out.subset(shapely.contains_xy(plan.regions, xy[:, 0], xy[:, 1]))
        return out

    if batch_cells is not None:
        yield from _iter_batch_cells(slide, plan, batch_cells, batch_size, readers, progress,
                                     finish)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qpcell-post") as pool:
        try:
            for tiles, cores in _read_batches(slide, plan, batch_size, stop, readers):
                det, cls = map_fn(tiles)
                det = np.asarray(det)
                if det.shape != tiles.shape[:3]:
                    raise QpcellError(f"the model returned maps of shape {det.shape} for tiles "
                                      f"of shape {tiles.shape[:3]}")
                for i, core in enumerate(cores):
                    c = None if cls is None else np.asarray(cls[i])
                    pending.append(pool.submit(_tile_cells, det[i], c, core, plan,
                                               postprocess_fn))
                done += len(cores)
                if progress:
                    progress(done, total)
                # hand on finished tiles in order; wait only when too many are pending
                while pending and (len(pending) > max_pending or pending[0].done()):
                    yield finish(pending.popleft().result())
            while pending:
                yield finish(pending.popleft().result())
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise


def _iter_batch_cells(slide: Slide, plan: TilePlan, batch_cells: BatchCellsFn,
                      batch_size: int, readers: int,
                      progress: Callable[[int, int], None] | None,
                      finish: Callable[[Detections], Detections]) -> Iterator[Detections]:
    """:func:`iter_plan` through ``batch_cells``: one batch in its thread while the caller
    writes the cells of the one before."""
    stop = threading.Event()
    pending: deque[tuple[Future, int]] = deque()
    done = 0

    def collect(all_: bool) -> Iterator[Detections]:
        """The cells of finished batches (of every batch when ``all_``), in order."""
        nonlocal done
        while pending and (all_ or len(pending) > 1 or pending[0][0].done()):
            fut, n = pending.popleft()
            cells = fut.result()
            done += n
            if progress:
                progress(done, len(plan))
            yield from (finish(c) for c in cells)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qpcell-batch") as pool:
        try:
            for tiles, cores in _read_batches(slide, plan, batch_size, stop, readers):
                pending.append((pool.submit(batch_cells, tiles, cores, plan), len(cores)))
                yield from collect(False)
            yield from collect(True)
        except BaseException:
            stop.set()
            for fut, _ in pending:
                fut.cancel()
            raise


def run_plan(slide: Slide, plan: TilePlan, map_fn: MapFn, postprocess_fn: PostprocessFn, *,
             classes: Sequence[CellClass] | None = None, batch_size: int = 4,
             workers: int | None = None, progress: Callable[[int, int], None] | None = None,
             batch_cells: BatchCellsFn | None = None, readers: int = 1) -> Detections:
    """Run a :class:`TilePlan` (the second half of :func:`predict_slide`): all the cells of
    :func:`iter_plan` in one :class:`Detections`."""
    parts = list(iter_plan(slide, plan, map_fn, postprocess_fn, batch_size=batch_size,
                           workers=workers, progress=progress, batch_cells=batch_cells,
                           readers=readers))
    if classes is None:
        classes = parts[0].classes if parts else None
        if classes is None:
            raise QpcellError("no tile was predicted and no class list was given")
    return Detections.concatenate(parts, tuple(classes), slide.mpp)


# --------------------------------------------------------------------------------------------
# a model, jobs, and the output folder
# --------------------------------------------------------------------------------------------

def _backend_maps(predict_maps: MapFn, backend: str, tiles: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """``predict_maps(tiles)`` on the inference backend ``backend`` (:mod:`qpcell.inference`)."""
    from qpcell.inference import using_backend

    with using_backend(backend):
        return predict_maps(tiles)


@dataclass
class Predictor:
    """Everything :func:`predict_to_folder` needs from a model.

    Build it from a loaded checkpoint with :meth:`from_bundle`, or from plain callables
    (tests, other frameworks).
    """

    map_fn: MapFn
    postprocess_fn: PostprocessFn
    classes: tuple[CellClass, ...]
    mpp: float | None
    reach_px: int = 0
    name: str = "model"
    info: dict = field(default_factory=dict)
    batch_cells: BatchCellsFn | None = None
    readers: int = 1
    #: Pixel size (µm/px) for images that carry none: what training estimated for its own
    #: images without one (``config.json``: ``training.source_mpp``), else None.
    source_mpp: float | None = None

    @classmethod
    def from_bundle(cls, bundle, name: str | None = None, backend: str = "fast",
                    postprocess: str = "auto", views: str | None = None) -> Predictor:
        """From ``qpcell.checkpoint.ModelBundle`` (``load_model``); its maps are computed
        by the inference ``backend`` (:mod:`qpcell.inference`; ``"fast"``: bf16 PyTorch on
        CPUs with native bf16, else ONNX Runtime on CPUs, channels-last PyTorch with autocast
        on GPUs), averaged over the test-time ``views`` (:mod:`qpcell.views`; ``None``: the
        model's own) and post-processed where ``postprocess`` says
        (:func:`qpcell.device_cells.resolve_postprocess`: ``"auto"`` = on the device on CUDA).
        """
        from qpcell.device_cells import DeviceCells, resolve_postprocess
        from qpcell.inference import BACKENDS

        if backend not in BACKENDS:
            raise QpcellError(f"unknown inference backend {backend!r}; choose from "
                              f"{', '.join(BACKENDS)}")
        info = {}
        if views is not None and views != getattr(bundle, "views", DEFAULT_VIEWS):
            if views not in VIEWS:
                raise QpcellError(f"unknown test-time views {views!r}; choose from "
                                  f"{', '.join(VIEWS)}")
            bundle = replace(bundle, views=views)
            sha = model_fingerprint(getattr(bundle, "path", ""))
            if sha is not None:  # other maps: results of the model's own views are not reused
                info[MODEL_KEY] = f"{sha}+views={views}"
        reach = int(bundle.postprocess.reach_px)
        if getattr(bundle, "postprocess_kind", "sdrdin") == "peaks":
            peaks = bundle.meta.get("peaks", {})
            reach = max(reach, int(math.ceil(float(peaks.get("min_distance_px", 3)))) + 1)
        kind = getattr(bundle, "postprocess_kind", "sdrdin")
        on_device = resolve_postprocess(postprocess, bundle.device, kind) == "device"
        cuda = bundle.device.type == "cuda"
        return cls(partial(_backend_maps, bundle.predict_maps, backend), bundle.to_detections,
                   tuple(bundle.classes), bundle.mpp,
                   reach, name or str(getattr(bundle, "path", "model")),
                   {"architecture": getattr(bundle, "name", None),
                    "postprocess_kind": getattr(bundle, "postprocess_kind", None),
                    "views": getattr(bundle, "views", DEFAULT_VIEWS), **info},
                   DeviceCells(bundle, backend) if on_device else None,
                   min(4, os.cpu_count() or 1) if on_device and cuda else 1,
                   source_mpp=source_mpp_of(getattr(bundle, "meta", {}) or {}))


def source_mpp_of(meta: dict) -> float | None:
    """The pixel size a model's training estimated for images without one (µm/px), if any."""
    info = (meta.get("training") or {}).get("source_mpp") or {}
    value = info.get("value") if info.get("how") == "estimated" else None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def settle_pixel_size(slide: Slide, predictor: Predictor) -> list[str]:
    """Give a slide without a pixel size the one the model's training estimated for such
    images (:attr:`Predictor.source_mpp`); the warnings to show the user (the same on every
    call)."""
    slide.assume_mpp(predictor.source_mpp, "model")
    if slide.mpp_source == "model":
        return [f"pixel size unknown: taken to be {slide.mpp:.3g} µm/px, as training "
                f"estimated for its images without one (pass --mpp to set it)"]
    if slide.mpp is None and predictor.mpp is not None:
        return [f"pixel size unknown: taken to be the model's {predictor.mpp} µm/px (pass "
                f"--mpp to set it)"]
    return []


@dataclass
class PredictionJob:
    """One image to predict: its output name, file, optional regions and pixel size."""

    name: str
    image: Path
    regions: list[BaseGeometry] | None = None
    mpp: float | None = None


@dataclass
class ImageResult:
    """What happened to one image in :func:`predict_to_folder`."""

    name: str
    image: Path
    counts: dict[str, int]
    skipped: bool = False
    mpp: float | None = None
    seconds: float = 0.0
    tiles: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    readouts: dict = field(default_factory=dict)  # the "readouts" of predictions.json

    @property
    def n_cells(self) -> int:
        return int(sum(self.counts.values()))


@dataclass
class PredictEvent:
    """Progress report of :func:`predict_to_folder`.

    ``kind``: ``"start"`` (an image begins; ``total`` = its tiles), ``"tiles"`` (``done`` of
    ``total`` tiles), ``"done"`` or ``"skip"`` (``result`` set). ``index`` / ``n_images``
    count images.
    """

    kind: str
    name: str
    index: int
    n_images: int
    done: int = 0
    total: int = 0
    result: ImageResult | None = None


def collect_jobs(source: str | Path, *, regions: str = "annotations", mpp: float | None = None
                 ) -> list[PredictionJob]:
    """Images to predict from a file, a folder of images or a GeoJSON project folder.

    Parameters
    ----------
    source
        An image file; a folder of images; or a GeoJSON project (images + ``<stem>.geojson``):
        then pixel sizes come from its ``metadata.json`` and, with ``regions="annotations"``,
        predictions are limited to its unclassified polygon annotations (images without any
        are predicted whole).
    regions
        ``"annotations"`` or ``"none"``.
    mpp
        Pixel size (µm/px) for every image, overriding files and metadata.
    """
    if regions not in ("annotations", "none"):
        raise QpcellError(f"--regions must be 'annotations' or 'none', not {regions!r}")
    src = Path(source)
    if src.is_file():
        split = split_image_name(src.name)
        if split is None:
            raise QpcellError("not an image file qpcell reads", src)
        return [PredictionJob(split[0], src, None, mpp)]
    if not src.is_dir():
        raise QpcellError("no such image file or folder", src)
    images = scan_images(src)
    if not images:
        raise QpcellError("the folder holds no images", src)
    has_geojson = any((src / f"{stem}{ANNOTATION_SUFFIX}").is_file() for stem in images)
    if not has_geojson:
        return [PredictionJob(stem, path, None, mpp) for stem, path in images.items()]
    project = read_project(src, require_images=True)
    return [PredictionJob(img.name, Path(img.image),
                          img.regions if (regions == "annotations" and img.regions) else None,
                          mpp if mpp is not None else img.mpp)
            for img in project.images]


SUMMARY_FILE = "predictions.json"


def output_paths(out: Path, name: str) -> dict[str, Path]:
    """The files written for image ``name`` in ``out``."""
    return {"geojson": out / f"{name}.geojson", "csv": out / f"{name}.csv",
            "overlay": out / f"{name}.overlay.png"}


def _counts_of_geojson(path: Path, classes: Sequence[CellClass]) -> dict[str, int]:
    objs = read_geojson(path)
    counts = {c.name: 0 for c in classes}
    for name in objs.detection_class:
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


class _CellWriter:
    """Cells streamed into one image's CSV and QuPath GeoJSON, tile by tile.

    The rows and features are exactly those of :func:`qpcell.io.outputs.write_csv` and
    :func:`qpcell.io.geojson.write_detections` for all the cells at once, but only one
    tile's cells are ever formatted at a time: memory does not grow with the slide.
    """

    def __init__(self, table, geojson, classes: Sequence[CellClass], mpp: float | None) -> None:
        self.names = np.array([c.name for c in classes], dtype=object)
        self.mpp = mpp
        self.rows = csv.writer(table)
        self.rows.writerow(csv_columns(Detections.empty(classes, mpp)))
        self.geojson = geojson
        self.geojson.write('{"type":"FeatureCollection","features":[')
        self.first = True

    def add(self, det: Detections) -> None:
        if not len(det):
            return
        cols = [np.char.mod("%.3f", det.xy[:, 0]), np.char.mod("%.3f", det.xy[:, 1]),
                self.names[det.labels], np.char.mod("%.4f", det.scores)]
        cols += [np.char.mod("%.4f", det.class_probs[:, k]) for k in range(len(self.names))]
        if det.mpp is not None:
            cols += [np.char.mod("%.3f", det.xy[:, 0] * det.mpp),
                     np.char.mod("%.3f", det.xy[:, 1] * det.mpp)]
        self.rows.writerows(zip(*cols, strict=True))
        try:
            text = json.dumps(detections_to_features(det, mpp=self.mpp), allow_nan=False,
                              separators=(",", ":"))
        except ValueError as err:  # a NaN slipped through: never write JSON QuPath rejects
            raise QpcellError(f"cannot write GeoJSON: {err}") from None
        self.geojson.write(text[1:-1] if self.first else "," + text[1:-1])
        self.first = False

    def close(self) -> None:
        self.geojson.write("]}")


def start_summary(out: Path, jobs: Sequence[PredictionJob], predictor: Predictor,
                  overwrite: bool) -> dict:
    """Check ``jobs`` against the output folder ``out`` (created) and start its summary.

    Raises :class:`QpcellError` when two jobs share a name, or when ``out`` holds predictions
    of another model and not ``overwrite``. Entries of images predicted before are kept.
    """
    dupes = sorted(n for n, k in Counter(j.name for j in jobs).items() if k > 1)
    if dupes:
        raise QpcellError(f"several images are named {dupes[0]!r}; their outputs would clash")
    out.mkdir(parents=True, exist_ok=True)
    old = read_json(out / SUMMARY_FILE) or {}
    if old and old.get("model") != predictor.name:
        if not overwrite:
            raise QpcellError(f"holds predictions of another model ({old.get('model')}); use "
                              "--overwrite to replace them or another --out folder", out)
        old = {}
    return {
        "qpcell_version": __version__,
        "model": predictor.name,
        "model_info": predictor.info,
        "classes": [{"name": c.name, "color": list(c.color)} for c in predictor.classes],
        "model_mpp": predictor.mpp,
        "images": dict(old.get("images", {})),
    }


def predict_to_folder(jobs: Sequence[PredictionJob], predictor: Predictor, out: str | Path, *,
                      overwrite: bool = False, tile_size: int = 512, batch_size: int = 4,
                      halo: int | None = None, tissue: bool = True, workers: int | None = None,
                      overlay_max_pixels: int | None = None,
                      on_event: Callable[[PredictEvent], None] | None = None,
                      readouts: ReadoutOptions | None = None) -> list[ImageResult]:
    """Predict every job into ``out`` (see "The output folder" in the module notes).

    ``readouts`` (default: counts per region, a report, no hotspots) adds the figures of
    :mod:`qpcell.io.readouts`: ``summary.csv``, ``<stem>.report.png``, hotspots.

    Raises
    ------
    QpcellError
        Two jobs share a name, or ``out`` holds predictions of another model (and not
        ``overwrite``).
    """
    out = Path(out)
    summary = start_summary(out, jobs, predictor, overwrite)
    summary_path = out / SUMMARY_FILE
    readouts = readouts or ReadoutOptions()
    summary["readouts"] = readouts.to_json()
    limit = OVERLAY_MAX_PIXELS if overlay_max_pixels is None else overlay_max_pixels
    emit = on_event or (lambda event: None)
    results: list[ImageResult] = []
    model_sha = predictor_fingerprint(predictor)
    for index, job in enumerate(jobs):
        paths = output_paths(out, job.name)
        entry = summary["images"].get(job.name)
        if paths["geojson"].is_file() and not overwrite and reusable(entry, job.image,
                                                                     model_sha, job.mpp):
            counts = (entry or {}).get("counts")
            if counts is None:
                counts = _counts_of_geojson(paths["geojson"], predictor.classes)
            res = ImageResult(job.name, job.image, counts, skipped=True,
                              mpp=(entry or {}).get("mpp"),
                              readouts=(entry or {}).get("readouts") or {},
                              outputs={k: p for k, p in paths.items() if p.is_file()})
            results.append(res)
            emit(PredictEvent("skip", job.name, index, len(jobs), result=res))
            continue
        t0 = time.perf_counter()
        warns: list[str] = []
        with open_slide(job.image, mpp=job.mpp) as slide:
            warns += settle_pixel_size(slide, predictor)
            plan = plan_tiles(slide, mpp=predictor.mpp, tile_size=tile_size, halo=halo,
                              reach_px=predictor.reach_px, regions=job.regions, tissue=tissue)
            emit(PredictEvent("start", job.name, index, len(jobs), 0, len(plan)))

            def tick(done: int, total: int, _name=job.name, _i=index) -> None:
                emit(PredictEvent("tiles", _name, _i, len(jobs), done, total))

            small = slide.width * slide.height <= limit
            counts = np.zeros(len(predictor.classes), dtype=np.int64)
            kept: list[Detections] = []
            cells_xy: list[np.ndarray] = []  # centres and classes only, for the read-outs
            cells_class: list[np.ndarray] = []
            with contextlib.ExitStack() as files:  # exits in reverse: the GeoJSON goes last
                geojson = files.enter_context(atomic_open(paths["geojson"], "w",
                                                          encoding="utf-8"))
                table = files.enter_context(atomic_open(paths["csv"], "w", encoding="utf-8",
                                                        newline=""))
                writer = _CellWriter(table, geojson, predictor.classes, slide.mpp)
                tiles = files.enter_context(contextlib.closing(iter_plan(
                    slide, plan, predictor.map_fn, predictor.postprocess_fn,
                    batch_size=batch_size, workers=workers, progress=tick,
                    batch_cells=predictor.batch_cells, readers=predictor.readers)))
                for cells in tiles:
                    writer.add(cells)
                    counts += np.bincount(cells.labels, minlength=len(counts))
                    cells_xy.append(cells.xy.astype(np.float32))
                    cells_class.append(cells.labels.astype(np.int16))
                    if small:
                        kept.append(cells)
                writer.close()
                written = {"csv": paths["csv"]}
                if small:
                    write_overlay(paths["overlay"], slide.full_image(),
                                  Detections.concatenate(kept, predictor.classes, slide.mpp))
                    written["overlay"] = paths["overlay"]
                else:
                    paths["overlay"].unlink(missing_ok=True)
                    warns.append(f"no overlay: the image has {slide.width}x{slide.height} px "
                                 f"(overlays only up to {limit:,} px)")
                figures = image_readouts(out, job, slide, predictor.classes, cells_xy,
                                         cells_class, readouts, written)
                warns += figures.pop("warnings")
            written["geojson"] = paths["geojson"]
            counts_by_name = {c.name: int(k) for c, k in zip(predictor.classes, counts,
                                                              strict=True)}
            res = ImageResult(job.name, job.image, counts_by_name, mpp=slide.mpp,
                              seconds=time.perf_counter() - t0, tiles=len(plan),
                              outputs=written, warnings=warns, readouts=figures)
            summary["images"][job.name] = {
                "image": str(job.image), "mpp": slide.mpp, "mpp_source": slide.mpp_source,
                "size": [slide.width, slide.height], "regions": job.regions is not None,
                "tiles": len(plan), "tiles_total": plan.n_total, "n_cells": res.n_cells,
                "counts": res.counts, "seconds": round(res.seconds, 3),
                "outputs": {k: p.name for k, p in written.items()}, "warnings": warns,
                "readouts": figures, **stamp(job.image, model_sha)}
        write_json(summary_path, summary)
        write_summary_csv(out / SUMMARY_CSV, summary["images"])
        results.append(res)
        emit(PredictEvent("done", job.name, index, len(jobs), len(plan), len(plan), res))
    if not summary_path.is_file():
        write_json(summary_path, summary)
        write_summary_csv(out / SUMMARY_CSV, summary["images"])
    return results


__all__ = ["MapFn", "PostprocessFn", "BatchCellsFn", "TilePlan", "plan_tiles", "predict_slide",
           "run_plan", "iter_plan",
           "default_halo", "Predictor", "PredictionJob", "ImageResult", "PredictEvent",
           "collect_jobs", "predict_to_folder", "start_summary", "output_paths", "SUMMARY_FILE"]
