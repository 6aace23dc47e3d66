"""Ensembles: members trained from other seeds, their maps averaged (qpcell.ensemble,
qpcell.train_ensemble, the ensemble model folder and ``qpcell train --members``)."""

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
from qpcell.ensemble import another_member, combined_postprocess, mean_maps
from qpcell.errors import QpcellError
from qpcell.models import create_model
from qpcell.train import TrainingInterrupted
from qpcell.train_ensemble import LEDGER, train_ensemble, write_ensemble
from qpcell.train_guard import prepare_model_folder

CLASSES = [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}]


def test_settings_for_the_averaged_maps_come_from_every_member():
    posts = [PostprocessConfig(threshold=0.3, peak_window_px=7, class_box_px=25,
                               min_area_px=10.0, class_gain=(4.0, 1.0)),
             PostprocessConfig(threshold=0.5, peak_window_px=15, class_box_px=49,
                               min_area_px=0.0, class_gain=(1.0, 1.0)),
             PostprocessConfig(threshold=0.7, peak_window_px=11, class_box_px=49,
                               min_area_px=50.0)]  # no gains tuned: every gain 1
    post = combined_postprocess(posts)
    assert post.threshold == pytest.approx(0.5)
    assert post.class_gain == pytest.approx((4.0 ** (1 / 3), 1.0))
    assert (post.peak_window_px, post.class_box_px, post.min_area_px) == (11, 49, 10.0)
    two = combined_postprocess(posts[:2])  # an even count: the lower median, a member's value
    assert (two.peak_window_px, two.class_box_px, two.min_area_px) == (7, 25, 0.0)
    assert combined_postprocess(posts[2:]) == posts[2]
    shares = [replace(p, context_weight=w) for p, w in zip(posts, (0.0, 0.5, 0.25), strict=True)]
    assert combined_postprocess(shares).context_weight == 0.25  # the neighbours' share: median
    with pytest.raises(ValueError):
        combined_postprocess([])


def test_another_member_only_while_the_budget_left_holds_one():
    assert another_member(600.0, [580.0], 3)
    assert another_member(530.0, [580.0], 3)  # 0.9 of a member: its cap still ends it
    assert not another_member(500.0, [580.0], 3)
    assert not another_member(1e6, [100.0, 100.0, 100.0], 3)  # at most max_members
    assert not another_member(1e6, [], 3)


def test_mean_maps_average_members():
    a = (np.zeros((1, 4, 4), np.float32), np.full((1, 2, 4, 4), 0.2, np.float32))
    b = (np.ones((1, 4, 4), np.float32), np.full((1, 2, 4, 4), 0.6, np.float32))
    det, cls = mean_maps([a, b])
    assert det.dtype == np.float32 and np.allclose(det, 0.5) and np.allclose(cls, 0.4)
    assert mean_maps([(a[0], None), (b[0], None)])[1] is None


def _member(folder, seed: int, threshold: float, classes=CLASSES):
    torch.manual_seed(seed)
    return save_model(folder, create_model("unet", len(classes), base=4),
                      {"classes": classes, "mpp": 0.5, "postprocess_kind": "sdrdin", "mask": {},
                       "postprocess": to_dict(PostprocessConfig(threshold=threshold, mpp=0.5))})


def test_an_ensemble_folder_loads_and_averages_its_members_maps(tmp_path):
    out = tmp_path / "ens"
    members = [_member(out / "members" / f"member-{k}", k, t)
               for k, t in ((1, 0.2), (2, 0.4))]
    write_ensemble(out, members)
    config = read_config(out)
    assert config["kind"] == "ensemble" and config["members"] == ["members/member-1",
                                                                   "members/member-2"]
    assert config["postprocess"]["threshold"] == pytest.approx(0.3)
    bundle = load_model(out, device="cpu")
    assert bundle.name == "ensemble of 2 unet" and len(bundle.members) == 2
    tiles = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    singles = [load_model(m, device="cpu").predict_maps(tiles) for m in members]
    assert not np.allclose(singles[0][0], singles[1][0])  # two different networks
    det, cls = bundle.predict_maps(tiles)
    assert np.allclose(det, (singles[0][0] + singles[1][0]) / 2, atol=1e-5)
    assert np.allclose(cls, (singles[0][1] + singles[1][1]) / 2, atol=1e-5)
    on_device = DeviceCells(bundle, backend="eager").maps(tiles)
    assert np.allclose(on_device[0].numpy(), det, atol=1e-5)
    assert np.allclose(on_device[1].numpy(), cls, atol=1e-5)


