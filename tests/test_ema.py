"""The weights' moving average: its decay, its arithmetic, and what training validates and keeps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from qpcell.config import PatchConfig, TrainConfig
from qpcell.ema import ema_decay, make_ema
from qpcell.errors import QpcellError
from qpcell.synthetic import synthetic_dataset
from qpcell.train import TrainImage, train


def test_decay_warms_up_then_holds():
    ds = [ema_decay(0.99, n) for n in range(2000)]
    assert ds[0] == pytest.approx(0.1) and ds[10] == pytest.approx(11 / 20)
    assert all(a <= b for a, b in zip(ds, ds[1:], strict=False))
    assert max(ds) == 0.99 and ds[-1] == 0.99
    assert ema_decay(0.5, 0) == pytest.approx(0.1) and ema_decay(0.5, 100) == 0.5


def test_average_follows_the_rule_for_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ema = make_ema(model, 0.9)
    ema.update_parameters(model)  # the first update copies
    w0 = model[0].weight.detach().clone()
    assert torch.equal(ema.module[0].weight, w0)
    expected = w0.clone()
    for n in range(1, 40):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()(torch.randn(4, 1, 5, 5))  # moves the running statistics
        ema.update_parameters(model)
        d = ema_decay(0.9, n)
        expected = d * expected + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.module[0].weight, expected, atol=1e-5)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    # the statistics are averaged, not copied; the batch count is copied
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked == 39


def test_a_decay_outside_0_1_is_refused():
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(QpcellError, match="EMA decay"):
            make_ema(torch.nn.Linear(2, 2), bad)


def test_training_validates_and_keeps_the_average(tmp_path):
    pairs = synthetic_dataset(3, (96, 96), 3, seed=0)
    classes = pairs[0][0].classes
    data = [TrainImage(a.name, im, a.xy, a.labels, None) for a, im in pairs]
    patch = replace(PatchConfig(), size=64, stride=32, background_fraction=0.0)
    cfg = replace(TrainConfig(), epochs=2, seed=0, ema_decay=0.9, keep_epochs=True)
    kwargs = dict(model_name="unet", model_kwargs={"base": 4}, model_mpp=None, prepared=data,
                  patch_cfg=patch, device="cpu", max_steps_per_epoch=3,
                  val_names=[data[0].name])
    result = train([], classes, tmp_path / "m", train_cfg=cfg, **kwargs)
    state = torch.load(tmp_path / "m" / "resume.pt", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in state["ema"].items()
                if k.startswith("module.")}
    raw = state["model"]
    last = load_file(tmp_path / "m" / "epochs" / "epoch-002" / "weights.safetensors")
    name = next(k for k in raw if k.endswith("weight") and raw[k].ndim == 4)
    steps = sum(h.steps for h in result.history)
    # the saved round is the average of every step's weights, not the raw weights
    assert torch.equal(last[name], averaged[name])
    assert not torch.equal(averaged[name], raw[name])
    assert steps >= 4 and int(state["ema"]["n_averaged"]) == steps
    # resume carries the average on
    more = train([], classes, tmp_path / "m", resume=True,
                 train_cfg=replace(cfg, epochs=3), **kwargs)
    state = torch.load(tmp_path / "m" / "resume.pt", weights_only=True)
    assert int(state["ema"]["n_averaged"]) == steps + more.history[-1].steps
    assert [h.epoch for h in more.history] == [1, 2, 3]
    assert result.best_epoch in (1, 2)
