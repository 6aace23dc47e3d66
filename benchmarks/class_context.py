"""Neighbouring cells' classes: what mixing each cell's class probabilities with those of the
cells around it does to test scores, on the same weights.

Each model folder is a single model kept by ``benchmarks/time_to_accuracy.py --workdir``. Its
validation images (named in its ``config.json``) and the split's test images are predicted
once, the way ``qpcell predict`` reads them, with every class gain 1 and no context. Then, for
each ``--settings`` pair (radius in µm, weight; ``0:0`` = none), every image's cells are mixed
with their neighbours' (:func:`qpcell.postprocess.neighbour_context`, as post-processing does
before the gains), the class gains are tuned on the validation cells as training does
(:func:`qpcell.tuning.tune_class_gain`) and the test cells are scored. The context changes only
classes, so detection F1 is the same in every row of one model.

Usage::

    python benchmarks/class_context.py --dataset endonuke --models runs/t2a/endonuke-*-seed* \\
        --settings 0:0,10:0.5,15:0.5,20:0.25 --json context.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import data_root, scores_of  # noqa: E402
from class_gains import model_runs_parser  # noqa: E402
from time_to_accuracy import load_split, predict_images  # noqa: E402

KEYS = ("detection_f1", "weighted_f1", "mean_class_aware_f1")


def parse_settings(text: str) -> list[tuple[float, float]]:
    """``"0:0,10:0.5"`` -> ``[(0.0, 0.0), (10.0, 0.5)]`` (radius µm, weight)."""
    out = []
    for item in text.split(","):
        radius, _, weight = item.partition(":")
        out.append((float(radius), float(weight)))
    return out


def with_context(dets: Sequence, radius_um: float, weight: float, mpp: float) -> list:
    """``dets`` with their class probabilities mixed over ``radius_um`` (images at ``mpp``
    µm/px where a detection list carries none) and their classes chosen again."""
    from qpcell.postprocess import neighbour_context

    out = []
    for d in dets:
        probs = neighbour_context(d.xy, d.class_probs, radius_um / (d.mpp or mpp), weight)
        out.append(replace(d, labels=np.argmax(probs, axis=1) if len(d) else d.labels,
                           class_probs=probs.astype(np.float32)))
    return out


def run_model(model_dir: Path, split, settings: Sequence[tuple[float, float]],
              tune_radius: float | None = None) -> list[dict]:
    """One row per setting (and one with the weight tuned at ``tune_radius`` µm): the gains
    tuned on validation and the test scores with them."""
    from qpcell.checkpoint import load_model
    from qpcell.config import PAPER_MPP
    from qpcell.metrics import score_dataset
    from qpcell.postprocess import relabel_with_gain
    from qpcell.train import estimate_source_mpp
    from qpcell.tuning import tune_class_gain, tune_context_weight

    config = json.loads((model_dir / "config.json").read_text())
    val_names = set(config["training"]["val_images"])
    val = [a for a in split.trainval if a.name in val_names]
    source_mpp, _ = estimate_source_mpp(split.trainval, PAPER_MPP, None)
    bundle = load_model(model_dir, device="cpu")
    bundle.postprocess = replace(bundle.postprocess, class_gain=(), context_weight=0.0)
    val_dets = predict_images(bundle, val, source_mpp)
    test_dets = predict_images(bundle, split.test, source_mpp)
    names = [c.name for c in split.classes]
    mpp = source_mpp or PAPER_MPP
    rows = []

    def score(radius_um: float, weight: float, gain, tuned: bool) -> None:
        test = [relabel_with_gain(d, gain)
                for d in with_context(test_dets, radius_um, weight, mpp)]
        report = score_dataset(list(zip(test, split.test, strict=True)), names, split.radius_px)
        rows.append({"model": str(model_dir), "radius_um": radius_um,
                     "weight": "tuned" if tuned else weight, "chosen_weight": weight,
                     "gain": list(gain), "scores": scores_of(report)})
        s = rows[-1]["scores"]
        print(f"{model_dir.name} {radius_um:g} µm x {rows[-1]['weight']} ({weight:g}): "
              f"detection F1 {s['detection_f1']:.3f} weighted F1 {s['weighted_f1']:.3f} "
              f"class-aware {s['mean_class_aware_f1']:.3f}", flush=True)

    for radius_um, weight in settings:
        gain, _ = tune_class_gain(with_context(val_dets, radius_um, weight, mpp), val,
                                  split.classes, split.radius_px)
        score(radius_um, weight, gain, tuned=False)
    if tune_radius is not None:
        weight, gain, _ = tune_context_weight(
            lambda w: with_context(val_dets, tune_radius, w, mpp), val, split.classes,
            split.radius_px)
        score(tune_radius, weight, gain, tuned=True)
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """Per setting: the mean of each figure over the models, and its mean difference from the
    first setting with how many models scored higher (and the weights the tuning chose)."""
    settings = list(dict.fromkeys((r["radius_um"], r["weight"]) for r in rows))
    by = {(r["model"], r["radius_um"], r["weight"]): r["scores"] for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = {}
    for s in settings:
        entry = {}
        for k in KEYS:
            diffs = [by[(m, *s)][k] - by[(m, *settings[0])][k] for m in models]
            entry[k] = {"mean": float(np.mean([by[(m, *s)][k] for m in models])),
                        "diff": float(np.mean(diffs)), "higher": int(np.sum(np.array(diffs) > 0))}
        if s[1] == "tuned":
            entry["chosen_weights"] = [r["chosen_weight"] for r in rows
                                       if (r["radius_um"], r["weight"]) == s]
        out[f"{s[0]:g}:{s[1]}" if isinstance(s[1], str) else f"{s[0]:g}:{s[1]:g}"] = entry
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = model_runs_parser(__doc__.splitlines()[0])
    p.add_argument("--settings", default="0:0,10:0.5",
                   help="comma-separated radius_um:weight pairs; the first is the reference")
    p.add_argument("--tune-radius", type=float, default=None, help="also a row with the weight "
                   "tuned on validation at this radius (µm), as training tunes it")
    args = p.parse_args(argv)
    split = load_split(args.dataset, data_root(), args.cache, max_test=args.max_test)
    settings = parse_settings(args.settings)
    rows = [r for m in args.models for r in run_model(m, split, settings, args.tune_radius)]
    summary = summarise(rows)
    for name, entry in summary.items():
        print(f"{name}: " + "  ".join(
            f"{k} {entry[k]['mean']:.3f} ({entry[k]['diff']:+.3f}, {entry[k]['higher']} higher)"
            for k in KEYS), flush=True)
    result = {"dataset": args.dataset, "rows": rows, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
