"""Training loop, checkpoints and resume, on tiny synthetic data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from qpcell.checkpoint import load_model, read_config
from qpcell.config import PatchConfig, TrainConfig
from qpcell.errors import QpcellError
from qpcell.metrics import score_dataset
from qpcell.models.cell_classifier import base_spec
from qpcell.synthetic import synthetic_dataset
from qpcell.train import (
    EpochSummary,
    TrainCallbacks,
    TrainImage,
    TrainingInterrupted,
    epoch_dir,
    estimate_source_mpp,
    pick_epoch,
    selection_key,
    split_names,
    train,
)

PATCH = replace(PatchConfig(), size=96, stride=64, background_fraction=0.0)


def tiny_data(n: int = 3, size: int = 128, seed: int = 0):
    pairs = synthetic_dataset(n, (size, size), 3, seed=seed)
    classes = pairs[0][0].classes
    prepared = [TrainImage(a.name, im, a.xy, a.labels, None) for a, im in pairs]
    return classes, prepared


def test_split_is_seeded_by_image_and_seven_to_three():
    names = [f"im{i}" for i in range(10)]
    train_a, val_a = split_names(names, 0.3, seed=1)
    train_b, val_b = split_names(names, 0.3, seed=1)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 3 and len(train_a) == 7
    assert not set(train_a) & set(val_a)
    assert any(split_names(names, 0.3, seed=k)[1] != val_a for k in (2, 3))
    tr, va = split_names(names, 0.3, seed=0, val_names=["im4", "im9"])
    assert va == ["im4", "im9"] and len(tr) == 8
    with pytest.raises(QpcellError, match="im11"):
        split_names(names, 0.3, seed=0, val_names=["im11"])


class Recorder(TrainCallbacks):
    def __init__(self, stop_at: tuple[int, int] | None = None):
        self.losses: list[tuple[int, float]] = []
        self.stop_at = stop_at

    def on_batch(self, epoch, step, loss, progress=None, seconds_left=None):
        if self.stop_at == (epoch, step):
            raise KeyboardInterrupt
        self.losses.append((epoch, loss))


def test_training_loss_falls_and_model_finds_its_cells(tmp_path):
    torch.manual_seed(0)
    classes, data = tiny_data(8, 128)
    rec = Recorder()
    result = train([], classes, tmp_path / "m", model_name="s-drdin",
                   model_kwargs={"base": 8}, model_mpp=None, prepared=data,
                   train_cfg=replace(TrainConfig(), epochs=20, batch_size=4, seed=0),
                   patch_cfg=PATCH, val_names=[data[0].name], callbacks=rec, device="cpu")
    first = np.mean([v for e, v in rec.losses if e == 1])
    last = np.mean([v for e, v in rec.losses if e == 20])
    assert last < 0.5 * first
    bundle = load_model(result.model_dir, device="cpu")
    found = []
    for d in data[1:]:  # the images it was trained on
        det, cls = bundle.predict_maps(d.pixels[None])
        found.append(bundle.to_detections(det[0], cls[0]))
    report = score_dataset(list(zip(found, data[1:], strict=True)), [c.name for c in classes],
                           5.0)
    assert report.detection.f1 > 0.85, report.detection
    config = read_config(result.model_dir)
    assert config["training"]["epoch"] == result.best_epoch
    assert 0 < config["postprocess"]["threshold"] < 1
    assert [c["name"] for c in config["classes"]] == [c.name for c in classes]
    log = (result.model_dir / "train_log.txt").read_text().splitlines()
    assert len(log) == 20 and log[0].startswith("epoch 1 steps")


def test_training_is_reproducible_on_cpu(tmp_path):
    classes, data = tiny_data(2, 96)
    runs = []
    for k in range(2):
        rec = Recorder()
        train([], classes, tmp_path / f"m{k}", model_kwargs={"base": 4}, model_mpp=None,
              prepared=data, train_cfg=replace(TrainConfig(), epochs=1, seed=3),
              patch_cfg=PATCH, callbacks=rec, device="cpu", max_steps_per_epoch=3)
        runs.append([v for _, v in rec.losses])
    assert runs[0] == runs[1]


def test_ctrl_c_saves_resumable_state_and_resume_finishes(tmp_path):
    classes, data = tiny_data(2, 96)
    kwargs = dict(model_kwargs={"base": 4}, model_mpp=None, prepared=data,
                  train_cfg=replace(TrainConfig(), epochs=3, seed=0), patch_cfg=PATCH,
                  device="cpu", max_steps_per_epoch=2)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train([], classes, tmp_path / "m", callbacks=Recorder(stop_at=(2, 1)), **kwargs)
    assert (tmp_path / "m" / "resume.pt").exists()
    assert len((tmp_path / "m" / "train_log.txt").read_text().splitlines()) == 1
    rec = Recorder()
    result = train([], classes, tmp_path / "m", callbacks=rec, resume=True, **kwargs)
    assert {e for e, _ in rec.losses} == {2, 3}
    assert [h.epoch for h in result.history] == [1, 2, 3]


def test_resume_without_state_is_a_clear_error(tmp_path):
    classes, data = tiny_data(1, 96)
    with pytest.raises(QpcellError, match="nothing to resume"):
        train([], classes, tmp_path / "m", model_mpp=None, prepared=data, resume=True,
              device="cpu")


@pytest.fixture
def saved_model(tmp_path):
    classes, data = tiny_data(1, 96)
    train([], classes, tmp_path / "m", model_kwargs={"base": 4}, model_mpp=None, prepared=data,
          train_cfg=replace(TrainConfig(), epochs=1), patch_cfg=PATCH, device="cpu",
          max_steps_per_epoch=1)
    return tmp_path / "m", data


def test_checkpoint_round_trip_gives_identical_maps(saved_model):
    folder, data = saved_model
    a = load_model(folder, device="cpu")
    b = load_model(folder, device="cpu")
    det_a, cls_a = a.predict_maps(data[0].pixels[None])
    det_b, cls_b = b.predict_maps(data[0].pixels[None])
    assert det_a.shape == (1, 96, 96) and cls_a.shape == (1, 3, 96, 96)
    np.testing.assert_array_equal(det_a, det_b)
    np.testing.assert_array_equal(cls_a, cls_b)
    assert a.name == "s-drdin" and a.mpp is None


def test_corrupt_or_foreign_checkpoints_give_clear_errors(saved_model, tmp_path):
    folder, _ = saved_model
    with pytest.raises(QpcellError, match="not a qpcell model"):
        load_model(tmp_path / "nowhere")
    weights = folder / "weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(QpcellError, match="corrupt model weights"):
        load_model(folder)
    weights.write_bytes(good)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["base"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QpcellError, match="do not fit"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(QpcellError, match="corrupt model description"):
        load_model(folder)


def test_precision_chooses_bf16_only_where_asked_or_native(monkeypatch):
    from qpcell import device as dev

    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    assert dev.autocast_dtype(cpu) is None
    assert dev.autocast_dtype(cpu, "bf16") == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    assert dev.autocast_dtype(cpu) == torch.bfloat16
    assert dev.autocast_dtype(cpu, "fp32") is None
    with pytest.raises(QpcellError, match="unknown precision 'fp8'"):
        dev.autocast_dtype(cpu, "fp8")


def test_benchmarks_name_the_cpu_with_its_family_and_model():
    from qpcell.device import name_from_cpuinfo

    amd = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu avx2\n\nprocessor\t: 1\n"
           "cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n")
    assert name_from_cpuinfo(amd) == "AMD EPYC (family 25, model 1)"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n"
    assert name_from_cpuinfo(arm) and "family" not in name_from_cpuinfo(arm)


def test_models_train_channels_last_under_autocast_and_nchw_in_float32():
    from qpcell.device import training_layout

    for device in ("cpu", "cuda"):
        assert training_layout(torch.device(device), torch.bfloat16) == torch.channels_last
        assert training_layout(torch.device(device), None) == torch.contiguous_format
    assert training_layout(torch.device("mps"), torch.bfloat16) == torch.contiguous_format


def test_bf16_and_fp32_training_both_run_and_differ(tmp_path):
    classes, data = tiny_data(2, 96)
    losses = {}
    for precision in ("fp32", "bf16"):
        rec = Recorder()
        result = train([], classes, tmp_path / precision, model_kwargs={"base": 4},
                       model_mpp=None, prepared=data,
                       train_cfg=replace(TrainConfig(), epochs=1, seed=3, precision=precision),
                       patch_cfg=PATCH, callbacks=rec, device="cpu", max_steps_per_epoch=3)
        losses[precision] = [v for _, v in rec.losses]
        # the saved weights load (channels-last training must not leak into the file)
        load_model(result.model_dir, device="cpu")
        assert read_config(result.model_dir)["training"]["config"]["precision"] == precision
    assert losses["fp32"][0] == pytest.approx(losses["bf16"][0], rel=0.05)
    assert losses["fp32"] != losses["bf16"]


def test_cosine_schedule_falls_from_the_paper_rate_and_constant_stays():
    from qpcell.train import epoch_lr

    cfg = replace(TrainConfig(), epochs=10, lr=1e-3, lr_schedule="cosine")
    rates = [epoch_lr(cfg, e) for e in range(1, 11)]
    assert rates[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert 0 < rates[-1] < 0.03e-3
    assert epoch_lr(replace(cfg, lr_schedule="constant"), 7) == 1e-3
    with pytest.raises(QpcellError, match="unknown learning-rate schedule 'step'"):
        epoch_lr(replace(cfg, lr_schedule="step"), 1)


def test_decoupled_weight_decay_shrinks_only_the_weight_tensors():
    from qpcell.train import make_optimizer

    def step(decoupled: bool) -> tuple[torch.nn.Module, dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
        with torch.no_grad():
            model[1].bias.fill_(0.5)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cfg = replace(TrainConfig(), lr=0.1, weight_decay=0.5, decoupled_weight_decay=decoupled)
        opt = make_optimizer(model, cfg)
        for p in model.parameters():  # no gradient: only the decay moves a parameter
            p.grad = torch.zeros_like(p)
        opt.step()
        return model, before

    model, before = step(True)
    torch.testing.assert_close(model[0].weight, before["0.weight"] * (1 - 0.1 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(model.state_dict()[name], before[name]), name
    model, before = step(False)  # Adam's L2 term moves every parameter, biases included
    assert not torch.equal(model[1].bias, before["1.bias"])
    assert not torch.allclose(model[0].weight, before["0.weight"] * (1 - 0.1 * 0.5))


def summary(epoch: int, f1: float, class_f1: float) -> EpochSummary:
    return EpochSummary(epoch, 1.0, {}, f1, class_f1, 0.5, 1.0, False)


def test_selection_rules_pick_detection_or_the_mean_of_both():
    history = [summary(1, 0.80, 0.70), summary(2, 0.86, 0.60), summary(3, 0.84, 0.80),
               summary(4, 0.84, 0.80)]
    assert pick_epoch(history, "detection") == 2
    assert pick_epoch(history, "combined") == 3  # epochs 3 and 4 tie: the first is kept
    assert pick_epoch(history, "combined", classifies=False) == 2
    assert selection_key(0.8, 0.6, "combined") == pytest.approx((0.7, 0.8))
    assert selection_key(0.8, 0.6, "detection") == (0.8, 0.6)
    # detection ties are broken by classification
    assert pick_epoch([summary(1, 0.8, 0.5), summary(2, 0.8, 0.6)], "detection") == 2
    with pytest.raises(QpcellError, match="unknown model selection 'loss'"):
        pick_epoch(history, "loss")
    with pytest.raises(QpcellError, match="no epochs"):
        pick_epoch([], "detection")


def test_keep_epochs_saves_each_epoch_and_the_kept_one_follows_the_rule(tmp_path):
    classes, data = tiny_data(3, 96)
    cfg = replace(TrainConfig(), epochs=3, seed=0, select_on="combined", keep_epochs=True)
    result = train([], classes, tmp_path / "m", model_kwargs={"base": 4}, model_mpp=None,
                   prepared=data, train_cfg=cfg, patch_cfg=PATCH, device="cpu",
                   max_steps_per_epoch=2, val_names=[data[0].name])
    assert result.best_epoch == pick_epoch(result.history, "combined")
    kept = result.history[result.best_epoch - 1]
    assert (result.val_f1, result.val_class_f1) == (kept.val_f1, kept.val_class_f1)
    for h in result.history:
        config = read_config(epoch_dir(result.model_dir, h.epoch))
        assert config["training"]["epoch"] == h.epoch
        assert config["training"]["val_f1"] == h.val_f1
    # the model folder holds exactly the kept epoch's weights and settings
    kept_dir = epoch_dir(result.model_dir, result.best_epoch)
    assert ((result.model_dir / "weights.safetensors").read_bytes()
            == (kept_dir / "weights.safetensors").read_bytes())
    assert read_config(result.model_dir)["postprocess"] == read_config(kept_dir)["postprocess"]
    assert not (result.model_dir / "epochs" / "epoch-004").exists()


def test_resume_reads_a_state_saved_before_selection_was_a_choice(tmp_path):
    classes, data = tiny_data(2, 96)
    kwargs = dict(model_kwargs={"base": 4}, model_mpp=None, prepared=data, patch_cfg=PATCH,
                  device="cpu", max_steps_per_epoch=2)
    train([], classes, tmp_path / "m", train_cfg=replace(TrainConfig(), epochs=1), **kwargs)
    path = tmp_path / "m" / "resume.pt"
    state = torch.load(path, weights_only=True)
    old = json.loads(state["best"])
    state["best"] = json.dumps({"key": old["key"], "epoch": old["epoch"],
                                "setting": old["setting"]})  # the format of earlier versions
    torch.save(state, path)
    result = train([], classes, tmp_path / "m", resume=True,
                   train_cfg=replace(TrainConfig(), epochs=2, select_on="combined"), **kwargs)
    assert [h.epoch for h in result.history] == [1, 2]
    assert result.best_epoch == pick_epoch(result.history, "combined")


def test_a_run_started_without_decoupled_decay_resumes_with_it_and_keeps_its_moments(tmp_path):
    from qpcell.train import make_optimizer, regroup_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    old = make_optimizer(model, TrainConfig())  # one group, as every run before
    model(torch.randn(2, 1, 6, 6)).square().mean().backward()
    old.step()
    saved = old.state_dict()
    new = make_optimizer(model, replace(TrainConfig(), weight_decay=0.05,
                                        decoupled_weight_decay=True))
    new.load_state_dict(regroup_optimizer_state(saved, new, list(model.parameters())))
    for p in model.parameters():
        torch.testing.assert_close(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    assert [g["weight_decay"] for g in new.param_groups] == [0.05, 0.0]

    classes, data = tiny_data(2, 96)
    kwargs = dict(model_kwargs={"base": 4}, model_mpp=None, prepared=data, patch_cfg=PATCH,
                  device="cpu", max_steps_per_epoch=2)
    train([], classes, tmp_path / "m", train_cfg=replace(TrainConfig(), epochs=1), **kwargs)
    result = train([], classes, tmp_path / "m", resume=True, **kwargs,
                   train_cfg=replace(TrainConfig(), epochs=2, weight_decay=0.05,
                                     decoupled_weight_decay=True))
    assert [h.epoch for h in result.history] == [1, 2]


def test_a_time_budget_ends_on_time_with_the_schedule_run_out(tmp_path):
    from qpcell.recipe import recipe

    classes, data = tiny_data(4, 96)
    rec = recipe("fast", "s-drdin")
    budget = 12.0
    result = train([], classes, tmp_path / "m", model_kwargs={**rec.model_kwargs, "base": 4},
                   model_mpp=None, prepared=data, val_names=[data[0].name],
                   train_cfg=replace(rec.train, time_budget_s=budget, seed=0),
                   mask_cfg=rec.mask, patch_cfg=replace(rec.patch, size=64), device="cpu")
    assert result.seconds <= budget * 1.25 + 1.0
    assert result.seconds >= budget * 0.6
    assert len(result.history) >= 1  # the cadence itself: tests/test_schedule.py
    lrs = [h.lr for h in result.history]
    assert lrs[-1] < 0.3 * rec.train.lr  # the cosine ran (nearly) out by the end
    assert sum(h.steps for h in result.history) > 3
    config = read_config(result.model_dir)
    assert config["training"]["config"]["time_budget_s"] == budget
    assert base_spec(config["model"])["batch_norm"] is True
    assert config["views"] == "flips"  # tuned on, and predicting with, the four flips


def test_a_step_cap_ends_a_long_budget_early_with_the_schedule_run_out(tmp_path):
    from conftest import NoteTaker

    from qpcell.recipe import recipe

    classes, data = tiny_data(4, 96)
    rec = recipe("fast")
    said = NoteTaker()
    cfg = replace(rec.train, time_budget_s=600.0, seed=0, max_passes=1.0, min_steps=24)
    result = train([], classes, tmp_path / "m", model_name="unet",
                   model_kwargs={**rec.model_kwargs, "base": 4},
                   model_mpp=None, prepared=data, val_names=[data[0].name], train_cfg=cfg,
                   mask_cfg=rec.mask, patch_cfg=replace(rec.patch, size=64), device="cpu",
                   callbacks=said)
    assert sum(h.steps for h in result.history) == 24  # the floor: one pass is a step here
    assert result.seconds < 120  # nowhere near the 10 minutes
    assert result.history[-1].lr < 0.05 * rec.train.lr  # the cosine ran out on the cap
    assert len(result.history) >= 2  # validation rounds spread over the shortened run
    assert any("24 steps" in n and "--max-passes 0" in n for n in said.notes)


def test_the_step_cap_counts_only_the_annotated_area():
    from shapely.geometry import box

    from qpcell.train import annotated_area_px

    pixels = np.zeros((100, 200, 3), np.uint8)
    xy, labels = np.zeros((0, 2)), np.zeros(0, np.int64)
    assert annotated_area_px(TrainImage("a", pixels, xy, labels, None)) == 100 * 200
    quarter = [box(0, 0, 100, 50)]
    assert annotated_area_px(TrainImage("a", pixels, xy, labels, quarter)) == 100 * 50
    # overlapping regions count once; a region past the image edge is clipped to it
    regions = [box(0, 0, 100, 50), box(50, 0, 100, 50), box(150, 50, 400, 300)]
    assert annotated_area_px(TrainImage("a", pixels, xy, labels, regions)) == 5000 + 50 * 50


def test_each_recipe_names_the_network_it_trains():
    from qpcell.errors import QpcellError
    from qpcell.recipe import default_model, recipe

    assert default_model("fast") == "unet" and default_model("paper") == "s-drdin"
    assert recipe("fast") == recipe("fast", "unet")
    assert recipe("fast").model_kwargs == {"batch_norm": True, "class_weights": "cells"}
    # S-DRDIN's detection decoder gets the Dice term; the U-Net has no such head
    assert recipe("fast", "s-drdin").model_kwargs["det_dice"] == 1.0
    assert recipe("paper") == recipe("paper", "s-drdin")
    fast, paper = recipe("fast").train, recipe("paper").train
    assert fast.decoupled_weight_decay and fast.weight_decay == 0.0
    assert not paper.decoupled_weight_decay and paper.weight_decay == 0.0
    # neighbouring cells' classes within 10 µm are offered (the share is tuned) by the fast
    # recipe only
    post = recipe("fast").post
    assert post.context_radius_px * post.mpp == pytest.approx(10) and post.context_weight == 0
    assert recipe("paper").post.context_radius_px == 0.0
    with pytest.raises(QpcellError, match="unknown recipe 'quick'"):
        recipe("quick")


def test_fast_recipe_loss_falls_and_model_finds_its_cells(tmp_path):
    from qpcell.recipe import default_model, recipe
    from qpcell.tuning import CONTEXT_WEIGHTS

    torch.manual_seed(0)
    classes, data = tiny_data(8, 128)
    rec = recipe("fast")
    # 30 U-Net epochs take less time than S-DRDIN's 15 (24 s against 30 s on 2 cores); in 15
    # the U-Net finds the cells but has not yet told CD4+ from CD8+ (docs/RESULTS.md, "Demo")
    epochs = 30
    calls = Recorder()
    result = train([], classes, tmp_path / "m", model_name=default_model("fast"),
                   model_kwargs={**rec.model_kwargs, "base": 8},
                   model_mpp=None, prepared=data, val_names=[data[0].name], callbacks=calls,
                   train_cfg=replace(rec.train, epochs=epochs, seed=0), mask_cfg=rec.mask,
                   post_cfg=rec.post, patch_cfg=replace(rec.patch, size=96, stride=32),
                   device="cpu")
    first = np.mean([v for e, v in calls.losses if e == 1])
    last = np.mean([v for e, v in calls.losses if e == epochs])
    assert last < 0.6 * first
    bundle = load_model(result.model_dir, device="cpu")
    # the saved model takes the share of its neighbours' classes that validation chose
    assert bundle.postprocess.context_weight in CONTEXT_WEIGHTS
    assert bundle.postprocess.context_radius_px == pytest.approx(10 / 0.44)
    found = [bundle.to_detections(*(m[0] for m in bundle.predict_maps(d.pixels[None])))
             for d in data[1:]]
    report = score_dataset(list(zip(found, data[1:], strict=True)), [c.name for c in classes],
                           5.0)
    assert report.detection.f1 > 0.85, report.detection
    assert report.classification.weighted_f1 > 0.8, report.classification


def test_images_without_pixel_size_are_scaled_by_their_nuclei(tmp_path):
    from PIL import Image

    from qpcell.points import AnnotatedImage
    from qpcell.predict import Predictor

    pairs = synthetic_dataset(3, (128, 128), 3, seed=1)
    anns = []
    for a, im in pairs:
        path = tmp_path / f"{a.name}.png"
        Image.fromarray(im).save(path)
        anns.append(AnnotatedImage(a.name, path, a.xy, a.labels, a.classes))
    notes = []

    class Notes(TrainCallbacks):
        def on_note(self, text):
            notes.append(text)

    result = train(anns, anns[0].classes, tmp_path / "m", model_kwargs={"base": 4},
                   model_mpp=0.44, train_cfg=replace(TrainConfig(), epochs=1), patch_cfg=PATCH,
                   device="cpu", max_steps_per_epoch=1, callbacks=Notes())
    source = read_config(result.model_dir)["training"]["source_mpp"]
    assert source["how"] == "estimated" and source["images"] == 3
    assert source["value"] == pytest.approx(2.0 / source["nucleus_radius_px"], rel=1e-3)
    assert result.mpp == 0.44
    assert any("carry no pixel size" in n and "µm/px" in n for n in notes)
    predictor = Predictor.from_bundle(load_model(result.model_dir, device="cpu"))
    # prediction reads such images at exactly the scale training used, not a rounded one
    assert predictor.source_mpp == estimate_source_mpp(anns, 0.44, None)[0]
    # --mpp wins over the estimate, and is recorded as given
    given = train(anns, anns[0].classes, tmp_path / "g", model_kwargs={"base": 4},
                  model_mpp=0.44, fallback_mpp=0.5, train_cfg=replace(TrainConfig(), epochs=1),
                  patch_cfg=PATCH, device="cpu", max_steps_per_epoch=1)
    assert read_config(given.model_dir)["training"]["source_mpp"] == {"how": "given",
                                                                      "value": 0.5}
