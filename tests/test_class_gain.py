"""Class gains: a prior shift on the class probabilities, tuned on validation."""

from __future__ import annotations

import numpy as np
import pytest

from qpcell.config import PostprocessConfig
from qpcell.errors import QpcellError
from qpcell.metrics import score_dataset
from qpcell.points import Detections, make_classes
from qpcell.postprocess import apply_class_gain, postprocess_sdrdin
from qpcell.train import TrainImage, tune_class_gain

CLASSES = make_classes(["common", "rare"])


def one_cell_maps(p_rare: float) -> tuple[np.ndarray, np.ndarray]:
    shape = (64, 64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    det = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 25).astype(np.float32)
    cls = np.stack([np.full(shape, 1 - p_rare), np.full(shape, p_rare)]).astype(np.float32)
    return det, cls


def test_gain_shifts_the_class_and_keeps_probabilities_summing_to_one():
    det, cls = one_cell_maps(0.4)
    cfg = PostprocessConfig(min_area_px=10)
    assert postprocess_sdrdin(det, cls, cfg, CLASSES).labels.tolist() == [0]
    shifted = postprocess_sdrdin(det, cls, PostprocessConfig(min_area_px=10,
                                                             class_gain=(1.0, 2.0)), CLASSES)
    assert shifted.labels.tolist() == [1]
    np.testing.assert_allclose(shifted.class_probs[0], [0.6 / 1.4, 0.8 / 1.4], rtol=1e-5)
    with pytest.raises(QpcellError, match="one per class"):
        postprocess_sdrdin(det, cls, PostprocessConfig(min_area_px=10, class_gain=(1.0,)),
                           CLASSES)
    with pytest.raises(QpcellError, match="one per class"):
        apply_class_gain(np.ones((1, 2)), (1.0, -1.0))


def test_tuned_gains_make_the_rare_class_appear_without_hurting_the_common_one():
    rng = np.random.default_rng(0)
    truths, dets = [], []
    for i in range(4):
        xy = rng.uniform(0, 500, (50, 2))
        labels = (np.arange(50) < 5).astype(np.int64)  # 10% rare
        # the model ranks rare cells higher for "rare" but never above 0.5
        p_rare = np.where(labels == 1, rng.uniform(0.3, 0.45, 50), rng.uniform(0.0, 0.15, 50))
        probs = np.column_stack([1 - p_rare, p_rare]).astype(np.float32)
        truths.append(TrainImage(f"im{i}", np.zeros((500, 500, 3), np.uint8), xy, labels, None))
        dets.append(Detections(xy, np.zeros(50, np.int64), np.ones(50, np.float32), probs,
                               CLASSES))
    before = score_dataset(list(zip(dets, truths, strict=True)), ["common", "rare"], 3.0)
    assert before.class_aware[1].total_f1 == 0.0
    gain, weighted = tune_class_gain(dets, truths, CLASSES, 3.0)
    # a cell is called rare where g_rare * p > g_common * (1 - p): every rare cell
    # (p >= 0.3) and no common one (p <= 0.15) when 0.7 / 0.3 < g_rare / g_common < 0.85 / 0.15
    assert 0.7 / 0.3 < gain[1] / gain[0] < 0.85 / 0.15
    assert weighted == pytest.approx(1.0)
    assert weighted > before.classification.weighted_f1


