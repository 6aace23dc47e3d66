"""Time to accuracy: how good a model ``qpcell train`` gives after N minutes, as a new user runs it.

Each run is what a user does: images without a pixel size, ``qpcell train`` with a time
budget and nothing else (the scale comes from the annotated nuclei, :mod:`qpcell.scale`), then
prediction on the held-out images the way ``qpcell predict`` reads them (tiles at the model's
µm/px, the training's pixel-size estimate for images without one), scored against their points
by ``qpcell.metrics.score_dataset``. Mean ± sample std over the seeds.

Data (read from ``$QPCELL_DATA`` or ``../shared/data``; never copied into the repository):

* ``endonuke`` (EndoNuke, IHC; Naumov et al., Data 2022, CC BY 4.0): the split of
  benchmarks/accuracy.py (test = every third image by number, 94; train + validation = the
  other 188, 7:3 by the seed), scored at 6 px (at the native scale).
* ``endonuke-x2``, ``endonuke-x3``: the same images and points resampled 2x and 3x (bilinear),
  as a 40x scan without metadata arrives; scored at 12 and 18 px (the same distance in the
  tissue). Written once to ``--cache``.
* ``nucls`` (the NuCLS example, H&E; Amgad et al., GigaScience 2022, CC0): its train/ (7:3)
  and test/ folders, scored at 8 px. A smoke check of another stain, 5 test tiles.

Usage::

    python benchmarks/time_to_accuracy.py --datasets endonuke --minutes 5,10,30 --seeds 0,1,2 \\
        --json tta.json --plot docs/figures/time-to-accuracy.png
    python benchmarks/time_to_accuracy.py --recipe paper --minutes 10     # the paper's recipe
    python benchmarks/time_to_accuracy.py --minutes 30 --score-rounds   # every round on test
    python benchmarks/time_to_accuracy.py --smoke                         # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import data_root, epoch_picks, scores_of, summarise  # noqa: E402

from qpcell.errors import QpcellError  # noqa: E402

#: Matching radius (px at the data's native scale) and how the data was made.
DATASETS = {"endonuke": (6.0, 1), "endonuke-x2": (6.0, 2), "endonuke-x3": (6.0, 3),
            "nucls": (8.0, 1)}
TARGETS = {10: {"detection_f1": 0.89, "weighted_f1": 0.94, "mean_class_aware_f1": 0.60},
           30: {"detection_f1": 0.90, "weighted_f1": 0.95, "mean_class_aware_f1": 0.65}}


@dataclass
class Split:
    """One dataset as a user has it: annotated images (files, no pixel size) and the classes."""

    name: str
    classes: tuple
    trainval: list  # AnnotatedImage
    test: list  # AnnotatedImage
    radius_px: float  # matching radius at the images' own scale


def resampled_endonuke(root: Path, factor: int, cache: Path) -> Path:
    """EndoNuke's images and points resampled ``factor`` times (bilinear), written once."""
    from PIL import Image
    from skimage.transform import rescale

    src = root / "endonuke"
    if factor == 1:
        return src
    out = cache / f"endonuke-x{factor}"
    done = out / ".complete"
    if done.exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text((src / "classes.txt").read_text())
    for label in sorted((src / "labels").glob("*.txt")):
        image = src / "images" / f"{label.stem}.png"
        rgb = np.asarray(Image.open(image).convert("RGB"))
        big = rescale(rgb, factor, order=1, channel_axis=-1, preserve_range=True)
        Image.fromarray(np.clip(big + 0.5, 0, 255).astype(np.uint8)).save(
            out / "images" / f"{label.stem}.png")
        rows = np.loadtxt(label, ndmin=2)
        if rows.size:
            rows[:, :2] = (rows[:, :2] + 0.5) * factor - 0.5
        np.savetxt(out / "labels" / label.name, rows, fmt=["%.2f", "%.2f", "%d"])
    done.touch()
    return out


