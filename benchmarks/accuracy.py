"""Accuracy benchmark on real data: the papers' Table 2/3 (S-DRDIN) and Table 1 (MTL-IHC).

Every method is trained on the training images, tunes its post-processing on the validation
images (``qpcell.train.train`` does that after every epoch and keeps the best epoch), predicts
the held-out test images whole (``qpcell.checkpoint.load_model``, then
``ModelBundle.predict_maps`` and ``to_detections``, as validation does) and is scored by
``qpcell.metrics.score_dataset`` at the matching radius: detection precision / recall / F1 /
TP / FP (S-DRDIN Table 2), weighted classification precision / recall / F1 and per-class F1
over the matched cells (Table 3), class-aware totalF1 / meanF1 per class (MTL-IHC Table 1),
and the training time. Mean ± sample standard
deviation over the seeds (``--seeds``; a seed fixes the train/validation split, the weights
and the patches). A radius sweep PNG per method (first seed) goes to ``--plots``.

Data (read in memory from ``$QPCELL_DATA`` or ``../shared/data`` beside the checkout; never
copied into the repository):

* ``endonuke`` (default): EndoNuke, IHC (ER/PR) endometrium, 282 tiles of 200x200 px,
  classes stroma / epithelium / other. Naumov et al., "EndoNuke: Nuclei Detection Dataset for
  Estrogen and Progesterone Stained IHC Endometrium Scans", Data 2022; CC BY 4.0. Split: the
  stems sorted numerically, test = positions ``i % 3 == 0`` (94 images), the other 188 split
  7:3 into train / validation by the seed. Pixel size unknown: models work at the native
  scale (``model_mpp=None``), S-DRDIN disc radius 2 px, matching radius 6 px (about half the
  median nearest-neighbour spacing of 11.4 px) for validation and test.
* ``nucls``: the NuCLS example shipped with CellViT++ (H&E breast; Amgad et al., GigaScience
  2022; CC0 1.0): its own ``train/`` (10 tiles, 7:3 again) and ``test/`` (5 tiles), four
  classes, matching radius 8 px. Tiny: a smoke check of the H&E path, not a benchmark.

Methods (``--methods``, comma separated; default all):

``classical``               colour deconvolution + LoG peaks + random forest (qpcell.classical)
``s-drdin``                 the paper's model (stop-gradient, pixel-weighted CE)
``s-drdin-gradient``        no stop-gradient
``separate``                drdin-detection + drdin-classification, trained one after the
                            other (``qpcell train --model separate``); the pipeline's class box
                            is re-tuned on validation with its classification maps (the
                            detection model alone cannot tune it), so both pipelines are tuned
                            alike
``unet``                    plain U-Net, plain CE
``mtl-ihc``                 paper 003 "Ours" (``--aux none``), ResNet-18 DeepLabv3+
``mtl-ihc+dynamic``         "Ours+" (``--aux dynamic``)
``mtl-ihc+dynamic+prior``   "Ours++" (``--aux dynamic,prior``); prior class = epithelium on
                            EndoNuke (it grows in glands), tumor_any on NuCLS

Choices (measured on this 2-core CPU, shared, see docs/RESULTS.md):

* ``--patch-size 208`` (default): a 200 px EndoNuke tile is one padded patch either way, and
  208 (13 x 16) pads 8 px where 224 pads 24, so an epoch costs (208/224)² = 0.86 of 224's.
* ``--epochs 20`` (default), ``--lr-schedule cosine``, ``--rare-repeats 2`` (defaults here,
  the same for every deep method; ``qpcell train`` keeps the paper's constant rate and plain
  sampling unless asked): with bf16 on a 2-core Intel CPU with AMX an S-DRDIN epoch (132 patches,
  batch 4, plus validation of 56 images and the post-processing search) takes about 20 s on
  2 idle cores, so one seed of the S-DRDIN table (s-drdin, s-drdin-gradient, separate, unet,
  classical) takes about 30 min and three seeds about 1.5 h; MTL-IHC (ResNet-18) costs about
  twice S-DRDIN per epoch, plus its prior model. Without bf16 (a 2-core AVX2 CPU) an
  S-DRDIN epoch takes 90-120 s, one seed about 35 min; on one H200 GPU about 9 s, because
  the validation search on the CPU then dominates. On seed 0, 20 epochs with the cosine
  schedule and rare-class windows scored 0.862 / 0.906 / 0.509 (detection F1, weighted F1,
  mean class-aware F1) against 0.861 / 0.915 / 0.499 with the paper's constant rate (float32,
  older tuning) and 0.873 / 0.881 / 0.483 after 40 constant-rate epochs; the rare class is
  predicted at all only with the rare-class windows (docs/RESULTS.md).
* ``--select-on detection`` (default, as ``qpcell train``): each deep method keeps its best
  epoch by validation detection F1; ``combined`` by the mean of detection and weighted
  classification F1. ``--keep-epochs`` saves every epoch's model and, after training, scores
  each on the test split, so one run shows what either rule (and the best epoch in hindsight)
  would have scored.
* ``--quick``: 1 seed, 3 epochs, every third test image: a check that everything runs and
  scores (about 20 min for all methods). ``--smoke``: 6 training images, 1 epoch of 2 batches,
  3 test images, narrow networks: seconds, for tests/test_benchmarks.py.

Usage::

    python benchmarks/accuracy.py --quick --json quick.json --markdown quick.md
    python benchmarks/accuracy.py --seeds 0,1,2 --json acc.json --markdown acc.md --plots figs/
    python benchmarks/accuracy.py --dataset nucls --epochs 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from qpcell.config import SELECT_ON  # noqa: E402
from qpcell.errors import QpcellError  # noqa: E402
from qpcell.points import AnnotatedImage, CellClass, Detections  # noqa: E402

ATTRIBUTION = {
    "endonuke": "EndoNuke (Naumov et al., Data 2022), CC BY 4.0; test subset from the public "
                "ispras/endonet repository",
    "nucls": "NuCLS (Amgad et al., GigaScience 2022), CC0 1.0; example shipped with "
             "TIO-IKIM/CellViT-plus-plus",
}
METHODS = ("classical", "s-drdin", "s-drdin-gradient", "separate", "unet", "mtl-ihc",
           "mtl-ihc+dynamic", "mtl-ihc+dynamic+prior")
LABELS = {
    "classical": "classical (deconvolution + RF)",
    "s-drdin": "S-DRDIN",
    "s-drdin-gradient": "S-DRDIN-gradient",
    "separate": "DRDIN-detection + DRDIN-classification",
    "unet": "U-Net",
    "mtl-ihc": "MTL-IHC Ours (aux none)",
    "mtl-ihc+dynamic": "MTL-IHC Ours+ (dynamic)",
    "mtl-ihc+dynamic+prior": "MTL-IHC Ours++ (dynamic, prior)",
}
#: The issue's goal on the EndoNuke test split (s-drdin).
GOAL = {"detection_f1": 0.92, "weighted_f1": 0.95, "mean_class_aware_f1": 0.70}


def data_root() -> Path:
    """``$QPCELL_DATA`` or ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("QPCELL_DATA", REPO.parent / "shared" / "data"))


