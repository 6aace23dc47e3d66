"""``qpcell demo``: the whole job on synthetic multiplex-IHC data, in a few minutes on a CPU."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import typer

from qpcell.cli._app import app, console
from qpcell.errors import Interrupted

DEMO_CLASSES = 4
DEMO_MPP = 0.44  # the paper's working resolution: no resampling


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("qpcell-demo"), "--out", "-o", help="Folder for everything "
                             "the demo writes."),
    minutes: float = typer.Option(1.0, help="Training time budget in minutes (qpcell "
                                  "train's fast recipe)."),
    train_images: int = typer.Option(8, help="Synthetic training + validation images."),
    test_images: int = typer.Option(3, help="Held-back synthetic test images."),
    model: str | None = typer.Option(None, help="Network to train (default: the fast "
                                     "recipe's, as in qpcell train)."),
    base: int = typer.Option(8, help="Network width: channels of its first level (the "
                             "papers' is 16)."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str | None = typer.Option(None, help="cpu, cuda, mps (default: best available)."),
) -> None:
    """Generate synthetic mIHC images, train a model, predict held-back images, evaluate."""
    from qpcell.cli.evaluate import render_report
    from qpcell.cli.predict import run_prediction
    from qpcell.cli.train import run_training
    from qpcell.io.atomic import atomic_write_text
    from qpcell.io.project import read_project
    from qpcell.io.sources import load_source
    from qpcell.metrics import score_dataset
    from qpcell.recipe import default_model, recipe
    from qpcell.synthetic import write_synthetic_project
    from qpcell.train import TrainingInterrupted
    from qpcell.train_guard import prepare_model_folder

    t0 = time.perf_counter()
    data, test = out / "data" / "train", out / "data" / "test"
    console.rule("1. synthetic data")
    write_synthetic_project(data, train_images, (256, 256), DEMO_CLASSES, seed=seed,
                            mpp=DEMO_MPP, prefix="train")
    write_synthetic_project(test, test_images, (384, 384), DEMO_CLASSES, seed=seed + 1000,
                            mpp=DEMO_MPP, prefix="test")
    console.print(f"{train_images} training and {test_images} test images in {out / 'data'}")

    model = model or default_model("fast")
    console.rule(f"2. train {model} for {minutes:g} min")
    classes, images = load_source(data)
    model_dir = out / "model"
    fast = recipe("fast", model)
    prepare_model_folder(model_dir, overwrite=True)  # the demo's own folder: start afresh
    try:
        run_training(classes, images, model_dir, model,
                     model_kwargs={**fast.model_kwargs, "base": base}, model_mpp=DEMO_MPP,
                     device=device, mask_cfg=fast.mask, patch_cfg=fast.patch,
                     post_cfg=fast.post,
                     train_cfg=replace(fast.train, time_budget_s=minutes * 60, seed=seed))
    except TrainingInterrupted:
        raise Interrupted("the demo stopped while training and cannot be resumed; run "
                          f"`qpcell demo --out {out}` again to start over", model_dir) from None

    console.rule("3. predict held-back images")
    predictions = out / "predictions"
    run_prediction(model_dir, test, predictions, device=device, overwrite=True)

    console.rule("4. evaluate")
    truth = read_project(test)
    found = read_project(predictions, classes=truth.classes, require_images=False,
                         source="detections")
    by_name = {a.name: a for a in found.images}
    pairs = [(by_name[t.name], t) for t in truth.images]
    radius = 10.0  # S-DRDIN 2.5: 10 px at 0.44 µm/px
    report = score_dataset(pairs, [c.name for c in truth.classes], radius)
    for table in render_report(report, DEMO_MPP):
        console.print(table)
    atomic_write_text(out / "evaluation.json", json.dumps(report.to_dict(), indent=2))

    console.rule("done")
    console.print(f"in {(time.perf_counter() - t0) / 60:.1f} min: detection F1 "
                  f"[bold]{report.detection.f1:.3f}[/], classification F1 (weighted) "
                  f"[bold]{report.classification.weighted_f1:.3f}[/]", highlight=False)
    console.print(f"  model:       {model_dir}\n"
                  f"  detections:  {predictions}/*.geojson (QuPath: File > Import objects)\n"
                  f"  tables:      {predictions}/*.csv\n"
                  f"  overlays:    {predictions}/*.overlay.png\n"
                  f"  evaluation:  {out / 'evaluation.json'}", highlight=False)
