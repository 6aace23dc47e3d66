"""The training loop: images + points -> a model folder, validated and tuned as S-DRDIN 2.3-2.5.

Steps: read every image at the model's µm/px; split by image (7:3, seeded, or given); sample
224x224 patches with stride 120 inside annotated regions; train with Adam; after every epoch run
the real post-processing on the validation images, tune its threshold (and the small-component
area) for detection F1, and keep the best model by validation detection F1 (ties: weighted
classification F1) or, with ``select_on="combined"``, by the mean of the two; ``keep_epochs``
also saves every epoch's model. A Ctrl-C saves a resumable state; ``resume=True`` continues
from it.
Nothing here prints: progress goes to a :class:`TrainCallbacks` object and a log file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from qpcell import __version__
from qpcell.checkpoint import classes_to_meta, postprocess_meta, save_model
from qpcell.config import (
    PAPER_MPP,
    SELECT_ON,
    MaskConfig,
    MatchConfig,
    PatchConfig,
    PostprocessConfig,
    TrainConfig,
    to_dict,
)
from qpcell.device import autocast_dtype
from qpcell.distributed import barrier, broadcast, default_loader_settings, setup, shard, wrap
from qpcell.errors import Interrupted, QpcellError
from qpcell.inference import model_maps
from qpcell.io.atomic import atomic_open
from qpcell.points import AnnotatedImage, CellClass, Detections
from qpcell.train_guard import check_resume_state

RESUME = "resume.pt"
LOG = "train_log.txt"


@dataclass
class TrainImage:
    """One image ready for training: pixels and points at the model's µm/px."""

    name: str
    pixels: np.ndarray  # (H, W, 3) uint8
    xy: np.ndarray  # (N, 2) pixels at the model's µm/px
    labels: np.ndarray  # (N,)
    regions: list | None  # shapely geometries at the model's µm/px


@dataclass
class EpochSummary:
    """What one epoch achieved; ``best`` is True when it became the kept model."""

    epoch: int
    loss: float
    loss_parts: dict[str, float]
    val_f1: float
    val_class_f1: float
    threshold: float
    seconds: float
    best: bool


@dataclass
class TrainResult:
    """Where the model is and how it did on validation."""

    model_dir: Path
    history: list[EpochSummary]
    best_epoch: int
    val_f1: float
    val_class_f1: float
    train_images: list[str]
    val_images: list[str]
    n_patches: int
    seconds: float