# --------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """Annotated images split into train+validation and test, at the native scale."""

    name: str
    classes: tuple[CellClass, ...]
    trainval: list  # qpcell.train.TrainImage
    test: list[AnnotatedImage]
    test_pixels: list[np.ndarray]
    radius_px: float
    nucleus_radius_px: float
    prior_class: str


def _train_images(anns: Sequence[AnnotatedImage]) -> list:
    from qpcell.train import load_train_image

    return [load_train_image(a, None) for a in anns]


def load_dataset(name: str, root: Path, *, max_trainval: int | None = None,
                 test_step: int = 1, max_test: int | None = None) -> Dataset:
    """EndoNuke or the NuCLS example from ``root`` (see the module notes for the splits).

    ``max_trainval`` keeps the first training/validation images, ``test_step`` and
    ``max_test`` every ``test_step``-th test image, at most ``max_test`` (quick runs).
    """
    from qpcell.io.project import natural_key
    from qpcell.io.tables import import_tables

    if name == "endonuke":
        folder = root / "endonuke"
        if not (folder / "labels").is_dir():
            raise QpcellError("EndoNuke not found (set QPCELL_DATA to the folder holding "
                              "endonuke/)", folder)
        imp = import_tables(folder)
        anns = sorted(imp.images, key=lambda a: natural_key(a.name))
        test = [a for i, a in enumerate(anns) if i % 3 == 0]
        rest = [a for i, a in enumerate(anns) if i % 3]
        classes, radius, nucleus, prior = imp.classes, 6.0, 5.0, "epithelium"
    elif name == "nucls":
        folder = root / "nucls-example"
        if not (folder / "train" / "labels").is_dir():
            raise QpcellError("NuCLS example not found (set QPCELL_DATA to the folder holding "
                              "nucls-example/)", folder)
        train_imp, test_imp = import_tables(folder / "train"), import_tables(folder / "test")
        if [c.name for c in train_imp.classes] != [c.name for c in test_imp.classes]:
            raise QpcellError("train/ and test/ name different classes", folder)
        rest = sorted(train_imp.images, key=lambda a: natural_key(a.name))
        test = sorted(test_imp.images, key=lambda a: natural_key(a.name))
        classes, radius, nucleus, prior = train_imp.classes, 8.0, 8.0, "tumor_any"
    else:
        raise QpcellError(f"unknown dataset {name!r}; choose endonuke or nucls")
    rest = rest[:max_trainval]
    test = test[::test_step][:max_test]
    test_data = _train_images(test)
    return Dataset(name, tuple(classes), _train_images(rest), test,
                   [d.pixels for d in test_data], radius, nucleus, prior)


