"""Does bfloat16 inference change the scores? One trained model, several inference backends.

Issue 7 allows bf16 only where detection and classification F1 on the EndoNuke test split move
by less than 0.005. This script predicts the test split of ``benchmarks/accuracy.py`` with the
same model through each backend of :mod:`qpcell.inference` (float32 ``onnxruntime`` as the
reference, ``torch-bf16``, ...), scores each against the points, and prints the differences
and the time each took.

Usage::

    python benchmarks/precision.py --model MODEL_DIR [--backends onnxruntime,torch-bf16]
                                   [--dataset endonuke] [--json precision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):  # run as a script from a checkout
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from accuracy import predict_test, scores_of, script_dataset  # noqa: E402

from qpcell.errors import QpcellError  # noqa: E402

#: The scores compared, and the largest change the issue allows for bf16.
KEYS = ("detection_f1", "weighted_f1", "mean_class_aware_f1")
TOLERANCE = 0.005


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a qpcell model folder")
    p.add_argument("--backends", default="onnxruntime,torch-bf16",
                   help="comma-separated; the first is the reference (default "
                        "onnxruntime,torch-bf16)")
    p.add_argument("--dataset", choices=("endonuke", "nucls"), default="endonuke")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-test", type=int, default=None, help="score only N test images")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from qpcell.checkpoint import load_model
    from qpcell.inference import using_backend
    from qpcell.metrics import score_dataset

    ds = script_dataset(args.dataset, "precision benchmark", threads=args.threads,
                        max_trainval=0, max_test=args.max_test)
    try:
        bundle = load_model(args.model, device="cpu")
    except QpcellError as err:
        sys.exit(f"precision benchmark: {err}")
    names = [c.name for c in ds.classes]
    rows = {}
    for backend in args.backends:
        with using_backend(backend):
            bundle.predict_maps(ds.test_pixels[0][None, :192, :192])  # builds the runner
            t0 = time.perf_counter()
            preds = predict_test(bundle, ds)
            seconds = time.perf_counter() - t0
        report = score_dataset(list(zip(preds, ds.test, strict=True)), names, ds.radius_px)
        scores = scores_of(report)
        rows[backend] = {"seconds": seconds, **{k: scores[k] for k in KEYS},
                         "n_cells": int(sum(len(p.xy) for p in preds))}
        print(f"{backend:12s} " + "  ".join(f"{k} {scores[k]:.4f}" for k in KEYS)
              + f"  {seconds:.1f} s", flush=True)
    ref = args.backends[0]
    deltas = {b: {k: rows[b][k] - rows[ref][k] for k in KEYS} for b in args.backends[1:]}
    for b, d in deltas.items():
        ok = all(abs(v) < TOLERANCE for v in d.values())
        print(f"{b} - {ref}: " + "  ".join(f"{k} {v:+.4f}" for k, v in d.items())
              + f"  speed-up {rows[ref]['seconds'] / rows[b]['seconds']:.2f}x"
              + f"  ({'within' if ok else 'OUTSIDE'} +-{TOLERANCE})")
    result = {"benchmark": "precision", "dataset": ds.name, "model": str(args.model),
              "n_test_images": len(ds.test), "reference": ref, "backends": rows,
              "deltas": deltas, "tolerance": TOLERANCE,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
