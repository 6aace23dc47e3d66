"""Training: images + points -> a model folder, in five named stages.

1. :func:`prepare_data` reads every image at the model's µm/px (estimating the pixel size of
   images that carry none from the size of their annotated nuclei, :mod:`qpcell.scale`) and
   splits them by image into train and validation (S-DRDIN 2.1: 7:3, seeded, or given).
2. :func:`build_run` creates the model, optimiser and targets (or restores them to resume).
3. :func:`train_rounds` takes optimiser steps on patches (the S-DRDIN grid, or windows
   centred on cells) in *rounds*: an epoch, or the stretch of a time budget between two
   validations (:class:`qpcell.schedule.Budget`); the learning rate follows progress.
4. After each round the real post-processing runs on the validation images, its settings
   are tuned (:mod:`qpcell.tuning`) and the best round's model is kept (validation detection
   F1, ties: weighted classification F1; or ``select_on="combined"``).
5. With ``TrainConfig.cells_share`` > 0, :func:`train_cells` trains a cell classifier on crops
   around the training cells (:mod:`qpcell.train_cells`) in that share of a time budget.
6. :func:`finish_run` tunes every post-processing setting for the kept model (and the cell
   classifier's share of the class maps) and writes the model folder.

With few images (:func:`refits`) the last share of the run trains on every image, the
validation images too: their settings are chosen (fully tuned) just before, and the last
weights are kept with them, since nothing is left to validate on.

A Ctrl-C saves a resumable state; ``resume=True`` continues from it. Nothing here prints:
progress and notes go to a :class:`TrainCallbacks` object and a log file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from qpcell import __version__
from qpcell.checkpoint import classes_to_meta, postprocess_meta, save_model
from qpcell.config import (
    PAPER_MPP,
    SAMPLINGS,
    SELECT_ON,
    MaskConfig,
    MatchConfig,
    PatchConfig,
    PostprocessConfig,
    TrainConfig,
    to_dict,
)
from qpcell.device import autocast_dtype, training_layout
from qpcell.distributed import barrier, broadcast, default_loader_settings, setup, shard, wrap
from qpcell.ema import make_ema
from qpcell.errors import Interrupted, QpcellError
from qpcell.io.atomic import atomic_open
from qpcell.models.cell_classifier import CellClassifier, WithCellClassifier, crop_px_for
from qpcell.points import AnnotatedImage, CellClass
from qpcell.pretrained import Transfer, resolve_init, transfer_weights
from qpcell.schedule import LR_SCHEDULES, Budget, final_validation_factor, lr_at, step_cap
from qpcell.train_cells import CellTraining, classifier_steps, fit_cell_classifier
from qpcell.train_guard import check_resume_state
from qpcell.tuning import (
    edge_notes,
    image_maps,
    tune_cell_share,
    tune_class_gain,
    tune_postprocess,
    validate,
    validation_maps,
)
from qpcell.views import DEFAULT_VIEWS, VIEWS

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
    """What one round (an epoch, or a stretch of a time budget) achieved; ``best`` is True
    when it became the kept model."""

    epoch: int
    loss: float
    loss_parts: dict[str, float]
    val_f1: float
    val_class_f1: float
    threshold: float
    seconds: float
    best: bool
    steps: int = 0
    lr: float = math.nan


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
    mpp: float | None = None
    notes: list[str] = field(default_factory=list)
    # the kept weights trained on every image after this round (None: no refit); the
    # validation scores are that round's
    refit_after_round: int | None = None


class TrainCallbacks:
    """Hooks for progress display; the CLI overrides them, library use ignores them.

    ``on_start`` gets the rounds and the batches of one round (for a time budget: the
    budget's seconds in ``budget_s``); ``on_batch`` gets the share of the run done
    (``progress``, 0-1) and the seconds left when that is known.
    """

    def on_start(self, epochs: int, batches_per_epoch: int, start_epoch: int,
                 budget_s: float | None = None) -> None: ...

    def on_batch(self, epoch: int, step: int, loss: float, progress: float | None = None,
                 seconds_left: float | None = None) -> None: ...

    def on_epoch(self, summary: EpochSummary) -> None: ...

    def on_note(self, text: str) -> None: ...


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


def estimate_source_mpp(images: Sequence[AnnotatedImage], model_mpp: float | None,
                        fallback_mpp: float | None) -> tuple[float | None, dict | None]:
    """The pixel size to assume for images that carry none (µm/px), and how it was found.

    ``fallback_mpp`` (``--mpp``) when given; else, when the model works at a fixed µm/px and
    some images carry no pixel size, the estimate of :func:`qpcell.scale.estimate_mpp` from
    those images' annotated nuclei; else ``None`` (nothing to estimate).

    Returns
    -------
    mpp : µm/px or None; info : ``{"how", "value", "nucleus_radius_px", "images"}`` or None
    """
    from qpcell.io.slides import open_slide
    from qpcell.scale import NUCLEUS_RADIUS_UM, estimate_mpp

    if fallback_mpp is not None:
        return fallback_mpp, {"how": "given", "value": float(fallback_mpp)}
    if model_mpp is None:
        return None, None
    unknown = []
    for ann in images:
        if ann.image is None or ann.mpp is not None or not len(ann.xy):
            continue
        with open_slide(ann.image) as slide:
            if slide.mpp is None:
                unknown.append(ann)
    if not unknown:
        return None, None
    native = [load_train_image(a, None) for a in unknown]
    try:
        mpp, radius = estimate_mpp([d.pixels for d in native], [d.xy for d in native])
    except QpcellError:
        return None, {"how": "native", "value": None, "images": len(unknown),
                      "reason": "no nucleus-like blobs at the annotated points"}
    # The value unrounded: prediction must read images at the very scale training used (on
    # NuCLS, rounding 0.210107 to 0.2101 moved a model's test detection F1 by up to 0.010).
    return mpp, {"how": "estimated", "value": float(mpp),
                 "nucleus_radius_px": round(float(radius), 2),
                 "nucleus_radius_um": NUCLEUS_RADIUS_UM, "images": len(unknown)}


def scale_note(info: dict | None, model_mpp: float | None) -> str | None:
    """One line saying at which scale images without a pixel size are used."""
    if info is None or info["how"] == "given":
        return None
    if info["how"] == "native":
        return (f"{info['images']} image(s) carry no pixel size and their nuclei could not be "
                f"measured ({info['reason']}): training at their native scale; pass --mpp")
    return (f"{info['images']} image(s) carry no pixel size: their annotated nuclei measure "
            f"{info['nucleus_radius_px']:.1f} px in radius, so they are taken as "
            f"{info['value']:.3f} µm/px (a {info['nucleus_radius_um']:g} µm nucleus radius) and "
            f"read at the model's {model_mpp:g} µm/px; pass --mpp if you know the pixel size")


@dataclass
class PreparedData:
    """Stage 1's result: the images at the model's scale, split, and what scale that is."""

    data: list[TrainImage]
    train_set: list[TrainImage]
    val_set: list[TrainImage]
    split: tuple[list[str], list[str]]
    model_mpp: float | None  # the scale the model really works at (None: native)
    source_mpp: dict | None  # how images without a pixel size were scaled
    notes: list[str]


def prepare_data(images: Sequence[AnnotatedImage], *, model_mpp: float | None,
                 fallback_mpp: float | None, train_cfg: TrainConfig,
                 val_names: Sequence[str] | None,
                 prepared: Sequence[TrainImage] | None = None,
                 split: tuple[list[str], list[str]] | None = None) -> PreparedData:
    """Stage 1: read and split the images (see the module docstring)."""
    notes: list[str] = []
    source = None
    if prepared is None:
        fallback_mpp, source = estimate_source_mpp(images, model_mpp, fallback_mpp)
        if source is not None and source["how"] == "native":
            model_mpp = None
        note = scale_note(source, model_mpp)
        if note:
            notes.append(note)
        data = [load_train_image(a, model_mpp, fallback_mpp) for a in images]
    else:
        data = list(prepared)
    if not data:
        raise QpcellError("no annotated images to train on")
    if sum(len(d.xy) for d in data) == 0:
        raise QpcellError("the training images hold no point annotations")
    if split is None:
        split = split_names([d.name for d in data], train_cfg.val_fraction, train_cfg.seed,
                            val_names)
    by_name = {d.name: d for d in data}
    return PreparedData(data, [by_name[n] for n in split[0] if n in by_name],
                        [by_name[n] for n in split[1] if n in by_name], split, model_mpp,
                        source, notes)


EPOCHS_DIR = "epochs"
#: The cell classifier's share of the class maps where no validation image is left to tune the
#: settings on (after a refit on every image): the share training offers
#: (:data:`qpcell.tuning.CELL_SHARES`).
CELLS_UNTUNED_SHARE = 0.5


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


# --------------------------------------------------------------------------- the run
def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based) in an epoch-counted run: ``cfg.lr``, or for
    ``"cosine"`` a half cosine from ``cfg.lr`` at epoch 1 towards 0 after the last epoch."""
    return lr_at((epoch - 1) / max(1, cfg.epochs), cfg.lr, cfg.lr_schedule, cfg.warmup)


@dataclass
class Run:
    """Stage 2's result and the state stages 3-5 share: one training run in progress."""

    model: torch.nn.Module
    ddp: torch.nn.Module  # the model as the forward pass sees it (DDP under torchrun)
    optimizer: torch.optim.Optimizer
    ctx: object  # qpcell.distributed.Context
    device: torch.device
    amp: torch.dtype | None
    layout: torch.memory_format
    kind: str  # post-processing: "sdrdin" or "peaks"
    classifies: bool
    target_fn: object
    post: PostprocessConfig  # at the model's µm/px
    match_r: float
    radius: float  # label disc radius at the model's µm/px
    rng: np.random.Generator
    history: list[EpochSummary] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {
        "key": [-math.inf, -math.inf], "f1": -1.0, "class_f1": -1.0, "epoch": 0,
        "setting": {}})
    best_state: dict | None = None  # the kept round's weights (CPU copies)
    scaler: object = None  # torch.amp.GradScaler for float16 autocast (older CUDA GPUs)
    start_epoch: int = 1
    elapsed: float = 0.0  # seconds of a time budget already spent (resume)
    n_patches: int = 0
    init: Transfer | None = None  # set when the run started from another model's weights
    # set when the run's last stretch trains on every image (:func:`refits`): the round it
    # began after, and that round's settings and validation scores
    refit: dict | None = None
    # the averaged weights that are validated and kept, when ``TrainConfig.ema_decay`` > 0
    ema: torch.nn.Module | None = None

    @property
    def evaluated(self) -> torch.nn.Module:
        """The network that is validated, saved and kept: the weights' average, if any."""
        return self.model if self.ema is None else self.ema.module


