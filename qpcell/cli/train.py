"""``qpcell train``: point annotations -> a model folder."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from qpcell.cli._app import app, console, print_note
from qpcell.config import PAPER_MPP, SAMPLINGS, SELECT_ON, TrainConfig
from qpcell.device import PRECISIONS
from qpcell.ensemble import MAX_MEMBERS, MEMBERS_DIR, member_name
from qpcell.errors import QpcellError
from qpcell.recipe import DEFAULT_BUDGET_MIN, RECIPES, default_model, recipe
from qpcell.train import EpochSummary, TrainCallbacks, TrainResult
from qpcell.train_guard import prepare_model_folder, training_notes
from qpcell.views import DEFAULT_VIEWS

SEPARATE = "separate"
MTL = "mtl-ihc"


class RichCallbacks(TrainCallbacks):
    """A progress bar over the whole run (batches, or the time budget), with loss, validation
    F1 and time left; where the output is no terminal (a log file), a plain line every
    :data:`LOG_EVERY_S` seconds instead."""

    LOG_EVERY_S = 30.0

    def __init__(self, progress: Progress, label: str, clock=time.monotonic) -> None:
        self.progress = progress
        self.clock = clock
        self.label = label
        self.task = None
        self.val = "-"
        self.total = 1
        self.round = "epoch"
        self.last_line = clock()

    def on_start(self, epochs: int, batches_per_epoch: int, start_epoch: int,
                 budget_s: float | None = None) -> None:
        self.round = "round" if budget_s else "epoch"
        self.total = 1000 if budget_s else (epochs - start_epoch + 1) * batches_per_epoch
        self.task = self.progress.add_task(self.label, total=self.total, info="")

    def on_batch(self, epoch: int, step: int, loss: float, progress: float | None = None,
                 seconds_left: float | None = None) -> None:
        info = f"{self.round} {epoch} loss {loss:.4f} val F1 {self.val}"
        if seconds_left is not None:
            info += f" {seconds_left / 60:.1f} min left"
        if self.round == "round" and progress is not None:
            self.progress.update(self.task, completed=progress * self.total, info=info)
        else:
            self.progress.update(self.task, advance=1, info=info)
        now = self.clock()
        if not self.progress.console.is_terminal and now - self.last_line >= self.LOG_EVERY_S:
            self.last_line = now
            done = f"{100 * progress:.0f}% " if progress is not None else ""
            self.progress.console.print(f"{done}{info}", highlight=False)

    def on_epoch(self, summary: EpochSummary) -> None:
        refit = math.isnan(summary.val_f1)  # a round on every image (qpcell.train.refits)
        self.val = "refit" if refit else f"{summary.val_f1:.3f}"
        star = " *" if summary.best else ""
        scores = ("all images, not validated" if refit else
                  f"val F1 {summary.val_f1:.3f}  class F1 {summary.val_class_f1:.3f}")
        self.progress.console.print(
            f"{self.round} {summary.epoch:3d}  loss {summary.loss:.4f}  {scores}  "
            f"thr {summary.threshold:.2f}  {summary.steps} steps  "
            f"{summary.seconds:.0f}s{star}", highlight=False)

    def on_note(self, text: str) -> None:
        self.progress.console.print(f"note: {text}", highlight=False, markup=False)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False)


def parse_mpp(value: str | None) -> float | None:
    """``--model-mpp``: a positive number, or ``native`` (None)."""
    if value is None or value.lower() == "native":
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise QpcellError(f"--model-mpp {value!r} is neither a number nor 'native'") from None
    if not mpp > 0:
        raise QpcellError(f"--model-mpp {value!r} must be positive")
    return mpp


def run_training(source_classes, images, out: Path, model: str, *, show: bool = True,
                 members: int | None = 1, **kwargs) -> list[TrainResult]:
    """Train one model, an ensemble of ``members`` (None: as many as the time budget holds,
    :mod:`qpcell.train_ensemble`) or the separate detection + classification pipeline, with
    progress; the result of each model trained."""
    from qpcell.checkpoint import read_config, save_pipeline
    from qpcell.train_ensemble import train_ensemble

    with _progress() if show else _NoProgress() as progress:
        if model == MTL:
            from qpcell.mtl import train_mtl

            return [train_mtl(images, source_classes, out,
                              callbacks=RichCallbacks(progress, model) if show else None,
                              **kwargs)]
        if model != SEPARATE:
            return train_ensemble(
                images, source_classes, out, members=members, max_members=MAX_MEMBERS,
                model_name=model, on_note=print_note,
                callbacks_for=lambda k: (RichCallbacks(progress, model if k == 1 else
                                                       f"{model} member {k}")
                                         if show else None), **kwargs)
        from qpcell.train import train
        results = {}
        cfg = kwargs.get("train_cfg")
        if cfg is not None and cfg.time_budget_s:  # the two models share the budget
            kwargs["train_cfg"] = replace(cfg, time_budget_s=cfg.time_budget_s / 2)
        for part, name in (("detection", "drdin-detection"),
                           ("classification", "drdin-classification")):
            results[part] = train(images, source_classes, out / part, model_name=name,
                                  callbacks=RichCallbacks(progress, name) if show else None,
                                  **kwargs)
    det_cfg = read_config(out / "detection")
    meta = {k: det_cfg[k] for k in ("classes", "mpp", "mask", "postprocess_kind", "postprocess")}
    meta["views"] = det_cfg.get("views", DEFAULT_VIEWS)  # what the threshold was tuned on
    meta["training"] = {part: read_config(out / part)["training"] for part in results}
    meta["training"]["source_mpp"] = meta["training"]["detection"].get("source_mpp")
    save_pipeline(out, {p: out / p for p in results}, meta)
    det, cls = results["detection"], results["classification"]
    return [TrainResult(out, det.history + cls.history, det.best_epoch, det.val_f1,
                        cls.val_class_f1, det.train_images, det.val_images,
                        det.n_patches + cls.n_patches, det.seconds + cls.seconds)]


def parse_members(value: str, model: str) -> int | None:
    """``--members``: a count of at least 1, or ``auto`` (None; one model for the pipeline
    and mtl-ihc, which train no ensembles)."""
    if value.strip().lower() == "auto":
        return 1 if model in (SEPARATE, MTL) else None
    try:
        count = int(value)
    except ValueError:
        raise QpcellError(f"--members {value!r} is neither a number nor 'auto'") from None
    if count < 1:
        raise QpcellError(f"--members {count}: give at least 1 (or 'auto')")
    if count > 1 and model in (SEPARATE, MTL):
        raise QpcellError(f"--members {count}: ensembles are for single networks, not "
                          f"{model}")
    return count


def implied_model(recipe_name: str, init: Path | None, resumed: Path | None) -> str:
    """The network to train when ``--model`` is not given.

    The one of the run being resumed (``resumed``: its model folder), else the one of the
    starting model (``init``: a model folder), else the recipe's
    (:data:`qpcell.recipe.DEFAULT_MODELS`).
    """
    from qpcell.checkpoint import CONFIG, read_config
    from qpcell.models.cell_classifier import base_spec

    if resumed is not None and (resumed / "detection").is_dir():
        return SEPARATE
    if resumed is not None and (resumed / MEMBERS_DIR / member_name(1) / CONFIG).exists():
        resumed = resumed / MEMBERS_DIR / member_name(1)  # an ensemble: its first member's
    for folder in (resumed, init):
        if folder is not None and (folder / CONFIG).exists():
            name = base_spec(read_config(folder).get("model", {})).get("name")
            if isinstance(name, str):
                return name
    return default_model(recipe_name)


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


@app.command("train")
def train_command(
    source: Path = typer.Argument(..., help="GeoJSON project folder, or a QuPath project "
                                  "(project.qpproj)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="s-drdin, s-drdin-gradient, drdin-detection, "
                                          "drdin-classification, unet, mtl-ihc, or 'separate' "
                                          "(drdin-detection + drdin-classification). Default: "
                                          "the recipe's (fast: unet, paper: s-drdin); with "
                                          "--init MODEL or --resume, that model's network."),
    recipe_name: str = typer.Option("fast", "--recipe", help="'fast' (default): the settings "
                                    "that learn most in minutes (qpcell.recipe); 'paper': "
                                    "S-DRDIN 2.2-2.3 / paper 003 as published. The options "
                                    "below override single settings of either."),
    time_budget: float | None = typer.Option(None, "--time-budget", help="Train for this many "
                                             "minutes (validation and writing the model "
                                             "included); the learning rate, validation and "
                                             "stopping fit the time (or --max-passes, "
                                             "whichever ends first). Default with --recipe "
                                             "fast and no --epochs: 10."),
    max_passes: float | None = typer.Option(None, "--max-passes", min=0.0, help="With a time "
                                            "budget: also stop once the training windows "
                                            "have covered the training images this many "
                                            "times (fast: 150, at least 1,000 steps; 0: the "
                                            "time alone). On a fast CPU or a GPU the run then "
                                            "ends early instead of over-fitting."),
    epochs: int | None = typer.Option(None, help="Train for this many epochs instead of a "
                                      "time budget (default with --recipe paper: 100)."),
    batch_size: int | None = typer.Option(None, help="Patches per batch (S-DRDIN: 4; "
                                          "fast: 8)."),
    lr: float | None = typer.Option(None, help="Adam learning rate (S-DRDIN: 1e-3; "
                                    "fast: 2e-3)."),
    weight_decay: float | None = typer.Option(None, min=0.0, help="Weight decay (default "
                                              "0; with --recipe fast AdamW's decoupled decay "
                                              "of the weight tensors, e.g. 0.05; mtl-ihc "
                                              "keeps paper 003's 2e-5)."),
    lr_schedule: str | None = typer.Option(None, help="'constant' (S-DRDIN) or 'cosine' "
                                           "(down to 0 at the end; fast)."),
    select_on: str | None = typer.Option(None, help="Which round (epoch) to keep: "
                                         "'detection' (best validation detection F1; paper) "
                                         "or 'combined' (best mean of detection F1 and "
                                         "weighted classification F1; fast)."),
    keep_epochs: bool = typer.Option(False, help="Also save every epoch's model under "
                                     "OUT/epochs/epoch-NNN."),
    refit: float | None = typer.Option(None, help=f"With at most {TrainConfig.refit_max_images} "
                                       "images: train the last "
                                       "REFIT share of the run on every image, the "
                                       "validation images too, once the settings are "
                                       "chosen on them (0: never; fast: 0.3; paper: 0)."),
    ema: float | None = typer.Option(None, help="Validate and keep an exponential moving "
                                     "average of the weights with this decay per step "
                                     "(warmed up; 0: the weights themselves, the default)."),
    seed: int = typer.Option(0, help="Random seed (split, patches, weights)."),
    members: str = typer.Option("auto", help="Models to train and average (an ensemble; "
                                "member K trains with seed SEED+K-1 and validates on its own "
                                "images). 'auto' (default): with a time budget, another model "
                                "while the budget left holds one after the step cap ended "
                                f"the last (at most {MAX_MEMBERS}), else one. Each member "
                                "adds one model's prediction time."),
    precision: str = typer.Option(TrainConfig.precision, help="'auto': bf16 autocast where "
                                  "the hardware computes bf16 natively (CUDA, CPUs with "
                                  "AVX512-BF16/AMX), channels-last; 'fp32'; 'bf16'."),
    mpp: float | None = typer.Option(None, help="Pixel size (µm/px) of images that do not "
                                     "carry one (default: estimated from the size of the "
                                     "annotated nuclei, and printed)."),
    model_mpp: str = typer.Option(str(PAPER_MPP), help="µm/px the model works at "
                                  "(S-DRDIN: 0.44), or 'native' to keep each image's scale."),
    base: int | None = typer.Option(None, help="Network width (S-DRDIN: 16)."),
    init: str = typer.Option("none", help="Starting weights: 'none' (random, the default), "
                             "'builtin' (qpcell's IHC nucleus model: S-DRDIN of the fast "
                             "recipe, trained on EndoNuke; helps on DAB + haematoxylin IHC, "
                             "not on H&E) or a model folder of the same architecture. The "
                             "class layer is fitted to your classes."),
    val_images: str | None = typer.Option(None, help="Comma-separated image names to validate "
                                          "on (default: a seeded 30% of the images)."),
    images: str | None = typer.Option(None, help="Comma-separated image names to use."),
    disc_radius: float | None = typer.Option(None, help="Label disc radius, px at 0.44 µm/px "
                                             "(S-DRDIN: 2; fast: 4); at native scale in "
                                             "native px."),
    match_radius: float | None = typer.Option(None, help="Validation matching radius in px at "
                                              "the model's scale (default 10 px at 0.44 µm/px)."),
    patch_size: int | None = typer.Option(None, help="Patch side in px (S-DRDIN: 224; "
                                          "fast: 128)."),
    stride: int | None = typer.Option(None, help="Patch stride in px of the 'grid' sampling "
                                      "(S-DRDIN: 120)."),
    sampling: str | None = typer.Option(None, help="'grid' (S-DRDIN: every stride-120 window) "
                                        "or 'cells' (fast: windows centred near annotated "
                                        "cells)."),
    background_fraction: float | None = typer.Option(None, help="Share of cell-free patches "
                                                     "kept (grid) or drawn (cells)."),
    rotate90: bool | None = typer.Option(None, "--rotate90/--no-rotate90",
                                         help="Also augment with 90-degree rotations (fast)."),
    colour_jitter: float | None = typer.Option(None, help="HED stain, brightness and contrast "
                                               "jitter strength (0: none, the default; 1: "
                                               "Tellez et al.'s HED-light)."),
    scale_jitter: float | None = typer.Option(None, min=0.0, help="Read each training window "
                                              "at a random scale between 1/(1+J) and 1+J "
                                              "(0: none, the default)."),
    class_context: float | None = typer.Option(None, min=0.0, help="Let each cell's class "
                                               "take a share of the class probabilities of the "
                                               "cells within this many µm, the share (none "
                                               "included) tuned on the validation images "
                                               "(fast: 10; 0: off, the paper)."),
    cell_classifier: float | None = typer.Option(None, min=0.0, max=0.9, help="Share of the "
                                                 "time budget that trains a cell classifier on "
                                                 "crops around the annotated cells after the "
                                                 "network; half of its class map is mixed "
                                                 "into the network's (0: none, the default; "
                                                 "0.2 measured on EndoNuke: see the README)."),
    rare_repeats: int | None = typer.Option(None, min=0, help="Grid sampling: draw windows "
                                            "holding a cell of a rare class (under 5% of the "
                                            "points) this many more times per epoch "
                                            "(S-DRDIN: 0)."),
    max_steps: int | None = typer.Option(None, help="At most this many batches per epoch."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, mps (default: best "
                                      "available)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, help="Replace the model already in --out."),
    image_root: list[str] = typer.Option([], help="OLD=NEW prefix to remap moved images of "
                                         "a QuPath project (repeatable)."),
    aux: str = typer.Option("dynamic,prior", help="mtl-ihc auxiliary decoders: 'none' (paper "
                            "003 'Ours'), 'dynamic' ('Ours+'), 'dynamic,prior' ('Ours++')."),
    prior_classes: str | None = typer.Option(None, help="mtl-ihc: class(es) that grow in "
                                             "clusters, learnt as the tissue prior (default: "
                                             "the most clustered class)."),
    backbone: str = typer.Option("resnet18", help="mtl-ihc ResNet backbone: resnet18/34/50/"
                                 "101 (paper 003: resnet101)."),
    prior_epochs: int = typer.Option(10, help="mtl-ihc: epochs of the early-stopped prior "
                                     "model (paper 003: 10)."),
) -> None:
    """Train a cell detection + classification model on point annotations."""
    from qpcell.distributed import is_main
    from qpcell.io.sources import load_source

    if not is_main():  # under torchrun only rank 0 prints; errors still show from every rank
        console.quiet = True

    prepare_model_folder(out, resume=resume, overwrite=overwrite)
    model_mpp_value = parse_mpp(model_mpp)
    from qpcell.pretrained import resolve_init

    if recipe_name not in RECIPES:
        raise QpcellError(f"--recipe {recipe_name!r}: choose from {', '.join(RECIPES)}")
    start = resolve_init(init)  # a wrong folder fails here, early
    model = model or implied_model(recipe_name, start, out if resume else None)
    if start is not None and model == MTL:
        raise QpcellError("--init is for the S-DRDIN family and the U-Net; mtl-ihc trains its "
                          "own prior model")
    rec = recipe(recipe_name, model)
    if epochs is not None and time_budget is not None:
        raise QpcellError("give --epochs or --time-budget, not both")
    if time_budget is not None and not time_budget > 0:
        raise QpcellError(f"--time-budget {time_budget} must be a positive number of minutes")
    budget_s = (time_budget * 60 if time_budget is not None else
                None if epochs is not None or recipe_name == "paper" else
                DEFAULT_BUDGET_MIN * 60)
    if max_passes is not None and budget_s is None:
        raise QpcellError("--max-passes ends a time budget early; a run of --epochs ends after "
                          "its epochs")

    def given(**values):
        return {k: v for k, v in values.items() if v is not None}

    train_cfg = replace(rec.train, seed=seed, precision=precision,
                        keep_epochs=keep_epochs, time_budget_s=budget_s,
                        **given(epochs=epochs, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay,
                                lr_schedule=lr_schedule, select_on=select_on,
                                refit_share=refit, ema_decay=ema, max_passes=max_passes,
                                cells_share=cell_classifier))
    patch_cfg = replace(rec.patch, **given(size=patch_size, stride=stride, sampling=sampling,
                                           background_fraction=background_fraction,
                                           rotate90=rotate90, colour_jitter=colour_jitter,
                                           scale_jitter=scale_jitter,
                                           rare_repeats=rare_repeats))
    mask_cfg = replace(rec.mask, **given(disc_radius_px=disc_radius))
    post_cfg = rec.post
    if class_context is not None:
        post_cfg = replace(post_cfg, context_radius_px=class_context / post_cfg.mpp,
                           context_weight=0.0)
    if stride is None and patch_cfg.stride > patch_cfg.size:  # a smaller --patch-size alone
        patch_cfg = replace(patch_cfg, stride=patch_cfg.size)
    if patch_cfg.size % 16 or patch_cfg.size < 32:
        raise QpcellError(f"--patch-size {patch_cfg.size} must be a multiple of 16, at least 32")
    if not 0 < patch_cfg.stride <= patch_cfg.size:
        raise QpcellError(f"--stride {patch_cfg.stride} must be between 1 and --patch-size")
    if patch_cfg.sampling not in SAMPLINGS:
        raise QpcellError(f"--sampling {patch_cfg.sampling!r}: choose from "
                          f"{', '.join(SAMPLINGS)}")
    if precision not in PRECISIONS:
        raise QpcellError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if train_cfg.select_on not in SELECT_ON:
        raise QpcellError(f"--select-on {select_on!r}: choose from {', '.join(SELECT_ON)}")
    if not 0 <= train_cfg.refit_share < 1:
        raise QpcellError(f"--refit {refit}: give a share of the run from 0 up to (not "
                          "including) 1")
    if not 0 <= train_cfg.ema_decay < 1:
        raise QpcellError(f"--ema {ema}: give a decay from 0 (off) up to (not including) 1")
    if train_cfg.epochs < 1 or train_cfg.batch_size < 1:
        raise QpcellError("--epochs and --batch-size must be at least 1")
    n_members = parse_members(members, model)
    roots = {}
    for item in image_root:
        if "=" not in item:
            raise QpcellError(f"--image-root {item!r} must look like OLD=NEW")
        old, new = item.split("=", 1)
        roots[old] = new
    notes: list[str] = []
    classes, annotated = load_source(source, images=images.split(",") if images else None,
                                     image_root=roots or None, notes=notes)
    for note in notes + training_notes(annotated, val_images):
        print_note(note)
    console.print(f"[bold]{len(annotated)}[/] images, "
                  f"{sum(len(a) for a in annotated)} points, classes: "
                  + ", ".join(c.name for c in classes), highlight=False)
    kwargs: dict = {}
    if model == MTL:
        from qpcell.config import MTLConfig

        kwargs["aux"] = () if aux.strip().lower() == "none" else tuple(
            a.strip() for a in aux.split(",") if a.strip())
        kwargs["prior_classes"] = prior_classes.split(",") if prior_classes else None
        kwargs["backbone"] = backbone
        kwargs["mtl_cfg"] = replace(MTLConfig(), prior_epochs=prior_epochs)
        if disc_radius is not None:
            kwargs["mask_cfg"] = mask_cfg
    else:
        kwargs["mask_cfg"] = mask_cfg
        kwargs["init"] = init
        model_kwargs = dict(rec.model_kwargs)
        if base is not None:
            model_kwargs["base"] = base
        if model_kwargs:
            kwargs["model_kwargs"] = model_kwargs
    if budget_s:
        console.print(f"recipe {rec.name}, time budget {budget_s / 60:g} min", highlight=False)
    else:
        console.print(f"recipe {rec.name}, {train_cfg.epochs} epochs", highlight=False)
    results = run_training(
        classes, annotated, out, model, members=n_members,
        model_mpp=model_mpp_value, fallback_mpp=mpp, train_cfg=train_cfg, patch_cfg=patch_cfg,
        post_cfg=post_cfg,
        match_radius_px=match_radius,
        val_names=val_images.split(",") if val_images else None,
        device=device, resume=resume, max_steps_per_epoch=max_steps, **kwargs)
    if results:
        console.print(summary_table(out, results, "round" if budget_s else "epoch"))
    else:
        console.print(f"every member was trained already: the ensemble in {out} is complete",
                      highlight=False)


def summary_table(out: Path, results: list[TrainResult], round_word: str) -> Table:
    """The table printed when training is done: one column per model trained (an ensemble's
    members side by side)."""
    from qpcell.checkpoint import read_config

    table = Table(title="Training done")
    table.add_column("")
    several = len(results) > 1
    for k in range(len(results)):
        table.add_column(f"member {k + 1}" if several else "")
    config = read_config(out) if (out / "config.json").exists() else {}
    n = len(config.get("members") or []) if config.get("kind") == "ensemble" else 0

    def row(label: str, values) -> None:
        table.add_row(label, *[str(v) for v in values])

    row("model folder", [out] + [""] * (len(results) - 1))
    if n:
        row("ensemble", [f"{n} members, their maps averaged: prediction takes {n}x one "
                         "model's time (--members 1: one model)"] + [""] * (len(results) - 1))
    row(f"best {round_word}", [r.best_epoch for r in results])
    mpp = results[0].mpp
    row("model scale", [f"{mpp:g} µm/px" if mpp else "native"] + [""] * (len(results) - 1))
    refits = [r.refit_after_round for r in results]
    when = ""
    if any(r is not None for r in refits):
        row("trained on every image", ["-" if r is None else f"after round {r}"
                                       for r in refits])
        when = " (before the refit)" if several else f" (round {refits[0]})"
    row(f"validation detection F1{when}", [f"{r.val_f1:.3f}" for r in results])
    row(f"validation classification F1 (weighted){when}",
        [f"{r.val_class_f1:.3f}" for r in results])
    row("train / validation images",
        [f"{len(r.train_images)} / {len(r.val_images)}" for r in results])
    row("time", [f"{r.seconds / 60:.1f} min" for r in results])
    return table
