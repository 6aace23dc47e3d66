"""The cell classifier beside the network: what mixing its class map in does to test scores, on
the same network weights.

Each model folder is a single network kept by ``benchmarks/time_to_accuracy.py --workdir``. For
each, a cell classifier (:mod:`qpcell.models.cell_classifier`) is trained on the network's own
training images (named in its ``config.json``) for as many steps as ``qpcell train`` gives it
(or ``--steps``, or until ``--seconds``), as ``qpcell train`` does after the network
(:func:`qpcell.train_cells.fit_cell_classifier`). Then for each ``--shares``
value the class maps ``(1 - share) net + share cells`` of the validation images (with the
model's test-time views) get the whole post-processing search, as training's final tuning
does, the model is saved with those settings, and the split's test images are predicted and
scored as ``qpcell predict`` and ``time_to_accuracy.py`` do. Share 0 is the network alone,
re-tuned the same way; the last row is the share the tuning would have chosen.

Usage::

    python benchmarks/cell_classifier.py --dataset endonuke --models runs/t2a/endonuke-*-seed* \\
        --shares 0,0.25,0.5 --workdir runs/cells --json cells.json
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import data_root  # noqa: E402
from class_context import KEYS  # noqa: E402
from class_gains import model_runs_parser  # noqa: E402
from time_to_accuracy import load_split, score_on_test  # noqa: E402

from qpcell.models.cell_classifier import MARGIN_PX  # noqa: E402

META_SKIP = ("model", "format", "format_version", "qpcell_version", "kind")


def run_model(model_dir: Path, split, shares: Sequence[float], steps: int | None,
              workdir: Path, seed: int, margin_px: int, seconds: float | None) -> list[dict]:
    """Rows of (share, validation and test scores) for one kept model."""
    import torch

    from qpcell.checkpoint import load_model, postprocess_meta, read_config, save_model
    from qpcell.config import PAPER_MPP, PostprocessConfig, TrainConfig
    from qpcell.device import autocast_dtype, training_layout
    from qpcell.models.cell_classifier import CellClassifier, WithCellClassifier, crop_px_for
    from qpcell.train import estimate_source_mpp, load_train_image, selection_key
    from qpcell.train_cells import classifier_steps, fit_cell_classifier
    from qpcell.tuning import tune_cell_share, validation_maps

    config = read_config(model_dir)
    training = config["training"]
    mpp = config.get("mpp")
    source_mpp, _ = estimate_source_mpp(split.trainval, mpp or PAPER_MPP, None)
    by_name = {a.name: a for a in split.trainval}
    train_set = [load_train_image(by_name[n], mpp, source_mpp) for n in training["train_images"]]
    val_set = [load_train_image(by_name[n], mpp, source_mpp) for n in training["val_images"]]
    bundle = load_model(model_dir, device="cpu")
    net, device = bundle.models["model"], torch.device("cpu")
    torch.manual_seed(seed)
    cells = CellClassifier(len(bundle.classes), crop_px=crop_px_for(mpp), margin_px=margin_px)
    amp = autocast_dtype(device, "auto")
    t0 = time.perf_counter()
    if steps is None:
        defaults = TrainConfig()
        steps = classifier_steps(sum(len(d.xy) for d in train_set), defaults.cells_passes,
                                 defaults.cells_min_steps)
    fit = fit_cell_classifier(cells, [(d.pixels, d.xy, d.labels) for d in train_set],
                              steps=steps, seconds=seconds, device=device, amp=amp,
                              layout=training_layout(device, amp), seed=seed)
    fit_s = time.perf_counter() - t0
    fields = PostprocessConfig.__dataclass_fields__
    post = PostprocessConfig(**{k: v for k, v in config["postprocess"].items() if k in fields})
    post = replace(post, class_gain=None, context_weight=0.0)  # tuned again below
    net_maps = validation_maps(net, val_set, device, bundle.views)
    only_cells = WithCellClassifier.wrap(net, cells, 1.0)
    cell_maps = [c for _, c in validation_maps(only_cells, val_set, device, bundle.views)]
    select_on = training["config"].get("select_on", "combined")
    meta = {k: v for k, v in config.items() if k not in META_SKIP}
    rows = []
    for share in shares:
        _, setting, f1, cf1 = tune_cell_share(
            net_maps, cell_maps, val_set, bundle.classes, post, training["match_radius_px"],
            lambda a, b: selection_key(a, b, select_on), shares=(share,))
        folder = workdir / model_dir.name / f"share-{share:g}"
        save_model(folder, WithCellClassifier.wrap(net, cells, share) if share > 0 else net,
                   {**meta, "postprocess": postprocess_meta(replace(post, **setting))})
        scores = score_on_test(folder, split, source_mpp, "cpu")[1]
        row = {"model": str(model_dir), "share": share, "val_f1": f1, "val_class_f1": cf1,
               "setting": setting, "classifier_steps": fit.steps, "classifier_seconds": fit_s,
               "classifier_loss": [fit.first_loss, fit.last_loss], "scores": scores}
        rows.append(row)
        print(f"{model_dir.name} share {share:g}: validation {f1:.4f} / {cf1:.4f}, test "
              + " / ".join(f"{scores[k]:.4f}" for k in KEYS), flush=True)
    chosen = max(rows, key=lambda r: (selection_key(r["val_f1"], r["val_class_f1"], select_on),
                                      -r["share"]))
    rows.append({**chosen, "share": "tuned", "chosen_share": chosen["share"]})
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """Per share: the mean of each test figure over the models, and its mean difference from
    share 0 (the network alone, re-tuned) with how many models scored higher."""
    base = {r["model"]: r["scores"] for r in rows if r["share"] == 0}
    out = {}
    for share in dict.fromkeys(r["share"] for r in rows):
        group = [r for r in rows if r["share"] == share]
        entry = {}
        for key in KEYS:
            values = [r["scores"][key] for r in group]
            diffs = [r["scores"][key] - base[r["model"]][key] for r in group
                     if r["model"] in base]
            entry[key] = {"mean": float(np.mean(values)),
                          "diff": float(np.mean(diffs)) if diffs else None,
                          "higher": int(sum(d > 0 for d in diffs))}
        out[str(share)] = entry
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = model_runs_parser(__doc__.splitlines()[0])
    p.add_argument("--shares", default="0,0.25,0.5",
                   help="comma-separated shares of the classifier's class map (0: none)")
    p.add_argument("--steps", type=int, default=None, help="the classifier's training steps "
                   "(default: as qpcell train gives it, qpcell.train_cells.classifier_steps)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop the classifier's training after this many seconds, as a time "
                   "budget does (qpcell train: a fifth of it)")
    p.add_argument("--margin-px", type=int, default=MARGIN_PX,
                   help="how far the training windows reach beyond the crop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("runs/cell-classifier"))
    args = p.parse_args(argv)
    split = load_split(args.dataset, data_root(), args.cache, max_test=args.max_test)
    shares = [float(s) for s in args.shares.split(",")]
    rows = [r for m in args.models
            for r in run_model(m, split, shares, args.steps, args.workdir, args.seed,
                               args.margin_px, args.seconds)]
    result = {"dataset": args.dataset, "shares": shares, "steps": args.steps,
              "seconds": args.seconds, "margin_px": args.margin_px, "rows": rows,
              "summary": summarise(rows)}
    for share, entry in result["summary"].items():
        parts = [f"{k} {v['mean']:.4f}" + ("" if v["diff"] is None else f" ({v['diff']:+.4f}, "
                                            f"{v['higher']} higher)") for k, v in entry.items()]
        print(f"share {share}: " + "  ".join(parts))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
