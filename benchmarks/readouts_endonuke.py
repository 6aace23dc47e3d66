"""Per-image read-outs on the EndoNuke test split (issue 15): counts and positive % of a model
against the ground truth, as a user gets them from ``qpcell predict`` + ``qpcell evaluate``.

The test split is ``benchmarks/accuracy.py``'s: the 282 tiles sorted by name (numerically),
every third from the first (94 tiles). Epithelium plays the "positive" class (against all
other classes), to exercise the positive-fraction code on real counts: EndoNuke marks no
Ki67 status. The script writes the split as a GeoJSON project (images linked, not copied) in
``--workdir``, then runs, exactly as a user would:

    qpcell predict MODEL TESTPROJ --out PREDS --positive-classes epithelium --no-report
    qpcell evaluate PREDS TESTPROJ --radius 6 --positive-classes epithelium \
        --counts-png PNG --json SCORES

and prints the figures (JSON with ``--json``).

    nice -n 19 python benchmarks/readouts_endonuke.py --model MODEL [--png counts.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="model folder (qpcell train)")
    ap.add_argument("--workdir", type=Path, help="where the test project and predictions go")
    ap.add_argument("--png", type=Path, help="the per-image counts / Bland-Altman plot")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--positive", default="epithelium")
    args = ap.parse_args()

    from qpcell.io.project import natural_key, write_project
    from qpcell.io.tables import import_tables

    root = Path(os.environ.get("QPCELL_DATA", REPO.parent / "shared" / "data")) / "endonuke"
    imp = import_tables(root)
    anns = sorted(imp.images, key=lambda a: natural_key(a.name))
    test = [a for i, a in enumerate(anns) if i % 3 == 0]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qpcell-readouts-"))
    project = write_project(work / "test", test, copy_images=False)
    preds = work / "predictions"
    scores = work / "scores.json"
    png = args.png or work / "counts.png"
    qpcell = [sys.executable, "-m", "qpcell"]
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="160")
    t0 = time.perf_counter()
    subprocess.run(qpcell + ["predict", str(args.model), str(project), "--out", str(preds),
                             "--positive-classes", args.positive, "--no-report",
                             "--overwrite"], check=True, env=env)
    t_predict = time.perf_counter() - t0
    subprocess.run(qpcell + ["evaluate", str(preds), str(project), "--radius", "6",
                             "--positive-classes", args.positive, "--counts-png", str(png),
                             "--json", str(scores)], check=True, env=env)
    data = json.loads(scores.read_text())
    counts = data["counts"]
    rows = counts["images"]
    err = np.array([r["predicted_positive_percent"] - r["true_positive_percent"]
                    for r in rows if r["predicted_positive_percent"] is not None
                    and r["true_positive_percent"] is not None])
    result = {
        "model": str(args.model), "images": len(rows), "positive": args.positive,
        "predict_seconds": round(t_predict, 1),
        "positive_percent": counts["positive_percent"],
        "abs_error_points": {"median": float(np.median(np.abs(err))),
                             "p90": float(np.percentile(np.abs(err), 90)),
                             "max": float(np.max(np.abs(err)))},
        "per_class": counts["per_class"],
        "detection_f1": data["detection"]["f1"],
        "weighted_f1": data["classification"]["weighted_f1"],
        "counts_png": str(png),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