def script_dataset(name: str, what: str, *, threads: int | None = None, **kwargs) -> Dataset:
    """:func:`load_dataset` from :func:`data_root` for a benchmark script.

    Sets torch's CPU ``threads`` first (when given); a missing or unreadable dataset ends the
    script with a one-line error that starts with ``what``.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        return load_dataset(name, data_root(), **kwargs)
    except QpcellError as err:
        sys.exit(f"{what}: {err}")


# --------------------------------------------------------------------------- methods
@dataclass
class Settings:
    """What every method is trained with."""

    epochs: int
    patch_size: int
    disc_radius_px: float
    device: str | None
    max_steps: int | None = None
    base: int | None = None  # S-DRDIN / U-Net width (None: the paper's 16)
    mtl_channels: int | None = None  # MTL-IHC ASPP / decoder width (None: 256)
    prior_epochs: int = 10  # MTL-IHC's early-stopped prior model (paper: 10)
    lr: float | None = None  # S-DRDIN family / U-Net learning rate (None: the paper's 1e-3)
    precision: str = "auto"  # TrainConfig.precision: bf16 where the hardware has it
    rare_repeats: int = 0  # PatchConfig.rare_repeats: extra draws of rare-class windows
    lr_schedule: str = "constant"  # TrainConfig.lr_schedule
    select_on: str = "detection"  # TrainConfig.select_on: which epoch is kept
    keep_epochs: bool = False  # score every epoch's model on the test split too


def _train_kwargs(ds: Dataset, st: Settings, seed: int) -> dict:
    from qpcell.config import MaskConfig, PatchConfig, TrainConfig

    return {
        "model_mpp": None,
        "train_cfg": replace(TrainConfig(), epochs=st.epochs, seed=seed,
                             lr=st.lr or TrainConfig().lr, precision=st.precision,
                             lr_schedule=st.lr_schedule, select_on=st.select_on,
                             keep_epochs=st.keep_epochs),
        "patch_cfg": replace(PatchConfig(), size=st.patch_size, rare_repeats=st.rare_repeats),
        "match_radius_px": ds.radius_px,
        "device": st.device,
        "max_steps_per_epoch": st.max_steps,
        "prepared": ds.trainval,
        "mask_cfg": replace(MaskConfig(), disc_radius_px=st.disc_radius_px),
    }


def train_deep(method: str, ds: Dataset, st: Settings, seed: int, out: Path):
    """Train one deep method into the model folder ``out``; returns its TrainResult."""
    from qpcell.cli.train import run_training
    from qpcell.config import MTLConfig
    from qpcell.mtl import train_mtl
    from qpcell.train import train

    kwargs = _train_kwargs(ds, st, seed)
    if method.startswith("mtl-ihc"):
        aux = tuple(method.split("+")[1:])
        kwargs.pop("mask_cfg")  # MTL-IHC's own circle radius
        model_kwargs = {"channels": st.mtl_channels} if st.mtl_channels else None
        return train_mtl([], ds.classes, out, aux=aux, prior_classes=[ds.prior_class],
                         mtl_cfg=replace(MTLConfig(), prior_epochs=st.prior_epochs),
                         model_kwargs=model_kwargs, **kwargs)
    model_kwargs = {"base": st.base} if st.base else None
    if method == "separate":
        return run_training(ds.classes, [], out, "separate", show=False,
                            model_kwargs=model_kwargs, **kwargs)
    return train([], ds.classes, out, model_name=method, model_kwargs=model_kwargs, **kwargs)


def retune_pipeline(bundle, ds: Dataset, val_names: Sequence[str]):
    """The separate pipeline with its post-processing tuned on validation as one model.

    The detection model tuned threshold and minimum area on its detection map but could not
    tune the class box (it has no class maps); this re-runs the same search on the pipeline's
    maps, so the class box is chosen like S-DRDIN's.
    """
    from qpcell.config import PostprocessConfig
    from qpcell.train import image_maps, tune_postprocess

    val = [d for d in ds.trainval if d.name in set(val_names)]
    maps = [image_maps(bundle.predict_maps, d.pixels) for d in val]
    setting, _, _ = tune_postprocess(maps, val, ds.classes, PostprocessConfig(), ds.radius_px)
    return replace(bundle, postprocess=replace(PostprocessConfig(), **setting))


def predict_test(bundle, ds: Dataset) -> list[Detections]:
    """Whole-image predictions of the test images, exactly as validation saw its images.

    ``qpcell.train.image_maps`` (the maps of a whole image, padded to a multiple of 16) and
    ``ModelBundle.to_detections`` (the tuned post-processing): the test images are treated
    like the validation images the settings were tuned on.
    """
    from qpcell.train import image_maps

    return [bundle.to_detections(*image_maps(bundle.predict_maps, px)) for px in ds.test_pixels]


def run_classical(ds: Dataset, seed: int) -> tuple[list[Detections], dict]:
    """Fit the classical baseline (RF on the training split, detection tuned on train+val)."""
    from qpcell.classical import fit_classical
    from qpcell.train import split_names

    tr_names, _ = split_names([d.name for d in ds.trainval], 0.3, seed)
    train_set = [d for d in ds.trainval if d.name in set(tr_names)]
    t0 = time.perf_counter()
    model = fit_classical([d.pixels for d in train_set], [(d.xy, d.labels) for d in train_set],
                          ds.classes, nucleus_radius_px=ds.nucleus_radius_px,
                          match_radius_px=ds.radius_px,
                          tune_images=[d.pixels for d in ds.trainval],
                          tune_points=[d.xy for d in ds.trainval], seed=seed)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = [model.predict(px) for px in ds.test_pixels]
    return preds, {"train_seconds": seconds, "predict_seconds": time.perf_counter() - t1,
                   "settings": model.describe()}


def run_method(method: str, ds: Dataset, st: Settings, seed: int, workdir: Path
               ) -> tuple[list[Detections], dict]:
    """Train, predict the test images; returns the predictions and the run's facts."""
    if method == "classical":
        return run_classical(ds, seed)
    from qpcell.checkpoint import load_model

    out = workdir / f"{method}-seed{seed}"
    result = train_deep(method, ds, st, seed, out)
    bundle = load_model(out, device=st.device)
    facts = {"train_seconds": result.seconds, "best_epoch": result.best_epoch,
             "val_f1": result.val_f1, "val_class_f1": result.val_class_f1,
             "n_train_images": len(result.train_images),
             "n_val_images": len(result.val_images), "n_patches": result.n_patches,
             "history": [{"epoch": h.epoch, "loss": round(h.loss, 5), "val_f1": h.val_f1,
                          "val_class_f1": h.val_class_f1, "seconds": round(h.seconds, 2)}
                         for h in result.history]}
    if method == "separate":
        bundle = retune_pipeline(bundle, ds, result.val_images)
    facts["postprocess"] = (bundle.meta.get("peaks") if bundle.postprocess_kind == "peaks"
                            else {k: getattr(bundle.postprocess, k) for k in
                                  ("threshold", "min_area_px", "peak_window_px",
                                   "class_box_px", "class_gain")})
    t1 = time.perf_counter()
    preds = predict_test(bundle, ds)
    facts["predict_seconds"] = time.perf_counter() - t1
    if st.keep_epochs:
        facts["epochs"] = score_epochs(out, result.history, ds, st)
        facts["picks"] = epoch_picks(result.history, facts["epochs"])
    return preds, facts


