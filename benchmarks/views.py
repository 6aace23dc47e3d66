"""Test-time views on trained models: what averaging the maps of flipped tiles buys.

Takes model folders kept by ``benchmarks/time_to_accuracy.py --workdir`` (single models or
ensembles) and, for each set of views (:data:`qpcell.views.VIEWS`), does what training's final
step does with them: the post-processing settings tuned on the model's own validation images
(those named in its ``config.json``) from the maps averaged over the views
(``qpcell.tuning.tune_postprocess``, the recipe's starting settings), then the test images
predicted as ``qpcell predict`` predicts them and scored as ``time_to_accuracy.py`` scores.
An ensemble's members are tuned each on their own validation images and their settings
combined (``qpcell.ensemble.combined_postprocess``), as ``qpcell train`` does.

The same weights in every column: the difference is the views alone. Where a run trained on its
validation images too at the end (the refit, at most 30 images: NuCLS), its validation images
are no longer held out, for every set of views alike.

Usage::

    python benchmarks/time_to_accuracy.py --datasets endonuke --minutes 10 --seeds 0,1,2 \\
        --workdir runs/t2a
    python benchmarks/views.py runs/t2a/endonuke-unet-fast-10min-seed* --dataset endonuke \\
        --json views.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import data_root, scores_of  # noqa: E402
from time_to_accuracy import DATASETS, load_split, predict_images  # noqa: E402

KEYS = ("detection_f1", "weighted_f1", "mean_class_aware_f1")


def tuned_setting(folder: Path, split, views: str, recipe_name: str) -> dict:
    """Post-processing settings of the single model in ``folder``, tuned on its validation
    images from the maps of ``views``."""
    from qpcell.checkpoint import load_model
    from qpcell.predict import source_mpp_of
    from qpcell.recipe import recipe
    from qpcell.train import load_train_image
    from qpcell.tuning import image_maps, tune_postprocess

    bundle = replace(load_model(folder, device="cpu"), views=views)
    training = bundle.meta["training"]
    names = set(training["val_images"])
    source = source_mpp_of(bundle.meta)
    val = [load_train_image(a, bundle.mpp, source) for a in split.trainval if a.name in names]
    base = recipe(recipe_name).post
    base = base.scaled(bundle.mpp) if bundle.mpp else base
    maps = [image_maps(bundle.predict_maps, d.pixels) for d in val]
    setting, _, _ = tune_postprocess(maps, val, split.classes, base,
                                     training["match_radius_px"])
    return {"base": base, "setting": setting}


def score_views(folder: Path, split, views: str, recipe_name: str, cache: dict,
                tuned_for: str | None = None) -> dict:
    """Scores on the test split of the model (or ensemble) in ``folder`` with ``views``, its
    settings tuned for ``tuned_for`` (default: ``views`` themselves); ``cache`` keeps members'
    settings between calls."""
    from qpcell.checkpoint import load_model, read_config
    from qpcell.ensemble import combined_postprocess
    from qpcell.metrics import score_dataset
    from qpcell.predict import source_mpp_of

    config = read_config(folder)
    members = ([folder / m for m in config["members"]] if config.get("kind") == "ensemble"
               else [folder])
    posts = []
    for member in members:
        key = (str(member), tuned_for or views)
        if key not in cache:
            cache[key] = tuned_setting(member, split, tuned_for or views, recipe_name)
        tuned = cache[key]
        posts.append(replace(tuned["base"], **tuned["setting"]))
    post = combined_postprocess(posts)
    bundle = replace(load_model(folder, device="cpu"), views=views, postprocess=post)
    preds = predict_images(bundle, split.test, source_mpp_of(bundle.meta))
    report = score_dataset(list(zip(preds, split.test, strict=True)),
                           [c.name for c in split.classes], split.radius_px)
    return {"scores": scores_of(report),
            "setting": {k: getattr(post, k) for k in ("threshold", "min_area_px",
                                                      "peak_window_px", "class_box_px",
                                                      "class_gain")}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from qpcell.views import VIEWS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", type=Path, nargs="+", help="model folders kept by "
                   "time_to_accuracy.py --workdir (single models or ensembles)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="endonuke")
    p.add_argument("--views", default=",".join(VIEWS),
                   help=f"comma-separated, from {', '.join(VIEWS)} (default all)")
    p.add_argument("--recipe", default="fast", help="the recipe the models were trained with")
    p.add_argument("--one-view-with-their-settings", action="store_true",
                   help="also score one view with the settings tuned for each other set of "
                   "views (what `qpcell predict --tta none` does with a model tuned for them); "
                   "rows 'none@VIEWS'")
    p.add_argument("--cache", type=Path, default=Path("runs/data-cache"),
                   help="where time_to_accuracy.py wrote resampled data")
    p.add_argument("--max-test", type=int, default=None,
                   help="score only the first N test images (3 for time_to_accuracy --smoke)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.views = [v for v in args.views.split(",") if v]
    if not args.views or set(args.views) - set(VIEWS):
        p.error(f"--views must name some of {', '.join(VIEWS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    split = load_split(args.dataset, data_root(), args.cache, max_test=args.max_test)
    models, cache = {}, {}
    for folder in args.models:
        rows = {}
        for views in args.views:
            t0 = time.perf_counter()
            rows[views] = {**score_views(folder, split, views, args.recipe, cache),
                           "seconds": time.perf_counter() - t0}
        if args.one_view_with_their_settings:
            for views in [v for v in args.views if v != "none"]:
                t0 = time.perf_counter()
                rows[f"none@{views}"] = {**score_views(folder, split, "none", args.recipe,
                                                       cache, tuned_for=views),
                                         "seconds": time.perf_counter() - t0}
        for views, row in rows.items():
            print(f"{folder.name:40s} {views:14s} "
                  + "  ".join(f"{k} {row['scores'][k]:.4f}" for k in KEYS), flush=True)
        models[str(folder)] = rows
    summary = {}
    for views in rows:
        values = {k: [m[views]["scores"][k] for m in models.values()] for k in KEYS}
        summary[views] = {k: {"mean": float(np.mean(v)),
                              "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                          for k, v in values.items()}
        if views != args.views[0]:
            diffs = {k: [m[views]["scores"][k] - m[args.views[0]]["scores"][k]
                         for m in models.values()] for k in KEYS}
            summary[views]["minus_" + args.views[0]] = {
                k: {"mean": float(np.mean(d)), "higher": int(np.sum(np.array(d) > 0)),
                    "of": len(d)} for k, d in diffs.items()}
        print(f"{views:14s} " + "  ".join(
            f"{k} {summary[views][k]['mean']:.4f} ± {summary[views][k]['std']:.4f}"
            for k in KEYS), flush=True)
    result = {"benchmark": "views", "dataset": args.dataset, "recipe": args.recipe,
              "models": models, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=_plain), encoding="utf-8")
    return result


def _plain(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()