def load_split(name: str, root: Path, cache: Path, *, max_trainval: int | None = None,
               max_test: int | None = None) -> Split:
    """The user's view of dataset ``name`` (see the module docstring)."""
    from qpcell.io.project import natural_key
    from qpcell.io.tables import import_tables

    radius, factor = DATASETS[name]
    if name.startswith("endonuke"):
        if not (root / "endonuke" / "labels").is_dir():
            raise QpcellError("EndoNuke not found (set QPCELL_DATA)", root / "endonuke")
        imp = import_tables(resampled_endonuke(root, factor, cache))
        anns = sorted(imp.images, key=lambda a: natural_key(a.name))
        test = [a for i, a in enumerate(anns) if i % 3 == 0]
        rest = [a for i, a in enumerate(anns) if i % 3]
        classes = imp.classes
    else:
        folder = root / "nucls-example"
        if not (folder / "train" / "labels").is_dir():
            raise QpcellError("NuCLS example not found (set QPCELL_DATA)", folder)
        tr, te = import_tables(folder / "train"), import_tables(folder / "test")
        rest = sorted(tr.images, key=lambda a: natural_key(a.name))
        test = sorted(te.images, key=lambda a: natural_key(a.name))
        classes = tr.classes
    return Split(name, tuple(classes), rest[:max_trainval], test[:max_test], radius * factor)


def with_overrides(rec, overrides: Sequence[str]):
    """The recipe with ``part.field=value`` settings changed (train, patch, mask, post, model),
    for measuring one change at a time."""
    parts = {"train": rec.train, "patch": rec.patch, "mask": rec.mask, "post": rec.post}
    model = dict(rec.model_kwargs)
    for item in overrides:
        key, _, text = item.partition("=")
        part, _, name = key.partition(".")
        value = json.loads(text) if text not in ("cells", "grid", "constant", "cosine") else text
        if part == "model":
            model[name] = value
        elif part in parts and hasattr(parts[part], name):
            parts[part] = replace(parts[part], **{name: value})
        else:
            raise QpcellError(f"--set {item!r}: expected train.X, patch.X, mask.X, post.X or "
                              "model.X")
    return replace(rec, train=parts["train"], patch=parts["patch"], mask=parts["mask"],
                   post=parts["post"], model_kwargs=model)