def build_run(prep: PreparedData, classes: Sequence[CellClass], out: Path, *, model_name: str,
              model_kwargs: dict | None, train_cfg: TrainConfig, mask_cfg: MaskConfig,
              post_cfg: PostprocessConfig, match_radius_px: float | None, device,
              resume: bool, init: Path | None = None) -> Run:
    """Stage 2: model, optimiser, targets and scales (restored from ``resume.pt`` if asked;
    otherwise started from the model folder ``init`` when given, :mod:`qpcell.pretrained`)."""
    from qpcell.masks import sdrdin_targets
    from qpcell.models import create_model

    ctx = setup(device)  # under torchrun: join the process group (GPU = LOCAL_RANK)
    loading = default_loader_settings(ctx.device)
    if ctx.distributed:  # torchrun sets OMP_NUM_THREADS=1: share the cores among the ranks
        torch.set_num_threads(loading.torch_threads)
    torch.manual_seed(train_cfg.seed)
    model_mpp = prep.model_mpp
    work_mpp = model_mpp or PAPER_MPP
    scale = PAPER_MPP / work_mpp if model_mpp else 1.0
    radius = mask_cfg.disc_radius_px * (mask_cfg.mpp / work_mpp if model_mpp else 1.0)
    post = post_cfg.scaled(work_mpp) if model_mpp else post_cfg
    match_r = match_radius_px or MatchConfig().radius_px * scale

    model = create_model(model_name, len(classes), **(model_kwargs or {}))
    transfer = None
    if init is not None and not resume:
        transfer = transfer_weights(model, init, tuple(classes))
    model.to(ctx.device)
    amp = autocast_dtype(ctx.device, train_cfg.precision)
    # An unknown schedule, sampling or model selection fails now, not after the first round.
    lr_at(0.0, train_cfg.lr, train_cfg.lr_schedule, train_cfg.warmup)
    selection_key(0.0, 0.0, train_cfg.select_on)
    layout = training_layout(ctx.device, amp)
    model.to(memory_format=layout)
    make_targets = getattr(model, "target_fn", None)
    n = len(classes)
    target_fn = make_targets(radius) if make_targets else (
        lambda xy, lab, shape: sdrdin_targets(xy, lab, n, shape, radius))
    optimizer = make_optimizer(model, train_cfg)
    run = Run(model, model, optimizer, ctx, ctx.device, amp, layout,
              getattr(model, "postprocess_kind", "sdrdin"), bool(getattr(model, "has_cls", True)),
              target_fn, post, match_r, radius, np.random.default_rng(train_cfg.seed),
              init=transfer)
    if amp == torch.float16:
        run.scaler = torch.amp.GradScaler("cuda")
    if train_cfg.ema_decay > 0:
        run.ema = make_ema(model, train_cfg.ema_decay)
    if resume:
        state = read_state(out)
        check_resume_state(state, model, classes, out)
        restore(run, state, train_cfg)
    run.ddp = wrap(model, ctx)  # the forward pass goes through DDP; everything else: `model`
    return run