class TrainCallbacks:
    """Hooks for progress display; the CLI overrides them, library use ignores them."""

    def on_start(self, epochs: int, batches_per_epoch: int, start_epoch: int) -> None: ...

    def on_batch(self, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch(self, summary: EpochSummary) -> None: ...


class TrainingInterrupted(Interrupted):
    """Raised after Ctrl-C once the resumable state is safely on disk."""


# --------------------------------------------------------------------------- data
def load_train_image(ann: AnnotatedImage, model_mpp: float | None,
                     fallback_mpp: float | None = None) -> TrainImage:
    """Read one annotated image at ``model_mpp`` (µm/px; ``None`` = native scale).

    The source pixel size is the image file's, else the annotation's, else ``fallback_mpp``;
    when none is known the image is used at its native scale.
    """
    from shapely import affinity

    from qpcell.io.slides import from_full_res, open_slide

    if ann.image is None:
        raise QpcellError(f"image {ann.name!r} has no pixels attached")
    with open_slide(ann.image, mpp=ann.mpp or fallback_mpp) as slide:
        target = model_mpp if (model_mpp and slide.mpp) else None
        scale = slide.scale_for(target)
        width, height = slide.grid_size(target)
        pixels = slide.read_grid(0, 0, width, height, mpp=target)
    regions = None
    if ann.regions:
        shift = 0.5 / scale - 0.5
        regions = [affinity.affine_transform(r, [1 / scale, 0, 0, 1 / scale, shift, shift])
                   for r in ann.regions]
    return TrainImage(ann.name, pixels, from_full_res(ann.xy, scale), ann.labels, regions)


def split_names(names: Sequence[str], val_fraction: float, seed: int,
                val_names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Split image names into train and validation, by image (S-DRDIN 2.1: 7:3).

    With ``val_names`` given, those are validation and the rest train. With one image, it is
    used for both (a warning belongs to the caller).
    """
    names = list(names)
    if val_names:
        missing = sorted(set(val_names) - set(names))
        if missing:
            raise QpcellError(f"--val-images names images that are not in the data: {missing}")
        val = [n for n in names if n in set(val_names)]
        return [n for n in names if n not in set(val_names)], val
    if len(names) == 1:
        return names, names
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    val = sorted(names[i] for i in order[:n_val])
    return [n for n in names if n not in set(val)], val


# --------------------------------------------------------------------------- validation
def image_maps(predict_maps: Callable, pixels: np.ndarray, tile: int = 1024
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Maps of a whole (validation) image, in tiles of ``tile`` px with a 64 px halo."""
    h, w = pixels.shape[:2]
    if h <= tile and w <= tile:
        det, cls = predict_maps(pixels[None])
        return det[0], None if cls is None else cls[0]
    halo = 64
    det_full = np.zeros((h, w), np.float32)
    cls_full = None
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            ya, xa = max(0, y0 - halo), max(0, x0 - halo)
            yb, xb = min(h, y0 + tile + halo), min(w, x0 + tile + halo)
            det, cls = predict_maps(pixels[None, ya:yb, xa:xb])
            y1, x1 = min(h, y0 + tile), min(w, x0 + tile)
            det_full[y0:y1, x0:x1] = det[0, y0 - ya:y1 - ya, x0 - xa:x1 - xa]
            if cls is not None:
                if cls_full is None:
                    cls_full = np.zeros((cls.shape[1], h, w), np.float32)
                cls_full[:, y0:y1, x0:x1] = cls[0, :, y0 - ya:y1 - ya, x0 - xa:x1 - xa]
    return det_full, cls_full


THRESHOLDS = (0.05, *np.round(np.arange(0.1, 0.91, 0.1), 2).tolist())
CLASS_BOX_FRACTIONS = (1.0, 1 / 2, 1 / 3, 1 / 5, 1 / 10)  # of the paper's 49 px box
PEAK_WINDOW_FRACTIONS = (1.0, 3 / 4, 1 / 2, 1 / 3)  # of the paper's 15 px window
#: Class gains tried for each class in turn (:func:`tune_class_gain`).
GAINS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0)
#: How much weighted classification F1 the class gains may give up for the rarer classes.
GAIN_WEIGHTED_F1_SLACK = 0.01


def tune_class_gain(dets: Sequence[Detections], truths: Sequence[TrainImage],
                    classes: Sequence[CellClass], radius_px: float, *, rounds: int = 1
                    ) -> tuple[tuple[float, ...], float]:
    """Per-class gains (:attr:`PostprocessConfig.class_gain`) for ``dets`` (found with gain 1).

    Coordinate ascent over :data:`GAINS`, class by class, for the mean class-aware F1 over
    the classes (paper 003; a class never predicted scores 0 there), keeping weighted
    classification F1 within :data:`GAIN_WEIGHTED_F1_SLACK` of the gain-1 value. Gains only
    change classes, never which cells are found.

    Returns
    -------
    gains : one factor per class (all 1.0 when nothing helps); weighted_f1 : with them
    """
    from qpcell.metrics import score_dataset
    from qpcell.postprocess import apply_class_gain

    names = [c.name for c in classes]
    regions = [t.regions for t in truths]

    def relabel(d: Detections, gain: tuple[float, ...]) -> Detections:
        if not len(d):
            return d
        probs = apply_class_gain(d.class_probs, gain)
        return replace(d, labels=np.argmax(probs, axis=1), class_probs=probs.astype(np.float32))

    def score(gain: tuple[float, ...]) -> tuple[float, float]:
        relabelled = [relabel(d, gain) for d in dets]
        report = score_dataset(list(zip(relabelled, truths, strict=True)), names, radius_px,
                               regions=regions)
        aware = float(np.mean([c.total_f1 for c in report.class_aware]))
        return aware, report.classification.weighted_f1

    gain = (1.0,) * len(classes)
    best_aware, best_weighted = score(gain)
    floor = best_weighted - GAIN_WEIGHTED_F1_SLACK
    for _ in range(rounds):
        changed = False
        for k in range(len(classes)):
            for g in GAINS:
                trial = (*gain[:k], g, *gain[k + 1:])
                if trial == gain:
                    continue
                aware, weighted = score(trial)
                if weighted >= floor and aware > best_aware + 1e-9:
                    gain, best_aware, best_weighted, changed = trial, aware, weighted, True
        if not changed:
            break
    return gain, best_weighted


def tune_postprocess(maps: Sequence[tuple[np.ndarray, np.ndarray | None]],
                     truths: Sequence[TrainImage], classes: Sequence[CellClass],
                     base: PostprocessConfig, radius_px: float, kind: str = "sdrdin",
                     ) -> tuple[dict, float, float]:
    """Pick post-processing settings for validation detection F1 (ties: classification F1).

    For ``"sdrdin"`` the detection threshold and the small-component area (the paper's value
    and smaller ones, since the area that survives a threshold depends on the disc radius) are
    searched for detection F1, then the peak window (the paper's and smaller) and the threshold
    again; then the class box (the paper's and smaller) for weighted classification F1, and
    the class gains for the rarer classes (:func:`tune_class_gain`). For ``"peaks"``: the
    class-map threshold and peak distance.

    Returns
    -------
    settings : dict of the chosen values; f1 : detection F1; class_f1 : weighted class F1
    """
    from qpcell.metrics import score_dataset
    from qpcell.postprocess import postprocess_peaks, postprocess_sdrdin

    names = [c.name for c in classes]
    if kind == "peaks":
        grid = [{"threshold": t, "min_distance_px": d}
                for t in THRESHOLDS for d in (2.0, 3.0, 4.0)]
    else:
        areas = sorted({base.min_area_px, base.min_area_px / 2, base.min_area_px / 5, 0.0})
        grid = [{"threshold": t, "min_area_px": a} for t in THRESHOLDS for a in areas]

    def run(setting: dict) -> list[Detections]:
        if kind == "peaks":
            return [postprocess_peaks(c, threshold=setting["threshold"],
                                      min_distance_px=setting["min_distance_px"], classes=classes)
                    for _, c in maps]
        cfg = replace(base, **setting)
        return [postprocess_sdrdin(d, c, cfg, classes) for d, c in maps]

    def score(setting: dict) -> tuple[float, float]:
        report = score_dataset(list(zip(run(setting), truths, strict=True)), names, radius_px,
                               regions=[t.regions for t in truths])
        return report.detection.f1, report.classification.weighted_f1

    best_key, best = max(((score(s), s) for s in grid), key=lambda ks: ks[0])
    if kind == "sdrdin":
        # The paper's 15 px window suppresses all but one maximum where cells lie closer than
        # about 7 px apart (dense tissue, or images at a finer scale than the model's): try
        # smaller windows with the chosen threshold and area, then the thresholds again.
        windows = sorted({max(3, round(base.peak_window_px * f) | 1)
                          for f in PEAK_WINDOW_FRACTIONS}, reverse=True)
        best_key, best = max(((score({**best, "peak_window_px": w}), {**best,
                               "peak_window_px": w}) for w in windows), key=lambda ks: ks[0])
        best_key, best = max(((score({**best, "threshold": t}), {**best, "threshold": t})
                              for t in THRESHOLDS), key=lambda ks: ks[0])
    if kind == "sdrdin" and len(classes) > 1:
        # The class box does not move cells, only their classes: tune it for class F1 among
        # the paper's 49 px and smaller boxes (a 49 px box averages over neighbours where
        # cells are dense).
        boxes = sorted({max(3, round(base.class_box_px * f) | 1) for f in CLASS_BOX_FRACTIONS})
        (f1, cf1), box = max(((score({**best, "class_box_px": b}), b) for b in boxes),
                             key=lambda kb: (kb[0][1], kb[1]))
        best_key, best = (best_key[0], cf1), {**best, "class_box_px": box}
        gain, cf1 = tune_class_gain(run(best), truths, classes, radius_px)
        if any(g != 1.0 for g in gain):
            best_key, best = (best_key[0], cf1), {**best, "class_gain": gain}
    return best, best_key[0], best_key[1]


# --------------------------------------------------------------------------- loop


LR_SCHEDULES = ("constant", "cosine")


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based): ``cfg.lr``, or for ``"cosine"`` a half cosine
    from ``cfg.lr`` at epoch 1 towards 0 after the last epoch."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(1, cfg.epochs)))
    raise QpcellError(f"unknown learning-rate schedule {cfg.lr_schedule!r}; choose from "
                      f"{', '.join(LR_SCHEDULES)}")


