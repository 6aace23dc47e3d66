"""Do flip test-time augmentation or peaks of the detection map find more cells?

Detection F1 on the EndoNuke test split stays at 0.86-0.87 for every deep model trained by
``benchmarks/accuracy.py``. This script asks whether inference, not training, holds it there.
It takes model folders that ``accuracy.py --workdir`` kept and compares, on the same weights:

``plain``
    The maps as they are, with S-DRDIN 2.5 post-processing re-tuned on validation
    (``qpcell.train.tune_postprocess``, as training does after every epoch). The baseline.
``flip-tta``
    The maps averaged over the image as it is and flipped left-right, up-down and both, then
    flipped back (4x the model's time), with the post-processing re-tuned the same way.
``det-peaks``
    Cells as local maxima of the detection map smoothed by a Gaussian
    (``skimage.feature.peak_local_max``) instead of components and their distance transform.
    Threshold, minimum distance and smoothing are chosen for validation detection F1, the
    class box for weighted classification F1.

The models must use S-DRDIN 2.5 post-processing (the S-DRDIN family, the U-Net and the
separate pipeline; not MTL-IHC). Each variant is tuned on the validation images named in the
model's config (the seed's own split) and scored once on the test split, exactly as
``accuracy.py`` scores. Where the misses lie is reported too: how many of the test cells
within ``--edge`` px (default 3) of an image's edge were missed (nuclei cut by the 200 px
crop), and the detection F1 of the cells further inside.

Usage::

    python benchmarks/accuracy.py --methods unet --seeds 0 --workdir models
    python benchmarks/postprocess_variants.py models/unet-seed0 --json variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):  # run as a script from a checkout
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from accuracy import scores_of, script_dataset  # noqa: E402

from qpcell.errors import QpcellError  # noqa: E402

VARIANTS = ("plain", "flip-tta", "det-peaks")
KEYS = ("detection_precision", "detection_recall", "detection_f1", "weighted_f1",
        "mean_class_aware_f1")
#: A true cell closer than this (px) to an image edge counts as at the edge.
EDGE_PX = 3.0
#: The det-peaks search: thresholds, minimum distances (px), Gaussian sigmas (px), class boxes.
PEAK_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
PEAK_DISTANCES = (1, 2, 3)
PEAK_SIGMAS = (0.0, 1.0, 1.5, 2.0)
PEAK_BOXES = (3, 5, 7, 9, 15)

Maps = tuple[np.ndarray, np.ndarray | None]


def flip_maps(predict_maps: Callable, pixels: np.ndarray, image_maps: Callable) -> Maps:
    """Maps of ``pixels`` averaged over the four flips (none, left-right, up-down, both).

    ``image_maps(predict_maps, pixels)`` gives one image's ``(H, W)`` and ``(C, H, W)`` maps;
    each flipped image's maps are flipped back before averaging.
    """
    dets, clss = [], []
    for axes in ((), (1,), (0,), (0, 1)):
        det, cls = image_maps(predict_maps, np.ascontiguousarray(np.flip(pixels, axes)))
        dets.append(np.flip(det, axes))
        clss.append(None if cls is None else np.flip(cls, tuple(a + 1 for a in axes)))
    cls_mean = None if clss[0] is None else np.mean(clss, axis=0, dtype=np.float32)
    return np.mean(dets, axis=0, dtype=np.float32), cls_mean


def peak_cells(det: np.ndarray, cls: np.ndarray | None, classes, *, threshold: float,
               min_distance: int, sigma: float, box: int):
    """Cells at local maxima of the (Gaussian-smoothed, ``sigma`` px) detection map.

    A maximum counts above ``threshold`` and at least ``min_distance`` px from a higher one;
    its class is the argmax of the class maps averaged over a ``box`` px square.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max

    from qpcell.points import Detections
    from qpcell.postprocess import box_means

    smooth = ndimage.gaussian_filter(det, sigma) if sigma else det
    peaks = peak_local_max(smooth, min_distance=min_distance, threshold_abs=threshold,
                           exclude_border=False)
    if not len(peaks):
        return Detections.empty(classes)
    rows, cols = peaks[:, 0], peaks[:, 1]
    if cls is None:
        probs = np.full((len(rows), len(classes)), 1.0 / len(classes))
    else:
        means = box_means(cls, rows, cols, box)
        probs = means / np.maximum(means.sum(axis=1, keepdims=True), 1e-12)
    return Detections(np.column_stack([cols, rows]).astype(np.float64), np.argmax(probs, 1),
                      det[rows, cols].astype(np.float32), probs.astype(np.float32), classes)


def tune_peaks(maps: Sequence[Maps], truths, classes, radius_px: float) -> dict:
    """The det-peaks setting with the best validation detection F1 (then class box: weighted F1)."""
    from qpcell.metrics import score_dataset

    names = [c.name for c in classes]

    def score(setting: dict) -> tuple[float, float]:
        preds = [peak_cells(d, c, classes, **setting) for d, c in maps]
        report = score_dataset(list(zip(preds, truths, strict=True)), names, radius_px,
                               regions=[t.regions for t in truths])
        return report.detection.f1, report.classification.weighted_f1

    grid = [{"threshold": t, "min_distance": m, "sigma": s, "box": PEAK_BOXES[0]}
            for t in PEAK_THRESHOLDS for m in PEAK_DISTANCES for s in PEAK_SIGMAS]
    best = max(grid, key=lambda s: score(s)[0])
    return max(({**best, "box": b} for b in PEAK_BOXES), key=lambda s: score(s)[1])


