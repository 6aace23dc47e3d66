"""Few images: the end of a run trains on every image once the settings are chosen."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

import qpcell.train as train_module
from qpcell.checkpoint import read_config
from qpcell.config import PatchConfig, TrainConfig
from qpcell.errors import QpcellError
from qpcell.synthetic import synthetic_dataset
from qpcell.train import (
    TrainCallbacks,
    TrainImage,
    TrainingInterrupted,
    epoch_dir,
    refit_epoch,
    refits,
    train,
)

PATCH = replace(PatchConfig(), size=64, stride=64, background_fraction=0.0)


def tiny_data(n: int = 3, size: int = 96):
    pairs = synthetic_dataset(n, (size, size), 3, seed=0)
    return pairs[0][0].classes, [TrainImage(a.name, im, a.xy, a.labels, None)
                                 for a, im in pairs]


class Calls(TrainCallbacks):
    def __init__(self, stop_at: tuple[int, int] | None = None):
        self.notes: list[str] = []
        self.stop_at = stop_at

    def on_batch(self, epoch, step, loss, progress=None, seconds_left=None):
        if self.stop_at == (epoch, step):
            raise KeyboardInterrupt

    def on_note(self, text):
        self.notes.append(text)


@pytest.fixture
def loaded(monkeypatch):
    """The names of the images each round's loader draws from."""
    seen: list[list[str]] = []
    real = train_module._loader

    def spy(run, train_set, *args, **kwargs):
        seen.append(sorted(d.name for d in train_set))
        return real(run, train_set, *args, **kwargs)

    monkeypatch.setattr(train_module, "_loader", spy)
    return seen


def test_the_refit_applies_to_few_images_with_a_validation_set():
    cfg = replace(TrainConfig(), refit_share=0.25, refit_max_images=30)
    assert refits(cfg, 10, 3)
    assert refits(cfg, 30, 9)
    assert not refits(cfg, 31, 9)  # many images: the validation images are not missed
    assert not refits(cfg, 10, 0)  # nothing was held back
    assert not refits(replace(cfg, refit_share=0.0), 10, 3)
    with pytest.raises(QpcellError, match="refit share"):
        refits(replace(cfg, refit_share=1.0), 10, 3)
    assert refit_epoch(replace(cfg, epochs=10)) == 8  # epochs 8-10 are the last 25%
    assert refit_epoch(replace(cfg, epochs=4, refit_share=0.5)) == 3
    assert refit_epoch(replace(cfg, epochs=1)) is None  # no validated epoch would come first


def test_epochs_refit_trains_on_every_image_with_the_settings_chosen_before(tmp_path, loaded):
    classes, data = tiny_data(3)
    calls = Calls()
    cfg = replace(TrainConfig(), epochs=4, seed=0, refit_share=0.5, keep_epochs=True)
    result = train([], classes, tmp_path / "m", model_kwargs={"base": 4}, model_mpp=None,
                   prepared=data, train_cfg=cfg, patch_cfg=PATCH, device="cpu",
                   max_steps_per_epoch=2, val_names=[data[0].name], callbacks=calls)
    everyone = sorted(d.name for d in data)
    assert loaded[:2] == [everyone[1:]] * 2 and loaded[2:] == [everyone] * 2
    assert [math.isnan(h.val_f1) for h in result.history] == [False, False, True, True]
    assert result.best_epoch == 4 and result.refit_after_round == 2
    assert (result.val_f1, result.val_class_f1) == (result.history[1].val_f1,
                                                     result.history[1].val_class_f1)
    assert any("trains on all 3" in n for n in calls.notes)
    config = read_config(result.model_dir)
    assert config["training"]["refit_after_round"] == 2
    assert config["postprocess"] == read_config(epoch_dir(result.model_dir, 2))["postprocess"]
    assert ((result.model_dir / "weights.safetensors").read_bytes()
            == (epoch_dir(result.model_dir, 4) / "weights.safetensors").read_bytes())
    log = (result.model_dir / "train_log.txt").read_text().splitlines()
    assert "all images (refit)" in log[3] and "val_f1" in log[1]