def run_one(split: Split, minutes: float, seed: int, recipe_name: str, workdir: Path, *,
            device: str | None = None, base: int | None = None,
            overrides: Sequence[str] = (), model: str | None = None, init: str = "none",
            train_images: int | None = None, model_mpp: float | None = None,
            score_rounds: bool = False, members: int | None = None) -> dict:
    """Train with a time budget as ``qpcell train`` does, predict the test images, score.

    ``init`` is the starting weights (``builtin``, ``none`` or a model folder; default
    ``none``, as ``qpcell train``). ``train_images``: train (and validate) on only this many
    of the training images, drawn by the seed, as a user with a few annotated tiles does;
    the test images stay all of them. ``model_mpp``: the scale the model works at (µm/px;
    default the paper's 0.44, as ``qpcell train``). ``score_rounds``: also save every
    validation round's model and score it on the test images, with what each rule for the
    kept round would have scored (``round_scores``, ``picks``); the test images choose
    nothing. A round's model is scored with the setting its round chose (the threshold alone,
    :func:`qpcell.tuning.tune_postprocess` ``quick``), so the rounds compare among themselves;
    the run's own ``scores`` are the kept model's after the full search at the end.
    ``members``: the models of an ensemble, as ``qpcell train --members`` (None: ``auto``,
    as many as the budget holds after the step cap, :mod:`qpcell.train_ensemble`)."""
    from qpcell.config import PAPER_MPP
    from qpcell.ensemble import MAX_MEMBERS, MEMBERS_DIR, member_name
    from qpcell.recipe import default_model, recipe
    from qpcell.train import epoch_dir, estimate_source_mpp
    from qpcell.train_ensemble import train_ensemble

    model = model or default_model(recipe_name)
    rec = with_overrides(recipe(recipe_name, model), overrides)
    if train_images is not None:
        pick = np.random.default_rng(seed).choice(len(split.trainval), train_images,
                                                  replace=False)
        split = replace(split, trainval=[split.trainval[i] for i in sorted(pick)])
    work_mpp = model_mpp or PAPER_MPP
    source_mpp, info = estimate_source_mpp(split.trainval, work_mpp, None)
    # The matching radius at the model's scale: the same distance in the tissue as at test.
    model_px = split.radius_px * (source_mpp / work_mpp if source_mpp else 1.0)
    kwargs = dict(rec.model_kwargs)
    if base:
        kwargs["base"] = base
    tag = ("" if init == "none" else f"-init-{Path(init).name}") + (
        "" if train_images is None else f"-{train_images}images") + (
        "" if model_mpp is None else f"-{model_mpp:g}mpp")
    out = workdir / f"{split.name}-{model}-{recipe_name}-{minutes:g}min-seed{seed}{tag}"
    t0 = time.perf_counter()
    results = train_ensemble(split.trainval, split.classes, out, members=members,
                             max_members=MAX_MEMBERS, model_name=model,
                             model_kwargs=kwargs, model_mpp=work_mpp,
                             train_cfg=replace(rec.train, seed=seed, time_budget_s=minutes * 60,
                                               keep_epochs=rec.train.keep_epochs
                                               or score_rounds),
                             mask_cfg=rec.mask, patch_cfg=rec.patch, post_cfg=rec.post,
                             match_radius_px=model_px, init=init,
                             device=device)
    result = results[0]  # rounds and the kept round: the first member's
    first = out / MEMBERS_DIR / member_name(1) if len(results) > 1 else out
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    bundle, scores = score_on_test(out, split, source_mpp, device)
    predict_s = time.perf_counter() - t1
    setting = bundle.meta["postprocess"]
    steps = int(sum(h.steps for r in results for h in r.history))
    extra = {}
    if score_rounds:
        extra["round_scores"] = [
            {"round": h.epoch, "val_f1": h.val_f1, "val_class_f1": h.val_class_f1,
             "test": score_on_test(epoch_dir(first, h.epoch), split, source_mpp, device)[1]}
            for h in result.history]
        extra["picks"] = epoch_picks(result.history,
                                     [{"epoch": r["round"], "test": r["test"]}
                                      for r in extra["round_scores"]])
    return {"method": f"{split.name} {minutes:g} min" + (
                f" from {init}" if init != "none" else "") + (
                f" ({train_images} images)" if train_images is not None else ""),
            "dataset": split.name, "minutes": minutes, "seed": seed, "recipe": recipe_name,
            "model": model, "model_spec": network_spec(out), "init": init,
            "train_images": len(split.trainval),
            "model_mpp": work_mpp,
            "train_seconds": train_s, "predict_seconds": predict_s,
            "rounds": len(result.history), "best_round": result.best_epoch,
            "steps": steps, "patches": result.n_patches,
            # steps per second of the whole run, validation included: how fast this machine
            # trains (the same budget on a faster CPU takes more steps)
            "steps_per_second": steps / train_s,
            "model_dir": str(out), "members": len(results),
            "member_steps": [int(sum(h.steps for h in r.history)) for r in results],
            "val_f1": result.val_f1, "source_mpp": info, "threshold": setting["threshold"],
            "peak_window_px": setting["peak_window_px"],
            "views": getattr(bundle, "views", "none"),
            "context_radius_px": setting.get("context_radius_px", 0.0),
            "context_weight": setting.get("context_weight", 0.0),
            "cell_classifier": cell_classifiers(out), "notes": result.notes,
            "overrides": list(overrides), "scores": scores, **extra}


def network_spec(model_dir: Path) -> dict | None:
    """The network of the model in ``model_dir`` (``config.json``'s ``model``); for an
    ensemble, its first member's (the members share it)."""
    from qpcell.checkpoint import read_config
    from qpcell.ensemble import MEMBERS_DIR, member_name

    config = read_config(model_dir)
    if config.get("model") is None and config.get("members"):
        config = read_config(model_dir / MEMBERS_DIR / member_name(1))
    return config.get("model")


def cell_classifiers(model_dir: Path) -> list[dict | None]:
    """What each member's cell classifier did (``config.json``, ``training.cell_classifier``:
    share, steps, seconds; None where a member trained none)."""
    from qpcell.checkpoint import read_config

    config = read_config(model_dir)
    folders = [model_dir / m for m in config["members"]] if config.get("members") else [
        model_dir]
    return [read_config(f).get("training", {}).get("cell_classifier") for f in folders]