EPOCHS_DIR = "epochs"


def selection_key(f1: float, class_f1: float, select_on: str = "detection",
                  classifies: bool = True) -> tuple[float, float]:
    """The key by which the kept epoch is chosen (higher is better).

    ``"detection"``: validation detection F1, ties broken by weighted classification F1.
    ``"combined"``: the mean of the two, ties broken by detection F1; a model that does not
    classify (``classifies=False``) is always chosen on detection.
    """
    if select_on not in SELECT_ON:
        raise QpcellError(f"unknown model selection {select_on!r}; choose from "
                          f"{', '.join(SELECT_ON)}")
    if select_on == "detection" or not classifies:
        return (f1, class_f1)
    return ((f1 + class_f1) / 2, f1)


def pick_epoch(history: Sequence[EpochSummary], select_on: str = "detection",
               classifies: bool = True) -> int:
    """The epoch :func:`train` keeps under ``select_on`` (the first of equals)."""
    if not history:
        raise QpcellError("no epochs to choose from")
    keys = [selection_key(h.val_f1, h.val_class_f1, select_on, classifies) for h in history]
    return history[keys.index(max(keys))].epoch


def epoch_dir(out: str | Path, epoch: int) -> Path:
    """Where ``keep_epochs`` saves the model of ``epoch``: ``<out>/epochs/epoch-007``."""
    return Path(out) / EPOCHS_DIR / f"epoch-{epoch:03d}"