def make_optimizer(model: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with ``train_cfg.weight_decay``: an L2 term on every parameter, or with
    ``decoupled_weight_decay`` AdamW's decay of the weight tensors only (biases and
    normalisation scales, the 1-D parameters, are not decayed)."""
    if not train_cfg.decoupled_weight_decay:
        return torch.optim.Adam(model.parameters(), lr=train_cfg.lr,
                                weight_decay=train_cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1],
               "weight_decay": train_cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=train_cfg.lr, decoupled_weight_decay=True)


def regroup_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer,
                            params: Sequence[torch.nn.Parameter]) -> dict:
    """``saved``, an optimiser state of one parameter group over ``params`` in order (runs
    started before the decoupled weight decay), laid out as ``optimizer``'s groups, so that
    such a run resumes with its moments; any other state is returned as it is."""
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != 1 or len(groups) == 1:
        return saved
    position = {id(p): i for i, p in enumerate(params)}
    state, n = {}, 0
    for group in groups:
        for p in group["params"]:
            if position[id(p)] in saved["state"]:
                state[n] = saved["state"][position[id(p)]]
            n += 1
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def read_state(out: Path) -> dict:
    """The resumable state in ``out`` (a one-line error when there is none or it is broken)."""
    path = out / RESUME
    if not path.exists():
        raise QpcellError("nothing to resume (no resume.pt)", out)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise QpcellError(f"cannot read resume state ({err})", path) from None


def restore(run: Run, state: dict, train_cfg: TrainConfig) -> None:
    """Put ``run`` back where the saved ``state`` left it."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(regroup_optimizer_state(state["optimizer"], run.optimizer,
                                                          list(run.model.parameters())))
    torch.set_rng_state(state["torch_rng"])
    best = json.loads(state["best"])
    best.setdefault("f1", best["key"][0])  # resume states before selection was a choice
    best.setdefault("class_f1", best["key"][1])
    best["key"] = list(selection_key(best["f1"], best["class_f1"], train_cfg.select_on,
                                     run.classifies))
    run.best = best
    run.history = [EpochSummary(**h) for h in json.loads(state["history"])]
    run.start_epoch = int(state["epoch"]) + 1
    run.elapsed = float(state.get("elapsed", 0.0))
    run.rng = np.random.default_rng([train_cfg.seed, run.start_epoch])
    if "best_model" in state:
        run.best_state = state["best_model"]
    run.refit = json.loads(state.get("refit") or "null")
    if run.ema is not None and "ema" in state:
        run.ema.load_state_dict(state["ema"])
    init = json.loads(state.get("init") or "null")
    if init:  # the run started from another model's weights
        run.init = Transfer(**init)


def _state(run: Run, epoch: int, split: tuple[list[str], list[str]], elapsed: float) -> dict:
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "epoch": epoch, "best": json.dumps(run.best),
             "history": json.dumps([h.__dict__ for h in run.history]),
             "split": json.dumps(split), "torch_rng": torch.get_rng_state(),
             "elapsed": elapsed,
             "init": json.dumps(run.init.meta() if run.init else None),
             "refit": json.dumps(run.refit)}
    if run.best_state is not None:
        state["best_model"] = run.best_state
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    return state