def score_epochs(out: Path, history, ds: Dataset, st: Settings) -> list[dict]:
    """Test scores of every epoch's model (``keep_epochs``), each with its own tuned setting.

    The test split is only read here, after training: it shows what each rule for choosing
    the kept epoch would have scored, never which epoch is chosen.
    """
    from qpcell.checkpoint import load_model
    from qpcell.metrics import score_dataset
    from qpcell.train import epoch_dir

    names = [c.name for c in ds.classes]
    rows = []
    for h in history:
        bundle = load_model(epoch_dir(out, h.epoch), device=st.device)
        report = score_dataset(list(zip(predict_test(bundle, ds), ds.test, strict=True)), names,
                               ds.radius_px)
        s = scores_of(report)
        rows.append({"epoch": h.epoch, "val_f1": h.val_f1, "val_class_f1": h.val_class_f1,
                     "test": s})
        print(f"      epoch {h.epoch:3d}: validation {h.val_f1:.3f} / {h.val_class_f1:.3f}"
              f"  test {s['detection_f1']:.3f} / {s['weighted_f1']:.3f} / "
              f"{s['mean_class_aware_f1']:.3f}", flush=True)
    return rows


def epoch_picks(history, epochs: Sequence[dict]) -> dict:
    """The epoch each selection rule keeps, the last epoch and the best on test, with their
    test scores."""
    from qpcell.train import pick_epoch

    by_epoch = {row["epoch"]: row["test"] for row in epochs}
    picks = {}
    for rule in SELECT_ON:
        e = pick_epoch(history, rule)
        picks[f"kept on {rule}"] = {"epoch": e, "test": by_epoch[e]}
    last = max(by_epoch)
    picks["last epoch"] = {"epoch": last, "test": by_epoch[last]}
    for key in ("detection_f1", "weighted_f1", "mean_class_aware_f1"):
        e = max(by_epoch, key=lambda k: by_epoch[k][key])
        picks[f"best test {key}"] = {"epoch": e, "test": by_epoch[e]}  # hindsight
    return picks


