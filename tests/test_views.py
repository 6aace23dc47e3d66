"""Test-time views (qpcell.views): tiles flipped and turned, their maps turned back and averaged,
in the model folder, on the device, in training's final tuning and on the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN
from test_train import PATCH, Recorder, tiny_data

from qpcell.checkpoint import load_model, read_config, save_model
from qpcell.config import PostprocessConfig, TrainConfig, to_dict
from qpcell.device_cells import DeviceCells
from qpcell.errors import QpcellError
from qpcell.inference import model_maps
from qpcell.models import create_model
from qpcell.train import TrainingInterrupted, train
from qpcell.train_ensemble import write_ensemble
from qpcell.views import VIEWS, unview_map, view_mean, view_tiles

CLASSES = [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}]


@pytest.mark.parametrize("name", list(VIEWS))
def test_every_view_comes_back_to_the_tile_itself(name):
    tiles = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    maps = np.moveaxis(tiles, -1, 1).astype(np.float32)  # (B, C, H, W): a map of each channel
    views = VIEWS[name]
    assert len(set(views)) == len(views) == {"none": 1, "flips": 4, "dihedral": 8}[name]
    for view in views:
        seen = view_tiles(tiles, view)
        assert seen.flags.c_contiguous
        assert seen.shape[1:3] == ((7, 5) if view[0] % 2 else (5, 7))
        back = unview_map(np.moveaxis(seen, -1, 1).astype(np.float32), view)
        assert np.array_equal(back, maps)
        back_t = unview_map(torch.from_numpy(np.moveaxis(seen, -1, 1).astype(np.float32)),
                            view)
        assert torch.equal(back_t, torch.from_numpy(maps))
    with pytest.raises(ValueError, match="unknown test-time views 'mirror'"):
        view_mean(lambda t: (t[..., 0], None), tiles, "mirror")


def test_the_mean_over_views_undoes_each_view():
    tiles = np.random.default_rng(1).integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
    ramp = np.arange(6, dtype=np.float32) / 5  # 0 at the left edge to 1 at the right

    def predict_maps(t):  # the red channel, plus a term that does not turn with the tile
        det = t[..., 0].astype(np.float32) / 255 + ramp
        return det, np.stack([det, 1 - det], axis=1)

    det, cls = view_mean(predict_maps, tiles, "flips")
    # each view's red channel comes back in place; the fixed ramp averages with its mirror
    assert np.allclose(det, tiles[..., 0] / 255 + 0.5, atol=1e-6)
    assert cls.shape == (1, 2, 6, 6) and np.allclose(cls[:, 0], det, atol=1e-6)
    det8, _ = view_mean(predict_maps, tiles, "dihedral")  # the ramp over all turns: 0.5 too
    assert np.allclose(det8, det, atol=1e-6)
    assert view_mean(predict_maps, tiles, "none")[0] is not None
    assert np.allclose(view_mean(predict_maps, tiles, "none")[0], predict_maps(tiles)[0])


def _model(folder, views: str | None):
    torch.manual_seed(3)
    meta = {"classes": CLASSES, "mpp": 0.5, "postprocess_kind": "sdrdin", "mask": {},
            "postprocess": to_dict(PostprocessConfig(threshold=0.5, mpp=0.5))}
    if views is not None:
        meta["views"] = views
    return save_model(folder, create_model("unet", 2, base=4), meta)


def test_a_model_folder_predicts_with_its_views_on_the_host_and_the_device(tmp_path):
    folder = _model(tmp_path / "m", "flips")
    bundle = load_model(folder, device="cpu")
    assert bundle.views == "flips"
    assert load_model(_model(tmp_path / "old", None), device="cpu").views == "none"
    tiles = np.random.default_rng(2).integers(0, 256, (2, 48, 32, 3), dtype=np.uint8)
    net = bundle.members[0]
    expected = view_mean(lambda t: model_maps(net, t, bundle.device), tiles, "flips")
    one = model_maps(net, tiles, bundle.device)
    assert not np.allclose(one[0], expected[0], atol=1e-4)  # an untrained net is not symmetric
    det, cls = bundle.predict_maps(tiles)
    assert np.allclose(det, expected[0], atol=1e-5) and np.allclose(cls, expected[1], atol=1e-5)
    on_device = DeviceCells(bundle, backend="eager").maps(tiles)
    assert np.allclose(on_device[0].numpy(), det, atol=1e-5)
    assert np.allclose(on_device[1].numpy(), cls, atol=1e-5)
    turned = DeviceCells(replace(bundle, views="dihedral"), backend="eager").maps(tiles)
    assert np.allclose(turned[0].numpy(),
                       view_mean(lambda t: model_maps(net, t, bundle.device), tiles,
                                 "dihedral")[0], atol=1e-5)


def test_unknown_views_in_a_model_folder_or_members_that_disagree_are_refused(tmp_path):
    folder = _model(tmp_path / "m", "flips")
    config = json.loads((folder / "config.json").read_text())
    config["views"] = "sideways"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QpcellError, match="unknown test-time views 'sideways'"):
        load_model(folder, device="cpu")
    out = tmp_path / "ens"
    members = [_model(out / "members" / "member-1", "flips"),
               _model(out / "members" / "member-2", "none")]
    with pytest.raises(QpcellError, match="different test-time views"):
        write_ensemble(out, members)
    write_ensemble(out, [members[0], _model(out / "members" / "member-3", "flips")])
    assert read_config(out)["views"] == "flips"
    assert load_model(out, device="cpu").views == "flips"


def _train_kwargs(data, **train_cfg):
    return dict(model_name="unet", model_kwargs={"base": 4}, model_mpp=None, prepared=data,
                patch_cfg=PATCH, device="cpu",
                train_cfg=replace(TrainConfig(), lr_schedule="cosine", seed=2, **train_cfg))


def test_training_tunes_the_kept_settings_on_the_views_it_predicts_with(tmp_path):
    classes, data = tiny_data(3, 96)
    result = train([], classes, tmp_path / "v", max_steps_per_epoch=2,
                   **_train_kwargs(data, epochs=2, views="flips"))
    config = read_config(result.model_dir)
    assert config["views"] == "flips" and config["training"]["config"]["views"] == "flips"
    assert load_model(result.model_dir, device="cpu").views == "flips"
    plain = train([], classes, tmp_path / "p", max_steps_per_epoch=2,
                  **_train_kwargs(data, epochs=2))
    assert read_config(plain.model_dir)["views"] == "none"
    # Ctrl-C keeps the kept round's settings, tuned on one view, and says so
    with pytest.raises(TrainingInterrupted):
        train([], classes, tmp_path / "i", max_steps_per_epoch=2,
              callbacks=Recorder(stop_at=(2, 1)), **_train_kwargs(data, epochs=3,
                                                                  views="flips"))
    assert read_config(tmp_path / "i")["views"] == "none"
    with pytest.raises(QpcellError, match="unknown test-time views 'all'"):
        train([], classes, tmp_path / "x", **_train_kwargs(data, views="all"))


def test_tta_on_the_command_line(cli, tmp_path, synthetic_project):
    model = tmp_path / "m"
    code, _, stderr = cli("train", synthetic_project, "--out", model, "--base", "4",
                          *TINY_TRAIN)
    assert code == 0, stderr
    config = json.loads((model / "config.json").read_text())
    assert config["views"] == "none"  # the paper's recipe predicts each tile once
    config["views"] = "flips"
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "p"
    code, stdout, stderr = cli("predict", model, synthetic_project, "--out", out, "--device",
                               "cpu")
    assert code == 0, stderr
    assert "views flips" in " ".join(stdout.split())
    first = json.loads((out / "predictions.json").read_text())
    code, stdout, stderr = cli("predict", model, synthetic_project, "--out", out, "--device",
                               "cpu", "--tta", "none")
    assert code == 0, stderr
    assert "views none" in " ".join(stdout.split())
    again = json.loads((out / "predictions.json").read_text())
    shas = {json.dumps(e.get("model_sha256")) for r in (first, again)
            for e in r["images"].values()}
    assert len(shas) == 2  # one view's cells are not taken for the model's own
    code, _, stderr = cli("predict", model, synthetic_project, "--out", out, "--tta", "all")
    assert code == 1 and "--tta 'all': choose from model, none, flips, dihedral" in stderr
