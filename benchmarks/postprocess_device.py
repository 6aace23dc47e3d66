"""Post-processing alone: the CPU path (numpy, tile by tile) against the device path (torch,
a batch at once), on the same maps, in one run.

The maps are those of a hand-set nucleus detector on the EndoNuke test split (every third
image, 200 x 200 px; dark blobs of optical density are cells, detection F1 about 0.7 against
the annotations at 5 px), so their cells look like a real model's without training one.
Both paths run in turns (``--repeats``), with ``--threads`` torch threads (default 1, as one
post-processing thread of ``qpcell predict``), and are timed by the wall clock and by the
process's CPU time: on a shared machine the CPU seconds are the steadier figure. The two
paths' cells are compared too (detection F1 of one against the other at 2 px, share of
matched cells with the same class).

Usage::

    python benchmarks/postprocess_device.py --json postprocess-device.json
    python benchmarks/postprocess_device.py --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def nucleus_maps(tiles: np.ndarray):
    """``(det (B, H, W), cls (B, 3, H, W))`` float32 of uint8 RGB tiles: dark blobs of
    optical density (smoothed over 5 x 5 px) are cells; classes from the stain's colour."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float() / 255
    od = F.avg_pool2d(-torch.log(x.clamp_min(1 / 255)), 5, 1, 2, count_include_pad=False)
    det = torch.sigmoid(8 * (od.sum(1) - 1.9))
    cls = torch.softmax(torch.cat([4 * (od[:, :1] - od[:, 2:]), 4 * (od[:, 2:] - od[:, 1:2]),
                                   od[:, 1:2] - 1.0], dim=1), dim=1)
    return det.numpy(), cls.numpy()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "QPCELL_DATA", REPO.parent / "shared" / "data")) / "endonuke")
    p.add_argument("--step", type=int, default=1, help="every n-th test image (default 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from qpcell.config import PostprocessConfig
    from qpcell.metrics import match_points
    from qpcell.points import make_classes
    from qpcell.postprocess import postprocess_sdrdin
    from qpcell.postprocess_torch import cells_of_batch, sdrdin_batch

    torch.set_num_threads(args.threads)
    names = sorted((q.stem for q in (args.data / "images").glob("*.png")), key=int)
    if not names:
        raise SystemExit(f"no EndoNuke images in {args.data / 'images'}")
    test = [n for i, n in enumerate(names) if i % 3 == 0][::args.step]
    tiles = np.stack([np.asarray(Image.open(args.data / "images" / f"{n}.png").convert("RGB"))
                      for n in test])
    det, cls = nucleus_maps(tiles)
    classes = make_classes(["stroma", "epithelium", "other"])
    cfg = PostprocessConfig(min_area_px=20, peak_window_px=7, class_box_px=11)
    device = torch.device(args.device)
    batches = [(torch.from_numpy(det[i:i + args.batch_size]).to(device),
                torch.from_numpy(cls[i:i + args.batch_size]).to(device))
               for i in range(0, len(det), args.batch_size)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def cpu_path():
        return [postprocess_sdrdin(det[i], cls[i], cfg, classes) for i in range(len(det))]

    def device_path():
        out = []
        for d, c in batches:
            out += cells_of_batch(sdrdin_batch(d, c, cfg), len(d), cfg, classes)
        sync()
        return out

    cpu_cells, dev_cells = cpu_path(), device_path()  # warm, and the cells to compare
    wall = {"cpu": [], "device": []}
    cpu_s = {"cpu": [], "device": []}
    for _ in range(args.repeats):
        for name, fn in (("cpu", cpu_path), ("device", device_path)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu_s[name].append(time.process_time() - c0)
    n_cpu = sum(len(c) for c in cpu_cells)
    n_dev = sum(len(c) for c in dev_cells)
    tp = same = 0
    for a, b in zip(dev_cells, cpu_cells, strict=True):
        m = match_points(a.xy, b.xy, 2.0)
        tp += m.tp
        same += int(np.sum(a.labels[m.pred_idx] == b.labels[m.true_idx]))
    n = len(det)
    med = {k: float(np.median(v)) for k, v in wall.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu_s.items()}
    result = {
        "tiles": n, "tile_px": list(det.shape[1:]), "batch_size": args.batch_size,
        "device": str(device), "threads": args.threads, "repeats": args.repeats,
        "cells": n_cpu, "load": [round(v, 2) for v in os.getloadavg()],
        "ms_per_tile_wall": {k: round(v / n * 1e3, 2) for k, v in med.items()},
        "ms_per_tile_process_cpu": {k: round(v / n * 1e3, 2) for k, v in med_cpu.items()},
        # > 1: the device path is faster
        "cpu_vs_device_wall": round(med["cpu"] / med["device"], 3),
        "cpu_vs_device_process_cpu": round(med_cpu["cpu"] / med_cpu["device"], 3),
        "agreement_f1_2px": round(2 * tp / max(1, n_cpu + n_dev), 5),
        "agreement_same_class": round(same / max(1, tp), 5),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
