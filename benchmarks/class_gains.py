"""Class gains: what the grid of per-class factors, tuned on validation, does to test scores.

Each model folder is a ``benchmarks/time_to_accuracy.py`` run. Its validation images (named in
its ``config.json``) and the split's test images are predicted once with every class gain 1,
the way ``qpcell predict`` reads them; then the gains are tuned on the validation cells
(:func:`qpcell.tuning.tune_class_gain`, as training does) with each ``--grid`` and the test
cells are scored with them. Gains change only classes, so detection F1 is the same in every
row of one model.

Usage::

    python benchmarks/class_gains.py --dataset endonuke --models runs/tta/endonuke-*-seed0 \\
        --grid 0.5,1,2,3,5,8,13 --grid 0.05,0.1,0.2,0.3,0.5,1,2,3,5,8,13 --json gains.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import data_root, scores_of  # noqa: E402
from time_to_accuracy import DATASETS, load_split, predict_images  # noqa: E402


def predict_all(model_dir: Path, images: Sequence, source_mpp: float | None) -> list:
    """Detections of ``images`` with every class gain 1 (class probabilities kept)."""
    from qpcell.checkpoint import load_model

    bundle = load_model(model_dir, device="cpu")
    bundle.postprocess = replace(bundle.postprocess, class_gain=())
    return predict_images(bundle, images, source_mpp)


def run_model(model_dir: Path, split, grids: Sequence[tuple[float, ...]],
              objectives: Sequence[str] = ("class_aware",), rounds: int = 1) -> list[dict]:
    """One row per grid: the gains tuned on validation and the test scores with them."""
    from qpcell.config import PAPER_MPP
    from qpcell.metrics import score_dataset
    from qpcell.postprocess import relabel_with_gain
    from qpcell.train import estimate_source_mpp
    from qpcell.tuning import tune_class_gain

    config = json.loads((model_dir / "config.json").read_text())
    val_names = set(config["training"]["val_images"])
    val = [a for a in split.trainval if a.name in val_names]
    source_mpp, _ = estimate_source_mpp(split.trainval, PAPER_MPP, None)
    names = [c.name for c in split.classes]
    val_dets = predict_all(model_dir, val, source_mpp)
    test_dets = predict_all(model_dir, split.test, source_mpp)
    rows = []
    for objective in objectives:
        for grid in grids:
            gain, _ = tune_class_gain(val_dets, val, split.classes, split.radius_px,
                                      objective=objective, rounds=rounds, gains=grid)
            test = [relabel_with_gain(d, gain) for d in test_dets]
            report = score_dataset(list(zip(test, split.test, strict=True)), names,
                                   split.radius_px)
            rows.append({"model": str(model_dir), "grid": list(grid), "objective": objective,
                         "rounds": rounds,
                         "gain": list(gain), "scores": scores_of(report)})
            s = rows[-1]["scores"]
            print(f"{model_dir.name} {objective}, grid {min(grid):g}-{max(grid):g}: gains "
                  f"{list(gain)} detection F1 {s['detection_f1']:.3f} weighted F1 "
                  f"{s['weighted_f1']:.3f} class-aware {s['mean_class_aware_f1']:.3f}",
                  flush=True)
    return rows


def model_runs_parser(description: str) -> argparse.ArgumentParser:
    """The options of a script that re-scores ``time_to_accuracy.py`` model folders: the
    dataset, the models, the data cache, ``--max-test`` and ``--json``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="endonuke", choices=sorted(DATASETS))
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.add_argument("--cache", type=Path, default=Path("runs/data-cache"))
    p.add_argument("--max-test", type=int, default=None, help="score only the first N test "
                   "images (quick checks)")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = model_runs_parser(__doc__.splitlines()[0])
    p.add_argument("--grid", action="append", required=True,
                   help="comma-separated gains (repeat for each grid to compare)")
    p.add_argument("--objectives", default="class_aware",
                   help="comma-separated: class_aware, weighted, both")
    p.add_argument("--rounds", type=int, default=1, help="rounds of coordinate ascent")
    args = p.parse_args(argv)
    split = load_split(args.dataset, data_root(), args.cache, max_test=args.max_test)
    grids = [tuple(float(g) for g in text.split(",")) for text in args.grid]
    objectives = args.objectives.split(",")
    rows = [r for m in args.models for r in run_model(m, split, grids, objectives, args.rounds)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
