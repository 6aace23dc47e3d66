"""Per-image count agreement (qpcell evaluate --positive-classes / --counts-png)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box
from test_evaluate_cli import detections, truth

from qpcell.io.geojson import write_detections
from qpcell.io.project import write_project
from qpcell.readouts import PositiveRule, count_agreement


def test_count_agreement_figures_by_hand():
    pairs = [  # (pred xy, pred labels, true xy, true labels)
        (np.zeros((3, 2)), [0, 0, 1], np.zeros((4, 2)), [0, 1, 1, 1]),
        (np.zeros((2, 2)), [1, 1], np.zeros((2, 2)), [0, 1]),
        (np.zeros((5, 2)), [0, 0, 0, 1, 2], np.zeros((4, 2)), [0, 0, 1, 2]),
    ]
    a = count_agreement(pairs, ["pos", "neg", "x"], ["a", "b", "c"],
                        rule=PositiveRule(("pos",), ("neg",)))
    pos = a.counts["pos"]
    assert pos.true.tolist() == [1, 1, 2] and pos.pred.tolist() == [2, 0, 3]
    assert pos.mae == pytest.approx(1.0) and pos.bias == pytest.approx(1 / 3)
    assert pos.r == pytest.approx(np.corrcoef([1, 1, 2], [2, 0, 3])[0, 1])
    # positive %: true 25, 50, 66.7; predicted 66.7, 0, 75
    t, p = np.array([25, 50, 200 / 3]), np.array([200 / 3, 0, 75])
    assert a.positive.mae == pytest.approx(np.mean(np.abs(p - t)))
    d = p - t
    assert a.positive.loa == pytest.approx((d.mean() - 1.96 * d.std(ddof=1),
                                            d.mean() + 1.96 * d.std(ddof=1)))
    assert a.rows[1]["predicted_positive_percent"] == 0.0


def test_regions_leave_cells_outside_out():
    xy = np.array([[5.0, 5.0], [50.0, 50.0]])
    a = count_agreement([(xy, [0, 0], xy[:1], [0])], ["pos"], ["a"],
                        regions=[[box(0, 0, 10, 10)]])
    assert a.counts["pos"].pred.tolist() == [1] and a.counts["pos"].mae == 0


def test_evaluate_prints_and_plots_count_agreement(cli, tmp_path):
    rng = np.random.default_rng(0)
    gt, pred_dir = [], tmp_path / "pred"
    for i in range(5):
        n = 10 + 5 * i
        xy = rng.uniform(0, 200, (n, 2))
        lab = (rng.random(n) < 0.2 + 0.1 * i).astype(np.int64)
        gt.append(truth(f"im{i}", xy, lab, mpp=0.5))
        flip = rng.random(n) < 0.1
        write_detections(pred_dir / f"im{i}.geojson", detections(xy, np.where(flip, 1 - lab, lab)))
    gt_dir = write_project(tmp_path / "gt", gt)
    png, out = tmp_path / "counts.png", tmp_path / "scores.json"
    code, stdout, stderr = cli("evaluate", pred_dir, gt_dir, "--radius", "3",
                               "--positive-classes", "immune", "--counts-png", png,
                               "--json", out)
    assert code == 0, stderr
    assert "Counts per image" in stdout and "positive %" in stdout
    data = json.loads(out.read_text())["counts"]
    assert data["rule"] == {"positive": ["immune"], "negative": []}
    rows = data["images"]
    assert [r["true"]["immune"] for r in rows] == [int(g.labels.sum()) for g in gt]
    errs = [abs(r["predicted_positive_percent"] - r["true_positive_percent"]) for r in rows]
    assert data["positive_percent"]["mae"] == pytest.approx(np.mean(errs))
    assert f"{np.mean(errs):.2f}" in stdout
    with Image.open(png) as im:
        assert im.size[0] > 600
    code, _, stderr = cli("evaluate", pred_dir, gt_dir, "--radius", "3",
                          "--positive-classes", "Ki67")
    assert code == 1 and "'Ki67' is not one of" in stderr