def _write_state(path: Path, state: dict) -> None:
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def round_windows(run: Run, train_set: Sequence[TrainImage], patch_cfg: PatchConfig,
                  n_classes: int, n: int | None = None) -> np.ndarray:
    """The windows of one round: the S-DRDIN grid (plus rare-class repeats), or ``n`` (default:
    as many as the grid has) windows centred near cells (:func:`qpcell.patches.cell_windows`)."""
    from qpcell.patches import cell_windows, rare_class_windows, sample_windows

    if patch_cfg.sampling not in SAMPLINGS:
        raise QpcellError(f"unknown patch sampling {patch_cfg.sampling!r}; choose from "
                          f"{', '.join(SAMPLINGS)}")
    points = [(d.xy, d.labels) for d in train_set]
    if patch_cfg.sampling == "cells" and n is not None:
        return cell_windows([d.pixels.shape[:2] for d in train_set], points, n,
                            size=patch_cfg.size, background_share=patch_cfg.background_fraction,
                            class_balance=patch_cfg.class_balance, rng=run.rng)
    wins = []
    for i, d in enumerate(train_set):
        xy0 = sample_windows(d.pixels.shape[:2], d.xy, size=patch_cfg.size,
                             stride=patch_cfg.stride, regions=d.regions,
                             background_fraction=patch_cfg.background_fraction, rng=run.rng)
        wins.extend((i, int(x), int(y)) for x, y in xy0)
    wins = rare_class_windows(wins, points, n_classes, patch_cfg.size,
                              share=patch_cfg.rare_share, repeats=patch_cfg.rare_repeats)
    if patch_cfg.sampling == "cells":
        return round_windows(run, train_set, patch_cfg, n_classes, max(1, len(wins)))
    return np.asarray(wins, dtype=np.int64).reshape(-1, 3)


def _loader(run: Run, train_set, windows, patch_cfg: PatchConfig, train_cfg: TrainConfig,
            extra) -> DataLoader:
    from functools import partial

    from qpcell.augment import stain_jitter
    from qpcell.patches import PatchDataset

    loading = default_loader_settings(run.device)
    colour = (partial(stain_jitter, strength=patch_cfg.colour_jitter)
              if patch_cfg.colour_jitter > 0 else None)
    dataset = PatchDataset([d.pixels for d in train_set], [(d.xy, d.labels) for d in train_set],
                           shard(windows, run.ctx), size=patch_cfg.size,
                           target_fn=run.target_fn,
                           extra_maps=None if extra[0] is None else
                           [extra[0][d.name] for d in train_set], extra_key=extra[1],
                           flips=patch_cfg.flips, rotate90=patch_cfg.rotate90, colour=colour,
                           scale_jitter=patch_cfg.scale_jitter,
                           seed=int(run.rng.integers(2**31)) + run.ctx.rank)
    generator = torch.Generator().manual_seed(int(run.rng.integers(2**31)))
    return DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=True,
                      generator=generator, drop_last=False,
                      num_workers=loading.num_workers if train_cfg.num_workers is None
                      else train_cfg.num_workers, pin_memory=loading.pin_memory)


def train_step(run: Run, x: torch.Tensor, targets: dict, lr: float, epoch: int
               ) -> tuple[float, dict]:
    """One optimiser step at learning rate ``lr``; returns the loss and its parts."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x = x.to(run.device, non_blocking=True).contiguous(memory_format=run.layout)
    targets = {k: v.to(run.device, non_blocking=True) for k, v in targets.items()}
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(run.device.type, dtype=run.amp or torch.float32,
                        enabled=run.amp is not None):
        output = run.ddp(x)
    loss, parts = run.model.loss({k: v.float() for k, v in output.items()}, targets)
    if not torch.isfinite(loss):
        raise QpcellError(f"training diverged at epoch {epoch} (loss {loss.item()})")
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.n_patches += len(x)
    return loss.item(), parts


def keep_if_best(run: Run, epoch: int, setting: dict, f1: float, cf1: float,
                 select_on: str, views: str = DEFAULT_VIEWS) -> bool:
    """Step 4: keep this round's weights when they are the best so far (``setting`` was
    tuned on the maps of the test-time ``views``)."""
    key = selection_key(f1, cf1, select_on, run.classifies)
    if key <= tuple(run.best["key"]):
        return False
    run.best = {"key": list(key), "f1": f1, "class_f1": cf1, "epoch": epoch, "setting": setting,
                "views": views}
    run.best_state = cpu_copy(run.evaluated)
    return True


def cpu_copy(model: torch.nn.Module) -> dict:
    """The model's weights, copied to the CPU (the kept round's state)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def model_meta(run: Run, prep: PreparedData, classes, setting: dict, epoch: int, f1: float,
               cf1: float, *, train_cfg: TrainConfig, mask_cfg: MaskConfig,
               patch_cfg: PatchConfig, extra_meta: dict | None,
               views: str = DEFAULT_VIEWS) -> dict:
    """``config.json`` entries of the model kept at ``epoch`` with post-processing ``setting``
    (tuned on the maps of the test-time ``views``, which the model then predicts with)."""
    return {
        "classes": classes_to_meta(classes),
        "mpp": prep.model_mpp,
        "views": views,
        "mask": {**to_dict(mask_cfg), "disc_radius_px_at_model_mpp": run.radius},
        "postprocess_kind": run.kind,
        "postprocess": postprocess_meta(replace(run.post, **setting))
        if run.kind == "sdrdin" else postprocess_meta(run.post),
        "peaks": setting if run.kind == "peaks" else None,
        "training": {
            "epoch": epoch, "epochs": train_cfg.epochs, "val_f1": f1, "val_class_f1": cf1,
            "match_radius_px": run.match_r, "train_images": prep.split[0],
            "val_images": prep.split[1],
            "n_train_points": int(sum(len(d.xy) for d in prep.train_set)),
            "source_mpp": prep.source_mpp,
            "init": run.init.meta() if run.init else None,
            # the weights also saw the validation images after this round (settings: before)
            "refit_after_round": run.best.get("refit_after_round"),
            "config": to_dict(train_cfg), "patch": to_dict(patch_cfg),
            "qpcell_version": __version__,
        },
        **(extra_meta or {}),
    }


