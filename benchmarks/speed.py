"""Prediction speed and memory: model forward alone against the whole ``qpcell predict`` pipeline.

What is measured, in one run, on the same tiles
-----------------------------------------------
The tiles are the ones ``qpcell predict`` reads for a square block of ``--tiles`` tile cores
in the middle of a pyramidal slide (``--slide``; by default a 20,000 x 20,000 px mosaic of
EndoNuke tiles at 0.44 µm/px written by ``benchmarks/make_slide.py``), each 512 x 512 px with
its halo, at the model's pixel size.

* **conv reference**: sustained GMAC/s of one large 3x3 convolution (1x64x512x512 -> 64
  channels) in every backend available here (eager fp32, channels-last fp32, channels-last
  bf16 where the CPU has bf16 instructions, ONNX Runtime); the fastest is the machine's
  reference, and the model's achieved GMAC/s (``qpcell.models.gmacs``) is reported as a share
  of it.
* **eager forward**: ``model(x)`` alone, PyTorch eager, batch 1, fp32, on each tile (already
  a float tensor): ms per tile, Mpx/s (tile pixels) and GMAC/s.
* **default forward**: ``ModelBundle.predict_maps`` (``qpcell.inference``'s default backend)
  on the same tiles in batches of ``--batch-size``, uint8 in, maps out.
* **fp32 forward**: the same through the float32 ONNX Runtime backend (the default before
  bf16), for before/after in one run.
* **post-processing**: ``ModelBundle.to_detections`` on each tile's maps (ms per tile, and as
  a share of the eager and of the default model time).
* **pipeline**: ``qpcell.predict.predict_to_folder`` through ``Predictor.from_bundle`` on the
  slide, limited to the block (a region): reading, resampling, forward, post-processing and
  writing GeoJSON/CSV. Mpx/s counts *image* pixels (tile cores, at the model's scale), so halo
  overlap is a cost. ``pipeline_vs_forward`` = pipeline Mpx/s / eager-forward Mpx/s.
* **post-processing on the device** (:mod:`qpcell.device_cells`, ``qpcell predict
  --postprocess device``, the default on CUDA): *model only* = uint8 tiles in, maps left on
  the device (copy + forward, what the network costs), as ms per tile and minutes per cm² of
  the block; the same batches' post-processing there (``postprocess_device``); the whole
  pipeline again with cells found on the device, as min/cm² and as a multiple of model-only
  time; and each stage alone, per tile: read, copy, forward (model-only runs, each stage
  waited for), post-process (device and CPU), write (CSV + GeoJSON of the block's cells).
  ``pipeline_cpu_postprocess_vs_device`` > 1 means the device path is the faster one.
* **slide runs** (each in a fresh subprocess, for its peak memory, ``VmHWM``): the pipeline
  on a centred square of ``--slide-region`` tile cores (or ``--full-slide``), as Mpx/s at the
  slide's own pixel size and minutes per cm² of tissue (1 cm² = 1e8 µm²), with the resident
  memory sampled as tiles complete; optionally the same region on a ``--big-slide``
  (60,000 px) to show that memory does not grow with the slide.

``--tile-size`` (default 512, as ``qpcell predict``) sets the tile side, halo included, for
every figure: larger tiles spend less of each forward pass on the halo.

On CUDA (``--device cuda``) the conv reference runs on the GPU (batch 16, float32 with TF32 as
PyTorch allows it, and bf16), every timing waits for the GPU (``torch.cuda.synchronize``), the
default forward is the ``"torch"`` backend (channels-last, bf16 autocast) and the fp32 forward
is the module itself, batched, without autocast: batching and mixed precision are then read
off the same table.

The model is ``--model`` (a folder from ``qpcell train``), by default an S-DRDIN
(base 16) briefly trained on EndoNuke (``.cache/bench/model-endonuke``, trained here when
missing: a few epochs, so that its maps, and so the post-processing time, look like a real
model's; throughput itself does not depend on training).

Usage::

    .venv/bin/python benchmarks/speed.py --json speed.json          # about 10 min, 2 cores
    .venv/bin/python benchmarks/speed.py --quick                    # a minute or two
    .venv/bin/python benchmarks/speed.py --full-slide --big-slide .cache/bench/endonuke-60k.ome.tif
    .venv/bin/python benchmarks/speed.py --tile-size 1024 --tiles 4 --slide-region 7
    python benchmarks/speed.py --device cuda --full-slide --tiles 64 --batch-size 16
    python benchmarks/speed.py --device cuda --tiles 64 --batch-size 32 --postprocess cpu
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

CACHE = REPO / ".cache" / "bench"
DEFAULT_MODEL = CACHE / "model-endonuke"
DEFAULT_SLIDE = CACHE / "endonuke-20k.ome.tif"
TILE = 512
UM2_PER_CM2 = 1e8


#: The float32 backend timed beside the default one (the default before bf16).
FP32_BACKEND = "onnxruntime"


# --------------------------------------------------------------------------- machine

def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def memory_kb(field: str = "VmHWM") -> int:
    """A ``/proc/self/status`` memory figure in kB (``VmHWM``: peak resident; ``VmRSS``)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _synchronize(device) -> None:
    """Wait for queued GPU work (timings of CUDA calls are otherwise only launch times)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def conv_reference(repeats: int = 3, size: int = 512, channels: int = 64,
                   device: str = "cpu") -> dict:
    """GMAC/s of one ``channels -> channels`` 3x3 convolution on ``size``² px, per backend.

    On CUDA: batch 16 (one image does not fill a GPU), float32 (TF32 where cuDNN allows it,
    PyTorch's default for convolutions) and bf16, ten calls per timing.
    """
    import torch

    from qpcell.device import cpu_has_bf16

    cuda = torch.device(device).type == "cuda"
    batch, calls = (16, 10) if cuda else (1, 1)
    macs = batch * calls * size * size * channels * channels * 9 / 1e9
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval().to(device)
    x = torch.rand(batch, channels, size, size, device=device)
    out: dict[str, float] = {}

    def run(name, module, inp):
        def call():
            for _ in range(calls):
                module(inp)
            _synchronize(device)

        with torch.inference_mode():
            call()
            out[name] = round(macs / _median_time(call, max(repeats, 5 if cuda else 1)), 2)

    run("torch eager fp32", conv, x)
    cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    run("torch channels-last fp32", cl, xcl)
    if cuda or cpu_has_bf16():
        run("torch channels-last bf16", copy.deepcopy(cl).to(torch.bfloat16),
            xcl.to(torch.bfloat16))
    if cuda:
        return out
    try:
        import onnxruntime as ort

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(conv, (x,), buf, input_names=["x"], opset_version=17,
                              dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        sess.run(None, {"x": xn})
        out["onnxruntime fp32"] = round(macs / _median_time(lambda: sess.run(None, {"x": xn}),
                                                            repeats), 2)
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------- inputs
def ensure_model(path: Path, epochs: int, steps: int) -> tuple[Path, str]:
    """A model folder at ``path``: reused, or an S-DRDIN (base 16) briefly trained here."""
    from qpcell.checkpoint import read_config

    if (path / "config.json").is_file():
        cfg = read_config(path)
        return path, cfg.get("training", {}).get("source", "given model folder")
    from qpcell.config import TrainConfig
    from qpcell.train import train

    root = Path(os.environ.get("QPCELL_DATA", REPO.parent / "shared" / "data")) / "endonuke"
    if (root / "labels").is_dir():
        from qpcell.io.tables import import_tables

        data = import_tables(root, mpp=0.44)
        images, classes = list(data.images), data.classes
        source = f"EndoNuke ({len(images)} tiles, taken as 0.44 µm/px)"
    else:
        from qpcell.synthetic import synthetic_classes, synthetic_dataset

        pairs = synthetic_dataset(60, (256, 256), 4, seed=0)
        images, classes = [a for a, _ in pairs], synthetic_classes(4)
        source = "synthetic mIHC (EndoNuke not found)"
    # every 7th image is left out of training (a test set for accuracy checks)
    names = [im.name for im in images]
    train_images = [im for i, im in enumerate(images) if i % 7]
    val = [im.name for i, im in enumerate(train_images) if i % 6 == 0]
    print(f"training a model for the benchmark on {source}: {epochs} epochs x {steps} steps")
    train(train_images, classes, path, model_mpp=0.44, train_cfg=TrainConfig(epochs=epochs),
          max_steps_per_epoch=steps, val_names=val, device="cpu",
          extra_meta={"benchmark": {"source": source, "test_images":
                                    [n for i, n in enumerate(names) if i % 7 == 0]}})
    return path, source


def model_source(path: Path) -> str:
    from qpcell.checkpoint import read_config

    cfg = read_config(path)
    bench = cfg.get("benchmark") or {}
    tr = cfg.get("training") or {}
    return (f"{cfg['model']['name']} base {cfg['model'].get('base')}, "
            f"{len(cfg['classes'])} classes, trained {tr.get('epoch')} epoch(s) on "
            f"{bench.get('source', 'unknown data')} (val F1 {tr.get('val_f1', float('nan')):.3f})")


def ensure_slide(path: Path, size: int, period: int = 0) -> Path:
    if path.is_file():
        return path
    sys.path.insert(0, str(REPO / "benchmarks"))
    import make_slide

    args = ["--size", str(size), "--out", str(path)]
    if period:
        args += ["--period", str(period)]
    make_slide.main(args)
    return path


def block_region(plan, k: int):
    """A box (full-resolution px) over ``k x k`` tile cores in the middle of ``plan``'s grid,
    inset by half a pixel so that it meets no other core; and its area in grid px."""
    import shapely

    core = plan.core
    gw, gh = plan.grid
    cx = max(0, (gw // core - k) // 2) * core
    cy = max(0, (gh // core - k) // 2) * core
    x1, y1 = min(gw, cx + k * core), min(gh, cy + k * core)
    s = plan.scale
    box = shapely.box((cx + 0.5) * s, (cy + 0.5) * s, (x1 - 0.5) * s, (y1 - 0.5) * s)
    return box, (x1 - cx) * (y1 - cy)


# --------------------------------------------------------------------------- measurements
def _round_robin(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns (load changes hit them alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def measure_tiles(bundle, slide_path: Path, n_tiles: int, batch_size: int, repeats: int,
                  workdir: Path, tile: int = TILE) -> dict:
    """Eager forward, default forward, post-processing and the pipeline on the same tiles."""
    import torch

    from qpcell.device_cells import DeviceCells
    from qpcell.io.slides import open_slide
    from qpcell.models import gmacs
    from qpcell.predict import (
        PredictionJob,
        Predictor,
        _CellWriter,
        plan_tiles,
        predict_to_folder,
    )

    predictor = Predictor.from_bundle(bundle)
    k = max(1, int(round(n_tiles ** 0.5)))
    slide = open_slide(slide_path)
    plan = plan_tiles(slide, mpp=bundle.mpp, tile_size=tile, reach_px=predictor.reach_px)
    region, block_px = block_region(plan, k)
    plan = plan_tiles(slide, mpp=bundle.mpp, tile_size=tile, reach_px=predictor.reach_px,
                      regions=[region])

    def read():
        return np.stack([slide.read_grid(int(c[0]) - plan.halo, int(c[1]) - plan.halo,
                                         plan.tile, plan.tile, mpp=plan.read_mpp)
                         for c in plan.cores])

    tiles = read()
    n = len(tiles)
    model = bundle.models["model"]
    gmac = gmacs(model, tile)
    tile_mpx = tile * tile / 1e6

    # eager forward alone: batch 1, fp32, NCHW, tensors ready
    device = bundle.device
    cuda = device.type == "cuda"
    xs = [torch.from_numpy(t).permute(2, 0, 1)[None].float().div(255.0).contiguous().to(device)
          for t in tiles]

    def eager():
        with torch.inference_mode():
            for x in xs:
                model(x)
            _synchronize(device)

    # the default backend (what qpcell predict runs), uint8 tiles in, maps out
    def default_forward():
        return [predictor.map_fn(tiles[i:i + batch_size]) for i in range(0, n, batch_size)]

    def fp32_forward():  # float32 in batches, for before/after in one run
        if cuda:  # every CUDA backend autocasts: the module itself, batched, no autocast
            with torch.inference_mode():
                for i in range(0, n, batch_size):
                    for m in model.maps(model(torch.cat(xs[i:i + batch_size]))):
                        if m is not None:  # maps back to the host, as every backend does
                            m.float().cpu()
            return None
        from qpcell.inference import using_backend

        with using_backend(FP32_BACKEND):
            return [bundle.predict_maps(tiles[i:i + batch_size]) for i in range(0, n, batch_size)]

    maps = default_forward()  # builds the default backend, outside the timing
    fp32_forward()
    try:
        from qpcell.inference import runner_for

        backend = runner_for(model, bundle.device, "fast").name
    except ImportError:  # a qpcell from before the inference backends
        backend = "eager"
    det = np.concatenate([m[0] for m in maps])
    cls = None if maps[0][1] is None else np.concatenate([m[1] for m in maps])
    cells = [len(bundle.to_detections(det[i], None if cls is None else cls[i]))
             for i in range(n)]

    def post():  # every tile's maps, one thread
        for i in range(n):
            bundle.to_detections(det[i], None if cls is None else cls[i])

    # post-processing on the device (qpcell.device_cells): the same batches, maps left there
    device_cells = DeviceCells(bundle, profile=True)
    device_maps = [device_cells.maps(tiles[i:i + batch_size]) for i in range(0, n, batch_size)]

    def model_only():  # uint8 tiles in, maps left on the device: what the network costs
        for i in range(0, n, batch_size):
            device_cells.maps(tiles[i:i + batch_size])
        _synchronize(device)

    def post_device():
        for k, (d, c) in enumerate(device_maps):
            device_cells.postprocess(d, c, plan.cores[k * batch_size:(k + 1) * batch_size],
                                     plan)
        _synchronize(device)

    def write():  # formatting and writing the block's cells (CSV + GeoJSON), one thread
        parts = predictor_cells
        with open(workdir / "w.geojson", "w", encoding="utf-8") as g, \
                open(workdir / "w.csv", "w", encoding="utf-8", newline="") as t:
            writer = _CellWriter(t, g, bundle.classes, slide.mpp)
            for cells_ in parts:
                writer.add(cells_)
            writer.close()

    predictor_cells = [c for k, (d, c_) in enumerate(device_maps)
                       for c in device_cells.postprocess(
                           d, c_, plan.cores[k * batch_size:(k + 1) * batch_size], plan)]

    # the whole pipeline on the block of the slide, with where its time goes
    spent = {"forward": 0.0, "postprocess": 0.0}

    def timed(key, fn):
        def run(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent[key] += time.perf_counter() - t0
        return run

    timed_predictor = Predictor(timed("forward", predictor.map_fn),
                                timed("postprocess", predictor.postprocess_fn),
                                predictor.classes, predictor.mpp, predictor.reach_px,
                                predictor.name)
    last = {}

    def pipeline():
        spent.update(forward=0.0, postprocess=0.0)
        t0 = time.perf_counter()
        predict_to_folder([PredictionJob("block", slide_path, [region])], timed_predictor,
                          workdir / "pipeline", overwrite=True, batch_size=batch_size,
                          tile_size=tile)
        last.update(spent, total=time.perf_counter() - t0)

    # the whole pipeline again with post-processing on the device (the default on CUDA)
    device_predictor = Predictor.from_bundle(bundle, postprocess="device")

    def pipeline_device():
        predict_to_folder([PredictionJob("block", slide_path, [region])], device_predictor,
                          workdir / "pipeline-device", overwrite=True, batch_size=batch_size,
                          tile_size=tile)

    eager()
    pipeline()  # warm (file cache, thread pools)
    pipeline_device()
    device_cells.seconds.update(copy=0.0, forward=0.0, postprocess=0.0)
    stages = {"read": read, "eager": eager, "default": default_forward, "fp32": fp32_forward,
              "post": post, "post_device": post_device, "model_only": model_only,
              "write": write, "pipeline": pipeline, "pipeline_device": pipeline_device}
    t = _round_robin(stages, repeats)
    # copy and forward of the model-only runs (each stage waited for), per tile
    split = {k: device_cells.seconds[k] / (repeats * n) for k in ("copy", "forward")}
    slide.close()
    grid_mpp = plan.read_mpp or slide.mpp
    cm2 = block_px * grid_mpp ** 2 / UM2_PER_CM2 if grid_mpp else None

    def per_cm2(seconds: float) -> float | None:
        return round(seconds / 60 / cm2, 3) if cm2 else None
    eager_t, default, post_t, pipe = t["eager"] / n, t["default"] / n, t["post"] / n, t["pipeline"]
    pipe_mpx_s = block_px / 1e6 / pipe
    eager_mpx_s = tile_mpx / eager_t
    pipe_dev = t["pipeline_device"]
    device_figures = {
        "model_only": {"ms_per_tile": round(t["model_only"] / n * 1e3, 2),
                       "minutes_per_cm2": per_cm2(t["model_only"])},
        "postprocess_device": {"ms_per_tile": round(t["post_device"] / n * 1e3, 2)},
        "pipeline_device": {"seconds": round(pipe_dev, 3), "ms_per_tile":
                            round(pipe_dev / n * 1e3, 1), "minutes_per_cm2": per_cm2(pipe_dev)},
        "pipeline_cpu_postprocess_minutes_per_cm2": per_cm2(pipe),
        # each stage alone, per tile: reading (one thread), host-to-device copy and forward
        # (model-only runs, synchronised), post-processing on the device, writing the cells
        "stages_ms_per_tile": {"read": round(t["read"] / n * 1e3, 2),
                               "copy": round(split["copy"] * 1e3, 2),
                               "forward": round(split["forward"] * 1e3, 2),
                               "postprocess_device": round(t["post_device"] / n * 1e3, 2),
                               "postprocess_cpu": round(post_t * 1e3, 2),
                               "write": round(t["write"] / n * 1e3, 2)},
        "pipeline_device_vs_model_only": round(pipe_dev / t["model_only"], 3),
        # > 1: the new path (post-processing on the device) is faster than the old one
        "pipeline_cpu_postprocess_vs_device": round(pipe / pipe_dev, 3),
        "postprocess_cpu_vs_device": round(t["post"] / t["post_device"], 3),
    }
    return {
        "tiles": n, "tile_px": tile, "halo_px": plan.halo, "core_px": plan.core,
        "block_mpx": round(block_px / 1e6, 3), "slide_mpp": slide.mpp, "model_mpp": bundle.mpp,
        "batch_size": batch_size, "default_backend": backend, "repeats": repeats,
        "gmac_per_tile": round(gmac, 3),
        "cells_per_tile": round(float(np.mean(cells)), 1),
        "read_ms_per_tile": round(t["read"] / n * 1e3, 1),
        "eager_forward": {"ms_per_tile": round(eager_t * 1e3, 1),
                          "mpx_per_s": round(eager_mpx_s, 4),
                          "gmac_per_s": round(gmac / eager_t, 2)},
        "default_forward": {"ms_per_tile": round(default * 1e3, 1),
                            "mpx_per_s": round(tile_mpx / default, 4),
                            "gmac_per_s": round(gmac / default, 2)},
        "fp32_forward": {"backend": "torch fp32" if cuda else FP32_BACKEND,
                         "ms_per_tile": round(t["fp32"] / n * 1e3, 1),
                         "mpx_per_s": round(tile_mpx / (t["fp32"] / n), 4),
                         "gmac_per_s": round(gmac / (t["fp32"] / n), 2)},
        "postprocess": {"ms_per_tile": round(post_t * 1e3, 1),
                        "share_of_eager_model": round(post_t / eager_t, 4),
                        "share_of_default_model": round(post_t / default, 4)},
        "pipeline": {"seconds": round(pipe, 3), "mpx_per_s": round(pipe_mpx_s, 4),
                     "ms_per_tile": round(pipe / n * 1e3, 1),
                     # one run: the main thread's time in the model, and the post-processing
                     # threads' summed time; overlap = forward + post-processing > total
                     "last_run_total_s": round(last["total"], 3),
                     "last_run_forward_s": round(last["forward"], 3),
                     "last_run_postprocess_s": round(last["postprocess"], 3)},
        "pipeline_vs_forward": round(pipe_mpx_s / eager_mpx_s, 3),
        "default_vs_eager_forward": round(eager_t / default, 3),
        "default_vs_fp32_forward": round(t["fp32"] / n / default, 3),
        "device_postprocess": device_figures,
    }


def _slide_worker(spec: dict) -> dict:
    """Run in a fresh process: the pipeline on a slide (or a region of it), peak memory."""
    import torch

    from qpcell.checkpoint import load_model
    from qpcell.io.slides import open_slide
    from qpcell.predict import PredictionJob, Predictor, plan_tiles, predict_to_folder

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    base_kb = memory_kb("VmRSS")
    bundle = load_model(spec["model"], device=spec.get("device"))
    predictor = Predictor.from_bundle(bundle, postprocess=spec.get("postprocess", "auto"))
    tile = int(spec.get("tile", TILE))
    with open_slide(spec["slide"]) as slide:
        width, height, mpp = slide.width, slide.height, slide.mpp
        regions = None
        area_px = width * height  # full-resolution px
        if spec.get("cores"):
            plan = plan_tiles(slide, mpp=bundle.mpp, tile_size=tile, reach_px=predictor.reach_px)
            box, grid_px = block_region(plan, int(spec["cores"]))
            regions, area_px = [box], grid_px * plan.scale ** 2
    samples: list[tuple[int, int]] = []

    def on_event(event) -> None:
        if event.kind in ("start", "tiles"):
            samples.append((event.done, memory_kb("VmRSS")))

    t0 = time.perf_counter()
    results = predict_to_folder([PredictionJob("slide", Path(spec["slide"]), regions)],
                                predictor, spec["out"], overwrite=True,
                                batch_size=int(spec["batch_size"]), tile_size=tile,
                                on_event=on_event)
    seconds = time.perf_counter() - t0
    res = results[0]
    # resident memory when 1/4, 1/2, 3/4 and all of the tiles were done
    total = max(1, res.tiles)
    rss = {}
    for frac in (0.25, 0.5, 0.75, 1.0):
        done = [kb for d, kb in samples if d >= frac * total]
        if done:
            rss[f"{int(frac * 100)}%"] = round(done[0] / 1024, 1)
    um2 = area_px * (mpp or 0.0) ** 2
    return {
        "slide": spec["slide"], "size_px": [width, height], "slide_mpp": mpp,
        "area_px": area_px, "area_mm2": round(um2 / 1e6, 3), "tiles": res.tiles,
        "cells": res.n_cells, "seconds": round(seconds, 2),
        "mpx_per_s_at_slide_mpp": round(area_px / 1e6 / seconds, 4),
        "minutes_per_cm2": round(seconds / 60 * UM2_PER_CM2 / um2, 2) if um2 else None,
        "peak_rss_mb": round(memory_kb("VmHWM") / 1024, 1),
        "rss_before_model_mb": round(base_kb / 1024, 1),
        "rss_mb_at_tiles_done": rss,
    }


def slide_run(model: Path, slide: Path, cores: int | None, batch_size: int, device: str | None,
              threads: int | None, workdir: Path, tile: int = TILE,
              postprocess: str = "auto") -> dict:
    """:func:`_slide_worker` in a subprocess (its own peak-memory counter); ``cores``: the
    side, in tile cores, of the centred block predicted (``None``: the whole slide)."""
    spec = {"model": str(model), "slide": str(slide), "cores": cores,
            "batch_size": batch_size, "device": device, "threads": threads, "tile": tile,
            "postprocess": postprocess,
            "out": str(workdir / f"slide-{slide.stem}-{cores or 'full'}")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"slide run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def report(r: dict) -> None:
    t = r["tiles"]
    print(f"\nmachine: {r['machine']['cpu']}, {r['machine']['threads']} torch threads, load "
          f"{r['machine']['load_start']} -> {r['machine']['load_end']}; no GPU used"
          if r["machine"]["device"] == "cpu" else f"\ndevice {r['machine']['device']}")
    print(f"model: {r['model']}")
    print(f"tiles: {t['tiles']} x {t['tile_px']} px (halo {t['halo_px']}, core {t['core_px']}), "
          f"{t['gmac_per_tile']} GMAC per tile, {t['cells_per_tile']} cells per tile")
    ref = r["conv_reference_gmac_per_s"]
    print("conv reference (1x64x512x512, 3x3 -> 64), GMAC/s: "
          + ", ".join(f"{k} {v}" for k, v in ref.items()))
    rows = [("eager forward (fp32, batch 1)", t["eager_forward"]),
            (f"default forward ({t['default_backend']}, batch {t['batch_size']})",
             t["default_forward"])]
    if "fp32_forward" in t:
        rows.append((f"fp32 forward ({t['fp32_forward']['backend']}, batch {t['batch_size']})",
                     t["fp32_forward"]))
    for name, v in rows:
        print(f"  {name:42s} {v['ms_per_tile']:8.1f} ms/tile  {v['mpx_per_s']:7.3f} Mpx/s  "
              f"{v['gmac_per_s']:7.2f} GMAC/s")
    p = t["pipeline"]
    print(f"  {'whole pipeline (image px)':42s} {p['ms_per_tile']:8.1f} ms/tile  "
          f"{p['mpx_per_s']:7.3f} Mpx/s")
    print(f"    (one pipeline run: {p['last_run_total_s']} s, of which the model "
          f"{p['last_run_forward_s']} s on the main thread while post-processing took "
          f"{p['last_run_postprocess_s']} s in its threads; reading {t['read_ms_per_tile']} "
          f"ms/tile in its thread)")
    pp = t["postprocess"]
    print(f"  {'post-processing':42s} {pp['ms_per_tile']:8.1f} ms/tile  = "
          f"{100 * pp['share_of_eager_model']:.1f}% of eager, "
          f"{100 * pp['share_of_default_model']:.1f}% of default model time")
    print("ratios:")
    for key, val in r["ratios"].items():
        print(f"  {key:46s} {val}")
    dp = t.get("device_postprocess")
    if dp:
        st = dp["stages_ms_per_tile"]
        print(f"post-processing on the device ({r['machine']['device']}), batch "
              f"{t['batch_size']}:")
        print(f"  {'model only (uint8 in, maps left there)':42s} "
              f"{dp['model_only']['ms_per_tile']:8.1f} ms/tile  "
              f"{dp['model_only']['minutes_per_cm2']} min/cm²")
        print(f"  {'whole pipeline, cells found on the device':42s} "
              f"{dp['pipeline_device']['ms_per_tile']:8.1f} ms/tile  "
              f"{dp['pipeline_device']['minutes_per_cm2']} min/cm²  "
              f"({dp['pipeline_device_vs_model_only']}x model only)")
        print(f"  {'whole pipeline, cells found on the CPU':42s} "
              f"{t['pipeline']['ms_per_tile']:8.1f} ms/tile  "
              f"{dp['pipeline_cpu_postprocess_minutes_per_cm2']} min/cm²")
        print("  each stage alone, ms/tile: " + ", ".join(f"{k} {v}" for k, v in st.items()))
    for s in r.get("slide_runs", []):
        print(f"slide run {Path(s['slide']).name} ({s['size_px'][0]} x {s['size_px'][1]} px, "
              f"{s['area_mm2']} mm² predicted, {s['tiles']} tiles, {s['cells']} cells): "
              f"{s['seconds']} s, {s['mpx_per_s_at_slide_mpp']} Mpx/s at {s['slide_mpp']} µm/px, "
              f"{s['minutes_per_cm2']} min/cm², peak RSS {s['peak_rss_mb']} MB "
              f"({s['rss_before_model_mb']} MB before loading the model), "
              f"RSS by tiles done {s['rss_mb_at_tiles_done']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="model folder (default: trained here on EndoNuke when missing)")
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE,
                   help="pyramidal slide (default: made by make_slide.py when missing)")
    p.add_argument("--tiles", type=int, default=16, help="tiles timed (a square block; 16)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward (default 4)")
    p.add_argument("--tile-size", type=int, default=TILE,
                   help="tile side with its halo, px (default 512, as qpcell predict)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    p.add_argument("--slide-region", type=int, default=15,
                   help="side, in tile cores (448 px at 0.44 µm/px), of the centred square "
                        "predicted in the slide runs (default 15: 6720 px)")
    p.add_argument("--full-slide", action="store_true", help="predict the whole slide")
    p.add_argument("--big-slide", type=Path, default=None,
                   help="also run --slide-region on this (e.g. 60,000 px) slide, for memory")
    p.add_argument("--no-slide-run", action="store_true", help="skip the slide runs")
    p.add_argument("--postprocess", default="auto", choices=("auto", "device", "cpu"),
                   help="where the slide runs find cells (default auto: the device on CUDA)")
    p.add_argument("--epochs", type=int, default=2, help="epochs when training the model")
    p.add_argument("--steps", type=int, default=50, help="batches per epoch when training")
    p.add_argument("--quick", action="store_true",
                   help="4 tiles, 1 repeat, a 5 x 5 core slide region")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_slide_worker(json.loads(args.worker))))
        return {}

    import torch

    from qpcell.checkpoint import load_model
    from qpcell.device import cpu_name

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tiles, args.slide_region = min(args.tiles, 4), min(args.slide_region, 5)
    repeats = args.repeats or (1 if args.quick else 3)
    load_start = load_average()
    model_dir, _ = ensure_model(args.model, args.epochs, args.steps)
    slide = ensure_slide(args.slide, 20000)
    bundle = load_model(model_dir, device=args.device)
    ref = conv_reference(repeats=repeats, device=args.device)
    with tempfile.TemporaryDirectory(prefix="qpcell-speed-") as tmp:
        tiles = measure_tiles(bundle, slide, args.tiles, args.batch_size, repeats, Path(tmp),
                              args.tile_size)
        slide_runs = []
        if not args.no_slide_run:
            region = None if args.full_slide else args.slide_region
            slide_runs.append(slide_run(model_dir, slide, region, args.batch_size, args.device,
                                        args.threads, Path(tmp), args.tile_size,
                                        args.postprocess))
            if args.big_slide:
                slide_runs.append(slide_run(model_dir, args.big_slide, args.slide_region,
                                            args.batch_size, args.device, args.threads,
                                            Path(tmp), args.tile_size, args.postprocess))
    best_ref = max(ref.values())
    default_gmac_s = tiles["default_forward"]["gmac_per_s"]
    ratios = {
        "pipeline_vs_forward": tiles["pipeline_vs_forward"],
        "default_forward_vs_eager_forward": tiles["default_vs_eager_forward"],
        "default_forward_vs_fp32_forward": tiles["default_vs_fp32_forward"],
        "postprocess_share_of_eager_model": tiles["postprocess"]["share_of_eager_model"],
        "postprocess_share_of_default_model": tiles["postprocess"]["share_of_default_model"],
        "default_model_gmac_s_vs_best_conv_reference": round(default_gmac_s / best_ref, 4),
        "eager_model_gmac_s_vs_best_conv_reference":
            round(tiles["eager_forward"]["gmac_per_s"] / best_ref, 4),
    }
    backend_ref = {"onnxruntime": "onnxruntime fp32", "torch": "torch channels-last fp32",
                   "eager": "torch eager fp32",
                   "torch-bf16": "torch channels-last bf16"}.get(tiles["default_backend"])
    if args.device.startswith("cuda") and tiles["default_backend"] in ("torch", "eager"):
        backend_ref = "torch channels-last bf16"  # CUDA backends autocast to bf16
    if backend_ref in ref:
        ratios["default_model_gmac_s_vs_same_backend_conv"] = round(
            default_gmac_s / ref[backend_ref], 4)
    dp = tiles["device_postprocess"]
    ratios["pipeline_device_vs_model_only"] = dp["pipeline_device_vs_model_only"]
    ratios["pipeline_cpu_postprocess_vs_device"] = dp["pipeline_cpu_postprocess_vs_device"]
    ratios["postprocess_cpu_vs_device"] = dp["postprocess_cpu_vs_device"]
    ratios["model_only_minutes_per_cm2"] = dp["model_only"]["minutes_per_cm2"]
    ratios["pipeline_device_minutes_per_cm2"] = dp["pipeline_device"]["minutes_per_cm2"]
    if slide_runs:
        ratios["minutes_per_cm2"] = slide_runs[0]["minutes_per_cm2"]
        ratios["peak_rss_mb"] = max(s["peak_rss_mb"] for s in slide_runs)
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "device": args.device,
                    "cuda_available": torch.cuda.is_available(),
                    "torch": torch.__version__, "load_start": load_start,
                    "load_end": load_average()},
        "model": model_source(model_dir), "slide": str(slide),
        "conv_reference_gmac_per_s": ref, "tiles": tiles, "slide_runs": slide_runs,
        "ratios": ratios,
    }
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
