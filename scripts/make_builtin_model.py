"""Make qpcell's built-in starting model (``qpcell/builtin/ihc-nuclei``) from EndoNuke.

The model is what ``qpcell train --model s-drdin`` (fast recipe) gives after ``--minutes`` of
training on the EndoNuke split of ``benchmarks/time_to_accuracy.py``: the training + validation two
thirds only, so that the test third stays unseen for measuring ``--init builtin``. Its
weights, ``config.json`` and a model card (data, licence, attribution, scores) are written to
the package.

Usage::

    python scripts/make_builtin_model.py --minutes 30 --seed 0
    # reuse a benchmark run and its test scores:
    python scripts/make_builtin_model.py --minutes 30 --seed 0 \\
        --from runs/time-to-accuracy/endonuke-s-drdin-fast-30min-seed0 --scores tta-30.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

CARD = """# qpcell built-in starting model: IHC nuclei (`ihc-nuclei`)

What `qpcell train --init builtin` starts from (opt-in; training starts from random weights by
default): encoder, both decoders and the detection head come from this model; the class layer
is fitted to the user's classes (kept only when they are EndoNuke's own, in the same order).
Measured (docs/RESULTS.md, "Starting from the built-in model"): it helps on IHC like its own
(DAB + haematoxylin), and it did not help on H&E (NuCLS).

- **Architecture**: S-DRDIN (Chen et al.), width {base}, batch normalisation,
  as `qpcell.recipe.recipe("fast", "s-drdin")` builds it;
  {n_params:,} parameters; works at {mpp} µm/px.
- **Classes**: {classes}.
- **Training**: `qpcell train` with the fast recipe, a {minutes:g}-minute budget, seed {seed},
  on {n_train} EndoNuke images (+ {n_val} for validation): the benchmark split's training and
  validation two thirds (benchmarks/time_to_accuracy.py). The test third (every third image by
  number) was never seen, so it can measure `--init builtin`. The images carry no pixel size;
  qpcell estimated {source_mpp:.3f} µm/px from the size of the annotated nuclei.
- **Validation** (its own validation images, at {match:.1f} px): detection F1 {val_f1:.3f},
  weighted classification F1 {val_cf1:.3f}.
{test_line}- **Made**: {date} on {machine} with `{command}`.

## Data and licence
Trained on EndoNuke: A. Naumov et al., "EndoNuke: Nuclei Detection Dataset for Estrogen and
Progesterone Stained IHC Endometrium Scans", Data 2022 (the test subset shipped in the public
`ispras/endonet` repository), licensed CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/). The model weights are a work derived from it
and are distributed under CC BY 4.0 with this attribution. Only the weights are
shipped; no image or annotation of the dataset is part of qpcell.

## Limits
One stain family (ER/PR IHC of endometrium, DAB + haematoxylin) and one scanner. On other
stains it is a starting point to fine-tune, not a detector to use as it is.
"""


def main(argv: list[str] | None = None) -> None:
    import platform
    import shutil

    import torch

    from qpcell.checkpoint import CONFIG, WEIGHTS, read_config
    from qpcell.pretrained import BUILTIN_DIR

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from", dest="source", type=Path, default=None,
                   help="a model folder time_to_accuracy.py trained with these settings")
    p.add_argument("--scores", type=Path, default=None,
                   help="time_to_accuracy.py --json output holding that run's test scores")
    p.add_argument("--workdir", type=Path, default=Path("runs/time-to-accuracy"))
    args = p.parse_args(argv)
    command = "python scripts/make_builtin_model.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
    scores = None
    if args.source is None:
        from accuracy import data_root
        from time_to_accuracy import load_split, run_one

        split = load_split("endonuke", data_root(), Path("runs/data-cache"))
        run = run_one(split, args.minutes, args.seed, "fast", args.workdir, model="s-drdin")
        source = args.workdir / f"endonuke-s-drdin-fast-{args.minutes:g}min-seed{args.seed}"
        scores = run["scores"]
    else:
        source = args.source
        if args.scores:
            runs = json.loads(args.scores.read_text())["runs"]
            scores = next((r["scores"] for r in runs if r["minutes"] == args.minutes
                           and r["seed"] == args.seed and r["dataset"] == "endonuke"), None)
    config = read_config(source)
    training = config["training"]
    if training.get("init"):
        sys.exit("make_builtin_model: the model must be trained from random weights")
    from safetensors.torch import load_file

    n_params = sum(v.numel() for k, v in load_file(str(source / WEIGHTS)).items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    BUILTIN_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / WEIGHTS, BUILTIN_DIR / WEIGHTS)
    shutil.copyfile(source / CONFIG, BUILTIN_DIR / CONFIG)
    test_line = "" if scores is None else (
        f"- **EndoNuke test third** (94 images, at 6 px): detection F1 "
        f"{scores['detection_f1']:.3f}, weighted classification F1 {scores['weighted_f1']:.3f}, "
        f"mean class-aware F1 {scores['mean_class_aware_f1']:.3f}.\n")
    card = CARD.format(
        base=config["model"]["base"], n_params=n_params, mpp=config["mpp"],
        classes=", ".join(c["name"] for c in config["classes"]), minutes=args.minutes,
        seed=args.seed, n_train=len(training["train_images"]),
        n_val=len(training["val_images"]), source_mpp=training["source_mpp"]["value"],
        match=training["match_radius_px"], val_f1=training["val_f1"],
        val_cf1=training["val_class_f1"], test_line=test_line,
        date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads, float32",
        command=command)
    (BUILTIN_DIR / "MODEL_CARD.md").write_text(card)
    print(f"wrote {BUILTIN_DIR} ({sum(f.stat().st_size for f in BUILTIN_DIR.iterdir()) / 1e6:.1f}"
          " MB)")


if __name__ == "__main__":
    main()
