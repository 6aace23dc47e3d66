"""Models: shapes, registry, initialisation, stop-gradient and a tiny overfit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from qpcell.errors import QpcellError
from qpcell.losses import (
    bce_loss,
    cell_balanced_cross_entropy,
    cross_entropy,
    weighted_cross_entropy,
)
from qpcell.masks import sdrdin_targets
from qpcell.models import MODEL_NAMES, count_parameters, create_model, gmacs
from qpcell.models.sdrdin import SDRDIN, default_dense

C = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and stay fast when other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _targets(n_classes=C, size=32, batch=1, labels=None):
    xy = np.array([[8.0, 8.0], [20.0, 12.0], [12.0, 25.0]])
    labels = np.arange(3) % n_classes if labels is None else np.asarray(labels)
    t = sdrdin_targets(xy, labels, n_classes, (size, size))
    return {k: torch.from_numpy(v)[None].repeat(batch, 1, 1, 1) for k, v in t.items()}


def test_registry():
    assert set(MODEL_NAMES) >= {"s-drdin", "s-drdin-gradient", "drdin-detection",
                                "drdin-classification", "unet"}
    with pytest.raises(QpcellError, match="unknown model"):
        create_model("no-such-model", 3)
    with pytest.raises(QpcellError, match="s-drdin"):
        create_model("s-drdin", 3, no_such_option=1)


@pytest.mark.parametrize("name", ["s-drdin", "s-drdin-gradient", "drdin-detection",
                                  "drdin-classification", "unet"])
def test_shapes_maps_loss_and_spec(name):
    torch.manual_seed(0)
    m = create_model(name, C, base=4)
    x = torch.rand(2, 3, 32, 48)
    out = m(x)
    has_cls = name != "drdin-detection"
    has_det = name in ("s-drdin", "s-drdin-gradient", "drdin-detection")
    assert ("cls_logits" in out) == has_cls and ("det_logits" in out) == has_det
    if has_cls:
        assert out["cls_logits"].shape == (2, C + 1, 32, 48)
    if has_det:
        assert out["det_logits"].shape == (2, 1, 32, 48)
    det, cls = (v if v is None else v.detach() for v in m.maps(out))
    assert det.shape == (2, 32, 48) and float(det.min()) >= 0 and float(det.max()) <= 1
    if has_cls:
        assert cls.shape == (2, C, 32, 48)
        p = torch.softmax(out["cls_logits"].detach(), dim=1)
        assert torch.allclose(cls, p[:, :C])
        if not has_det:
            assert torch.allclose(det, 1 - p[:, C], atol=1e-6)
    else:
        assert cls is None
    t = {k: torch.cat([v, v[:, :, :, :16]], dim=-1).repeat(2, 1, 1, 1)
         for k, v in _targets().items()}
    total, parts = m.loss(out, t)
    assert total.ndim == 0 and torch.isfinite(total)
    assert all(isinstance(v, float) for v in parts.values())
    assert math.isclose(total.item(), sum(parts.values()), rel_tol=1e-5)
    spec = m.spec()
    assert spec["name"] == name and spec["n_classes"] == C
    rebuilt = create_model(**json.loads(json.dumps(spec)))
    assert rebuilt.spec() == spec and count_parameters(rebuilt) == count_parameters(m)
    with pytest.raises(QpcellError, match="multiple"):
        m(torch.rand(1, 3, 30, 32))


def test_paper_configuration():
    m = create_model("s-drdin", 6)
    assert [b.width for b in m.encoder.blocks] == [16, 32, 64, 128]
    assert [lv.block.width for lv in m.cls_decoder.levels] == [64, 32, 16]
    # DRDIN's dense skips: e0 avg-pooled 4x4 into the deepest decoder level, e2 upsampled
    # into the next one -> inception inputs of 64+64+16, 32+32+32 and 16+16 channels
    assert default_dense(4) == [(0, 2), (2, 1)]
    assert [lv.block.in_channels for lv in m.det_decoder.levels] == [144, 96, 32]
    assert isinstance(m.cls_decoder.levels[0].dense[0], nn.AvgPool2d)
    assert m.cls_decoder.levels[1].dense[0].stride == (2, 2)
    head = [mod for mod in m.det_head if isinstance(mod, nn.Conv2d)]
    assert [(h.in_channels, h.kernel_size) for h in head] == [(32, (3, 3)), (16, (3, 3)),
                                                              (16, (1, 1))]
    assert m.cls_head.out_channels == 7 and m.cls_head.kernel_size == (1, 1)
    assert gmacs(m, 64) > 0 and count_parameters(m) > 0


def test_glorot_uniform_init():
    torch.manual_seed(0)
    for name in (n for n in MODEL_NAMES if n != "mtl-ihc"):  # DeepLabv3+: He init + BN
        m = create_model(name, C, base=8)
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d):
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(mod.weight)
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                assert float(mod.weight.detach().abs().max()) <= bound + 1e-7
                assert torch.all(mod.bias == 0)
    big = create_model("s-drdin", C).encoder.blocks[3].b2.weight  # 128 x 128 x 3 x 3
    bound = math.sqrt(6.0 / (2 * 128 * 9))
    assert abs(float(big.detach().std()) - bound / math.sqrt(3)) < 0.02 * bound


def _encoder_grads(m: SDRDIN) -> list[float]:
    """Sum of |grad| per encoder block (0 where no gradient arrived)."""
    return [sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0
                for p in b.parameters()) for b in m.encoder.blocks]


def _det_backward(m: SDRDIN) -> None:
    torch.manual_seed(1)
    out = m(torch.rand(2, 3, 32, 32))
    m.zero_grad(set_to_none=True)
    bce_loss(out["det_logits"], _targets(batch=2)["det"]).backward()


def test_stop_gradient_skips_into_detection_decoder():
    torch.manual_seed(0)
    # With the trunk (bottleneck) and the classification features also cut, the only
    # remaining way from the detection loss to the encoder would be the skips.
    cut = dict(base=4, detach_bottleneck=True, detach_cls_features=True)
    m = create_model("s-drdin", C, **cut)
    _det_backward(m)
    assert _encoder_grads(m) == [0.0, 0.0, 0.0, 0.0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.det_decoder.parameters())
    assert all(p.grad is None for p in m.cls_decoder.parameters())
    # S-DRDIN-gradient: the same cut, but skips not detached -> e0..e2 receive the
    # detection loss through the skips (e3, the bottleneck, only feeds the trunk).
    g = create_model("s-drdin-gradient", C, **cut)
    _det_backward(g)
    grads = _encoder_grads(g)
    assert all(v > 0 for v in grads[:3]) and grads[3] == 0.0


def test_stop_gradient_default_keeps_trunk_path():
    torch.manual_seed(0)
    m = create_model("s-drdin", C, base=4)
    # The detection decoder itself: skips detached, the bottleneck is its trunk.
    feats = [f.detach().requires_grad_(True) for f in m.encoder(torch.rand(1, 3, 32, 32))]
    m.det_decoder(feats, detach_skips=True).sum().backward()
    assert all(f.grad is None for f in feats[:-1])
    assert feats[-1].grad is not None and feats[-1].grad.abs().sum() > 0
    # Whole model: the detection loss reaches the encoder only through the bottleneck and the
    # classification features, as in the paper ("direct" transfer via skips is stopped).
    _det_backward(m)
    assert all(v > 0 for v in _encoder_grads(m))
    # classification loss reaches every encoder block
    m.zero_grad(set_to_none=True)
    out = m(torch.rand(2, 3, 32, 32))
    weighted_cross_entropy(out["cls_logits"], _targets(batch=2)["cls"]).backward()
    assert all(v > 0 for v in _encoder_grads(m))
    assert all(p.grad is None for p in m.det_decoder.parameters())


@pytest.mark.parametrize("weights", ["none", "batch", "cells"])
def test_unet_loss_is_cross_entropy_weighted_as_asked(weights):
    torch.manual_seed(0)
    t = _targets(batch=2, labels=[0, 0, 1])  # imbalanced, else "cells" is plain
    m = create_model("unet", C, base=4, class_weights=weights)
    out = m(torch.rand(2, 3, 32, 32))
    total, parts = m.loss(out, t)
    losses = {"none": cross_entropy, "batch": weighted_cross_entropy,
              "cells": cell_balanced_cross_entropy}
    expected = losses[weights](out["cls_logits"], t["cls"])
    assert torch.isclose(total, expected) and parts == {"ce": float(expected.detach())}
    assert not any(torch.isclose(total, f(out["cls_logits"], t["cls"]))
                   for name, f in losses.items() if name != weights)
    assert create_model(**m.spec()).class_weights == weights


def test_unet_class_weights_are_checked_and_the_old_flag_still_loads():
    assert create_model("unet", C, base=4, class_weighted=True).class_weights == "batch"
    with pytest.raises(QpcellError, match="class_weights='pixels'"):
        create_model("unet", C, base=4, class_weights="pixels")


def test_unet_class_region_trains_the_classes_on_wider_discs():
    m = create_model("unet", C, base=4, class_weights="cells", class_region=2.0)
    make = m.target_fn(3.0)
    xy, labels = np.array([[10.0, 10.0], [22.0, 12.0]]), np.array([0, 1])
    t = make(xy, labels, (32, 32))
    assert t["cls_region"].shape == (C, 32, 32)
    narrow, wide = t["cls"][:C].sum(axis=(1, 2)), t["cls_region"].sum(axis=(1, 2))
    assert (narrow > 0).tolist() == (wide > 0).tolist() == [True, True, False]
    # discs of radius 6 instead of 3 (about 4x the pixels); where they meet, the nearest wins
    assert np.all(wide >= 3.3 * narrow) and t["cls_region"].sum(axis=0).max() == 1
    assert np.array_equal(t["cls"], create_model("unet", C, base=4).target_fn(3.0)(
        xy, labels, (32, 32))["cls"])
    batch = {k: torch.from_numpy(v)[None] for k, v in t.items()}
    out = m(torch.rand(1, 3, 32, 32))
    total, _ = m.loss(out, batch)
    assert torch.isclose(total, cell_balanced_cross_entropy(out["cls_logits"], batch["cls"],
                                                            batch["cls_region"]))
    assert not torch.isclose(total, cell_balanced_cross_entropy(out["cls_logits"], batch["cls"]))
    assert create_model(**m.spec()).class_region == 2.0
    for bad in ({"class_region": 0.5, "class_weights": "cells"},
                {"class_region": 2.0, "class_weights": "none"}):
        with pytest.raises(QpcellError, match="class_region"):
            create_model("unet", C, base=4, **bad)



def test_unet_class_power_is_passed_to_the_loss_and_kept():
    torch.manual_seed(0)
    t = _targets(batch=2, labels=[0, 0, 1])
    m = create_model("unet", C, base=4, class_weights="cells", class_power=0.5)
    out = {"cls_logits": 3 * torch.randn(2, C + 1, 32, 32)}  # confident, unlike a new model
    total, _ = m.loss(out, t)
    assert torch.isclose(total, cell_balanced_cross_entropy(out["cls_logits"], t["cls"],
                                                            power=0.5))
    assert not torch.isclose(total, cell_balanced_cross_entropy(out["cls_logits"], t["cls"]))
    assert create_model(**m.spec()).class_power == 0.5
    for bad in ({"class_power": 1.5, "class_weights": "cells"},
                {"class_power": 0.5, "class_weights": "none"}):
        with pytest.raises(QpcellError, match="class_power"):
            create_model("unet", C, base=4, **bad)

def test_gmacs_counts_conv_and_transposed_conv():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2),
                      nn.Flatten(), nn.Linear(4 * 32 * 32, 10))
    expected = 16 * 16 * 8 * 3 * 9 + 16 * 16 * 8 * 4 * 4 + 10 * 4 * 32 * 32
    assert math.isclose(gmacs(m, 16) * 1e9, expected)
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["s-drdin", "s-drdin-gradient", "drdin-detection",
                                  "drdin-classification", "unet"])
def test_overfit_one_patch(name):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 0.3
    for cx, cy in [(8, 8), (20, 12), (12, 25)]:
        x[0, :, cy - 2:cy + 3, cx - 2:cx + 3] = 0.9
    t = _targets()
    m = create_model(name, C, base=8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        total, _ = m.loss(m(x), t)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0], losses