def test_no_refit_with_many_images_or_none_held_back(tmp_path, loaded):
    classes, data = tiny_data(3)
    cfg = replace(TrainConfig(), epochs=2, seed=0, refit_share=0.5, refit_max_images=2)
    result = train([], classes, tmp_path / "m", model_kwargs={"base": 4}, model_mpp=None,
                   prepared=data, train_cfg=cfg, patch_cfg=PATCH, device="cpu",
                   max_steps_per_epoch=1, val_names=[data[0].name])
    assert result.refit_after_round is None and len(set(map(tuple, loaded))) == 1
    assert read_config(result.model_dir)["training"]["refit_after_round"] is None


def test_a_time_budget_refit_ends_on_time_and_on_every_image(tmp_path, loaded):
    from qpcell.recipe import recipe

    classes, data = tiny_data(4)
    rec = recipe("fast", "s-drdin")
    budget = 12.0
    result = train([], classes, tmp_path / "m", model_kwargs={**rec.model_kwargs, "base": 4},
                   model_mpp=None, prepared=data, val_names=[data[0].name], device="cpu",
                   train_cfg=replace(rec.train, time_budget_s=budget, seed=0,
                                     refit_share=0.3),
                   mask_cfg=rec.mask, patch_cfg=replace(rec.patch, size=64))
    assert budget * 0.6 <= result.seconds <= budget * 1.25 + 1.0
    validated = [h for h in result.history if not math.isnan(h.val_f1)]
    assert validated and math.isnan(result.history[-1].val_f1)
    assert result.refit_after_round == validated[-1].epoch
    assert result.best_epoch == result.history[-1].epoch
    assert loaded[-1] == sorted(d.name for d in data)
    assert result.history[-1].lr < 0.3 * rec.train.lr  # the schedule still runs out


def test_ctrl_c_in_the_refit_keeps_the_validated_model_and_resume_refits(tmp_path, loaded):
    classes, data = tiny_data(3)
    kwargs = dict(model_kwargs={"base": 4}, model_mpp=None, prepared=data, patch_cfg=PATCH,
                  device="cpu", max_steps_per_epoch=2, val_names=[data[0].name],
                  train_cfg=replace(TrainConfig(), epochs=4, seed=0, refit_share=0.5))
    with pytest.raises(TrainingInterrupted):
        train([], classes, tmp_path / "m", callbacks=Calls(stop_at=(3, 2)), **kwargs)
    kept = read_config(tmp_path / "m")["training"]
    assert kept["refit_after_round"] is None and kept["epoch"] <= 2  # a validated round
    loaded.clear()
    result = train([], classes, tmp_path / "m", resume=True, **kwargs)
    assert loaded == [sorted(d.name for d in data)] * 2  # epochs 3 and 4, on every image
    assert result.refit_after_round == 2 and result.best_epoch == 4


def test_the_refit_crops_the_extra_maps_of_every_image(tmp_path):
    """MTL-IHC's tissue prior comes as one map per image: a refit needs the validation images'
    maps too, each with its own image."""
    import numpy as np

    classes, data = tiny_data(3)
    maps = {d.name: np.full((1, *d.pixels.shape[:2]), i, np.float32)
            for i, d in enumerate(data)}
    seen: list[set] = []
    real = train_module._loader

    def spy(run, train_set, windows, patch_cfg, train_cfg, extra):
        loader = real(run, train_set, windows, patch_cfg, train_cfg, extra)
        values = set()
        for k, (_, targets) in enumerate(loader):
            values |= set(np.unique(targets["prior"].numpy()).tolist())
            if k == 3:
                break
        seen.append(values)
        return real(run, train_set, windows, patch_cfg, train_cfg, extra)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(train_module, "_loader", spy)
    try:
        train([], classes, tmp_path / "m", model_kwargs={"base": 4}, model_mpp=None,
              prepared=data, train_cfg=replace(TrainConfig(), epochs=2, seed=0,
                                               refit_share=0.5),
              patch_cfg=PATCH, device="cpu", max_steps_per_epoch=1, val_names=[data[0].name],
              extra_maps=maps, extra_key="prior")
    finally:
        monkey.undo()
    assert seen[0] <= {1.0, 2.0} and seen[1] <= {0.0, 1.0, 2.0}
    assert 0.0 in seen[1]  # the validation image (maps of 0) is drawn in the refit
