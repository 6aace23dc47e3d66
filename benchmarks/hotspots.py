"""Hotspot search speed and memory on a synthetic slide (issue 15).

A 20,000 x 20,000 px slide (0.5 µm/px, 1 mm² = 4 MPx) with 1,000,000 cells of three classes
("positive", "negative", "stroma"), laid out like tissue: cells in a few blobs of varying
density, the positive share varying smoothly with a few hot patches. The script times
:func:`qpcell.readouts.find_hotspots` (a 0.5 mm² circle, >= 500 cells) and the per-region
read-outs, and reports the process's peak resident memory (everything included: Python,
numpy, the cells). ``--layout uniform`` scatters the cells uniformly instead (the worst case
for the search's pruning).

    nice -n 19 python benchmarks/hotspots.py [--cells 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def tissue_cells(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` cells in blobs of tissue; labels 0 positive, 1 negative, 2 stroma."""
    centres = rng.uniform(0.2 * size, 0.8 * size, size=(6, 2))
    spreads = rng.uniform(0.05, 0.15, size=6) * size
    weights = rng.uniform(0.5, 1.5, size=6)
    which = rng.choice(6, size=n, p=weights / weights.sum())
    xy = centres[which] + rng.normal(size=(n, 2)) * spreads[which, None]
    xy = np.clip(xy, 0, size - 1)
    hot = rng.uniform(0.2 * size, 0.8 * size, size=(3, 2))
    d = np.full(n, np.inf)
    for h in hot:  # one hot patch at a time: no (n, 3, 2) temporary
        d = np.minimum(d, np.hypot(xy[:, 0] - h[0], xy[:, 1] - h[1]))
    p_pos = 0.1 + 0.5 * np.exp(-(d / (0.03 * size)) ** 2)
    u = rng.random(n)
    labels = np.where(u < 0.3, 2, np.where(rng.random(n) < p_pos, 0, 1))
    return xy, labels.astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=20_000, help="slide side in px")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--area-mm2", type=float, default=0.5)
    ap.add_argument("--min-cells", type=int, default=500)
    ap.add_argument("--layout", choices=("tissue", "uniform"), default="tissue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    from shapely.geometry import box

    from qpcell.readouts import PositiveRule, find_hotspots, region_readouts

    rng = np.random.default_rng(args.seed)
    if args.layout == "tissue":
        xy, labels = tissue_cells(args.cells, args.size, rng)
    else:
        xy = rng.uniform(0, args.size, size=(args.cells, 2))
        labels = rng.choice(3, size=args.cells, p=[0.2, 0.5, 0.3]).astype(np.int64)
    names = ["positive", "negative", "stroma"]
    rule = PositiveRule(("positive",), ("negative",))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    spots = find_hotspots(xy, labels, names, area=args.area_mm2, mpp=args.mpp, rule=rule,
                          min_cells=args.min_cells)
    t_hot = time.perf_counter() - t0
    t0 = time.perf_counter()
    half = args.size / 2
    regions = [(f"quadrant {i + 1}", box(x, y, x + half, y + half))
               for i, (x, y) in enumerate([(0, 0), (half, 0), (0, half), (half, half)])]
    region_readouts(xy, labels, names, image_size=(args.size, args.size), regions=regions,
                    mpp=args.mpp, rule=rule)
    t_regions = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "cells": args.cells, "size_px": args.size, "mpp": args.mpp, "layout": args.layout,
        "area_mm2": args.area_mm2, "min_cells": args.min_cells,
        "hotspot_seconds": round(t_hot, 3), "regions_seconds": round(t_regions, 3),
        "peak_rss_mb": round(peak, 1), "rss_before_search_mb": round(rss_before, 1),
        "hotspots": [{"kind": h.kind, "target": h.target, "x": round(h.x, 1),
                      "y": round(h.y, 1), "cells": h.n_cells,
                      "positive_percent": h.positive_percent, "exact": h.exact,
                      "circles_counted": h.checked} for h in spots],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
