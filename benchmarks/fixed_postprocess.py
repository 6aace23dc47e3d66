"""Post-processing tuned on the validation images, or fixed: what each gives on the test images.

After training, ``qpcell train`` searches the detection threshold, the smallest component, the
peak window, the class box and per-class gains on its validation images
(:func:`qpcell.tuning.tune_postprocess`). With a handful of images (NuCLS: 3 validation tiles)
that search may fit the noise of a few dozen cells. Each model folder is a
``benchmarks/time_to_accuracy.py`` run; its test images are predicted once, the way ``qpcell
predict`` reads them (the model's maps are reused for every variant), and scored with:

``tuned``
    The settings saved with the model (what a user gets).
``tuned-no-gain``
    The same, every class gain 1.
``threshold-0.5``, ``threshold-0.5-no-gain``
    The saved settings with the threshold set to 0.5 (with and without the gains).
``untuned``
    Nothing from validation: the fast recipe's post-processing at the model's scale (threshold
    0.5, smallest component 10 px, peak window 15 px at 0.44 µm/px), class box ``--box`` px,
    every class gain 1.

Usage::

    python benchmarks/fixed_postprocess.py --dataset nucls --models runs/tta/nucls-*-seed* \\
        --json fixed.json
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import data_root, scores_of  # noqa: E402
from class_gains import model_runs_parser  # noqa: E402
from time_to_accuracy import load_split  # noqa: E402

VARIANTS = ("tuned", "tuned-no-gain", "threshold-0.5", "threshold-0.5-no-gain", "untuned")
KEYS = ("detection_f1", "weighted_f1", "mean_class_aware_f1")


def memoised(map_fn: Callable) -> Callable:
    """``map_fn`` that computes the maps of each distinct batch of tiles only once."""
    seen: dict = {}

    def maps(tiles):
        key = (tiles.shape, tiles.dtype.str, hashlib.sha1(tiles.tobytes()).hexdigest())
        if key not in seen:
            seen[key] = map_fn(tiles)
        return seen[key]

    return maps


def settings(saved, model_mpp: float | None, box_px: int) -> dict:
    """The post-processing of each variant (:data:`VARIANTS`) for a model saved with
    ``saved`` (a ``PostprocessConfig`` at the model's scale, ``model_mpp`` µm/px; ``None``:
    the model works at the images' own scale and the recipe's sizes are taken as they are)."""
    from qpcell.recipe import recipe

    post = recipe("fast").post
    untuned = replace(post.scaled(model_mpp) if model_mpp else post, class_box_px=box_px,
                      class_gain=())
    return {"tuned": saved, "tuned-no-gain": replace(saved, class_gain=()),
            "threshold-0.5": replace(saved, threshold=0.5),
            "threshold-0.5-no-gain": replace(saved, threshold=0.5, class_gain=()),
            "untuned": untuned}


def run_model(model_dir: Path, split, box_px: int) -> dict:
    """The test scores of one model under every variant."""
    from qpcell.checkpoint import load_model
    from qpcell.io.slides import open_slide
    from qpcell.metrics import score_dataset
    from qpcell.predict import Predictor, predict_slide

    bundle = load_model(model_dir, device="cpu")
    predictor = Predictor.from_bundle(bundle)
    variants = settings(bundle.postprocess, bundle.mpp, box_px)
    preds: dict[str, list] = {name: [] for name in variants}
    for ann in split.test:  # each image read once, its maps computed once
        maps = memoised(predictor.map_fn)
        with open_slide(ann.image, mpp=predictor.source_mpp) as slide:
            for name, cfg in variants.items():
                bundle.postprocess = cfg
                preds[name].append(predict_slide(slide, maps, bundle.to_detections,
                                                 mpp=predictor.mpp, classes=predictor.classes,
                                                 reach_px=max(predictor.reach_px, cfg.reach_px),
                                                 tissue=False))
    names = [c.name for c in split.classes]
    row = {"model": str(model_dir), "variants": {}}
    for name, cfg in variants.items():
        report = score_dataset(list(zip(preds[name], split.test, strict=True)), names,
                               split.radius_px)
        s = scores_of(report)
        row["variants"][name] = {"setting": {"threshold": cfg.threshold,
                                             "min_area_px": cfg.min_area_px,
                                             "peak_window_px": cfg.peak_window_px,
                                             "class_box_px": cfg.class_box_px,
                                             "class_gain": list(cfg.class_gain)},
                                 "scores": {k: s[k] for k in KEYS}}
        print(f"{model_dir.name} {name}: " + " / ".join(f"{s[k]:.3f}" for k in KEYS),
              flush=True)
    return row


def summary(rows: Sequence[dict]) -> dict:
    """Mean and sample std over the models of each score, per variant."""
    out = {}
    for name in VARIANTS:
        out[name] = {}
        for k in KEYS:
            values = [r["variants"][name]["scores"][k] for r in rows]
            out[name][k] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = model_runs_parser(__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=11, help="the untuned class box, px at the "
                   "model's scale")
    args = p.parse_args(argv)
    split = load_split(args.dataset, data_root(), args.cache, max_test=args.max_test)
    rows = [run_model(m, split, args.box) for m in args.models]
    result = {"dataset": args.dataset, "models": rows, "summary": summary(rows)}
    for name, scores in result["summary"].items():
        print(f"{name}: " + " / ".join(f"{scores[k]['mean']:.3f} ± {scores[k]['std']:.3f}"
                                       for k in KEYS))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