def test_gains_stay_one_when_the_classes_are_already_right():
    xy = np.array([[10.0, 10.0], [50.0, 50.0]])
    labels = np.array([0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    truths = [TrainImage("a", np.zeros((64, 64, 3), np.uint8), xy, labels, None)]
    dets = [Detections(xy, labels, np.ones(2, np.float32), probs, CLASSES)]
    assert tune_class_gain(dets, truths, CLASSES, 3.0) == ((1.0, 1.0), 1.0)


@pytest.mark.parametrize("grouped", [True, False])
def test_cells_take_their_neighbours_classes_only_where_classes_come_in_groups(grouped):
    from qpcell.postprocess import neighbour_context
    from qpcell.tuning import tune_context_weight

    rng = np.random.default_rng(1)
    truths, cells = [], []
    for i in range(3):
        xy = rng.uniform(0, 300, (200, 2))
        # tissue classes (left and right half) or a cell's own (random, like Ki67 status)
        labels = (xy[:, 0] > 150).astype(np.int64) if grouped else rng.integers(0, 2, 200)
        p1 = np.where(labels == 1, rng.uniform(0.3, 1.0, 200), rng.uniform(0.0, 0.7, 200))
        truths.append(TrainImage(f"im{i}", np.zeros((300, 300, 3), np.uint8), xy, labels, None))
        cells.append((xy, np.column_stack([1 - p1, p1])))

    def dets_of(weight):
        out = []
        for xy, probs in cells:
            mixed = neighbour_context(xy, probs, 30.0, weight)
            out.append(Detections(xy, mixed.argmax(1), np.ones(len(xy), np.float32),
                                  mixed.astype(np.float32), CLASSES))
        return out

    weight, gain, weighted = tune_context_weight(dets_of, truths, CLASSES, 3.0)
    _, alone = tune_class_gain(dets_of(0.0), truths, CLASSES, 3.0)
    if grouped:  # the neighbours outvote a cell's noise
        assert weight == 0.5 and weighted > alone + 0.05
    else:  # they only blur it
        assert weight == 0.0 and weighted == alone
    assert len(gain) == 2


def test_windows_with_a_rare_cell_are_drawn_again():
    from qpcell.patches import rare_class_windows

    points = [(np.array([[10.0, 10.0], [150.0, 150.0]]), np.array([0, 1])),
              (np.array([[10.0, 10.0]] * 30), np.zeros(30, np.int64))]
    windows = [(0, 0, 0), (0, 100, 100), (1, 0, 0)]
    # class 1 holds 1 of 32 points (3%): rare at share 0.05, not at 0.02
    got = rare_class_windows(windows, points, 2, 64, share=0.05, repeats=2)
    assert got == windows + [(0, 100, 100)] * 2
    assert rare_class_windows(windows, points, 2, 64, share=0.02, repeats=2) == windows
    assert rare_class_windows(windows, points, 2, 64, share=0.05, repeats=0) == windows


def test_tuned_values_on_the_edge_of_their_grid_are_reported():
    from qpcell.config import PostprocessConfig
    from qpcell.tuning import PEAK_WINDOW_FRACTIONS, THRESHOLDS, edge_notes

    base = PostprocessConfig()
    assert edge_notes({"threshold": 0.5, "peak_window_px": 15}, base) == []
    (low,) = edge_notes({"threshold": min(THRESHOLDS)}, base)
    assert "lowest" in low and "not confident" in low
    (high,) = edge_notes({"threshold": max(THRESHOLDS)}, base)
    assert "highest" in high
    widest = max(round(base.peak_window_px * f) | 1 for f in PEAK_WINDOW_FRACTIONS)
    (window,) = edge_notes({"threshold": 0.5, "peak_window_px": widest}, base)
    assert "largest" in window and "pixel size" in window
    from qpcell.tuning import GAINS

    (gain,) = edge_notes({"threshold": 0.5, "class_gain": [2.0, 2.0, min(GAINS)]}, base,
                         ["stroma", "epithelium", "other"])
    assert "class gain of other" in gain and "counts may run low" in gain
    assert edge_notes({"threshold": 0.5, "class_gain": [min(GAINS)] * 2}, base) == []


def over_called_rare(seed: int = 0):
    """Cells whose class maps call the rare class too often, as a loss that weights every
    class alike leaves them: 30% of the common cells score 0.5-0.65 for "rare"."""
    rng = np.random.default_rng(seed)
    truths, dets = [], []
    for i in range(4):
        xy = rng.uniform(0, 500, (50, 2))
        labels = (np.arange(50) < 5).astype(np.int64)
        p_rare = np.where(labels == 1, rng.uniform(0.7, 0.9, 50),
                          np.where(np.arange(50) % 3 == 0, rng.uniform(0.5, 0.65, 50),
                                   rng.uniform(0.0, 0.3, 50)))
        probs = np.column_stack([1 - p_rare, p_rare]).astype(np.float32)
        truths.append(TrainImage(f"im{i}", np.zeros((500, 500, 3), np.uint8), xy, labels, None))
        dets.append(Detections(xy, probs.argmax(axis=1), np.ones(50, np.float32), probs,
                               CLASSES))
    return dets, truths


def test_gains_tuned_for_both_scores_pull_an_over_called_class_back():
    from qpcell.tuning import GAIN_OBJECTIVE

    dets, truths = over_called_rare()
    before = score_dataset(list(zip(dets, truths, strict=True)), ["common", "rare"], 3.0)
    assert before.classification.weighted_f1 < 0.8  # gain 1: a fifth of the cells miscalled
    assert GAIN_OBJECTIVE == "both"
    for objective in ("weighted", "both"):
        gain, weighted = tune_class_gain(dets, truths, CLASSES, 3.0, objective=objective)
        # every cell is right when common cells (p_rare <= 0.65) stay common,
        # g_rare * 0.65 < g_common * 0.35, and rare ones (p_rare >= 0.7) turn rare,
        # g_rare * 0.7 > g_common * 0.3
        assert 0.3 / 0.7 < gain[1] / gain[0] < 0.35 / 0.65, objective
        assert weighted == pytest.approx(1.0)
    with pytest.raises(ValueError, match="objective"):
        tune_class_gain(dets, truths, CLASSES, 3.0, objective="accuracy")
