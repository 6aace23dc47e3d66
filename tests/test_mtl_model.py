"""MTL-IHC model (paper 003): backbone compatibility, heads, losses, ablations, export."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from qpcell.errors import QpcellError
from qpcell.masks import circle_masks
from qpcell.models.mtl_ihc import MTLIHC
from qpcell.models.resnet import BACKBONES, dilate_last_stage, load_pretrained, resnet

SMALL = {"backbone": "resnet18", "channels": 16}

# torchvision's parameter counts (ImageNet models) minus the 1000-class fc layer
TORCHVISION_PARAMS = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000,
                      "resnet50": 25_557_032 - 2_049_000, "resnet101": 44_549_160 - 2_049_000}
# torchvision state-dict entries (with fc.weight and fc.bias) minus fc
TORCHVISION_KEYS = {"resnet18": 122 - 2, "resnet34": 218 - 2, "resnet50": 320 - 2,
                    "resnet101": 626 - 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is about as fast on an idle machine, far faster on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full(one_thread) -> MTLIHC:
    torch.manual_seed(0)
    return MTLIHC(2, aux=("dynamic", "prior"), **SMALL)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_matches_torchvision_layout(name):
    m = resnet(name, use_torchvision=False)
    state = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == TORCHVISION_PARAMS[name]
    assert len(state) == TORCHVISION_KEYS[name]
    assert not any(k.startswith(("fc.", "avgpool")) for k in state)
    for key in ("conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.weight"):
        assert key in state
    if name in ("resnet50", "resnet101"):
        assert "layer1.0.conv3.weight" in state and "layer1.0.downsample.0.weight" in state
    else:
        assert "layer1.0.conv3.weight" not in state and "layer1.0.downsample.0.weight" not in state


def test_output_stride_16_and_dilation():
    m = dilate_last_stage(resnet("resnet18", use_torchvision=False)).eval()
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == TORCHVISION_PARAMS["resnet18"]
    from qpcell.models.resnet import resnet_features

    with torch.no_grad():
        low, high = resnet_features(m, torch.rand(1, 3, 64, 64))
    assert low.shape == (1, 64, 16, 16) and high.shape == (1, 512, 4, 4)
    assert m.layer4[0].conv1.dilation == (1, 1) and m.layer4[1].conv1.dilation == (2, 2)


def test_pretrained_weights_load_strictly(tmp_path):
    src = resnet("resnet18", use_torchvision=False)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    model = MTLIHC(2, pretrained_path=str(path), **SMALL)
    got = model.encoder.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.state_dict().items())
    assert "pretrained_path" not in model.spec()
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(QpcellError, match="do not fit"):
        load_pretrained(resnet("resnet18", use_torchvision=False), bad)
    with pytest.raises(QpcellError, match="not found"):
        MTLIHC(2, pretrained_path=str(tmp_path / "missing.pth"), **SMALL)


def test_forward_shapes_and_maps(full):
    x = torch.rand(2, 3, 64, 48)
    full.train()
    out = full(x)
    assert out["main_logits"].shape == (2, 2, 64, 48)
    assert out["dynamic_logits"].shape == (2, 2, 64, 48)
    assert out["prior_logits"].shape == (2, 1, 64, 48)
    full.eval()
    with torch.no_grad():
        ev = full(x)
        assert set(ev) == {"main_logits"}  # inference runs the main decoder only
        assert set(full(x, aux=True)) == {"main_logits", "dynamic_logits", "prior_logits"}
    det, cls = full.maps(ev)
    assert cls.shape == (2, 2, 64, 48) and det.shape == (2, 64, 48)
    assert torch.allclose(cls, torch.sigmoid(ev["main_logits"]))
    assert torch.allclose(det, cls.max(dim=1).values)
    assert full.postprocess_kind == "peaks"


def _bce(z: np.ndarray, g: np.ndarray) -> float:
    p = 1 / (1 + np.exp(-z))
    return float(np.mean(-(g * np.log(p) + (1 - g) * np.log(1 - p))))


def test_losses_against_hand_computation(full):
    rng = np.random.default_rng(0)
    z_main = rng.normal(size=(1, 2, 2, 2))
    z_dyn = rng.normal(size=(1, 2, 2, 2))
    z_pri = rng.normal(size=(1, 1, 2, 2))
    circle = (rng.random((1, 2, 2, 2)) > 0.5).astype(float)
    circle[0, :, 0, 0] = 1
    dyn = (rng.random((1, 2, 2, 2)) > 0.5).astype(float)
    prior = rng.random((1, 1, 2, 2))
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    p_main, p_dyn, p_pri = sig(z_main), sig(z_dyn), sig(z_pri)
    # eq. 2 as a loss: 1 - mean over classes of intersection / union
    inter = (p_main * circle).sum(axis=(0, 2, 3))
    union = p_main.sum(axis=(0, 2, 3)) + circle.sum(axis=(0, 2, 3)) - inter
    iou = 1 - np.mean(inter / union)
    lm = 0.8 * _bce(z_main, circle) + 0.2 * iou
    ld = np.abs(p_dyn - dyn).mean()
    lc = np.abs(p_main - p_dyn).mean()
    lp = np.abs(p_pri - prior).mean()
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = {"main_logits": t(z_main), "dynamic_logits": t(z_dyn), "prior_logits": t(z_pri)}
    targets = {"circle": t(circle), "dynamic": t(dyn), "prior": t(prior)}
    total, parts = full.loss(out, targets)
    assert parts["main"] == pytest.approx(lm, rel=1e-4)
    assert parts["dynamic"] == pytest.approx(ld, rel=1e-5)
    assert parts["consistency"] == pytest.approx(lc, rel=1e-5)
    assert parts["prior"] == pytest.approx(lp, rel=1e-5)
    assert float(total) == pytest.approx(lm + 0.5 * lc + 0.5 * lp + 1.0 * ld, rel=1e-4)
    # only the outputs present are scored
    total_m, parts_m = full.loss({"main_logits": t(z_main)}, targets)
    assert set(parts_m) == {"main"} and float(total_m) == pytest.approx(lm, rel=1e-4)
    # CE-only main loss (the early-stopped prior model)
    ce = MTLIHC(2, main_loss="ce", **SMALL)
    _, parts_ce = ce.loss({"main_logits": t(z_main)}, targets)
    assert parts_ce["main"] == pytest.approx(_bce(z_main, circle), rel=1e-5)
    # custom weights
    w = MTLIHC(2, aux=("dynamic", "prior"), alpha=0.5, lambda_c=2.0, lambda_p=0.0, lambda_d=0.1,
               **SMALL)
    total_w, _ = w.loss(out, targets)
    lm_w = 0.5 * _bce(z_main, circle) + 0.5 * iou
    assert float(total_w) == pytest.approx(lm_w + 2.0 * lc + 0.1 * ld, rel=1e-4)
    with pytest.raises(QpcellError, match="prior"):
        full.loss(out, {"circle": t(circle), "dynamic": t(dyn)})


def test_consistency_detach_options():
    torch.manual_seed(0)
    z_main = torch.randn(1, 2, 4, 4, requires_grad=True)
    z_dyn = torch.randn(1, 2, 4, 4, requires_grad=True)
    targets = {"circle": torch.zeros(1, 2, 4, 4), "dynamic": torch.zeros(1, 2, 4, 4)}

    def grads(mode: str, lambda_c: float) -> tuple[torch.Tensor, torch.Tensor]:
        m = MTLIHC(2, aux=("dynamic",), consistency_detach=mode, lambda_c=lambda_c, **SMALL)
        z_main.grad = z_dyn.grad = None
        total, _ = m.loss({"main_logits": z_main, "dynamic_logits": z_dyn}, targets)
        total.backward()
        return z_main.grad.clone(), z_dyn.grad.clone()

    base = grads("none", 0.0)
    lc = {}  # gradient of Lc alone on each side
    for mode in ("none", "main", "dynamic"):
        g = grads(mode, 1.0)
        lc[mode] = ((g[0] - base[0]).abs().sum().item(), (g[1] - base[1]).abs().sum().item())
    assert lc["none"][0] > 0 and lc["none"][1] > 0  # default: both outputs move
    assert lc["main"][0] == 0 and lc["main"][1] > 0
    assert lc["dynamic"][0] > 0 and lc["dynamic"][1] == 0


def _grads(model: MTLIHC, size: int = 32) -> dict[str, bool]:
    torch.manual_seed(0)
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.rand(2, 3, size, size)
    c = model.n_classes
    targets = {"circle": (torch.rand(2, c, size, size) > 0.8).float(),
               "dynamic": (torch.rand(2, c, size, size) > 0.8).float(),
               "prior": torch.rand(2, model.n_prior, size, size)}
    out = model(x)
    total, _ = model.loss(out, targets)
    total.backward()
    got = {}
    for part in ("encoder", "main_decoder", "dynamic_decoder", "prior_decoder"):
        ps = [p for n, p in model.named_parameters() if n.startswith(part + ".")]
        got[part] = None if not ps else any(p.grad is not None and p.grad.abs().sum() > 0
                                            for p in ps)
    return got


@pytest.mark.parametrize("aux, built", [((), set()), (("dynamic",), {"dynamic_decoder"}),
                                        (("dynamic", "prior"),
                                         {"dynamic_decoder", "prior_decoder"})])
def test_auxiliary_decoders_only_in_their_ablation(aux, built):
    model = MTLIHC(3, aux=aux, n_prior=2, **SMALL)
    got = _grads(model)
    assert got["encoder"] and got["main_decoder"]
    for dec in ("dynamic_decoder", "prior_decoder"):
        if dec in built:
            assert got[dec] is True  # built and trained
        else:
            assert got[dec] is None  # not built at all
            assert not any(dec.split("_")[0] in n for n, _ in model.named_parameters())


def test_auxiliary_losses_reach_the_encoder():
    model = MTLIHC(2, aux=("dynamic", "prior"), **SMALL).train()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    for key, target in (("dynamic_logits", torch.zeros(2, 2, 32, 32)),
                        ("prior_logits", torch.zeros(2, 1, 32, 32))):
        model.zero_grad(set_to_none=True)
        torch.sigmoid(out[key]).sub(target).abs().mean().backward(retain_graph=True)
        enc = [p.grad for p in model.encoder.parameters() if p.grad is not None]
        assert enc and any(g.abs().sum() > 0 for g in enc)
        assert all(p.grad is None for p in model.main_decoder.parameters())


def test_export_and_inference_never_build_auxiliary_decoders(full, tmp_path):
    from qpcell.checkpoint import load_model, save_model
    from qpcell.models import create_model

    plain = MTLIHC(2, **SMALL)
    n_modules_plain = len(list(plain.modules()))
    assert len(list(full.modules())) > n_modules_plain
    full.eval()
    exported = full.export()
    names = [n for n, _ in exported.named_parameters()] + list(exported.state_dict())
    assert not any("dynamic" in n or "prior" in n for n in names)
    assert exported.spec()["aux"] == [] and full.spec()["aux"] == ["dynamic", "prior"]
    assert len(list(exported.modules())) == n_modules_plain
    rebuilt = create_model(**exported.spec())
    assert len(list(rebuilt.modules())) == n_modules_plain
    assert create_model(**full.spec()).spec() == full.spec()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported(x)["main_logits"], full(x)["main_logits"])
    meta = {"classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [4, 5, 6]}],
            "mpp": None, "postprocess_kind": "peaks", "postprocess": {},
            "peaks": {"threshold": 0.5, "min_distance_px": 3}}
    save_model(tmp_path / "m", exported, meta)
    bundle = load_model(tmp_path / "m", device="cpu")
    loaded = bundle.models["model"]
    assert not hasattr(loaded, "dynamic_decoder") and not hasattr(loaded, "prior_decoder")
    det, cls = bundle.predict_maps(np.full((1, 32, 32, 3), 200, np.uint8))
    assert det.shape == (1, 32, 32) and cls.shape == (1, 2, 32, 32)


def test_target_fn(full):
    xy = np.array([[10.0, 12.0], [40.0, 30.0]])
    labels = np.array([0, 1])
    fn = full.target_fn(6.0)
    t = fn(xy, labels, (48, 64), rng=np.random.default_rng(0))
    assert set(t) == {"circle", "dynamic"}
    assert np.array_equal(t["circle"], circle_masks(xy, labels, 2, (48, 64), 6.0))
    assert t["dynamic"].shape == (2, 48, 64)
    # the dynamic radius range follows the circle: (2, 7) px at radius 4 -> (3, 10.5) at 6
    assert fn.dynamic_radius_px == pytest.approx((3.0, 10.5))
    again = fn(xy, labels, (48, 64), rng=np.random.default_rng(0))
    assert np.array_equal(t["dynamic"], again["dynamic"])
    other = fn(xy, labels, (48, 64), rng=np.random.default_rng(1))
    assert not np.array_equal(t["dynamic"], other["dynamic"])
    assert set(MTLIHC(2, **SMALL).target_fn(4.0)(xy, labels, (48, 64))) == {"circle"}
    assert pickle.loads(pickle.dumps(fn)) == fn  # usable by DataLoader workers


def test_invalid_settings():
    for kwargs in ({"aux": ("shape",)}, {"backbone": "vgg16"}, {"main_loss": "dice"},
                   {"consistency_detach": "both"}, {"n_prior": 0}):
        with pytest.raises(QpcellError):
            MTLIHC(2, **{**SMALL, **kwargs})


def test_head_bias_starts_at_low_probability():
    m = MTLIHC(2, **SMALL)
    assert torch.allclose(m.main_decoder.head.bias, torch.full((2,), math.log(0.1 / 0.9)))