def refits(train_cfg: TrainConfig, n_images: int, n_val: int) -> bool:
    """True when the run ends on every image: few images (at most
    ``train_cfg.refit_max_images``), some of them for validation, and ``refit_share`` > 0."""
    if not 0.0 <= train_cfg.refit_share < 1.0:
        raise QpcellError(f"the refit share must be a fraction in [0, 1), got "
                          f"{train_cfg.refit_share}")
    return train_cfg.refit_share > 0 and n_val > 0 and n_images <= train_cfg.refit_max_images


def refit_epoch(train_cfg: TrainConfig) -> int | None:
    """The first epoch on every image in an epoch-counted refit run (None: the run is too
    short to leave a validated epoch before it)."""
    first = train_cfg.epochs - math.ceil(train_cfg.refit_share * train_cfg.epochs) + 1
    return first if 2 <= first <= train_cfg.epochs else None


def refit_note(n_images: int, share: float, epoch: int) -> str:
    """What the user is told when the refit begins."""
    return (f"only {n_images} images: the settings were chosen on the validation images "
            f"after round {epoch}; the last {share:.0%} of the run trains on all {n_images}, "
            "so the model is not validated after that")


def annotated_area_px(image: TrainImage) -> float:
    """The area (pixels² at the model's scale) of ``image`` that carries annotations: its
    annotated regions within the image, or the whole image when it has none."""
    h, w = image.pixels.shape[:2]
    if not image.regions:
        return float(h * w)
    from shapely.geometry import box
    from shapely.ops import unary_union

    return float(unary_union(image.regions).intersection(box(0, 0, w, h)).area)


def cap_note(cap: int, train_cfg: TrainConfig) -> str:
    """What the user is told of a time budget's step cap (:func:`qpcell.schedule.step_cap`)."""
    return (f"the run ends after {train_cfg.time_budget_s / 60:g} min or {cap:,} steps, "
            f"whichever comes first: {train_cfg.max_passes:g} passes over the training images"
            + (f", at least {train_cfg.min_steps:,} steps" if train_cfg.min_steps else "")
            + "; more steps than the annotations can use only over-fit them (--max-passes 0: "
            "the time alone)")