# --------------------------------------------------------------------------- scores
def scores_of(report) -> dict:
    """The benchmark's figures from a :class:`qpcell.metrics.Report` (flat, JSON-ready)."""
    det, cl = report.detection, report.classification
    row = {"detection_precision": det.precision, "detection_recall": det.recall,
           "detection_f1": det.f1, "tp": det.tp, "fp": det.fp, "fn": det.fn,
           "weighted_precision": cl.weighted_precision, "weighted_recall": cl.weighted_recall,
           "weighted_f1": cl.weighted_f1, "accuracy": cl.accuracy}
    for c in cl.per_class:
        row[f"f1[{c.name}]"] = c.f1
    for c in report.class_aware:
        row[f"totalF1[{c.name}]"] = c.total_f1
        row[f"meanF1[{c.name}]"] = c.mean_f1
    row["mean_class_aware_f1"] = float(np.mean([c.total_f1 for c in report.class_aware]))
    row["mean_class_aware_meanF1"] = float(np.mean([c.mean_f1 for c in report.class_aware]))
    return row


def summarise(runs: Sequence[dict]) -> dict:
    """Per method: mean, sample std (0 for one seed) and n of every numeric score."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        keys = [k for k, v in rows[0]["scores"].items() if isinstance(v, int | float)]
        keys.append("train_seconds")
        summary = {}
        for k in keys:
            vals = np.array([r["scores"][k] if k in r["scores"] else r[k] for r in rows], float)
            summary[k] = {"mean": float(vals.mean()),
                          "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                          "n": len(vals)}
        out[method] = summary
    return out


def goal_check(summary: dict) -> dict | None:
    """The issue's EndoNuke goal for s-drdin, where s-drdin was run."""
    s = summary.get("s-drdin")
    if s is None:
        return None
    res = {k: {"target": v, "value": s[k]["mean"], "met": s[k]["mean"] >= v}
           for k, v in GOAL.items()}
    sep = summary.get("separate")
    if sep is not None:
        res["ahead_of_separate"] = {
            k: {"s-drdin": s[k]["mean"], "separate": sep[k]["mean"],
                "met": s[k]["mean"] > sep[k]["mean"]} for k in ("detection_f1", "weighted_f1")}
    return res