def predict_images(bundle, images: Sequence, source_mpp: float | None) -> list:
    """Detections of the model ``bundle`` on ``images`` (annotated images), read as ``qpcell
    predict`` reads them: tiles at the model's µm/px, ``source_mpp`` (the training's estimate)
    for images without a pixel size."""
    from qpcell.io.slides import open_slide
    from qpcell.predict import Predictor, predict_slide

    predictor = Predictor.from_bundle(bundle)
    preds = []
    for ann in images:
        with open_slide(ann.image, mpp=source_mpp) as slide:
            preds.append(predict_slide(slide, predictor.map_fn, predictor.postprocess_fn,
                                       mpp=predictor.mpp, classes=predictor.classes,
                                       reach_px=predictor.reach_px, tissue=False))
    return preds


def score_on_test(model_dir: Path, split: Split, source_mpp: float | None,
                  device: str | None) -> tuple:
    """The model in ``model_dir`` (its bundle) and its scores on ``split``'s test images
    (:func:`predict_images`)."""
    from qpcell.checkpoint import load_model
    from qpcell.metrics import score_dataset

    bundle = load_model(model_dir, device=device)
    report = score_dataset(list(zip(predict_images(bundle, split.test, source_mpp), split.test,
                                    strict=True)),
                           [c.name for c in split.classes], split.radius_px)
    return bundle, scores_of(report)