def train_rounds(run: Run, prep: PreparedData, classes, out: Path, *, train_cfg: TrainConfig,
                 patch_cfg: PatchConfig, mask_cfg: MaskConfig, callbacks: TrainCallbacks,
                 max_steps_per_epoch: int | None, extra: tuple, extra_meta: dict | None
                 ) -> None:
    """Stages 3 and 4: rounds of steps, each followed by validation and keeping the best."""
    budget = None
    done_steps = sum(h.steps for h in run.history)  # before a resume, too
    if train_cfg.time_budget_s is not None:
        cap = step_cap(sum(annotated_area_px(d) for d in prep.train_set),
                       train_cfg.batch_size * run.ctx.world_size, patch_cfg.size,
                       train_cfg.max_passes, train_cfg.min_steps)
        budget = Budget(train_cfg.time_budget_s, val_share=train_cfg.val_share, max_steps=cap,
                        final_factor=final_validation_factor(len(VIEWS[train_cfg.views])))
        budget.start(time.perf_counter() - run.elapsed)
        if cap is not None and run.start_epoch == 1:
            callbacks.on_note(cap_note(cap, train_cfg))
    refit = refits(train_cfg, len(prep.data), len(prep.val_set))
    first_refit = refit_epoch(train_cfg) if refit and budget is None else None

    def refit_due(now: float) -> bool:  # a time budget's refit begins after this round
        return (refit and run.refit is None
                and budget.progress(now, done_steps) >= 1 - train_cfg.refit_share)

    train_set = prep.data if run.refit else prep.train_set
    if run.refit and budget is not None:
        budget.final_factor = 0.0  # the settings were chosen when the refit began
    windows = round_windows(run, train_set, patch_cfg, len(classes))
    if not len(windows):
        raise QpcellError("no training patches: are the points inside the annotated regions?")
    per_round = len(windows)
    batches = math.ceil(len(shard(windows, run.ctx)) / train_cfg.batch_size)
    if max_steps_per_epoch:
        batches = min(batches, max_steps_per_epoch)
    callbacks.on_start(train_cfg.epochs, batches, run.start_epoch,
                       budget_s=train_cfg.time_budget_s)
    log_path = out / LOG
    epoch = run.start_epoch - 1
    last_done = epoch
    try:
        while True:
            epoch += 1
            if budget is None and epoch > train_cfg.epochs:
                break
            if budget is not None and budget.done(time.perf_counter(), done_steps):
                break
            t0 = time.perf_counter()
            if epoch > run.start_epoch:
                windows = round_windows(run, train_set, patch_cfg, len(classes), per_round)
            loader = _loader(run, train_set, windows, patch_cfg, train_cfg, extra)
            run.model.train()
            total, parts_sum, steps, lr = 0.0, {}, 0, train_cfg.lr
            stop_round = False
            while not stop_round:
                for step, (x, targets) in enumerate(loader, steps + 1):
                    now = time.perf_counter()
                    if budget is not None:
                        progress = budget.progress(now, done_steps)
                        left = budget.left(now, done_steps)
                    else:
                        progress = ((epoch - 1) + (step - 1) / batches) / train_cfg.epochs
                        left = None
                    lr = lr_at(progress, train_cfg.lr, train_cfg.lr_schedule, train_cfg.warmup)
                    value, parts = train_step(run, x, targets, lr, epoch)
                    total += value
                    steps += 1
                    done_steps += 1
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
                    callbacks.on_batch(epoch, step, value, progress, left)
                    now = time.perf_counter()
                    if budget is None:
                        if max_steps_per_epoch and step >= max_steps_per_epoch:
                            break
                    elif budget.done(now, done_steps) or (run.refit is None and (
                            budget.should_validate(now, done_steps) or refit_due(now))):
                        break
                else:  # the loader ran dry: an epoch ends, a budget round draws more windows
                    if budget is not None:
                        windows = round_windows(run, train_set, patch_cfg, len(classes),
                                                per_round)
                        loader = _loader(run, train_set, windows, patch_cfg, train_cfg, extra)
                        continue
                stop_round = True
            last_done = epoch - 1
            now = time.perf_counter()
            switch = (refit and run.refit is None and epoch + 1 == first_refit
                      if budget is None else refit_due(now)
                      and not budget.done(now, done_steps))
            if run.refit is not None:  # a round on every image: nothing left to validate on
                setting, f1, cf1 = run.refit["setting"], math.nan, math.nan
                views = run.refit.get("views", DEFAULT_VIEWS)
                is_best = False
            else:
                # the settings a refit keeps are tuned on the maps the model will predict
                views = train_cfg.views if switch else DEFAULT_VIEWS
                setting, f1, cf1 = broadcast(
                    validate(run.evaluated, prep.val_set, classes, run.post, run.match_r,
                             run.kind, run.device, quick=budget is not None and not switch,
                             views=views)
                    if run.ctx.is_main else None, run.ctx)  # rank 0 validates; others wait
                if budget is not None:
                    budget.validated(time.perf_counter(), time.perf_counter() - now,
                                     done_steps)
                is_best = keep_if_best(run, epoch, setting, f1, cf1, train_cfg.select_on,
                                       views)
            if run.ctx.is_main and train_cfg.keep_epochs:
                scores = (f1, cf1) if run.refit is None else (run.refit["f1"],
                                                              run.refit["class_f1"])
                save_model(epoch_dir(out, epoch), _kept(run.evaluated),
                           model_meta(run, prep, classes, setting, epoch, *scores,
                                      train_cfg=train_cfg, mask_cfg=mask_cfg,
                                      patch_cfg=patch_cfg, extra_meta=extra_meta,
                                      views=views))
            if switch:  # the settings are chosen: the rest of the run sees every image
                run.refit = {"epoch": epoch, "setting": setting, "f1": f1, "class_f1": cf1,
                             "views": views}
                train_set = prep.data
                if budget is not None:
                    budget.final_factor = 0.0
                callbacks.on_note(refit_note(len(prep.data), train_cfg.refit_share, epoch))
            summary = EpochSummary(epoch, total / max(steps, 1),
                                   {k: v / max(steps, 1) for k, v in parts_sum.items()},
                                   f1, cf1, float(setting.get("threshold", math.nan)),
                                   time.perf_counter() - t0, is_best, steps, lr)
            run.history.append(summary)
            elapsed = time.perf_counter() - budget.t0 if budget is not None else 0.0
            if run.ctx.is_main:  # rank 0 alone writes the log and the resume state
                with open(log_path, "a", encoding="utf-8") as log:
                    scores = ("all images (refit)" if math.isnan(f1) else
                              f"val_f1 {f1:.4f} val_class_f1 {cf1:.4f}")
                    log.write(f"epoch {epoch} steps {steps} lr {lr:.2e} "
                              f"loss {summary.loss:.5f} {scores} "
                              f"threshold {summary.threshold:.2f} "
                              f"seconds {summary.seconds:.1f}{' best' if is_best else ''}\n")
                _write_state(out / RESUME, _state(run, epoch, prep.split, elapsed))
            last_done = epoch
            callbacks.on_epoch(summary)
    except KeyboardInterrupt:
        if run.ctx.is_main:
            elapsed = time.perf_counter() - budget.t0 if budget is not None else 0.0
            _write_state(out / RESUME, _state(run, last_done, prep.split, elapsed))
        if run.best_state is not None and run.ctx.is_main:  # keep the best round as it is
            finish_run(run, prep, classes, out, train_cfg=train_cfg, mask_cfg=mask_cfg,
                       patch_cfg=patch_cfg, extra_meta=extra_meta, callbacks=callbacks,
                       retune=False)
        raise TrainingInterrupted(
            f"interrupted after round {last_done}; the best model so far is kept; "
            "continue with --resume", out) from None
    if run.refit is not None and last_done > run.refit["epoch"]:
        keep_refit(run, last_done)


def keep_refit(run: Run, epoch: int) -> None:
    """Keep the refit's last weights, with the settings chosen when the refit began."""
    r = run.refit
    run.best = {"key": list(selection_key(r["f1"], r["class_f1"])), "f1": r["f1"],
                "class_f1": r["class_f1"], "epoch": epoch, "setting": r["setting"],
                "views": r.get("views", DEFAULT_VIEWS), "refit_after_round": r["epoch"]}
    run.best_state = cpu_copy(run.evaluated)