def _pm(stat: dict, digits: int = 3) -> str:
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _count(stat: dict) -> str:
    if stat["n"] > 1:
        return f"{stat['mean']:.0f} ± {stat['std']:.0f}"
    return f"{stat['mean']:.0f}"


def markdown(result: dict) -> str:
    """The four tables (detection, classification, class-aware, time) as markdown."""
    summary, names = result["summary"], result["class_names"]
    methods = list(summary)
    seeds = result["settings"]["seeds"]
    head = (f"### {result['dataset']} test split: {result['n_test_images']} images, "
            f"{result['n_test_cells']} cells; matching radius {result['radius_px']:g} px; "
            f"{len(seeds)} seed(s) {seeds}, {result['settings']['epochs']} epochs\n\n"
            f"Data: {result['attribution']}.\n")
    lines = [head, "Detection (S-DRDIN Table 2)\n",
             "| method | precision | recall | F1 | TP | FP |", "|---|---|---|---|---|---|"]
    for m in methods:
        s = summary[m]
        lines.append(f"| {LABELS.get(m, m)} | {_pm(s['detection_precision'])} | "
                     f"{_pm(s['detection_recall'])} | {_pm(s['detection_f1'])} | "
                     f"{_count(s['tp'])} | {_count(s['fp'])} |")
    lines += ["", "Classification of the matched cells (S-DRDIN Table 3; per-class F1)\n",
              "| method | weighted precision | weighted recall | weighted F1 | "
              + " | ".join(f"F1 {n}" for n in names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for m in methods:
        s = summary[m]
        lines.append(f"| {LABELS.get(m, m)} | {_pm(s['weighted_precision'])} | "
                     f"{_pm(s['weighted_recall'])} | {_pm(s['weighted_f1'])} | "
                     + " | ".join(_pm(s[f"f1[{n}]"]) for n in names) + " |")
    lines += ["", "Class-aware matching (MTL-IHC Table 1): totalF1 and meanF1 per class\n",
              "| method | " + " | ".join(f"totalF1 {n}" for n in names) + " | "
              + " | ".join(f"meanF1 {n}" for n in names) + " | mean totalF1 |",
              "|---|" + "---|" * (2 * len(names) + 1)]
    for m in methods:
        s = summary[m]
        lines.append(f"| {LABELS.get(m, m)} | "
                     + " | ".join(_pm(s[f"totalF1[{n}]"]) for n in names) + " | "
                     + " | ".join(_pm(s[f"meanF1[{n}]"]) for n in names) + " | "
                     + f"{_pm(s['mean_class_aware_f1'])} |")
    lines += ["", "Training time (train + per-epoch validation; MTL-IHC Ours++ includes its "
              "prior model)\n", "| method | minutes |", "|---|---|"]
    for m in methods:
        st = summary[m]["train_seconds"]
        lines.append(f"| {LABELS.get(m, m)} | "
                     + _pm({**st, "mean": st["mean"] / 60, "std": st["std"] / 60}, 1) + " |")
    picked = [r for r in result["runs"] if "picks" in r]
    if picked:
        lines += ["", "Test scores of the epoch each rule keeps (--keep-epochs): detection F1 / "
                  "weighted F1 / mean class-aware F1\n",
                  "| method | seed | " + " | ".join(picked[0]["picks"]) + " |",
                  "|---|---|" + "---|" * len(picked[0]["picks"])]
        for r in picked:
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['seed']} | " + " | ".join(
                f"epoch {v['epoch']}: {v['test']['detection_f1']:.3f} / "
                f"{v['test']['weighted_f1']:.3f} / {v['test']['mean_class_aware_f1']:.3f}"
                for v in r["picks"].values()) + " |")
    goal = result.get("goal")
    if goal and result["dataset"] == "endonuke":
        lines += ["", "Goal (s-drdin on EndoNuke): "
                  + ", ".join(f"{k} {v['value']:.3f} (target {v['target']}, "
                              f"{'met' if v['met'] else 'not met'})"
                              for k, v in goal.items() if "target" in v)]
        if "ahead_of_separate" in goal:
            lines.append("s-drdin ahead of the separate models: " + ", ".join(
                f"{k} {v['s-drdin']:.3f} vs {v['separate']:.3f} "
                f"({'yes' if v['met'] else 'no'})" for k, v in goal["ahead_of_separate"].items()))
    return "\n".join(lines) + "\n"


