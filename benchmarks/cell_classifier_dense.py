"""Does the cell classifier's dense map know what it knows on crops? Synthetic cells.

The synthetic classes (:mod:`qpcell.synthetic`) are drawn at random from cell to cell, so only
the cell at the centre of a crop tells its class: a classifier that finds the centre only from
its crops' borders calls the cells right on crops and at chance on the dense map over a tile,
where no border is near. For each ``--margins`` value and ``--steps`` count a
:class:`~qpcell.models.cell_classifier.CellClassifier` trains on the first ``--train`` images
(float32, CPU), and the cells of the others are scored twice: on windows centred on their
points (as it trained) and at their pixels in the dense map of the whole image (as
``qpcell predict`` runs it). No data is needed.

Usage::

    python benchmarks/cell_classifier_dense.py --margins 0,8,16 --steps 50,200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def score(margin_px: int, steps: int, train: Sequence[tuple], test: Sequence[tuple],
          crop_px: int, seed: int) -> dict:
    """Accuracy on windows and on the dense map of one classifier trained for ``steps``."""
    import torch

    from qpcell.models.cell_classifier import CellClassifier
    from qpcell.train_cells import cell_crops, fit_cell_classifier

    torch.manual_seed(seed)
    n_classes = int(max(lab.max() for *_, lab in train)) + 1
    # margin 0 builds the classifier as commits before the margin did (32124ce), to compare
    model = (CellClassifier(n_classes, crop_px=crop_px, margin_px=margin_px) if margin_px
             else CellClassifier(n_classes, crop_px=crop_px))
    t0 = time.perf_counter()
    fit_cell_classifier(model, train, steps=steps, seed=seed)
    seconds = time.perf_counter() - t0
    on_windows, on_dense = [], []
    with torch.no_grad():
        for pixels, xy, labels in test:
            windows = cell_crops(pixels, xy, getattr(model, "window_px", crop_px))
            x = torch.from_numpy(windows).permute(0, 3, 1, 2).float() / 255
            on_windows.append(model(x).argmax(1).numpy() == labels)
            tile = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
            called = model.dense_logits(tile)[0].argmax(0).numpy()
            rows, cols = np.rint(xy[:, ::-1]).astype(int).T
            rows = rows.clip(0, pixels.shape[0] - 1)
            cols = cols.clip(0, pixels.shape[1] - 1)
            on_dense.append(called[rows, cols] == labels)
    return {"margin_px": margin_px, "steps": steps, "seconds": seconds,
            "windows": float(np.concatenate(on_windows).mean()),
            "dense": float(np.concatenate(on_dense).mean())}


def main(argv: Sequence[str] | None = None) -> dict:
    import torch

    from qpcell.synthetic import synthetic_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--margins", default="0,8,16", help="comma-separated margins (px)")
    p.add_argument("--steps", default="50,200", help="comma-separated step counts")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--train", type=int, default=5, help="images to train on; the rest score")
    p.add_argument("--size", type=int, default=128, help="image side (px)")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--crop-px", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = [(px, a.xy, a.labels) for a, px in
            synthetic_dataset(args.images, (args.size, args.size), args.classes, seed=args.seed)]
    train, test = data[:args.train], data[args.train:]
    rows = []
    for margin in (int(m) for m in args.margins.split(",")):
        for steps in (int(s) for s in args.steps.split(",")):
            row = score(margin, steps, train, test, args.crop_px, args.seed)
            rows.append(row)
            print(f"margin {margin} px, {steps} steps ({row['seconds']:.1f} s): windows "
                  f"{row['windows']:.3f}, dense map {row['dense']:.3f}", flush=True)
    result = {"images": args.images, "train": args.train, "size": args.size,
              "classes": args.classes, "crop_px": args.crop_px, "seed": args.seed,
              "test_cells": int(sum(len(xy) for _, xy, _ in test)), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