def _kept(model: torch.nn.Module) -> torch.nn.Module:
    # A model with training-only parts (MTL-IHC's auxiliary decoders) saves what inference uses.
    return model.export() if hasattr(model, "export") else model


def uses_cells(run: Run, classes, train_cfg: TrainConfig) -> bool:
    """Whether this run trains a cell classifier (stage 5): asked for, a model that classifies
    into at least two classes, and one process (not under torchrun)."""
    if not 0.0 <= train_cfg.cells_share < 1.0:
        raise QpcellError(f"the cell classifier's share of the budget must be a fraction in "
                          f"[0, 1), got {train_cfg.cells_share}")
    return (train_cfg.cells_share > 0 and run.classifies and len(classes) >= 2
            and not run.ctx.distributed)


def train_cells(run: Run, prep: PreparedData, classes, out: Path, *, train_cfg: TrainConfig,
                callbacks: TrainCallbacks) -> tuple[CellClassifier, CellTraining]:
    """Stage 5: a cell classifier on crops around the cells the network trained on (every
    image after a refit), for ``cells_share`` of the time budget or ``cells_passes`` draws of
    each cell, whichever ends first (:func:`qpcell.train_cells.fit_cell_classifier`)."""
    images = prep.data if run.refit is not None else prep.train_set
    cells = [(d.pixels, d.xy, d.labels) for d in images]
    n_cells = sum(len(xy) for _, xy, _ in cells)
    steps = classifier_steps(n_cells, train_cfg.cells_passes, train_cfg.cells_min_steps)
    seconds = (None if train_cfg.time_budget_s is None
               else train_cfg.time_budget_s * train_cfg.cells_share)
    model = CellClassifier(len(classes), crop_px=crop_px_for(prep.model_mpp))
    callbacks.on_note(f"training a cell classifier on the {n_cells} cells of {len(images)} "
                      f"images: {steps} steps" + ("" if seconds is None else
                                                  f" or {seconds:.0f} s, whichever ends first"))
    result = fit_cell_classifier(model, cells, steps=steps, seconds=seconds, device=run.device,
                                 amp=run.amp, layout=run.layout, seed=train_cfg.seed)
    with open(out / LOG, "a", encoding="utf-8") as log:
        log.write(f"cell classifier steps {result.steps} loss {result.first_loss:.5f} -> "
                  f"{result.last_loss:.5f} seconds {result.seconds:.1f}\n")
    return model, result


def with_cells(run: Run, prep: PreparedData, classes, model: torch.nn.Module,
               cells: CellClassifier, views: str, select_on: str, retune: bool
               ) -> tuple[float, dict | None, float, float]:
    """The cell classifier's share of the class maps and the settings tuned with it
    (:func:`qpcell.tuning.tune_cell_share` on the validation images), or, when nothing is to be
    tuned (``retune`` False: after Ctrl-C or a refit) or no validation image is left,
    :data:`CELLS_UNTUNED_SHARE` and no new settings."""
    if not retune or not prep.val_set:
        return CELLS_UNTUNED_SHARE, None, math.nan, math.nan
    net_maps = validation_maps(model, prep.val_set, run.device, views)
    only_cells = WithCellClassifier.wrap(model, cells, 1.0)
    cell_maps = [c for _, c in validation_maps(only_cells, prep.val_set, run.device, views)]
    return tune_cell_share(net_maps, cell_maps, prep.val_set, classes, run.post, run.match_r,
                           lambda f1, cf1: selection_key(f1, cf1, select_on, run.classifies),
                           run.kind)