def score_ensembles(args: argparse.Namespace, root: Path) -> dict:
    """``--ensembles-of``: each group of ``args.group`` model folders copied into one ensemble
    folder (:func:`qpcell.train_ensemble.write_ensemble`) under ``args.workdir`` and scored on
    the test images as :func:`run_one` scores a run."""
    import shutil

    from qpcell.checkpoint import CONFIG, WEIGHTS, read_config
    from qpcell.ensemble import MEMBERS_DIR, member_name
    from qpcell.predict import source_mpp_of
    from qpcell.train_ensemble import write_ensemble

    folders = list(args.ensembles_of)
    if len(folders) % args.group:
        sys.exit(f"time_to_accuracy: {len(folders)} model folders do not make groups of "
                 f"{args.group}")
    split = load_split(args.datasets.split(",")[0], root, args.cache)
    runs = []
    for i in range(0, len(folders), args.group):
        group = folders[i:i + args.group]
        seeds = [read_config(f)["training"]["config"]["seed"] for f in group]
        out = args.workdir / f"{split.name}-ensemble-seeds-{'-'.join(map(str, seeds))}"
        members = []
        for k, folder in enumerate(group, 1):
            member = out / MEMBERS_DIR / member_name(k)
            member.mkdir(parents=True, exist_ok=True)
            for name in (CONFIG, WEIGHTS):
                shutil.copy2(folder / name, member / name)
            members.append(member)
        write_ensemble(out, members)
        t0 = time.perf_counter()
        bundle, scores = score_on_test(out, split, source_mpp_of(read_config(out)),
                                       args.device)
        predict_s = time.perf_counter() - t0
        runs.append({"method": f"{split.name} ensemble of {args.group}", "dataset": split.name,
                     "seeds": seeds, "members": [str(f) for f in group],
                     "postprocess": bundle.meta["postprocess"], "scores": scores,
                     "predict_seconds": predict_s, "train_seconds": float("nan")})
        print(f"{split.name} ensemble of seeds {seeds}: detection F1 "
              f"{scores['detection_f1']:.3f} weighted F1 {scores['weighted_f1']:.3f} "
              f"class-aware {scores['mean_class_aware_f1']:.3f}", flush=True)
    summary = summarise(runs)
    for method, stats in summary.items():
        print(f"{method}: " + "  ".join(
            f"{k} {stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}"
            for k in ("detection_f1", "weighted_f1", "mean_class_aware_f1")), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "runs": runs, "summary": summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return result


def curve(run: dict) -> tuple[str, str, str, str, str | None]:
    """The line of the figure a run belongs to: its dataset, network (with its loss weighting
    where it has one), starting model, how it predicts (its test-time views and whether it was
    offered its neighbours' classes; "" for one view and none, and in records that predate
    them) and precision (None in records that predate it), so that seeds are averaged only with
    seeds of the same setting and arithmetic."""
    model = run.get("model", "s-drdin")
    weights = (run.get("model_spec") or {}).get("class_weights")
    views = run.get("views") or "none"
    how = " + ".join(part for part in (None if views == "none" else views,
                                       "neighbours" if run.get("context_radius_px") else None)
                     if part)
    return (run["dataset"], model if weights is None else f"{model} ({weights} weights)",
            run.get("init") or "none", how, run.get("precision"))


def plot(runs: Sequence[dict], path: Path) -> None:
    """Detection, weighted and class-aware F1 against minutes, one line per :func:`curve`
    (mean and sample std over the seeds; n = seeds per point), and the EndoNuke targets
    (:data:`TARGETS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("detection_f1", "detection F1"), ("weighted_f1", "weighted class F1"),
            ("mean_class_aware_f1", "mean class-aware F1"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))

    lines = dict.fromkeys(curve(r) for r in runs)
    for ax, (key, title) in zip(axes, keys, strict=True):
        for line in lines:
            ds, model, init, how, precision = line
            mine = [r for r in runs if curve(r) == line]
            mins = sorted({r["minutes"] for r in mine})
            vals = [[r["scores"][key] for r in mine if r["minutes"] == m] for m in mins]
            label = (f"{ds} {model}" + ("" if init == "none" else f" from {Path(init).name}")
                     + ("" if precision is None else f", {precision}")
                     + (f", {how}" if how else ""))
            ax.errorbar(mins, [np.mean(v) for v in vals],
                        yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
                        marker="o", capsize=3,
                        label=f"{label} (n={'/'.join(str(len(v)) for v in vals)})")
        if any(r["dataset"].startswith("endonuke") for r in runs):
            ax.scatter(list(TARGETS), [t[key] for t in TARGETS.values()], marker="_", s=400,
                       color="black", label="target (EndoNuke, issue 18)")
        ax.set_xlabel("training budget (minutes)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.03 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="endonuke", help="comma-separated: "
                   + ", ".join(DATASETS))
    p.add_argument("--minutes", default="10", help="comma-separated training budgets")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--recipe", default="fast", help="fast (qpcell train's default) or paper")
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None, help="a single model of the registry, e.g. "
                   "s-drdin (default: the recipe's network, as in qpcell train: unet for "
                   "fast, s-drdin for paper)")
    p.add_argument("--set", action="append", default=[], metavar="PART.FIELD=VALUE",
                   help="change one setting of the recipe (repeatable), e.g. "
                   "patch.class_balance=0 or model.det_dice=0")
    p.add_argument("--base", type=int, default=None, help="network width (default: the "
                   "recipe's)")
    p.add_argument("--init", default="none", help="starting weights: none (the default, as "
                   "qpcell train), builtin or a model folder")
    p.add_argument("--train-images", type=int, default=None, help="train and validate on "
                   "only N of the training images, drawn by the seed (a user with a few "
                   "annotated tiles); the test images stay all of them")
    p.add_argument("--model-mpp", type=float, default=None, help="the scale the model works "
                   "at, µm/px (default: the paper's 0.44, as qpcell train)")
    p.add_argument("--workdir", type=Path, default=Path("runs/time-to-accuracy"))
    p.add_argument("--cache", type=Path, default=Path("runs/data-cache"),
                   help="where the resampled EndoNuke copies are written")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--plot-from", type=Path, nargs="+", default=None, metavar="JSON",
                   help="draw --plot from the runs of earlier --json files; train nothing")
    p.add_argument("--score-rounds", action="store_true", help="also score every "
                   "validation round's model on the test images (with the threshold its round "
                   "chose), and what each rule for the kept round would have kept (the test "
                   "images choose nothing)")
    p.add_argument("--members", default="auto", help="models per run, averaged (as "
                   "qpcell train --members; default auto: another one while the budget "
                   "holds one after the step cap)")
    p.add_argument("--ensembles-of", type=Path, nargs="+", default=None, metavar="MODEL",
                   help="train nothing: average the model folders of earlier runs (of the "
                   "one dataset --datasets names) in groups of --group, in the order given, "
                   "and score each group as the ensemble qpcell train --members would have "
                   "trained from those seeds")
    p.add_argument("--group", type=int, default=3, help="members per ensemble of "
                   "--ensembles-of")
    p.add_argument("--smoke", action="store_true", help="6 training and 3 test images, "
                   "a few seconds of training, narrow network: for the tests")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    import torch

    from qpcell.device import autocast_dtype, cpu_name, describe, pick_device

    args = parse_args(argv)
    if args.plot_from:
        runs = []
        for f in args.plot_from:
            record = json.loads(f.read_text())
            precision = (record.get("machine") or {}).get("precision")
            runs += [{"precision": precision, **r} for r in record["runs"]
                     if r["recipe"] == args.recipe]
        plot(runs, args.plot or Path("time-to-accuracy.png"))
        return {"runs": runs}
    root = data_root()
    if args.ensembles_of:
        return score_ensembles(args, root)
    minutes = [float(m) for m in args.minutes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    device = pick_device(args.device)
    amp = autocast_dtype(device, "auto")
    machine = {"device": describe(device), "cpu": cpu_name(),
               "threads": torch.get_num_threads(),
               "precision": "bf16" if amp == torch.bfloat16 else "fp32"}
    print(f"time to accuracy on {machine['device']}, precision {machine['precision']}",
          flush=True)
    runs = []
    for name in args.datasets.split(","):
        if name not in DATASETS:
            sys.exit(f"time_to_accuracy: unknown dataset {name!r}; choose from "
                     f"{', '.join(DATASETS)}")
        try:
            split = load_split(name, root, args.cache,
                               max_trainval=6 if args.smoke else None,
                               max_test=3 if args.smoke else None)
        except QpcellError as err:
            sys.exit(f"time_to_accuracy: {err}")
        if args.train_images is not None and not 2 <= args.train_images <= len(split.trainval):
            sys.exit(f"time_to_accuracy: --train-images {args.train_images}: {name} has "
                     f"{len(split.trainval)} training images (at least 2 are needed)")
        for m in minutes:
            for seed in seeds:
                run = run_one(split, m, seed, args.recipe, args.workdir, device=args.device,
                              base=4 if args.smoke else args.base, overrides=args.set,
                              model=args.model, init=args.init,
                              train_images=args.train_images, model_mpp=args.model_mpp,
                              score_rounds=args.score_rounds,
                              members=None if args.members == "auto" else int(args.members))
                run["precision"] = machine["precision"]
                runs.append(run)
                s = run["scores"]
                print(f"{name} {m:g} min seed {seed}: detection F1 {s['detection_f1']:.3f} "
                      f"(P {s['detection_precision']:.3f} R {s['detection_recall']:.3f}) "
                      f"weighted F1 {s['weighted_f1']:.3f} class-aware "
                      f"{s['mean_class_aware_f1']:.3f}  [{run['rounds']} rounds, "
                      f"{run['steps']} steps, {run['train_seconds']:.0f} s, "
                      f"{run['steps_per_second']:.2f} steps/s, thr "
                      f"{run['threshold']}, window {run['peak_window_px']}]", flush=True)
                for rule, pick in run.get("picks", {}).items():
                    t = pick["test"]
                    print(f"    {rule}: round {pick['epoch']}, test {t['detection_f1']:.3f} / "
                          f"{t['weighted_f1']:.3f} / {t['mean_class_aware_f1']:.3f}",
                          flush=True)
    summary = summarise(runs)
    for method, stats in summary.items():
        print(f"{method}: " + "  ".join(
            f"{k} {stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}"
            for k in ("detection_f1", "weighted_f1", "mean_class_aware_f1")), flush=True)
    result = {"machine": machine, "recipe": args.recipe, "date": time.strftime("%Y-%m-%d"),
              "runs": runs, "summary": summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
    if args.plot:
        plot(runs, args.plot)
    return result


if __name__ == "__main__":
    main()
