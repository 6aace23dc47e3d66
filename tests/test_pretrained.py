"""Starting a model from another's weights (``--init``) and the built-in starting model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from qpcell.checkpoint import load_model, read_config
from qpcell.config import PatchConfig, TrainConfig
from qpcell.errors import QpcellError
from qpcell.models import create_model
from qpcell.points import CellClass
from qpcell.pretrained import BUILTIN_DIR, resolve_init, transfer_weights
from qpcell.recipe import recipe
from qpcell.synthetic import synthetic_dataset
from qpcell.train import TrainCallbacks, TrainImage, train

PATCH = replace(PatchConfig(), size=64, stride=64, background_fraction=0.0)
FAST = recipe("fast", "s-drdin")
#: The fast recipe without its cell classifier: these tests are about the network's weights.
NETWORK_ONLY = replace(FAST.train, cells_share=0.0)


def tiny_data(n: int = 2, size: int = 96, seed: int = 0):
    pairs = synthetic_dataset(n, (size, size), 3, seed=seed)
    return pairs[0][0].classes, [TrainImage(a.name, im, a.xy, a.labels, None) for a, im in pairs]


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """An S-DRDIN of the fast recipe (width 4) after a few steps on synthetic data."""
    classes, data = tiny_data()
    out = tmp_path_factory.mktemp("start") / "m"
    train([], classes, out, model_kwargs={**FAST.model_kwargs, "base": 4}, model_mpp=None,
          prepared=data, train_cfg=replace(NETWORK_ONLY, epochs=1, seed=0), mask_cfg=FAST.mask,
          patch_cfg=PATCH, device="cpu", max_steps_per_epoch=3)
    return out, classes, data


def maps_of(model: torch.nn.Module, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from qpcell.inference import model_maps

    return model_maps(model.eval(), pixels[None], torch.device("cpu"))


def test_everything_but_the_class_layer_is_copied_for_other_classes(start_model):
    folder, classes, data = start_model
    theirs = load_model(folder, device="cpu").models["model"]
    mine = [CellClass("CD8+", (255, 0, 0)), CellClass("CD8-", (0, 0, 255))]
    model = create_model("s-drdin", len(mine), **{**FAST.model_kwargs, "base": 4})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transfer = transfer_weights(model, folder, tuple(mine))
    state = model.state_dict()
    assert transfer.total == len(state) and not transfer.classes_kept
    assert transfer.copied == len(state) - 2  # cls_head weight and bias keep their new values
    for key, value in state.items():
        if key.startswith("cls_head."):
            assert torch.equal(value, before[key])
        else:
            assert torch.equal(value, theirs.state_dict()[key]), key
    det_theirs, _ = maps_of(theirs, data[0].pixels)
    det_mine, cls_mine = maps_of(model, data[0].pixels)
    np.testing.assert_allclose(det_mine, det_theirs, atol=1e-5)  # the detector comes whole
    assert cls_mine.shape[1] == 2
    assert "fitted to your classes" in transfer.note(None)


def test_the_class_layer_is_kept_for_the_same_classes(start_model):
    folder, classes, data = start_model
    theirs = load_model(folder, device="cpu").models["model"]
    model = create_model("s-drdin", len(classes), **{**FAST.model_kwargs, "base": 4})
    transfer = transfer_weights(model, folder, tuple(classes))
    assert transfer.classes_kept and transfer.copied == transfer.total
    for a, b in zip(maps_of(model, data[0].pixels), maps_of(theirs, data[0].pixels),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_starting_model_of_another_shape_is_refused(start_model, tmp_path):
    folder, classes, _ = start_model
    wider = create_model("s-drdin", len(classes), **{**FAST.model_kwargs, "base": 8})
    with pytest.raises(QpcellError, match="does not fit.*--init none"):
        transfer_weights(wider, folder, tuple(classes))
    unet = create_model("unet", len(classes), batch_norm=True)
    with pytest.raises(QpcellError, match="does not fit"):
        transfer_weights(unet, folder, tuple(classes))


def test_init_names_are_resolved_with_one_line_errors(start_model, tmp_path):
    folder, _, _ = start_model
    assert resolve_init(None) is None and resolve_init("none") is None
    assert resolve_init(str(folder)) == folder
    with pytest.raises(QpcellError, match="no config.json"):
        resolve_init(tmp_path)
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    config = read_config(folder)
    (pipeline / "config.json").write_text(json.dumps({**config, "kind": "pipeline"}))
    with pytest.raises(QpcellError, match="single model"):
        resolve_init(pipeline)


def test_training_from_a_starting_model_says_so_and_records_it(start_model, tmp_path):
    folder, classes, data = start_model
    notes = []

    class Notes(TrainCallbacks):
        def on_note(self, text):
            notes.append(text)

    result = train([], classes, tmp_path / "m", model_kwargs={**FAST.model_kwargs, "base": 4},
                   model_mpp=None, prepared=data, init=str(folder), callbacks=Notes(),
                   train_cfg=replace(NETWORK_ONLY, epochs=1, seed=1), mask_cfg=FAST.mask,
                   patch_cfg=PATCH, device="cpu", max_steps_per_epoch=1)
    init = read_config(result.model_dir)["training"]["init"]
    assert init["source"] == str(folder) and init["classes_kept"] is True
    assert init["copied"] == init["total"]
    assert any(n.startswith("started from") for n in notes)
    scratch = train([], classes, tmp_path / "s", model_kwargs={"base": 4}, model_mpp=None,
                    prepared=data, train_cfg=replace(TrainConfig(), epochs=1), patch_cfg=PATCH,
                    device="cpu", max_steps_per_epoch=1)
    assert read_config(scratch.model_dir)["training"]["init"] is None


def test_a_resumed_run_still_says_what_it_started_from(start_model, tmp_path):
    from qpcell.train import TrainingInterrupted

    folder, classes, data = start_model

    class StopAt(TrainCallbacks):
        def on_batch(self, epoch, step, loss, progress=None, seconds_left=None):
            if (epoch, step) == (2, 1):
                raise KeyboardInterrupt

    kwargs = dict(model_kwargs={**FAST.model_kwargs, "base": 4}, model_mpp=None, prepared=data,
                  init=str(folder), train_cfg=replace(NETWORK_ONLY, epochs=2, seed=1),
                  mask_cfg=FAST.mask, patch_cfg=PATCH, device="cpu", max_steps_per_epoch=2)
    with pytest.raises(TrainingInterrupted):
        train([], classes, tmp_path / "m", callbacks=StopAt(), **kwargs)
    result = train([], classes, tmp_path / "m", resume=True, **kwargs)
    init = read_config(result.model_dir)["training"]["init"]
    assert init is not None and init["source"] == str(folder)


def test_the_builtin_model_ships_with_its_card_and_fits_the_default_model():
    assert resolve_init("builtin") == BUILTIN_DIR
    size = sum(p.stat().st_size for p in BUILTIN_DIR.iterdir())
    assert size < 10e6
    card = (BUILTIN_DIR / "MODEL_CARD.md").read_text()
    assert "EndoNuke" in card and "CC BY 4.0" in card
    config = read_config(BUILTIN_DIR)
    assert config["mpp"] == 0.44 and config["model"]["name"] == "s-drdin"
    for n in (1, 2, 5):  # any number of user classes
        model = create_model("s-drdin", n, **FAST.model_kwargs)
        classes = tuple(CellClass(f"c{i}", (i, i, i)) for i in range(n))
        transfer = transfer_weights(model, BUILTIN_DIR, classes)
        assert transfer.copied == transfer.total - 2 and transfer.source == "builtin"


def test_the_builtin_model_finds_nuclei_on_endonuke_test_tiles(endonuke):
    """Images of the split's test third, which the built-in model never saw."""
    from qpcell.io.project import natural_key
    from qpcell.io.slides import open_slide
    from qpcell.io.tables import import_tables
    from qpcell.metrics import score_dataset
    from qpcell.predict import Predictor, predict_slide

    imp = import_tables(endonuke)
    anns = sorted(imp.images, key=lambda a: natural_key(a.name))[::3][:6]
    predictor = Predictor.from_bundle(load_model(BUILTIN_DIR, device="cpu"))
    pairs = []
    for ann in anns:
        with open_slide(ann.image, mpp=predictor.source_mpp) as slide:
            pairs.append((predict_slide(slide, predictor.map_fn, predictor.postprocess_fn,
                                        mpp=predictor.mpp, classes=predictor.classes,
                                        reach_px=predictor.reach_px, tissue=False), ann))
    report = score_dataset(pairs, [c.name for c in imp.classes], 6.0)
    assert report.detection.f1 > 0.8, report.detection


def test_cli_starts_from_a_model_folder_and_refuses_what_cannot_start(cli, synthetic_project,
                                                                      tiny_model, tmp_path):
    code, stdout, stderr = cli("train", synthetic_project, "--out", tmp_path / "m", "--base",
                               "4", "--init", tiny_model, *TINY_TRAIN)
    assert code == 0, stderr
    text = " ".join(stdout.split())  # rich wraps long lines
    assert "started from" in text and "weight tensors" in text
    init = read_config(tmp_path / "m")["training"]["init"]
    assert init["source"] == str(tiny_model) and init["copied"] == init["total"]
    code, _, stderr = cli("train", synthetic_project, "--out", tmp_path / "n", "--init",
                          tmp_path / "nowhere")
    assert code == 1 and "no config.json" in stderr and "nowhere" in stderr
    assert not (tmp_path / "n" / "config.json").exists()
    code, _, stderr = cli("train", synthetic_project, "--out", tmp_path / "o", "--model",
                          "mtl-ihc", "--init", "builtin")
    assert code == 1 and "--init" in stderr
