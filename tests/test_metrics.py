"""Matching and scores: brute-force optimum, hand-computed examples, every edge convention."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon, box

from qpcell.errors import QpcellError
from qpcell.metrics import match_points, prf, radius_sweep, score_dataset


def pts(xy, labels=None):
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    lab = np.zeros(len(xy), dtype=np.int64) if labels is None else np.asarray(labels)
    return SimpleNamespace(xy=xy, labels=lab)


# --------------------------------------------------------------------------- brute force

def brute_force(pred, true, radius):
    """(max number of pairs, min total distance among those) by DP over subsets of truths."""
    n, m = len(pred), len(true)
    d = np.sqrt(((pred[:, None, :] - true[None, :, :]) ** 2).sum(-1)) if n and m else None
    best = {0: (0, 0.0)}  # mask of used truths -> (pairs, -distance) maximised
    for i in range(n):
        nxt = dict(best)  # prediction i unmatched
        for mask, (k, negd) in best.items():
            for j in range(m):
                if not mask & (1 << j) and d[i, j] <= radius:
                    cand = (k + 1, negd - d[i, j])
                    key = mask | (1 << j)
                    if key not in nxt or cand > nxt[key]:
                        nxt[key] = cand
        best = nxt
    k, negd = max(best.values())
    return k, -negd


def check_valid(m, pred, true, radius):
    assert len(set(m.pred_idx.tolist())) == len(m.pred_idx)
    assert len(set(m.true_idx.tolist())) == len(m.true_idx)
    d = np.sqrt(((pred[m.pred_idx] - true[m.true_idx]) ** 2).sum(-1))
    np.testing.assert_allclose(m.distance, d)
    assert np.all(d <= radius)
    assert m.n_pred == len(pred) and m.n_true == len(true)


grid_points = st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), max_size=7)
float_points = st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), max_size=7)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pred=grid_points, true=grid_points,
       radius=st.sampled_from([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 100.0]))
def test_matching_is_optimal_on_a_grid(pred, true, radius):
    # integer coordinates: many coinciding points, equal distances and pairs exactly at r
    pred = np.array(pred, dtype=float).reshape(-1, 2)
    true = np.array(true, dtype=float).reshape(-1, 2)
    m = match_points(pred, true, radius)
    check_valid(m, pred, true, radius)
    k, dist = brute_force(pred, true, radius)
    assert m.tp == k
    assert m.distance.sum() == pytest.approx(dist, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(pred=float_points, true=float_points, radius=st.floats(0.0, 6.0))
def test_matching_is_optimal_with_real_coordinates(pred, true, radius):
    pred = np.array(pred, dtype=float).reshape(-1, 2)
    true = np.array(true, dtype=float).reshape(-1, 2)
    m = match_points(pred, true, radius)
    check_valid(m, pred, true, radius)
    k, dist = brute_force(pred, true, radius)
    assert m.tp == k
    assert m.distance.sum() == pytest.approx(dist, abs=1e-9)


def test_cardinality_beats_distance():
    # nearest-first would take the 0.5 px pair and leave both others unmatched
    pred = np.array([[0.0, 0.0], [1.0, 0.0]])
    true = np.array([[0.5, 0.0], [-1.5, 0.0]])
    m = match_points(pred, true, radius=1.6)
    assert m.tp == 2
    pairs = sorted(zip(m.pred_idx.tolist(), m.true_idx.tolist(), strict=True))
    assert pairs == [(0, 1), (1, 0)]
    # among maximum matchings, the smaller total distance wins
    m = match_points([[0.0, 0.0], [10.0, 0.0]], [[1.0, 0.0], [11.0, 0.0]], radius=20)
    assert m.true_idx.tolist() == [0, 1] and m.distance.sum() == pytest.approx(2.0)


def test_radius_is_inclusive_and_zero_matches_coinciding_points():
    assert match_points([[0.0, 0.0]], [[3.0, 4.0]], 5.0).tp == 1
    assert match_points([[0.0, 0.0]], [[3.0, 4.0]], 4.999).tp == 0
    m = match_points([[1.0, 1.0], [2.0, 2.0]], [[1.0, 1.0], [2.0, 2.5]], 0.0)
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)


def test_matching_empty_sides_and_bad_input():
    m = match_points(np.zeros((0, 2)), [[1.0, 1.0]], 5)
    assert (m.tp, m.fp, m.fn) == (0, 0, 1)
    m = match_points([[1.0, 1.0]], [], 5)
    assert (m.tp, m.fp, m.fn) == (0, 1, 0)
    assert m.unmatched_pred().tolist() == [0]
    with pytest.raises(QpcellError):
        match_points([[0.0, 0.0]], [[0.0, 0.0]], -1)
    with pytest.raises(QpcellError):
        match_points([[0.0, np.nan]], [[0.0, 0.0]], 1)
    with pytest.raises(QpcellError):
        match_points([[0.0, 0.0, 0.0]], [[0.0, 0.0]], 1)


def test_100k_points_in_well_under_a_second(capsys):
    rng = np.random.default_rng(1)
    n = 100_000
    # 7,000 px square: mean nearest-neighbour spacing ~11 px, as in EndoNuke (11.4 px)
    true = rng.uniform(0, 7000, (n, 2))
    angle = rng.uniform(0, 2 * np.pi, n)
    length = rng.uniform(0, 4, n)
    pred = true + np.c_[np.cos(angle), np.sin(angle)] * length[:, None]
    perm = rng.permutation(n)
    pred = pred[perm]
    match_points(pred[:100], true[:100], 6.0)  # warm-up (imports)
    t0 = time.perf_counter()
    m = match_points(pred, true, 6.0)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[metrics] 100,000 x 100,000 points matched in {elapsed:.3f} s")
    assert m.tp == n  # every point is 4 px or less from its twin
    assert m.distance.sum() <= length.sum() + 1e-6  # no worse than the true pairing
    assert elapsed < 3.0


# --------------------------------------------------------------------------- scores

def test_prf_zero_division_rule():
    assert prf(0, 0, 0) == (1.0, 1.0, 1.0)
    assert prf(0, 0, 4) == (0.0, 0.0, 0.0)
    assert prf(0, 4, 0) == (0.0, 0.0, 0.0)
    assert prf(3, 1, 2) == pytest.approx((0.75, 0.6, 6 / 9))


def two_class_example():
    # image A: 4 truths; predictions: 3 near truths (one with the wrong class) + 1 far away
    true_a = pts([[10, 10], [30, 10], [50, 10], [70, 10]], [0, 0, 1, 1])
    pred_a = pts([[11, 10], [31, 10], [51, 10], [200, 200]], [0, 1, 1, 0])
    # image B: 2 truths, 2 good predictions
    true_b = pts([[10, 10], [40, 40]], [0, 1])
    pred_b = pts([[10, 12], [40, 41]], [0, 1])
    return [(pred_a, true_a), (pred_b, true_b)]


def test_detection_classification_and_fc_by_hand():
    rep = score_dataset(two_class_example(), ["a", "b"], 3.0)
    det = rep.detection
    assert (det.tp, det.fp, det.fn) == (5, 1, 1)
    assert det.precision == pytest.approx(5 / 6) and det.recall == pytest.approx(5 / 6)
    cls = rep.classification
    assert cls.n_matched == 5
    assert cls.confusion == [[2, 1], [0, 2]]
    assert cls.accuracy == pytest.approx(4 / 5)
    a, b = cls.per_class
    assert (a.name, a.support, b.support) == ("a", 3, 2)
    assert (a.precision, a.recall) == pytest.approx((1.0, 2 / 3))
    assert (b.precision, b.recall) == pytest.approx((2 / 3, 1.0))
    # HoVer-Net F_c: class a: TP_c 2, FP_c 0, FN_c 1, FP_d 1 (far "a"), FN_d 0
    assert a.fc == pytest.approx(4 / (4 + 0 + 2 + 1 + 0))
    # class b: TP_c 2, FP_c 1, FN_c 0, FP_d 0, FN_d 1 (the missed b at x=70)
    assert b.fc == pytest.approx(4 / (4 + 2 + 0 + 0 + 1))
    assert cls.weighted_f1 == pytest.approx((3 * a.f1 + 2 * b.f1) / 5)
    assert cls.detection_recall == pytest.approx([3 / 3, 2 / 3])
    assert rep.mean_distance == pytest.approx((1 + 1 + 1 + 2 + 1) / 5)
    assert [(s.tp, s.fp, s.fn) for s in rep.per_image] == [(3, 1, 1), (2, 0, 0)]


def test_weighted_scores_agree_with_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(3)
    true = pts(rng.uniform(0, 500, (300, 2)), rng.integers(0, 4, 300))
    keep = rng.random(300) < 0.8
    pred = pts(true.xy[keep] + rng.normal(0, 1, (keep.sum(), 2)), rng.integers(0, 4, keep.sum()))
    rep = score_dataset([(pred, true)], list("wxyz"), 5.0)
    m = match_points(pred.xy, true.xy, 5.0)
    y_true, y_pred = true.labels[m.true_idx], pred.labels[m.pred_idx]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4),
                                                 zero_division=0)
    got = rep.classification
    assert [c.precision for c in got.per_class] == pytest.approx(p)
    assert [c.recall for c in got.per_class] == pytest.approx(r)
    assert [c.f1 for c in got.per_class] == pytest.approx(f)
    assert [c.support for c in got.per_class] == s.tolist()
    wp, wr, wf, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(4),
                                                    average="weighted", zero_division=0)
    assert (got.weighted_precision, got.weighted_recall, got.weighted_f1) == pytest.approx(
        (wp, wr, wf))
    assert got.accuracy == pytest.approx(accuracy_score(y_true, y_pred))


def test_class_aware_total_and_mean_f1():
    rep = score_dataset(two_class_example(), ["a", "b"], 3.0)
    a, b = rep.class_aware
    # class a: image A: pred-a at (11,10) & (200,200) vs true-a (10,10),(30,10): tp1 fp1 fn1
    #          image B: tp1
    assert (a.tp, a.fp, a.fn) == (2, 1, 1)
    assert a.total_f1 == pytest.approx(4 / 6)
    assert a.mean_f1 == pytest.approx((0.5 + 1.0) / 2) and a.n_images == 2
    # class b: image A: pred-b (31,10),(51,10) vs true-b (50,10),(70,10): tp1 fp1 fn1; B: tp1
    assert (b.tp, b.fp, b.fn) == (2, 1, 1)
    assert b.mean_f1 == pytest.approx(0.75)


def test_mean_f1_skips_images_without_the_class():
    img1 = (pts([[0, 0]], [0]), pts([[0, 0]], [0]))  # class a only, perfect
    img2 = (pts([[0, 0]], [1]), pts([[50, 50]], [1]))  # class b only, all wrong
    img3 = (pts([], []), pts([], []))  # nothing at all
    rep = score_dataset([img1, img2, img3], ["a", "b"], 2.0)
    a, b = rep.class_aware
    assert (a.mean_f1, a.n_images) == (1.0, 1)
    assert (b.mean_f1, b.n_images, b.total_f1) == (0.0, 1, 0.0)
    assert rep.per_image[2].f1 == 1.0  # both empty: vacuous perfect image


def test_class_absent_everywhere_is_vacuous():
    rep = score_dataset([(pts([[0, 0]], [0]), pts([[0, 0]], [0]))], ["a", "ghost"], 2.0)
    ghost = rep.classification.per_class[1]
    assert (ghost.support, ghost.precision, ghost.f1, ghost.fc) == (0, 1.0, 1.0, 1.0)
    assert rep.class_aware[1].n_images == 0 and rep.class_aware[1].mean_f1 == 1.0
    assert rep.classification.weighted_f1 == 1.0  # zero-support classes weigh nothing


def test_edge_cases_no_predictions_no_truths_both_empty_single_class():
    truth = pts([[0, 0], [5, 5]])
    none = pts([])
    rep = score_dataset([(none, truth)], ["cell"], 3.0)
    assert rep.detection == (0, 0, 2, 0.0, 0.0, 0.0)
    assert rep.classification.accuracy == 0.0 and rep.classification.n_matched == 0
    assert rep.classification.per_class[0].fc == 0.0
    rep = score_dataset([(truth, none)], ["cell"], 3.0)
    assert rep.detection == (0, 2, 0, 0.0, 0.0, 0.0)
    assert rep.classification.weighted_f1 == 0.0
    rep = score_dataset([(none, none)], ["cell"], 3.0)
    assert rep.detection == (0, 0, 0, 1.0, 1.0, 1.0)
    assert rep.classification.accuracy == 1.0 and rep.class_aware[0].total_f1 == 1.0
    rep = score_dataset([(truth, truth)], ["cell"], 0.0)
    assert rep.detection.f1 == 1.0 and rep.classification.accuracy == 1.0
    assert rep.class_aware[0].total_f1 == 1.0 and rep.classification.per_class[0].fc == 1.0
    rep = score_dataset([], ["cell"], 3.0)
    assert rep.n_images == 0 and rep.detection.f1 == 1.0


def test_regions_ignore_outside_points_and_keep_the_boundary():
    region = [box(0, 0, 10, 10)]
    true = pts([[5, 5], [10, 5], [20, 20]], [0, 0, 0])  # inside, on the boundary, outside
    pred = pts([[5, 6], [30, 30], [10, 10]], [0, 0, 0])  # inside, outside, on the corner
    rep = score_dataset([(pred, true)], ["c"], 2.0, regions=[region])
    assert (rep.n_pred, rep.n_true, rep.n_pred_outside, rep.n_true_outside) == (2, 2, 1, 1)
    assert (rep.detection.tp, rep.detection.fp, rep.detection.fn) == (1, 1, 1)
    # several regions, a hole, and "None" = whole image for the second image
    donut = Polygon([(0, 0), (40, 0), (40, 40), (0, 40)],
                    [[(10, 10), (30, 10), (30, 30), (10, 30)]])
    rep = score_dataset([(pred, true), (pred, true)], ["c"], 2.0,
                        regions=[[donut, box(100, 100, 110, 110)], None])
    assert rep.per_image[0].n_true == 2  # (20, 20) lies in the hole
    assert rep.per_image[0].n_pred == 3  # (30, 30) and (10, 10) lie on the hole's boundary
    assert rep.per_image[1].n_true == 3
    assert score_dataset([(pred, true)], ["c"], 2.0, regions=[[]]).n_true == 3


def test_radius_sweep_is_monotone_and_json_ready():
    rng = np.random.default_rng(7)
    true = pts(rng.uniform(0, 300, (200, 2)), rng.integers(0, 2, 200))
    pred = pts(true.xy + rng.normal(0, 2, (200, 2)), true.labels)
    reports = radius_sweep([(pred, true)], ["x", "y"], [1, 2, 4, 8])
    tps = [r.detection.tp for r in reports]
    assert tps == sorted(tps) and [r.radius for r in reports] == [1, 2, 4, 8]
    d = reports[-1].to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["radius_px"] == 8 and back["detection"]["tp"] == tps[-1]
    assert back["classification"]["per_class"][0]["name"] == "x"
    assert back["class_aware"][1]["name"] == "y" and "mean_f1" in back["class_aware"][1]
    assert all(math.isfinite(v) for v in back["detection"].values())


def test_bad_inputs_raise_qpcell_error():
    ok = pts([[0, 0]], [0])
    with pytest.raises(QpcellError, match="labels"):
        score_dataset([(pts([[0, 0]], [2]), ok)], ["a", "b"], 1.0)
    with pytest.raises(QpcellError, match="regions"):
        score_dataset([(ok, ok)], ["a"], 1.0, regions=[None, None])
    with pytest.raises(QpcellError, match="radius"):
        score_dataset([(ok, ok)], ["a"], -2)
    with pytest.raises(QpcellError, match="classes"):
        score_dataset([(ok, ok)], [], 1.0)
    with pytest.raises(QpcellError, match="radius"):
        radius_sweep([(ok, ok)], ["a"], [])


def test_detections_and_annotated_images_are_accepted():
    from qpcell.points import AnnotatedImage, Detections, make_classes

    classes = make_classes(["a", "b"])
    truth = AnnotatedImage("img", None, [[1.0, 1.0], [9.0, 9.0]], [0, 1], classes)
    det = Detections([[1.5, 1.0], [9.0, 8.0]], [0, 0], [0.9, 0.8], np.zeros((2, 2)), classes)
    rep = score_dataset([(det, truth)], [c.name for c in classes], 2.0)
    assert rep.detection.tp == 2 and rep.classification.accuracy == 0.5
    assert rep.per_image[0].name == "img"


def test_docstring_examples_run():
    import doctest

    import qpcell.metrics

    result = doctest.testmod(qpcell.metrics)
    assert result.failed == 0 and result.attempted > 0


@settings(max_examples=200, deadline=None)
@given(pred=grid_points, true=grid_points, radius=st.sampled_from([0.0, 1.0, 1.5, 2.5, 100.0]))
def test_sparse_solver_is_optimal_too(pred, true, radius):
    # the path large images take (forced here by a zero dense limit)
    import qpcell.metrics as metrics

    pred = np.array(pred, dtype=float).reshape(-1, 2)
    true = np.array(true, dtype=float).reshape(-1, 2)
    old = metrics.DENSE_LIMIT
    metrics.DENSE_LIMIT = 0
    try:
        m = match_points(pred, true, radius)
    finally:
        metrics.DENSE_LIMIT = old
    check_valid(m, pred, true, radius)
    k, dist = brute_force(pred, true, radius)
    assert m.tp == k
    assert m.distance.sum() == pytest.approx(dist, abs=1e-9)


def test_dense_and_sparse_solvers_agree_on_crowded_points(monkeypatch):
    import qpcell.metrics as metrics

    rng = np.random.default_rng(11)
    pred = rng.uniform(0, 100, (600, 2))
    true = rng.uniform(0, 100, (500, 2))
    dense = match_points(pred, true, 5.0)
    monkeypatch.setattr(metrics, "DENSE_LIMIT", 0)
    sparse = match_points(pred, true, 5.0)
    check_valid(sparse, pred, true, 5.0)
    assert dense.tp == sparse.tp
    assert dense.distance.sum() == pytest.approx(sparse.distance.sum(), rel=1e-12)


def test_absurd_radius_is_refused_before_memory_runs_out(monkeypatch):
    import qpcell.metrics as metrics

    monkeypatch.setattr(metrics, "MAX_EDGES", 50)
    xy = np.random.default_rng(0).uniform(0, 100, (20, 2))
    assert match_points(xy, xy, 1.0).tp == 20  # few pairs: fine
    with pytest.raises(QpcellError, match="far too many"):
        match_points(xy, xy, 1000.0)


def test_metrics_imports_no_user_interface():
    import subprocess
    import sys

    code = ("import sys, qpcell.metrics; print(sorted(m for m in "
            "('rich', 'typer', 'matplotlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