def finish_run(run: Run, prep: PreparedData, classes, out: Path, *, train_cfg: TrainConfig,
               mask_cfg: MaskConfig, patch_cfg: PatchConfig, extra_meta: dict | None,
               callbacks: TrainCallbacks, retune: bool = True,
               cells: tuple[CellClassifier, CellTraining] | None = None) -> None:
    """Stage 6: tune every post-processing setting for the kept weights and write the model.

    Rounds of a time budget tuned the threshold only, and every round saw one view: the whole
    search runs now, on the maps of ``train_cfg.views`` (unless ``retune`` is False, as after
    Ctrl-C, when the round's settings and views are kept as they are). With a cell classifier
    (stage 5) the search runs for each share of its class map (:func:`with_cells`); a share
    above 0 is saved as a :class:`~qpcell.models.cell_classifier.WithCellClassifier`."""
    if run.best_state is None:
        raise QpcellError("training ended before any round was validated")
    run.model.load_state_dict(run.best_state)
    best = run.best
    setting, f1, cf1 = best["setting"], best["f1"], best["class_f1"]
    views = best.get("views", DEFAULT_VIEWS)
    refitted = best.get("refit_after_round") is not None  # its settings are chosen already
    model = _kept(run.model)
    cells_meta = None
    if cells is not None:
        views = views if refitted or not retune else train_cfg.views
        share, tuned, t_f1, t_cf1 = with_cells(run, prep, classes, model, cells[0], views,
                                               train_cfg.select_on, retune and not refitted)
        if tuned is not None:
            setting, f1, cf1 = tuned, t_f1, t_cf1
            run.best.update(setting=setting, f1=f1, class_f1=cf1, views=views)
        cells_meta = {"share": share, "tuned": tuned is not None, "steps": cells[1].steps,
                      "seconds": round(cells[1].seconds, 1),
                      "first_loss": cells[1].first_loss, "last_loss": cells[1].last_loss}
        callbacks.on_note(f"the cell classifier's share of the class maps: {share:g}"
                          + ("" if tuned is not None else " (not tuned: no validation images "
                             "of its own)"))
        if share > 0:
            model = WithCellClassifier.wrap(model, cells[0], share)
    elif retune and not refitted and (train_cfg.time_budget_s is not None
                                      or views != train_cfg.views):
        views = train_cfg.views
        setting, f1, cf1 = validate(run.model, prep.val_set, classes, run.post, run.match_r,
                                    run.kind, run.device, views=views)
        run.best.update(setting=setting, f1=f1, class_f1=cf1, views=views)
    for note in edge_notes(setting, run.post, [c.name for c in classes]):
        callbacks.on_note(note)
    meta = model_meta(run, prep, classes, setting, int(best["epoch"]), f1, cf1,
                      train_cfg=train_cfg, mask_cfg=mask_cfg, patch_cfg=patch_cfg,
                      extra_meta=extra_meta, views=views)
    meta["training"]["cell_classifier"] = cells_meta
    save_model(out, model, meta)


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
    init: str | Path | None = None,
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
        Every pixel constant (disc radius, post-processing windows) is scaled to it. Images
        without a pixel size are scaled by the size of their nuclei (:mod:`qpcell.scale`)
        unless ``fallback_mpp`` is given.
    fallback_mpp
        Source pixel size for images that carry none (``--mpp``).
    train_cfg, mask_cfg, patch_cfg, post_cfg
        Settings (defaults: the paper's; :func:`qpcell.recipe.recipe` gives the fast ones).
        ``train_cfg.time_budget_s`` trains for that many seconds instead of ``epochs``.
    match_radius_px
        Validation matching radius at the model's scale; default S-DRDIN's 10 px at 0.44 µm/px.
    init
        Starting weights: ``"builtin"``, a model folder, or None / ``"none"`` (random); the
        class layer is fitted to ``classes`` (:mod:`qpcell.pretrained`). Ignored on resume.
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
    t_start = time.perf_counter()
    callbacks = callbacks or TrainCallbacks()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = tuple(classes)
    if train_cfg.lr_schedule not in LR_SCHEDULES:
        lr_at(0.0, train_cfg.lr, train_cfg.lr_schedule)  # raises the one-line error
    if train_cfg.views not in VIEWS:
        raise QpcellError(f"unknown test-time views {train_cfg.views!r}; choose from "
                          f"{', '.join(VIEWS)}")
    saved_split = tuple(json.loads(read_state(out)["split"])) if resume else None
    init_dir = resolve_init(init)
    prep = prepare_data(images, model_mpp=model_mpp, fallback_mpp=fallback_mpp,
                        train_cfg=train_cfg, val_names=val_names, prepared=prepared,
                        split=saved_split)
    for note in prep.notes:
        callbacks.on_note(note)
    run = build_run(prep, classes, out, model_name=model_name, model_kwargs=model_kwargs,
                    train_cfg=train_cfg, mask_cfg=mask_cfg, post_cfg=post_cfg,
                    match_radius_px=match_radius_px, device=device, resume=resume,
                    init=init_dir)
    if run.init is not None and not resume:
        callbacks.on_note(run.init.note(prep.model_mpp))
    extra = (extra_maps, extra_key)  # every image's maps: a refit trains on them all
    with_classifier = uses_cells(run, classes, train_cfg)
    rounds_cfg = train_cfg  # the network's share of a time budget
    if with_classifier and train_cfg.time_budget_s is not None:
        rounds_cfg = replace(train_cfg,
                             time_budget_s=train_cfg.time_budget_s * (1 - train_cfg.cells_share))
    train_rounds(run, prep, classes, out, train_cfg=rounds_cfg, patch_cfg=patch_cfg,
                 mask_cfg=mask_cfg, callbacks=callbacks, max_steps_per_epoch=max_steps_per_epoch,
                 extra=extra, extra_meta=extra_meta)
    if run.ctx.is_main:
        cells = None
        if with_classifier:
            try:
                cells = train_cells(run, prep, classes, out, train_cfg=train_cfg,
                                    callbacks=callbacks)
            except KeyboardInterrupt:  # the network is trained: keep it without the classifier
                finish_run(run, prep, classes, out, train_cfg=train_cfg, mask_cfg=mask_cfg,
                           patch_cfg=patch_cfg, extra_meta=extra_meta, callbacks=callbacks)
                raise TrainingInterrupted("interrupted while training the cell classifier; "
                                          "the network is kept without it", out) from None
        finish_run(run, prep, classes, out, train_cfg=train_cfg, mask_cfg=mask_cfg,
                   patch_cfg=patch_cfg, extra_meta=extra_meta, callbacks=callbacks,
                   cells=cells)
    barrier(run.ctx)  # the model folder is complete before any rank returns
    return TrainResult(out, run.history, int(run.best["epoch"]), float(run.best["f1"]),
                       float(run.best["class_f1"]), prep.split[0], prep.split[1],
                       run.n_patches, time.perf_counter() - t_start, prep.model_mpp,
                       list(prep.notes), run.best.get("refit_after_round"))


__all__ = ["TrainImage", "EpochSummary", "TrainResult", "TrainCallbacks", "TrainingInterrupted",
           "PreparedData", "Run", "load_train_image", "split_names", "estimate_source_mpp",
           "prepare_data", "build_run", "train_rounds", "train_cells", "finish_run", "train",
           "epoch_lr", "uses_cells", "with_cells", "CELLS_UNTUNED_SHARE",
           "refits", "refit_epoch",
           "SELECT_ON", "selection_key", "pick_epoch", "epoch_dir",
           # validation lives in qpcell.tuning; these names stay importable from here
           "image_maps", "tune_class_gain", "tune_postprocess", "validate"]