def edge_breakdown(preds, truths, pixels, radius_px: float, edge_px: float) -> dict:
    """Misses near the image edges, and detection F1 of the cells further inside.

    One matching per image (as the scores use); a true cell is at the edge when it lies
    closer than ``edge_px`` to one. ``inner_f1`` counts the matched pairs and misses of the
    true cells that are not at the edge and the unmatched predictions that are not either,
    so no pair is split by the margin.

    Returns ``edge_cells``, ``edge_missed`` (of those, unmatched), ``missed`` (all unmatched
    true cells) and ``inner_f1``.
    """
    from qpcell.metrics import match_points, prf

    def at_edge(xy: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        h, w = shape[:2]
        dist = np.minimum(np.minimum(xy[:, 0], xy[:, 1]),
                          np.minimum(w - 1 - xy[:, 0], h - 1 - xy[:, 1]))
        return dist < edge_px

    edge_cells = edge_missed = missed = tp = fp = fn = 0
    for pred, truth, px in zip(preds, truths, pixels, strict=True):
        true_xy = np.asarray(truth.xy, dtype=np.float64).reshape(-1, 2)
        pred_xy = np.asarray(pred.xy, dtype=np.float64).reshape(-1, 2)
        match = match_points(pred_xy, true_xy, radius_px)
        true_edge, pred_edge = at_edge(true_xy, px.shape), at_edge(pred_xy, px.shape)
        unmatched = np.zeros(len(true_xy), dtype=bool)
        unmatched[match.unmatched_true()] = True
        edge_cells += int(true_edge.sum())
        edge_missed += int((true_edge & unmatched).sum())
        missed += int(unmatched.sum())
        tp += int((~true_edge[match.true_idx]).sum())
        fn += int((~true_edge & unmatched).sum())
        fp += int((~pred_edge[match.unmatched_pred()]).sum())
    return {"edge_cells": edge_cells, "edge_missed": edge_missed, "missed": missed,
            "inner_f1": prf(tp, fp, fn)[2]}


def validation_names(meta: dict) -> list[str]:
    """The validation images of a model folder (a pipeline's detection model's split)."""
    training = meta.get("training") or {}
    names = training.get("val_images") or (training.get("detection") or {}).get("val_images")
    if not names:
        raise QpcellError("the model's config names no validation images")
    return list(names)


def run_variant(variant: str, bundle, ds, val, cache: dict) -> tuple[list, dict]:
    """Tune ``variant`` on ``val``, predict the test split; returns predictions and settings.

    ``cache`` keeps one model's validation and test maps between its variants.
    """
    from qpcell.config import PostprocessConfig
    from qpcell.train import image_maps, tune_postprocess

    flipped = variant == "flip-tta"

    def maps_of(pixels: np.ndarray) -> Maps:
        if flipped:
            return flip_maps(bundle.predict_maps, pixels, image_maps)
        return image_maps(bundle.predict_maps, pixels)

    if flipped not in cache:
        cache[flipped] = ([maps_of(d.pixels) for d in val],
                          [maps_of(px) for px in ds.test_pixels])
    val_maps, test_maps = cache[flipped]
    if variant == "det-peaks":
        setting = tune_peaks(val_maps, val, ds.classes, ds.radius_px)
        return [peak_cells(d, c, ds.classes, **setting) for d, c in test_maps], setting
    setting, _, _ = tune_postprocess(val_maps, val, ds.classes, PostprocessConfig(),
                                     ds.radius_px)
    tuned = replace(bundle, postprocess=replace(PostprocessConfig(), **setting))
    return [tuned.to_detections(d, c) for d, c in test_maps], setting


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", type=Path, nargs="+", help="model folders kept by accuracy.py")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default all)")
    p.add_argument("--dataset", choices=("endonuke", "nucls"), default="endonuke")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-test", type=int, default=None, help="score only N test images")
    p.add_argument("--edge", type=float, default=EDGE_PX,
                   help=f"px from an image edge that count as its edge (default {EDGE_PX:g})")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if not args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants must name some of {', '.join(VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from qpcell.checkpoint import load_model
    from qpcell.metrics import score_dataset

    ds = script_dataset(args.dataset, "post-processing variants", threads=args.threads,
                        max_test=args.max_test)
    names = [c.name for c in ds.classes]
    models = {}
    for folder in args.models:
        try:
            bundle = load_model(folder, device="cpu")
            wanted = set(validation_names(bundle.meta))
            if bundle.postprocess_kind != "sdrdin":
                raise QpcellError(f"its post-processing is {bundle.postprocess_kind!r}; the "
                                  "variants compare against S-DRDIN 2.5's (S-DRDIN family, "
                                  "U-Net, separate)")
        except QpcellError as err:
            sys.exit(f"post-processing variants: {folder}: {err}")
        val = [d for d in ds.trainval if d.name in wanted]
        rows, cache = {}, {}
        for variant in args.variants:
            t0 = time.perf_counter()
            preds, setting = run_variant(variant, bundle, ds, val, cache)
            scores = scores_of(score_dataset(list(zip(preds, ds.test, strict=True)), names,
                                             ds.radius_px))
            edges = edge_breakdown(preds, ds.test, ds.test_pixels, ds.radius_px, args.edge)
            rows[variant] = {**{k: scores[k] for k in KEYS}, **edges, "setting": setting,
                             "seconds": time.perf_counter() - t0}
            print(f"{folder.name:24s} {variant:10s} "
                  + "  ".join(f"{k} {scores[k]:.4f}" for k in KEYS)
                  + f"  missed at the edge {edges['edge_missed']}/{edges['edge_cells']} (of "
                  f"{edges['missed']} missed)  F1 inside {edges['inner_f1']:.4f}", flush=True)
        models[str(folder)] = rows
    result = {"benchmark": "postprocess_variants", "dataset": ds.name,
              "n_test_images": len(ds.test), "variants": args.variants, "edge_px": args.edge,
              "models": models,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=_plain), encoding="utf-8")
    return result


def _plain(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()