def sweep(preds: list[Detections], ds: Dataset, method: str, folder: Path) -> dict:
    """Radius sweep (1 px to twice the radius) of one run: PNG + the F1 values."""
    from qpcell.metrics import radius_sweep
    from qpcell.plots import plot_radius_sweep

    radii = [float(r) for r in range(1, int(2 * ds.radius_px) + 1)]
    reports = radius_sweep(list(zip(preds, ds.test, strict=True)), [c.name for c in ds.classes],
                           radii)
    path = folder / f"{ds.name}-{method}-radius-sweep.png"
    plot_radius_sweep(reports, path, class_colors={c.name: c.color for c in ds.classes},
                      title=f"{LABELS.get(method, method)} on {ds.name} test "
                            f"({len(ds.test)} images)")
    return {"png": str(path), "radii": radii,
            "detection_f1": [r.detection.f1 for r in reports],
            "totalF1": {c.name: [r.class_aware[k].total_f1 for r in reports]
                        for k, c in enumerate(ds.classes)}}


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("endonuke", "nucls"), default="endonuke")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 20; --quick 3)")
    p.add_argument("--patch-size", type=int, default=208, help="multiple of 16 (default 208)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the S-DRDIN family and U-Net (default: the paper's "
                        "1e-3; MTL-IHC keeps paper 003's)")
    p.add_argument("--disc-radius", type=float, default=2.0,
                   help="S-DRDIN label disc radius, native px (default 2)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training precision (default auto: bf16 where the hardware has it)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                   help="learning-rate schedule (default cosine; S-DRDIN: constant)")
    p.add_argument("--rare-repeats", type=int, default=2,
                   help="extra draws per epoch of windows holding a rare-class cell (default 2; "
                        "S-DRDIN: 0)")
    p.add_argument("--select-on", choices=SELECT_ON, default="detection",
                   help="which epoch each deep method keeps: best validation detection F1 "
                        "(default) or the mean of detection and weighted classification F1")
    p.add_argument("--keep-epochs", action="store_true",
                   help="save every epoch's model and score each on the test split, to show "
                        "what each selection rule would have kept (not for separate)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-test", type=int, default=None, help="score only N test images")
    p.add_argument("--quick", action="store_true",
                   help="minutes: seed 0, 3 epochs, every third test image")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: 6 train images, 1 epoch of 2 batches, 3 test images")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    p.add_argument("--plots", type=Path, help="folder for the radius sweep PNGs")
    p.add_argument("--workdir", type=Path,
                   help="keep the model folders here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.patch_size % 16 or args.patch_size < 32:
        p.error(f"--patch-size {args.patch_size} must be a multiple of 16, at least 32")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.methods = methods
    if args.keep_epochs and "separate" in methods:
        p.error("--keep-epochs scores one model per epoch; the separate pipeline has two")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r} must be comma-separated integers")
    if args.quick or args.smoke:
        args.seeds = args.seeds[:1]
    if args.epochs is None:
        args.epochs = 1 if args.smoke else 3 if args.quick else 20
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    ds = script_dataset(args.dataset, "accuracy benchmark", threads=args.threads,
                        max_trainval=6 if args.smoke else None,
                        test_step=3 if args.quick else 1,
                        max_test=3 if args.smoke else args.max_test)
    st = Settings(args.epochs, args.patch_size, args.disc_radius, args.device,
                  prior_epochs=min(10, args.epochs), lr=args.lr, precision=args.precision,
                  rare_repeats=args.rare_repeats, lr_schedule=args.lr_schedule,
                  select_on=args.select_on, keep_epochs=args.keep_epochs)
    if args.smoke:
        st = replace(st, max_steps=2, base=4, mtl_channels=16, prior_epochs=1)
    names = [c.name for c in ds.classes]
    from qpcell.metrics import score_dataset

    runs: list[dict] = []
    sweeps: dict[str, dict] = {}
    load_start = _load()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpcell-accuracy-") as tmp:
        workdir = args.workdir or Path(tmp)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for method in args.methods:
                print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed} ...", flush=True)
                preds, facts = run_method(method, ds, st, seed, workdir)
                report = score_dataset(list(zip(preds, ds.test, strict=True)), names,
                                       ds.radius_px)
                row = {"method": method, "seed": seed, **facts, "scores": scores_of(report),
                       "report": {k: v for k, v in report.to_dict().items()
                                  if k != "per_image"}}
                runs.append(row)
                if args.json:  # every finished run is kept, should a later one fail
                    partial = args.json.with_suffix(".partial.json")
                    partial.write_text(json.dumps({"runs": runs}, default=_plain),
                                       encoding="utf-8")
                s = row["scores"]
                print(f"    detection F1 {s['detection_f1']:.3f}  weighted F1 "
                      f"{s['weighted_f1']:.3f}  class-aware F1 {s['mean_class_aware_f1']:.3f}"
                      f"  ({facts['train_seconds'] / 60:.1f} min)", flush=True)
                for rule, pick in facts.get("picks", {}).items():
                    t = pick["test"]
                    print(f"    {rule}: epoch {pick['epoch']}, test "
                          f"{t['detection_f1']:.3f} / {t['weighted_f1']:.3f} / "
                          f"{t['mean_class_aware_f1']:.3f}", flush=True)
                if args.plots and method not in sweeps:
                    sweeps[method] = sweep(preds, ds, method, args.plots)
    summary = summarise(runs)
    result = {
        "benchmark": "accuracy", "dataset": ds.name, "attribution": ATTRIBUTION[ds.name],
        "class_names": names, "radius_px": ds.radius_px, "n_test_images": len(ds.test),
        "n_test_cells": int(sum(len(a.xy) for a in ds.test)),
        "n_trainval_images": len(ds.trainval),
        "settings": {"methods": args.methods, "seeds": args.seeds, "epochs": args.epochs,
                     "patch_size": args.patch_size, "disc_radius_px": args.disc_radius,
                     "model_mpp": None, "quick": args.quick, "smoke": args.smoke,
                     "max_steps_per_epoch": st.max_steps, "base": st.base,
                     "mtl_channels": st.mtl_channels, "prior_epochs": st.prior_epochs,
                     "lr": st.lr, "precision": st.precision,
                     "rare_repeats": st.rare_repeats, "lr_schedule": st.lr_schedule,
                     "select_on": st.select_on, "keep_epochs": st.keep_epochs,
                     "prior_class": ds.prior_class,
                     "nucleus_radius_px": ds.nucleus_radius_px},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "device": args.device or "auto", "load_average_start": load_start,
                    "load_average_end": _load()},
        "wall_seconds": time.perf_counter() - t_all,
        "summary": summary, "goal": goal_check(summary), "sweeps": sweeps, "runs": runs,
    }
    text = markdown(result)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.with_suffix(".partial.json").unlink(missing_ok=True)
        args.json.write_text(json.dumps(result, indent=1, allow_nan=False, default=_plain),
                             encoding="utf-8")
    return result


def _plain(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        v = float(value)
        return v if math.isfinite(v) else None
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()
