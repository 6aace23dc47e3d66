"""The cell classifier beside the network: crops, training, the dense map, the wrapper, tuning."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qpcell.checkpoint import (
    classes_to_meta,
    load_model,
    postprocess_meta,
    read_config,
    save_model,
)
from qpcell.config import PostprocessConfig
from qpcell.errors import QpcellError
from qpcell.inference import model_maps
from qpcell.models import create_model
from qpcell.models.cell_classifier import (
    CellClassifier,
    WithCellClassifier,
    base_spec,
    crop_px_for,
)
from qpcell.synthetic import synthetic_dataset
from qpcell.train import TrainImage, train
from qpcell.train_cells import cell_crops, draw_weights, fit_cell_classifier
from qpcell.tuning import tune_cell_share

CPU = torch.device("cpu")


def tiny_data(n: int = 4, size: int = 96, seed: int = 0):
    pairs = synthetic_dataset(n, (size, size), 3, seed=seed)
    return pairs[0][0].classes, [TrainImage(a.name, im, a.xy, a.labels, None)
                                 for a, im in pairs]


def test_crops_are_centred_on_the_point_and_white_beyond_the_image():
    pixels = np.arange(20 * 30 * 3, dtype=np.int64).reshape(20, 30, 3) % 251
    pixels = pixels.astype(np.uint8)
    crops = cell_crops(pixels, np.array([[10.0, 5.0], [0.2, 19.0]]), 8)
    assert crops.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(crops[0], pixels[1:9, 6:14])  # [p - 4, p + 4)
    np.testing.assert_array_equal(crops[0, 4, 4], pixels[5, 10])
    np.testing.assert_array_equal(crops[1, 4, 4], pixels[19, 0])
    np.testing.assert_array_equal(crops[1, 0, 4], pixels[15, 0])
    assert (crops[1, :, :4] == 255).all() and (crops[1, 5:] == 255).all()  # beyond: white


def test_rare_classes_are_drawn_by_the_inverse_square_root_of_their_count():
    w = draw_weights(np.array([0] * 9 + [1]), 3)
    assert w.sum() == pytest.approx(1.0)
    assert w[-1] / w[0] == pytest.approx(3.0)


def test_the_crop_side_follows_the_working_scale():
    assert crop_px_for(0.44) == 48 and crop_px_for(None) == 48
    assert crop_px_for(0.22) == 96 and crop_px_for(5.0) == 16
    with pytest.raises(QpcellError, match="multiple of 8"):
        CellClassifier(3, crop_px=44)
    with pytest.raises(QpcellError, match="margin_px=4"):
        CellClassifier(3, margin_px=4)
    assert CellClassifier(3, crop_px=32, margin_px=8).window_px == 48


@pytest.fixture(scope="module")
def trained():
    classes, data = tiny_data(5, 96)
    torch.manual_seed(0)
    # a 32 px crop with 8 px margins keeps the windows small: 80 steps in seconds
    model = CellClassifier(len(classes), crop_px=32, margin_px=8)
    result = fit_cell_classifier(model, [(d.pixels, d.xy, d.labels) for d in data[:4]],
                                 steps=80, seed=0)
    return model, result, data[4]


def test_the_classifier_learns_the_classes_of_cells_it_never_saw(trained):
    model, result, held_out = trained
    assert result.steps == 80 and result.last_loss < 0.5 * result.first_loss
    windows = cell_crops(held_out.pixels, held_out.xy, model.window_px)
    with torch.no_grad():
        called = model(torch.from_numpy(windows).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert np.mean(called.numpy() == held_out.labels) >= 0.8


def test_its_dense_map_calls_the_classes_of_cells_it_never_saw(trained):
    # The synthetic classes are random from cell to cell, so only the cell at the centre tells
    # its class. A classifier that pooled over the crop alone called them right on crops (from
    # where the zero padding put the centre) and at chance on the dense map.
    model, _, held_out = trained
    x = torch.from_numpy(held_out.pixels).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        dense = model.dense_logits(x)[0].argmax(0).numpy()
    rows, cols = np.rint(held_out.xy[:, ::-1]).astype(int).clip(0, 95).T
    assert np.mean(dense[rows, cols] == held_out.labels) >= 0.8


def test_the_dense_map_pools_the_tile_features_centred_on_each_pixel(trained):
    import torch.nn.functional as F

    model, _, held_out = trained
    x = torch.from_numpy(held_out.pixels).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        dense = model.dense_logits(x)[0]
        # by hand: white around the tile, the features, and the head on the means of the 4 x 4
        # feature cells that cover [8j - 16, 8j + 16) + 4 (the crop centred on 8j + 4) and of
        # their central 2 x 2
        grid = model.features(F.pad(x, (12, 12, 12, 12), value=1.0))[0]
    assert dense.shape == (model.n_classes, 96, 96)

    def by_hand(jy: int, jx: int) -> torch.Tensor:
        crop = grid[:, jy:jy + 4, jx:jx + 4].mean(dim=(1, 2))
        centre = grid[:, jy + 1:jy + 3, jx + 1:jx + 3].mean(dim=(1, 2))
        return (model.head.weight[:, :, 0, 0] @ torch.cat([centre, crop])
                + model.head.bias).detach()

    # the pixel 8j + 4 reads the pooled output j + 1/16 (bilinear, half-pixel centres), so
    # 15/16 of the crop centred on it and 1/16 of the next one along each axis
    w = (15 / 16, 1 / 16)
    for jy in range(1, 10):
        for jx in range(1, 10):
            expected = sum(w[a] * w[b] * by_hand(jy + a, jx + b) for a in (0, 1) for b in (0, 1))
            torch.testing.assert_close(dense[:, 8 * jy + 4, 8 * jx + 4], expected, atol=1e-4,
                                       rtol=1e-4)


def wrapped(share: float = 0.3) -> tuple[WithCellClassifier, torch.nn.Module, CellClassifier]:
    torch.manual_seed(0)
    base = create_model("unet", 3, base=4, batch_norm=True, class_weights="cells").eval()
    cells = CellClassifier(3).eval()
    return WithCellClassifier.wrap(base, cells, share).eval(), base, cells


def test_the_wrapper_keeps_the_detection_map_and_mixes_the_class_maps():
    model, base, cells = wrapped(0.3)
    tiles = np.random.default_rng(0).integers(0, 255, (2, 80, 96, 3), dtype=np.uint8)
    det, cls = model_maps(model, tiles, CPU, backend="eager")
    base_det, base_cls = model_maps(base, tiles, CPU, backend="eager")
    np.testing.assert_array_equal(det, base_det)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        own = torch.softmax(cells.dense_logits(x), 1).numpy()
    mass = base_cls.sum(1, keepdims=True)  # 1 - p(background): the network's, kept
    np.testing.assert_allclose(cls, 0.7 * base_cls + 0.3 * mass * own, atol=1e-5)
    np.testing.assert_allclose(cls.sum(1), base_cls.sum(1), atol=1e-5)
    for backend in ("torch", "onnxruntime"):  # every way predict runs it
        np.testing.assert_allclose(model_maps(model, tiles, CPU, backend=backend)[1], cls,
                                   atol=1e-4)
    with pytest.raises(QpcellError, match="between 0 and 1"):
        WithCellClassifier(3, base=base.spec(), cells=cells.spec(), share=1.5)


def meta(classes) -> dict:
    return {"classes": classes_to_meta(classes), "mpp": None, "postprocess_kind": "sdrdin",
            "postprocess": postprocess_meta(PostprocessConfig())}


def test_a_saved_wrapper_loads_with_its_classifier_and_gives_its_network_to_init(tmp_path):
    from qpcell.pretrained import transfer_weights

    classes, data = tiny_data(1)
    model, base, _ = wrapped(0.5)
    save_model(tmp_path / "m", model, meta(classes))
    config = read_config(tmp_path / "m")
    assert config["model"]["share"] == 0.5 and base_spec(config["model"])["name"] == "unet"
    bundle = load_model(tmp_path / "m", device="cpu")
    assert bundle.name == "unet + cell classifier"
    np.testing.assert_allclose(bundle.predict_maps(data[0].pixels[None])[1],
                               model_maps(model, data[0].pixels[None], CPU)[1], atol=1e-5)
    fresh = create_model("unet", 3, base=4, batch_norm=True, class_weights="cells")
    transfer = transfer_weights(fresh, tmp_path / "m", tuple(classes))
    assert transfer.copied == len(base.state_dict())
    for name, value in base.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)


def disc_maps(xy: np.ndarray, labels: np.ndarray, shape, n_classes: int, right: bool):
    """A detection map with a blob on each cell and class maps that call each cell right
    (``right``) or at random."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    det = np.zeros(shape, np.float32)
    cls = np.full((n_classes, *shape), 1.0 / n_classes, np.float32)
    rng = np.random.default_rng(1)
    for (x, y), lab in zip(xy, labels, strict=True):
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= 9
        det = np.maximum(det, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0))
        call = lab if right else rng.integers(n_classes)
        cls[:, disc] = 0.1 / (n_classes - 1)
        cls[call, disc] = 0.9
    return det, cls


