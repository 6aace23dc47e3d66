"""Training speed: S-DRDIN against the separate DRDIN-detection + DRDIN-classification models.

S-DRDIN Table A.4 reports the joint model cheaper to train than the two separate models
trained one after the other (0.12 h against 0.16 h for 100 epochs, a ratio of 0.75). This
measures the same thing on this machine: patches per second of one training step (forward,
loss, backward, Adam update) on the same patches with the same batch size, for

* ``s-drdin`` (both branches, one model),
* ``drdin-detection`` and ``drdin-classification`` (each alone), and ``separate``: the two
  trained one after the other, i.e. ``1 / (1/pps_det + 1/pps_cls)`` patches per second,
* ``unet`` (the paper's fastest, for scale).

Patches are EndoNuke tiles (``$QPCELL_DATA`` or ``../shared/data``) with their S-DRDIN targets,
or synthetic mIHC images when the data is absent. The models take turns batch by batch
(round robin), so a change in machine load hits them alike; the median step time is used.
Data loading is not timed. Each model runs in every precision of ``--precisions`` (default
``fp32,auto``: float32, and what ``qpcell train`` uses here, i.e. bf16 autocast where the
hardware has native bf16, see ``qpcell.device.autocast_dtype``) and every memory layout of
``--layouts`` (default ``train``: what ``qpcell train`` uses, ``qpcell.device.training_layout``;
``nchw,channels-last`` compares the two), in the same round robin. Runs in a few minutes on 2
CPU cores.

Usage: python benchmarks/train_speed.py [--json FILE] [--size 224] [--batches 10]
                                        [--precisions fp32,auto] [--layouts train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

MODELS = ("s-drdin", "drdin-detection", "drdin-classification", "unet")
LAYOUTS = ("train", "nchw", "channels-last")
#: S-DRDIN Table A.4: hours for 100 epochs.
PAPER_HOURS = {"s-drdin": 0.12, "separate": 0.16, "unet": 0.09}


def patches(n: int, size: int, seed: int = 0):
    """``n`` training patches ``(x (n, 3, s, s), targets)`` and where they came from."""
    import torch

    from qpcell.masks import sdrdin_targets
    from qpcell.patches import PatchDataset

    root = Path(os.environ.get("QPCELL_DATA", REPO.parent / "shared" / "data")) / "endonuke"
    if (root / "labels").is_dir():
        from qpcell.io.project import natural_key
        from qpcell.io.tables import import_tables
        from qpcell.train import load_train_image

        imp = import_tables(root)
        anns = sorted(imp.images, key=lambda a: natural_key(a.name))[:n]
        data = [load_train_image(a, None) for a in anns]
        images, points = [d.pixels for d in data], [(d.xy, d.labels) for d in data]
        n_classes, source = len(imp.classes), f"EndoNuke ({root})"
    else:
        from qpcell.synthetic import synthetic_dataset

        pairs = synthetic_dataset(n, (size, size), 3, seed=seed)
        images, points = [im for _, im in pairs], [(a.xy, a.labels) for a, _ in pairs]
        n_classes, source = 3, "synthetic mIHC (EndoNuke not found)"
    windows = np.array([[i, 0, 0] for i in range(len(images))])
    ds = PatchDataset(images, points, windows, size=size, seed=seed,
                      target_fn=lambda xy, lab, shape: sdrdin_targets(xy, lab, n_classes, shape))
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it[0] for it in items])
    targets = {k: torch.stack([it[1][k] for it in items]) for k in items[0][1]}
    return x, targets, n_classes, source


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224, help="patch side in px (paper: 224)")
    p.add_argument("--batch-size", type=int, default=4, help="patches per batch (paper: 4)")
    p.add_argument("--batches", type=int, default=10, help="timed batches per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per model first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--precisions", default="fp32,auto",
                   help="comma-separated training precisions (fp32, bf16, auto)")
    p.add_argument("--layouts", default="train",
                   help="comma-separated memory layouts (train, nchw, channels-last)")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    precisions = list(dict.fromkeys(x for x in args.precisions.split(",") if x))
    layouts = list(dict.fromkeys(x for x in args.layouts.split(",") if x))
    if not set(layouts) <= set(LAYOUTS):
        p.error(f"--layouts: choose from {', '.join(LAYOUTS)}")
    if args.size % 16 or args.batches < 1 or args.batch_size < 1 or args.warmup < 0:
        p.error("--size must be a multiple of 16; --batches, --batch-size >= 1")
    import torch

    from qpcell.device import autocast_dtype, pick_device, training_layout
    from qpcell.models import count_parameters, create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    n_batches = args.warmup + args.batches
    x, targets, n_classes, source = patches(args.batch_size * min(n_batches, 8), args.size)
    batches = [(x[i:i + args.batch_size], {k: v[i:i + args.batch_size]
                                           for k, v in targets.items()})
               for i in range(0, len(x), args.batch_size)]
    formats = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}
    # one configuration a precision and layout, named by the precision alone when one layout
    configs = {}
    for pr in precisions:
        amp = autocast_dtype(device, pr)
        for lay in layouts:
            layout = training_layout(device, amp) if lay == "train" else formats[lay]
            configs[pr if len(layouts) == 1 else f"{pr} {lay}"] = (amp, layout)
    args.precisions = list(configs)
    amps = {pr: amp for pr, (amp, _) in configs.items()}
    runs = [(pr, name) for pr in args.precisions for name in MODELS]
    models, optims = {}, {}
    for pr, name in runs:
        torch.manual_seed(0)
        models[pr, name] = create_model(name, n_classes).to(device).train().to(
            memory_format=configs[pr][1])
        optims[pr, name] = torch.optim.Adam(models[pr, name].parameters(), lr=1e-3)
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    load_start = os.getloadavg()
    for step in range(n_batches):
        xb, tb = batches[step % len(batches)]
        xb = xb.to(device)
        tb = {k: v.to(device) for k, v in tb.items()}
        for pr, name in runs:  # round robin: load changes hit every model alike
            model, opt, amp = models[pr, name], optims[pr, name], amps[pr]
            x_in = xb.contiguous(memory_format=configs[pr][1])
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp or torch.float32,
                                enabled=amp is not None):
                out = model(x_in)
            loss, _ = model.loss({k: v.float() for k, v in out.items()}, tb)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[pr, name].append(time.perf_counter() - t0)
    by_precision = {}
    for pr in args.precisions:
        rows = {}
        for name in MODELS:
            med = statistics.median(times[pr, name])
            rows[name] = {"seconds_per_batch": med, "patches_per_second": args.batch_size / med,
                          "parameters": count_parameters(models[pr, name])}
        sep = rows["drdin-detection"]["seconds_per_batch"] + rows[
            "drdin-classification"]["seconds_per_batch"]
        rows["separate"] = {"seconds_per_batch": sep,
                            "patches_per_second": args.batch_size / sep,
                            "parameters": rows["drdin-detection"]["parameters"]
                            + rows["drdin-classification"]["parameters"]}
        by_precision[pr] = {"autocast": str(amps[pr]) if amps[pr] else "none (float32)",
                            "layout": str(configs[pr][1]).removeprefix("torch."),
                            "models": rows,
                            "s_drdin_over_separate_time": rows["s-drdin"]["seconds_per_batch"]
                            / sep}
    first = args.precisions[0]
    rows, ratio = by_precision[first]["models"], by_precision[first]["s_drdin_over_separate_time"]
    speedups = {pr: {name: rows[name]["seconds_per_batch"]
                     / by_precision[pr]["models"][name]["seconds_per_batch"] for name in rows}
                for pr in args.precisions[1:]}
    result = {
        "benchmark": "train_speed", "patches": source, "size": args.size,
        "batch_size": args.batch_size, "timed_batches": args.batches, "warmup": args.warmup,
        "precisions": by_precision, f"speedup_over_{first}": speedups,
        "s_drdin_over_separate_time": ratio,
        "paper_ratio": PAPER_HOURS["s-drdin"] / PAPER_HOURS["separate"],
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "load_average_start": [round(v, 2) for v in load_start],
                    "load_average_end": [round(v, 2) for v in os.getloadavg()]},
    }
    print(f"{args.size}x{args.size} patches, batch {args.batch_size}, median of {args.batches} "
          f"steps, {device}, {torch.get_num_threads()} threads; {source}")
    for pr, block in by_precision.items():
        print(f" precision {pr} (autocast: {block['autocast']}, {block['layout']})")
        for name, row in block["models"].items():
            gain = f"  {speedups[pr][name]:.2f}x {first}" if pr in speedups else ""
            print(f"  {name:22s} {row['patches_per_second']:7.2f} patches/s  "
                  f"{row['seconds_per_batch']:6.3f} s/batch  {row['parameters']:>10,d} params"
                  f"{gain}")
        print(f"  s-drdin / separate training time: {block['s_drdin_over_separate_time']:.2f} "
              f"(paper Table A.4: {PAPER_HOURS['s-drdin']} h / {PAPER_HOURS['separate']} h = "
              f"{result['paper_ratio']:.2f})")
    print(f"  load average {result['machine']['load_average_start']} -> "
          f"{result['machine']['load_average_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