def test_an_ensemble_refuses_members_that_do_not_fit(tmp_path):
    out = tmp_path / "ens"
    members = [_member(out / "members" / "member-1", 1, 0.5),
               _member(out / "members" / "member-2", 2, 0.5,
                       [{"name": "x", "color": [1, 2, 3]}, {"name": "b", "color": [0, 0, 200]}])]
    write_ensemble(out, members)
    with pytest.raises(QpcellError, match="member 'members/member-2' has other classes"):
        load_model(out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    config["members"] = ["../elsewhere"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QpcellError, match="outside the model folder"):
        load_model(out, device="cpu")


def _kwargs(data, **train):
    return dict(model_name="unet", model_kwargs={"base": 4}, model_mpp=None, prepared=data,
                patch_cfg=PATCH, device="cpu",
                train_cfg=replace(TrainConfig(), lr_schedule="cosine", seed=5, **train))


def test_a_budget_the_step_cap_leaves_unused_trains_more_members(tmp_path):
    classes, data = tiny_data(3, 96)
    out = tmp_path / "m"
    notes: list[str] = []
    results = train_ensemble([], classes, out, members=None, max_members=3, on_note=notes.append,
                             **_kwargs(data, time_budget_s=60.0, max_passes=0.3, min_steps=4))
    assert len(results) == 3 and len(notes) == 2 and "member 2 of the ensemble" in notes[0]
    config = read_config(out)
    assert config["kind"] == "ensemble" and len(config["members"]) == 3
    ledger = json.loads((out / "members" / LEDGER).read_text())
    assert [m["seed"] for m in ledger["members"]] == [5, 6, 7]
    assert sum(m["seconds"] for m in ledger["members"]) < 60.0
    assert ledger["members"][1]["budget_s"] == pytest.approx(
        60.0 - ledger["members"][0]["seconds"])
    seeds = [m["config"]["seed"] for m in config["training"]["members"]]
    assert seeds == [5, 6, 7]
    assert not (out / "weights.safetensors").exists()  # the first member moved beside the rest
    assert (out / "members" / "member-1" / "train_log.txt").exists()
    assert load_model(out, device="cpu").name == "ensemble of 3 unet"


def test_a_budget_spent_by_the_first_model_leaves_a_single_model(tmp_path):
    classes, data = tiny_data(2, 96)
    out = tmp_path / "m"
    results = train_ensemble([], classes, out, members=None, max_members=3,
                             **_kwargs(data, time_budget_s=10.0, max_passes=0.0))
    assert len(results) == 1 and results[0].model_dir == out
    assert read_config(out)["kind"] == "single" and not (out / "members").exists()


def test_an_ensemble_interrupted_in_a_member_keeps_the_finished_ones_and_resumes(tmp_path):
    classes, data = tiny_data(2, 96)
    out = tmp_path / "m"
    kwargs = _kwargs(data, epochs=2)
    kwargs["max_steps_per_epoch"] = 2

    def stop_in_second(k):
        return Recorder(stop_at=(2, 1)) if k == 2 else None

    with pytest.raises(TrainingInterrupted, match="member 2 of the ensemble.*--resume"):
        train_ensemble([], classes, out, members=3, max_members=3,
                       callbacks_for=stop_in_second, **kwargs)
    config = read_config(out)  # the finished member is ready to use meanwhile
    assert config["kind"] == "ensemble" and config["members"] == ["members/member-1"]
    assert load_model(out, device="cpu").predict_maps(data[0].pixels[None])[0].shape == (
        1, 96, 96)
    with pytest.raises(QpcellError, match="--resume continues it"):
        prepare_model_folder(out)
    rec = {}

    def record(k):
        rec[k] = Recorder()
        return rec[k]

    results = train_ensemble([], classes, out, members=3, max_members=3, resume=True,
                             callbacks_for=record, **kwargs)
    assert sorted(rec) == [2, 3] and len(results) == 2
    assert {e for e, _ in rec[2].losses} == {2}  # member 2 went on from its second epoch
    assert len(read_config(out)["members"]) == 3
    prepare_model_folder(out, overwrite=True)
    assert not (out / "members").exists()


def test_members_from_the_command_line_train_predict_and_refuse_bad_counts(cli, tmp_path,
                                                                            synthetic_project):
    out = tmp_path / "ens"
    code, stdout, stderr = cli("train", synthetic_project, "--out", out, "--base", "4",
                               "--members", "2", *TINY_TRAIN)
    assert code == 0, stderr
    assert "member 2 of the ensemble (seed 1, of 2)" in stderr
    assert "2 members, their maps averaged" in " ".join(stdout.split())
    members = read_config(out)["training"]["members"]
    assert [m["config"]["seed"] for m in members] == [0, 1]
    code, stdout, stderr = cli("predict", out, synthetic_project, "--out", tmp_path / "p",
                               "--device", "cpu")
    assert code == 0, stderr
    assert "ensemble of 2 s-drdin" in stdout
    code, _, stderr = cli("train", synthetic_project, "--out", tmp_path / "init", "--init", out,
                          *TINY_TRAIN)
    assert code == 1 and "not an ensemble; pass one of its members" in stderr
    for value, message in (("0", "give at least 1"), ("two", "neither a number nor 'auto'")):
        code, _, stderr = cli("train", synthetic_project, "--out", tmp_path / value,
                              "--members", value, *TINY_TRAIN)
        assert code == 1 and message in stderr
    code, _, stderr = cli("train", synthetic_project, "--out", tmp_path / "sep", "--model",
                          "separate", "--members", "2", *TINY_TRAIN)
    assert code == 1 and "ensembles are for single networks" in stderr


def test_under_torchrun_an_ensemble_of_several_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    classes, data = tiny_data(2, 96)
    with pytest.raises(QpcellError, match="under torchrun give --members 1"):
        train_ensemble([], classes, tmp_path / "m", members=2, max_members=3,
                       **_kwargs(data, epochs=1))
    assert not (tmp_path / "m").exists()