def test_the_share_goes_to_whichever_map_knows_the_classes():
    classes, data = tiny_data(3, 96)
    truths = [SimpleNamespace(xy=d.xy, labels=d.labels, regions=None) for d in data]
    good = [disc_maps(d.xy, d.labels, (96, 96), 3, True) for d in data]
    bad = [disc_maps(d.xy, d.labels, (96, 96), 3, False) for d in data]

    def key(f1, cf1):
        return (f1 + cf1) / 2, f1

    shares = (0.0, 0.5, 1.0)
    share, setting, f1, cf1 = tune_cell_share(bad, [c for _, c in good], truths, classes,
                                              PostprocessConfig(), 6.0, key, shares=shares)
    assert share > 0 and cf1 > 0.9 and f1 > 0.9 and "threshold" in setting
    share, _, _, cf1 = tune_cell_share(good, [c for _, c in bad], truths, classes,
                                       PostprocessConfig(), 6.0, key, shares=shares)
    assert share == 0.0 and cf1 > 0.9
    share, _, _, _ = tune_cell_share(good, [c for _, c in bad], truths, classes,
                                     PostprocessConfig(), 6.0, key)
    assert share == 0.5  # what training offers: half, whatever validation would prefer


def test_training_adds_the_classifier_with_the_share_validation_chose(tmp_path, monkeypatch):
    from qpcell.recipe import recipe

    classes, data = tiny_data(4, 96)
    rec = recipe("fast")
    kwargs = dict(model_name="unet", model_kwargs={**rec.model_kwargs, "base": 4},
                  model_mpp=None, prepared=data, val_names=[data[0].name], mask_cfg=rec.mask,
                  patch_cfg=replace(rec.patch, size=64), post_cfg=rec.post, device="cpu",
                  max_steps_per_epoch=2)
    monkeypatch.setattr("qpcell.tuning.CELL_SHARES", (0.5,))
    train([], classes, tmp_path / "half",
          train_cfg=replace(rec.train, epochs=1, seed=0, cells_share=0.2, cells_min_steps=60),
          **kwargs)
    config = read_config(tmp_path / "half")
    done = config["training"]["cell_classifier"]
    assert done["share"] == 0.5 and done["tuned"] and done["steps"] == 60  # the step floor
    assert done["last_loss"] < done["first_loss"]
    assert config["model"]["name"] == "with-cell-classifier"
    assert "cell classifier steps 60" in (tmp_path / "half" / "train_log.txt").read_text()
    bundle = load_model(tmp_path / "half", device="cpu")
    det, cls = bundle.predict_maps(data[1].pixels[None])
    assert cls.shape == (1, 3, 96, 96)
    np.testing.assert_allclose(cls.sum(1), det, atol=1e-4)  # the class mass: the network's

    monkeypatch.setattr("qpcell.tuning.CELL_SHARES", (0.0,))
    train([], classes, tmp_path / "none",
          train_cfg=replace(rec.train, epochs=1, seed=0, cells_share=0.2, cells_min_steps=60),
          **kwargs)
    config = read_config(tmp_path / "none")
    assert config["model"]["name"] == "unet"  # a share of 0: the network alone is saved
    assert config["training"]["cell_classifier"]["share"] == 0.0

    with pytest.raises(QpcellError, match="fraction"):
        train([], classes, tmp_path / "bad",
              train_cfg=replace(rec.train, epochs=1, cells_share=1.0), **kwargs)


def test_a_time_budget_leaves_the_classifier_its_share(tmp_path):
    from conftest import NoteTaker

    from qpcell.recipe import recipe

    classes, data = tiny_data(4, 96)
    rec = recipe("fast")
    said = NoteTaker()
    budget = 12.0
    result = train([], classes, tmp_path / "m", model_name="unet",
                   model_kwargs={**rec.model_kwargs, "base": 4}, model_mpp=None,
                   prepared=data, val_names=[data[0].name], callbacks=said,
                   train_cfg=replace(rec.train, time_budget_s=budget, seed=0, cells_share=0.25,
                                     refit_max_images=0),
                   mask_cfg=rec.mask, patch_cfg=replace(rec.patch, size=64), device="cpu")
    assert any("cell classifier" in n and "or 3 s" in n for n in said.notes)
    assert result.seconds <= budget * 1.25 + 1.0
    done = read_config(result.model_dir)["training"]["cell_classifier"]
    assert 0 < done["seconds"] <= 3.5
