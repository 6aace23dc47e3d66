"""How well a model's class probabilities tell each class apart, and what a class gain could give.

Each model folder is a ``benchmarks/time_to_accuracy.py`` run. The split's test images are
predicted once with every class gain 1, the way ``qpcell predict`` reads them, and the found
cells are paired with the annotated ones (matching radius of the split). Over the matched cells:

* the confusion matrix (rows: annotated class; columns: the class called with gains 1);
* per class, the ROC AUC and the average precision of its probability against "annotated as this
  class", with the class's share of the matched cells (the AP of a useless score);
* per class, the best F1 of calling the class wherever its probability reaches a threshold,
  the threshold chosen on these same test cells: more than any class gain tuned on validation
  can give that class, so an upper bound of its classification F1 for this model.

Usage::

    python benchmarks/class_separability.py --dataset endonuke \\
        --models runs/tta/endonuke-unet-fast-10min-seed* --json separability.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import data_root  # noqa: E402
from class_gains import model_runs_parser, predict_all  # noqa: E402
from time_to_accuracy import load_split  # noqa: E402


def best_threshold_f1(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(F1, threshold)``: the best F1 of ``scores >= threshold`` against boolean ``truth``."""
    from sklearn.metrics import precision_recall_curve

    if not truth.any():
        return 0.0, 1.0
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    k = int(np.argmax(f1))
    return float(f1[k]), float(thresholds[k])


def separability(probs: np.ndarray, called: np.ndarray, truth: np.ndarray,
                 names: Sequence[str]) -> dict:
    """The figures of the module docstring for matched cells: ``probs`` ``(N, C)``, the called
    and the annotated class ``(N,)`` each."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    c = len(names)
    confusion = np.bincount(truth * c + called, minlength=c * c).reshape(c, c)
    classes = {}
    for k, name in enumerate(names):
        y = truth == k
        both = 0 < y.sum() < len(y)
        f1, threshold = best_threshold_f1(probs[:, k], y)
        classes[name] = {"n": int(y.sum()), "share": float(y.mean()) if len(y) else 0.0,
                         "auc": float(roc_auc_score(y, probs[:, k])) if both else None,
                         "ap": float(average_precision_score(y, probs[:, k])) if both else None,
                         "best_f1": f1, "best_threshold": threshold}
    return {"confusion": confusion.tolist(), "classes": classes}


def run_model(model_dir: Path, split) -> dict:
    """Predict the test images with gains 1, match, and measure (:func:`separability`)."""
    from qpcell.config import PAPER_MPP
    from qpcell.metrics import match_points
    from qpcell.train import estimate_source_mpp

    source_mpp, _ = estimate_source_mpp(split.trainval, PAPER_MPP, None)
    dets = predict_all(model_dir, split.test, source_mpp)
    probs, called, truth = [], [], []
    for det, ann in zip(dets, split.test, strict=True):
        m = match_points(det.xy, ann.xy, split.radius_px)
        probs.append(det.class_probs[m.pred_idx])
        called.append(det.labels[m.pred_idx])
        truth.append(ann.labels[m.true_idx])
    names = [c.name for c in split.classes]
    row = {"model": str(model_dir),
           **separability(np.concatenate(probs), np.concatenate(called),
                          np.concatenate(truth), names)}
    print(f"{model_dir.name}: confusion (rows annotated, columns called) {row['confusion']}")
    for name, s in row["classes"].items():
        auc = "n/a" if s["auc"] is None else f"{s['auc']:.3f}"
        ap = "n/a" if s["ap"] is None else f"{s['ap']:.3f}"
        print(f"  {name}: {s['n']} matched cells ({s['share']:.2%}), AUC {auc}, AP {ap}, "
              f"best F1 by a threshold chosen on test {s['best_f1']:.3f}", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = model_runs_parser(__doc__.splitlines()[0]).parse_args(argv)
    split = load_split(args.dataset, data_root(), args.cache, max_test=args.max_test)
    rows = [run_model(m, split) for m in args.models]
    if len(rows) > 1:
        for name in rows[0]["classes"]:
            for key in ("auc", "ap", "best_f1"):
                values = [r["classes"][name][key] for r in rows
                          if r["classes"][name][key] is not None]
                if len(values) > 1:
                    print(f"{name} {key}: {statistics.mean(values):.3f} ± "
                          f"{statistics.stdev(values):.3f} over {len(values)} models")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
