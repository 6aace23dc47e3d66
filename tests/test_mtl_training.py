"""MTL-IHC training (paper 003): the early-stopped prior model, the full model, the folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qpcell import mtl
from qpcell import train as train_mod
from qpcell.config import MTLConfig, PatchConfig, TrainConfig
from qpcell.errors import QpcellError
from qpcell.synthetic import render_image, synthetic_classes
from qpcell.train import TrainImage

CLASSES = synthetic_classes(2)
PRIOR_EPOCHS = 2
EPOCHS = 8


def make_data(n: int, size: int = 96, seed: int = 0) -> list[TrainImage]:
    out = []
    for i in range(n):
        img, xy, lab = render_image((size, size), 2, rng=seed + i)
        out.append(TrainImage(f"im{seed + i}", img, xy, lab, None))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is about as fast on an idle machine, far faster on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """One real Ours++ run on synthetic images, with every call of ``train`` recorded."""
    out = tmp_path_factory.mktemp("mtl") / "model"
    data = make_data(4)
    calls = []
    original = train_mod.train

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(SimpleNamespace(args=args, kwargs=kwargs, result=result))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "train", spy)
        result = mtl.train_mtl(
            [], CLASSES, out, prepared=data, model_mpp=None,
            mtl_cfg=MTLConfig(prior_epochs=PRIOR_EPOCHS),
            train_cfg=TrainConfig(epochs=EPOCHS, batch_size=4, val_fraction=0.25, lr=0.1,
                                  weight_decay=0.5, decoupled_weight_decay=True),
            patch_cfg=PatchConfig(size=64, stride=32), max_steps_per_epoch=3,
            model_kwargs={"channels": 32}, device="cpu")
    return SimpleNamespace(out=out, data=data, calls=calls, result=result)


def test_stage1_is_an_early_stopped_ce_model(run):
    assert len(run.calls) == 2
    stage1 = run.calls[0]
    assert stage1.args[2] == run.out / mtl.PRIOR_DIR
    kw = stage1.kwargs
    assert kw["model_name"] == "mtl-ihc"
    assert kw["model_kwargs"]["main_loss"] == "ce" and tuple(kw["model_kwargs"]["aux"]) == ()
    assert kw["train_cfg"].epochs == PRIOR_EPOCHS
    # the paper's optimiser settings replace train_cfg's
    assert kw["train_cfg"].lr == MTLConfig().lr == 1e-3
    assert kw["train_cfg"].weight_decay == MTLConfig().weight_decay == 2e-5
    assert not kw["train_cfg"].decoupled_weight_decay  # paper 003's L2 term, not AdamW's
    assert [h.epoch for h in stage1.result.history] == list(range(1, PRIOR_EPOCHS + 1))
    assert kw.get("extra_maps") is None


def test_prior_targets_are_the_stage1_maps(run):
    stage2 = run.calls[1].kwargs
    assert stage2["extra_key"] == "prior"
    assert tuple(stage2["model_kwargs"]["aux"]) == ("dynamic", "prior")
    assert stage2["model_kwargs"]["n_prior"] == 1
    assert stage2["train_cfg"].epochs == EPOCHS
    maps = stage2["extra_maps"]
    assert set(maps) == {d.name for d in run.data}
    idx = mtl.clustered_class([(d.xy, d.labels) for d in run.data], 2)
    # recompute the early-stopped model's sigmoid maps from its saved folder
    from qpcell.checkpoint import load_model

    bundle = load_model(run.out / mtl.PRIOR_DIR, device="cpu")
    assert bundle.meta["model"]["aux"] == [] and bundle.meta["model"]["main_loss"] == "ce"
    for d in run.data:
        _, cls = train_mod.image_maps(bundle.predict_maps, d.pixels)
        assert maps[d.name].shape == (1, *d.pixels.shape[:2])
        np.testing.assert_allclose(maps[d.name][0], cls[idx], atol=1e-5)
        assert 0.0 <= maps[d.name].min() and maps[d.name].max() <= 1.0


def test_loss_falls_and_cells_are_found(run):
    hist = run.result.history
    assert [h.epoch for h in hist] == list(range(1, EPOCHS + 1))
    assert hist[-1].loss < 0.85 * hist[0].loss
    assert set(hist[0].loss_parts) == {"main", "dynamic", "consistency", "prior"}
    assert hist[-1].loss_parts["main"] < hist[0].loss_parts["main"]
    assert run.result.val_f1 >= 0.7

    # the saved (inference-only) model finds the cells of an image it never saw
    from qpcell.checkpoint import load_model
    from qpcell.metrics import score_dataset

    bundle = load_model(run.out, device="cpu")
    img, xy, lab = render_image((128, 128), 2, rng=99)
    det, cls = bundle.predict_maps(img[None])
    found = bundle.to_detections(det[0], cls[0])
    truth = SimpleNamespace(xy=xy, labels=lab)
    report = score_dataset([(found, truth)], [c.name for c in CLASSES], 6.0)
    assert report.detection.f1 >= 0.6, report.detection


def test_final_folder_holds_encoder_and_main_decoder_only(run):
    config = json.loads((run.out / "config.json").read_text())
    assert config["model"]["name"] == "mtl-ihc" and config["model"]["aux"] == []
    assert config["postprocess_kind"] == "peaks" and config["peaks"]["threshold"] > 0
    meta = config["mtl"]
    assert meta["inference"] == "encoder + main decoder only"
    assert meta["aux_trained"] == ["dynamic", "prior"]
    assert meta["prior_classes"] == [CLASSES[mtl.clustered_class(
        [(d.xy, d.labels) for d in run.data], 2)].name]
    assert meta["prior_model"] == mtl.PRIOR_DIR and meta["prior_epochs"] == PRIOR_EPOCHS
    keys = load_file(str(run.out / "weights.safetensors"))
    assert keys and not any("dynamic" in k or "prior" in k for k in keys)
    assert any(k.startswith("main_decoder.") for k in keys)
    from qpcell.checkpoint import load_model

    model = load_model(run.out, device="cpu").models["model"]
    assert model.aux == () and not any("dynamic" in n or "prior" in n
                                       for n, _ in model.named_modules())


def _fake_train(calls):
    def fake(images, classes, out, **kwargs):
        calls.append(SimpleNamespace(out=out, kwargs=kwargs))
        return train_mod.TrainResult(out, [], 1, 0.5, 0.5, [], [], 4, 0.1)

    return fake


def test_without_prior_there_is_no_stage1(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train_mod, "train", _fake_train(calls))
    data = make_data(1, size=48)
    mtl.train_mtl([], CLASSES, tmp_path, aux=("dynamic",), prepared=data, model_mpp=None)
    assert len(calls) == 1
    kw = calls[0].kwargs
    assert kw["extra_maps"] is None and tuple(kw["model_kwargs"]["aux"]) == ("dynamic",)
    assert kw["model_kwargs"]["backbone"] == "resnet18"
    assert kw["extra_meta"]["mtl"]["aux_trained"] == ["dynamic"]
    assert kw["extra_meta"]["mtl"]["prior_classes"] == []
    calls.clear()
    mtl.train_mtl([], CLASSES, tmp_path, aux=(), backbone="resnet34", prepared=data,
                  model_mpp=None)
    assert tuple(calls[0].kwargs["model_kwargs"]["aux"]) == ()
    assert calls[0].kwargs["model_kwargs"]["backbone"] == "resnet34"
    # the circle radius of MTLConfig, stated at MTLConfig.mpp, is what train() scales
    mask = calls[0].kwargs["mask_cfg"]
    assert mask.disc_radius_px == MTLConfig().circle_radius_px and mask.mpp == MTLConfig().mpp


def test_bad_arguments(tmp_path):
    data = make_data(1, size=48)
    with pytest.raises(QpcellError, match="model_name"):
        mtl.train_mtl([], CLASSES, tmp_path, prepared=data, model_name="unet")
    with pytest.raises(QpcellError, match="auxiliary"):
        mtl.train_mtl([], CLASSES, tmp_path, prepared=data, aux=("shape",))
    with pytest.raises(QpcellError, match="not among"):
        mtl.resolve_prior_classes(["Tumour"], CLASSES, data)


def test_most_clustered_class():
    rng = np.random.default_rng(0)
    # class 1: a dense clump in one corner; class 0: twice as many points spread everywhere
    clump = rng.normal([30, 30], 6, (60, 2))
    spread = rng.uniform(0, 300, (120, 2))
    xy = np.concatenate([spread, clump])
    labels = np.array([0] * 120 + [1] * 60)
    score = mtl.class_clustering([(xy, labels)], 3)
    assert score[1] > score[0] and np.isnan(score[2])
    assert mtl.clustered_class([(xy, labels)], 3) == 1
    # shuffled labels: no class stands out much
    shuffled = mtl.class_clustering([(xy, rng.permutation(labels))], 2)
    assert np.all(np.abs(shuffled) < 0.15)
    assert mtl.clustered_class([], 2) == 0
    data = [SimpleNamespace(xy=xy, labels=labels)]
    assert mtl.resolve_prior_classes(None, CLASSES, data) == [1]
    assert mtl.resolve_prior_classes("CD8+", CLASSES, data) == [0]
    assert mtl.resolve_prior_classes(["CD4+", "CD8+"], CLASSES, data) == [1, 0]
