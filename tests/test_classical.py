"""The classical baseline: colour deconvolution, LoG peaks and a random forest."""

from __future__ import annotations

import numpy as np
import pytest

from qpcell.classical import (
    ClassicalModel,
    DetectionSettings,
    cell_features,
    feature_names,
    find_peaks,
    fit_classical,
    nucleus_response,
    stain_channels,
    tune_detection,
)
from qpcell.errors import QpcellError
from qpcell.metrics import score_dataset
from qpcell.points import make_classes
from qpcell.synthetic import HAEMATOXYLIN, synthetic_dataset


def blob_image(centres, radius=4.0, size=64) -> np.ndarray:
    """White image with haematoxylin discs at ``centres`` (x, y)."""
    yy, xx = np.mgrid[:size, :size]
    od = np.zeros((size, size, 3))
    for x, y in centres:
        od += 0.8 * ((xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2)[..., None] * HAEMATOXYLIN
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)


def test_deconvolution_puts_haematoxylin_in_the_nucleus_not_in_the_dab_channel():
    ch = stain_channels(blob_image([(32, 32)]))
    assert ch.shape == (7, 64, 64) and ch.dtype == np.float32
    h, dab = ch[0], ch[2]
    assert h[32, 32] > h[5, 5] + 0.02  # nucleus against white (skimage's OD units)
    assert h[32, 32] > 10 * abs(dab[32, 32])
    assert ch[3, 32, 32] > ch[3, 5, 5]  # total optical density
    assert np.allclose(ch[4:, 5, 5], 1.0)  # white background in RGB
    with pytest.raises(QpcellError):
        stain_channels(np.zeros((8, 8)))


def test_peaks_sit_on_the_blob_centres():
    centres = [(15.0, 20.0), (45.0, 40.0), (20.0, 50.0)]
    ch = stain_channels(blob_image(centres))
    xy, values = find_peaks(nucleus_response(ch, 3.0, 0.0), 4, 0.01)
    assert len(xy) == 3 and np.all(values > 0.01)
    for c in centres:
        assert np.min(np.hypot(*(xy - np.array(c)).T)) <= 1.0
    # a threshold above every peak finds nothing
    assert len(find_peaks(nucleus_response(ch, 3.0, 0.0), 4, values.max() + 1)[0]) == 0


def test_features_have_their_names_and_tell_a_dark_cell_from_a_pale_one():
    img = blob_image([(20, 20)])
    yy, xx = np.mgrid[:64, :64]
    pale = 0.25 * ((xx - 45) ** 2 + (yy - 45) ** 2 <= 16)[..., None] * HAEMATOXYLIN
    img = np.minimum(img, np.clip(255 * np.exp(-pale), 0, 255)).astype(np.uint8)
    ch = stain_channels(img)
    resp = nucleus_response(ch, 3.0, 1.0)
    f = cell_features(ch, resp, np.array([[20.0, 20.0], [45.0, 45.0]]), 4.0)
    names = feature_names()
    assert f.shape == (2, len(names)) and np.all(np.isfinite(f))
    h_mean = names.index("haematoxylin: disc 1R mean")
    assert f[0, h_mean] > f[1, h_mean] > 0
    assert cell_features(ch, resp, np.zeros((0, 2)), 4.0).shape == (0, len(names))


@pytest.fixture(scope="module")
def synthetic():
    pairs = synthetic_dataset(6, (128, 128), 3, seed=3)
    classes = pairs[0][0].classes
    return classes, [im for _, im in pairs], [a for a, _ in pairs]


def test_fitted_model_finds_and_classifies_most_synthetic_cells(synthetic):
    classes, images, anns = synthetic
    model = fit_classical(images[:4], [(a.xy, a.labels) for a in anns[:4]], classes,
                          nucleus_radius_px=4.5, match_radius_px=6.0, n_estimators=50)
    assert isinstance(model, ClassicalModel) and model.tune_f1 > 0.8
    preds = [model.predict(im) for im in images[4:]]
    report = score_dataset(list(zip(preds, anns[4:], strict=True)),
                           [c.name for c in classes], 6.0)
    assert report.detection.recall >= 0.8
    assert report.detection.f1 >= 0.8
    assert report.classification.accuracy >= 0.8  # three stains, chance is 1/3
    p = preds[0]
    assert np.allclose(p.class_probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all((p.scores > 0) & (p.scores <= 1))
    assert model.describe()["n_training_cells"] == sum(len(a.xy) for a in anns[:4])


def test_tuning_prefers_settings_that_find_the_cells(synthetic):
    _, images, anns = synthetic
    good, f1 = tune_detection(images[:2], [a.xy for a in anns[:2]], nucleus_radius_px=4.5,
                              match_radius_px=6.0, sigma_grid=(0.7,), dab_grid=(0.0,))
    assert f1 > 0.8 and good.min_distance_px >= 1
    # far too high a threshold misses the cells: tuning picked a useful one
    chans = stain_channels(images[0])
    resp = nucleus_response(chans, good.sigma_px, good.dab_weight)
    found, _ = find_peaks(resp, good.min_distance_px, good.threshold)
    assert len(found) >= 0.8 * len(anns[0].xy)
    with pytest.raises(QpcellError):
        tune_detection([], [], nucleus_radius_px=4.5, match_radius_px=6.0)


def test_a_class_absent_from_training_gets_probability_zero(synthetic):
    _, images, anns = synthetic
    classes = make_classes(["a", "b", "c", "never"])
    model = fit_classical(images[:2], [(a.xy, a.labels) for a in anns[:2]], classes,
                          nucleus_radius_px=4.5, match_radius_px=6.0, n_estimators=10)
    det = model.predict(images[2])
    assert det.class_probs.shape[1] == 4 and np.all(det.class_probs[:, 3] == 0)
    empty = ClassicalModel(classes, DetectionSettings(2.0, 3.0, 1e9), 4.5, model.forest)
    assert len(empty.predict(images[2])) == 0


def test_fit_refuses_mismatched_or_empty_training_data(synthetic):
    classes, images, anns = synthetic
    with pytest.raises(QpcellError, match="point sets"):
        fit_classical(images[:2], [(anns[0].xy, anns[0].labels)], classes,
                      nucleus_radius_px=4.5, match_radius_px=6.0)
    with pytest.raises(QpcellError, match="no annotated cells"):
        fit_classical(images[:1], [(np.zeros((0, 2)), np.zeros(0, np.int64))], classes,
                      nucleus_radius_px=4.5, match_radius_px=6.0,
                      tune_images=images[:1], tune_points=[anns[0].xy])