def _state(model, optimizer, epoch: int, best: dict, history: list[EpochSummary],
           split: tuple[list[str], list[str]]) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "best": json.dumps(best), "history": json.dumps([h.__dict__ for h in history]),
            "split": json.dumps(split), "torch_rng": torch.get_rng_state()}


def _write_state(path: Path, state: dict) -> None:
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def train(
    images: Sequence[AnnotatedImage],
    classes: Sequence[CellClass],
    out: str | Path,
    *,
    model_name: str = "s-drdin",
    model_kwargs: dict | None = None,
    model_mpp: float | None = PAPER_MPP,
    fallback_mpp: float | None = None,
    train_cfg: TrainConfig = TrainConfig(),
    mask_cfg: MaskConfig = MaskConfig(),
    patch_cfg: PatchConfig = PatchConfig(),
    post_cfg: PostprocessConfig = PostprocessConfig(),
    match_radius_px: float | None = None,
    val_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    max_steps_per_epoch: int | None = None,
    prepared: Sequence[TrainImage] | None = None,
    extra_maps: dict[str, np.ndarray] | None = None,
    extra_key: str = "prior",
    extra_meta: dict | None = None,
) -> TrainResult:
    """Train a model on point annotations and write it to the folder ``out``.

    Parameters
    ----------
    images
        Annotated images with pixels (``AnnotatedImage.image``).
    classes
        The class list; labels index into it.
    out
        Model folder to write (``config.json`` + ``weights.safetensors``, log, resume state).
    model_name, model_kwargs
        Registry name and constructor options (``base`` width, ...).
    model_mpp
        µm/px the model works at (S-DRDIN: 0.44); ``None`` trains at the images' native scale.
        Every pixel constant (disc radius, post-processing windows) is scaled to it.
    fallback_mpp
        Source pixel size for images that carry none (``--mpp``).
    match_radius_px
        Validation matching radius at the model's scale; default S-DRDIN's 10 px at 0.44 µm/px.
    max_steps_per_epoch
        Cap on batches per epoch (quick runs and tests).
    prepared
        Already-loaded :class:`TrainImage` objects (skips reading ``images``).
    extra_maps, extra_key
        Dense per-image targets (image name -> ``(K, H, W)`` float32 at the model's µm/px),
        cropped with each patch into ``targets[extra_key]`` (the MTL-IHC tissue prior).
    extra_meta
        More entries for the model folder's ``config.json``.
    """
    from qpcell.masks import sdrdin_targets
    from qpcell.models import create_model
    from qpcell.patches import PatchDataset, rare_class_windows, sample_windows

    t_start = time.perf_counter()
    callbacks = callbacks or TrainCallbacks()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = tuple(classes)
    ctx = setup(device)  # under torchrun: join the process group (GPU = LOCAL_RANK)
    device = ctx.device
    loading = default_loader_settings(device)
    if ctx.distributed:  # torchrun sets OMP_NUM_THREADS=1: share the cores among the ranks
        torch.set_num_threads(loading.torch_threads)
    torch.manual_seed(train_cfg.seed)

    data = list(prepared) if prepared is not None else [
        load_train_image(a, model_mpp, fallback_mpp) for a in images]
    if not data:
        raise QpcellError("no annotated images to train on")
    if sum(len(d.xy) for d in data) == 0:
        raise QpcellError("the training images hold no point annotations")
    work_mpp = model_mpp or PAPER_MPP
    scale = PAPER_MPP / work_mpp if model_mpp else 1.0
    radius = mask_cfg.disc_radius_px * (mask_cfg.mpp / work_mpp if model_mpp else 1.0)
    post = post_cfg.scaled(work_mpp) if model_mpp else post_cfg
    match_r = match_radius_px or MatchConfig().radius_px * scale

    split = split_names([d.name for d in data], train_cfg.val_fraction, train_cfg.seed, val_names)
    state = None
    if resume:
        path = out / RESUME
        if not path.exists():
            raise QpcellError("nothing to resume (no resume.pt)", out)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise QpcellError(f"cannot read resume state ({err})", path) from None
        split = tuple(json.loads(state["split"]))
    by_name = {d.name: d for d in data}
    train_set = [by_name[n] for n in split[0] if n in by_name]
    val_set = [by_name[n] for n in split[1] if n in by_name]

    model = create_model(model_name, len(classes), **(model_kwargs or {})).to(device)
    amp = autocast_dtype(device, train_cfg.precision)
    # An unknown schedule or model selection fails now, not after the first epoch.
    epoch_lr(train_cfg, 1)
    selection_key(0.0, 0.0, train_cfg.select_on)
    layout = torch.channels_last if amp is not None else torch.contiguous_format
    model.to(memory_format=layout)
    kind = getattr(model, "postprocess_kind", "sdrdin")
    classifies = bool(getattr(model, "has_cls", True))
    make_targets = getattr(model, "target_fn", None)
    target_fn = make_targets(radius) if make_targets else (
        lambda xy, lab, shape: sdrdin_targets(xy, lab, len(classes), shape, radius))
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr,
                                 weight_decay=train_cfg.weight_decay)
    rng = np.random.default_rng(train_cfg.seed)
    history: list[EpochSummary] = []
    best = {"key": [-math.inf, -math.inf], "f1": -1.0, "class_f1": -1.0, "epoch": 0,
            "setting": {}}
    start_epoch = 1
    if state is not None:
        check_resume_state(state, model, classes, out)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        best = json.loads(state["best"])
        best.setdefault("f1", best["key"][0])  # resume states before selection was a choice
        best.setdefault("class_f1", best["key"][1])
        best["key"] = list(selection_key(best["f1"], best["class_f1"], train_cfg.select_on,
                                         classifies))
        history = [EpochSummary(**h) for h in json.loads(state["history"])]
        start_epoch = int(state["epoch"]) + 1
        rng = np.random.default_rng([train_cfg.seed, start_epoch])
    ddp = wrap(model, ctx)  # the forward pass goes through DDP; everything else uses `model`

    def windows_for_epoch() -> list[tuple[int, int, int]]:
        wins = []
        for i, d in enumerate(train_set):
            xy0 = sample_windows(d.pixels.shape[:2], d.xy, size=patch_cfg.size,
                                 stride=patch_cfg.stride, regions=d.regions,
                                 background_fraction=patch_cfg.background_fraction, rng=rng)
            wins.extend((i, int(x), int(y)) for x, y in xy0)
        return rare_class_windows(wins, [(d.xy, d.labels) for d in train_set], len(classes),
                                  patch_cfg.size, share=patch_cfg.rare_share,
                                  repeats=patch_cfg.rare_repeats)

    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    log_path = out / LOG
    n_patches = 0
    last_epoch = start_epoch - 1
    try:
        windows = windows_for_epoch()
        if not windows:
            raise QpcellError("no training patches: are the points inside the annotated regions?")
        batches = math.ceil(len(shard(windows, ctx)) / train_cfg.batch_size)
        if max_steps_per_epoch:
            batches = min(batches, max_steps_per_epoch)
        callbacks.on_start(train_cfg.epochs, batches, start_epoch)
        for epoch in range(start_epoch, train_cfg.epochs + 1):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr(train_cfg, epoch)
            if epoch > start_epoch:
                windows = windows_for_epoch()
            dataset = PatchDataset([d.pixels for d in train_set],
                                   [(d.xy, d.labels) for d in train_set],
                                   shard(windows, ctx),
                                   size=patch_cfg.size, target_fn=target_fn,
                                   extra_maps=None if extra_maps is None else
                                   [extra_maps[d.name] for d in train_set],
                                   extra_key=extra_key, flips=patch_cfg.flips,
                                   rotate90=patch_cfg.rotate90,
                                   seed=int(rng.integers(2**31)) + ctx.rank)
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            loader = DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=True,
                                generator=generator, drop_last=False,
                                num_workers=loading.num_workers if train_cfg.num_workers is None
                                else train_cfg.num_workers, pin_memory=loading.pin_memory)
            model.train()
            total, parts_sum, steps = 0.0, {}, 0
            for step, (x, targets) in enumerate(loader, 1):
                if max_steps_per_epoch and step > max_steps_per_epoch:
                    break
                x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
                targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp or torch.float32,
                                    enabled=amp is not None):
                    output = ddp(x)
                loss, parts = model.loss({k: v.float() for k, v in output.items()}, targets)
                if not torch.isfinite(loss):
                    raise QpcellError(f"training diverged at epoch {epoch} (loss {loss.item()})")
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                value = loss.item()
                total += value
                steps += 1
                n_patches += len(x)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
                callbacks.on_batch(epoch, step, value)
            last_epoch = epoch - 1
            setting, f1, cf1 = broadcast(
                validate(model, val_set, classes, post, match_r, kind, device)
                if ctx.is_main else None, ctx)  # rank 0 validates; the others wait for it
            key = selection_key(f1, cf1, train_cfg.select_on, classifies)
            is_best = key > tuple(best["key"])
            if is_best:
                best = {"key": list(key), "f1": f1, "class_f1": cf1, "epoch": epoch,
                        "setting": setting}
            if ctx.is_main and (is_best or train_cfg.keep_epochs):
                meta = {
                    "classes": classes_to_meta(classes),
                    "mpp": model_mpp,
                    "mask": {**to_dict(mask_cfg), "disc_radius_px_at_model_mpp": radius},
                    "postprocess_kind": kind,
                    "postprocess": postprocess_meta(replace(post, **setting))
                    if kind == "sdrdin" else postprocess_meta(post),
                    "peaks": setting if kind == "peaks" else None,
                    "training": {
                        "epoch": epoch, "epochs": train_cfg.epochs, "val_f1": f1,
                        "val_class_f1": cf1, "match_radius_px": match_r,
                        "train_images": split[0], "val_images": split[1],
                        "n_train_points": int(sum(len(d.xy) for d in train_set)),
                        "config": to_dict(train_cfg), "patch": to_dict(patch_cfg),
                        "qpcell_version": __version__,
                    },
                    **(extra_meta or {}),
                }
                # A model with training-only parts (MTL-IHC's auxiliary decoders) saves only
                # what inference uses.
                kept = model.export() if hasattr(model, "export") else model
                if is_best:
                    save_model(out, kept, meta)
                if train_cfg.keep_epochs:
                    save_model(epoch_dir(out, epoch), kept, meta)
            summary = EpochSummary(epoch, total / max(steps, 1),
                                   {k: v / max(steps, 1) for k, v in parts_sum.items()},
                                   f1, cf1, float(setting.get("threshold", math.nan)),
                                   time.perf_counter() - t0, is_best)
            history.append(summary)
            if ctx.is_main:  # rank 0 alone writes the log and the resume state
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(f"epoch {epoch} loss {summary.loss:.5f} val_f1 {f1:.4f} "
                              f"val_class_f1 {cf1:.4f} threshold {summary.threshold:.2f} "
                              f"seconds {summary.seconds:.1f}{' best' if is_best else ''}\n")
                _write_state(out / RESUME, _state(model, optimizer, epoch, best, history, split))
            last_epoch = epoch
            callbacks.on_epoch(summary)
    except KeyboardInterrupt:
        if ctx.is_main:
            _write_state(out / RESUME, _state(model, optimizer, last_epoch, best, history,
                                              split))
        raise TrainingInterrupted(
            f"interrupted after epoch {last_epoch}; continue with --resume", out) from None
    barrier(ctx)  # the model folder is complete before any rank returns
    return TrainResult(out, history, int(best["epoch"]), float(best["f1"]),
                       float(best["class_f1"]), split[0], split[1], n_patches,
                       time.perf_counter() - t_start)


def validate(model: torch.nn.Module, val_set: Sequence[TrainImage], classes, post, radius_px,
             kind: str, device: torch.device) -> tuple[dict, float, float]:
    """Tuned post-processing settings and validation scores of ``model``."""
    model.eval()

    def predict_maps(tiles: np.ndarray):
        return model_maps(model, tiles, device)

    maps = [image_maps(predict_maps, d.pixels) for d in val_set]
    return tune_postprocess(maps, val_set, classes, post, radius_px, kind)


__all__ = ["TrainImage", "EpochSummary", "TrainResult", "TrainCallbacks", "TrainingInterrupted",
           "load_train_image", "split_names", "tune_postprocess", "train", "validate",
           "SELECT_ON", "selection_key", "pick_epoch", "epoch_dir"]
