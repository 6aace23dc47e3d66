"""The commands a user runs, end to end on tiny synthetic projects: train, predict, demo."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TRAIN

from qpcell.config import TrainConfig
from qpcell.io.geojson import read_geojson
from qpcell.models.cell_classifier import base_spec
from qpcell.tuning import CELL_SHARES, CONTEXT_WEIGHTS


@pytest.fixture
def project(synthetic_project):
    return synthetic_project


@pytest.fixture
def model(tiny_model):
    return tiny_model


def test_train_writes_a_self_describing_model(model):
    config = json.loads((model / "config.json").read_text())
    assert config["model"]["name"] == "s-drdin" and config["model"]["base"] == 4
    assert [c["name"] for c in config["classes"]] == ["CD8+", "CD4+", "FOXP3+"]
    assert config["mpp"] is None and config["postprocess_kind"] == "sdrdin"
    assert (model / "weights.safetensors").stat().st_size > 1000
    assert (model / "train_log.txt").read_text().startswith("epoch 1 ")


def test_predict_writes_outputs_and_skips_finished_images(cli, model, project, tmp_path):
    out = tmp_path / "pred"
    code, stdout, _ = cli("predict", model, project, "--out", out, "--device", "cpu")
    assert code == 0, stdout
    names = sorted(p.name for p in out.iterdir())
    for i in range(3):
        assert f"synthetic-00{i}.geojson" in names and f"synthetic-00{i}.csv" in names
    assert "predictions.json" in names
    objs = read_geojson(out / "synthetic-000.geojson")
    assert len(objs.detection_xy) == len(objs.detection_class)
    before = (out / "synthetic-000.geojson").stat().st_mtime_ns
    code, stdout, _ = cli("predict", model, project, "--out", out, "--device", "cpu")
    assert code == 0 and "skipped" in stdout
    assert (out / "synthetic-000.geojson").stat().st_mtime_ns == before


def test_separate_models_train_and_predict_as_one(cli, project, tmp_path):
    out = tmp_path / "sep"
    code, stdout, stderr = cli("train", project, "--out", out, "--model", "separate",
                               "--base", "4", *TINY_TRAIN)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "pipeline"
    assert set(config["components"]) == {"detection", "classification"}
    code, stdout, stderr = cli("predict", out, project, "--out", tmp_path / "p", "--device",
                               "cpu")
    assert code == 0, stderr
    assert "separate (drdin-detection + drdin-classification)" in stdout


def test_mtl_ihc_trains_from_the_command_line(cli, project, tmp_path):
    out = tmp_path / "mtl"
    code, _, stderr = cli("train", project, "--out", out, "--model", "mtl-ihc", "--aux",
                          "dynamic", "--backbone", "resnet18", *TINY_TRAIN)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "mtl-ihc" and config["model"]["aux"] == []
    assert config["mtl"]["aux_trained"] == ["dynamic"]
    assert config["postprocess_kind"] == "peaks"


def test_training_options_reach_the_saved_model(cli, project, tmp_path):
    out = tmp_path / "m"
    code, _, stderr = cli("train", project, "--out", out, "--base", "4", "--precision", "fp32",
                          "--lr-schedule", "cosine", "--rare-repeats", "3", "--select-on",
                          "combined", "--keep-epochs", "--scale-jitter", "0.1",
                          "--weight-decay", "0.01", *TINY_TRAIN)
    assert code == 0, stderr
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["config"]["precision"] == "fp32"
    assert training["config"]["weight_decay"] == 0.01
    assert training["config"]["lr_schedule"] == "cosine"
    assert training["config"]["select_on"] == "combined"
    assert (out / "epochs" / "epoch-001" / "weights.safetensors").is_file()
    assert training["patch"]["rare_repeats"] == 3
    assert training["patch"]["scale_jitter"] == 0.1
    code, stdout, stderr = cli("predict", out, project, "--out", tmp_path / "p", "--device",
                               "cpu", "--backend", "eager")
    assert code == 0, stderr
    assert "(eager" in stdout


def test_time_budget_and_recipe_reach_the_saved_model(cli, project, tmp_path):
    out = tmp_path / "budget"
    code, stdout, stderr = cli("train", project, "--out", out, "--base", "4", "--time-budget",
                               "0.15", "--patch-size", "64", "--model-mpp", "native",
                               "--device", "cpu", "--max-passes", "2", "--members", "1",
                               "--cell-classifier", "0.2")
    assert code == 0, stderr
    assert "recipe fast, time budget 0.15 min" in stdout
    assert "or 1,000 steps, whichever comes first: 2 passes" in " ".join(stdout.split())
    config = json.loads((out / "config.json").read_text())
    training = config["training"]
    assert training["config"]["time_budget_s"] == pytest.approx(9.0)
    assert training["config"]["max_passes"] == 2 and training["config"]["min_steps"] == 1000
    assert training["config"]["lr_schedule"] == "cosine"
    assert training["config"]["weight_decay"] == 0.0
    assert training["config"]["decoupled_weight_decay"] is True
    assert training["patch"]["sampling"] == "cells" and training["patch"]["size"] == 64
    assert base_spec(config["model"])["batch_norm"] is True
    assert training["config"]["cells_share"] == 0.2  # the cell classifier's share of the time
    assert training["cell_classifier"]["share"] in CELL_SHARES  # tuned
    assert training["cell_classifier"]["steps"] > 0
    assert (config["model"]["name"] == "with-cell-classifier") == (
        training["cell_classifier"]["share"] > 0)
    assert config["postprocess"]["context_weight"] in CONTEXT_WEIGHTS  # tuned
    assert config["postprocess"]["context_radius_px"] * 0.44 == pytest.approx(10.0)
    out = tmp_path / "paper"
    code, stdout, stderr = cli("train", project, "--out", out, "--base", "4", "--recipe",
                               "paper", "--class-context", "15", "--cell-classifier", "0.3",
                               *TINY_TRAIN)
    assert code == 0, stderr
    assert "recipe paper, 1 epochs" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["config"]["time_budget_s"] is None
    assert config["training"]["config"]["weight_decay"] == 0.0
    assert config["training"]["patch"]["sampling"] == "grid"
    assert base_spec(config["model"])["batch_norm"] is False
    assert config["mask"]["disc_radius_px"] == 2.0
    # asked for, on top of the paper's settings
    assert config["postprocess"]["context_weight"] in CONTEXT_WEIGHTS
    assert config["postprocess"]["context_radius_px"] * 0.44 == pytest.approx(15.0)
    assert config["training"]["config"]["cells_share"] == 0.3
    # epochs, few cells: its step floor
    assert config["training"]["cell_classifier"]["steps"] == TrainConfig().cells_min_steps


def test_progress_lines_reach_a_log_file():
    from rich.console import Console
    from rich.progress import Progress

    from qpcell.cli import train as train_cli

    console = Console(file=__import__("io").StringIO(), force_terminal=False, width=120)
    clock = iter([0.0, 10.0, 40.0, 45.0, 80.0])
    with Progress(console=console) as progress:
        calls = train_cli.RichCallbacks(progress, "s-drdin", clock=lambda: next(clock))
        calls.on_start(1, 10, 1, budget_s=60.0)
        for step, left in ((1, 50.0), (2, 20.0), (3, 15.0), (4, 1.0)):
            calls.on_batch(1, step, 0.5, 1 - left / 60, left)
    text = console.file.getvalue()
    assert text.count("min left") == 2  # at 40 s and at 80 s: every 30 s, not every batch
    assert "67% round 1 loss 0.5000" in text


@pytest.mark.parametrize("args, message", [
    (("train", "nowhere", "--out", "m"), "no such file or folder"),
    (("train", ".", "--out", "m", "--patch-size", "100"), "multiple of 16"),
    (("train", ".", "--out", "m", "--precision", "fp16"), "--precision 'fp16'"),
    (("train", ".", "--out", "m", "--select-on", "loss"), "--select-on 'loss'"),
    (("predict", "nowhere", "nowhere", "--out", "o"), "not a qpcell model"),
    (("train", ".", "--out", "m", "--epochs", "3", "--time-budget", "1"), "not both"),
    (("train", ".", "--out", "m", "--time-budget", "-1"), "positive number of minutes"),
    (("train", ".", "--out", "m", "--epochs", "3", "--max-passes", "50"), "ends a time budget"),
    (("train", ".", "--out", "m", "--recipe", "slow"), "--recipe 'slow'"),
    (("train", ".", "--out", "m", "--sampling", "random"), "--sampling 'random'"),
    (("train", ".", "--out", "m", "--refit", "1"), "--refit 1.0"),
    (("train", ".", "--out", "m", "--ema", "1"), "--ema 1.0"),
])
def test_bad_input_is_one_line_and_exit_1(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli(*args)
    assert code == 1
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from qpcell.errors import QpcellError

    with pytest.raises(QpcellError):
        cli("--debug", "predict", "nowhere", "nowhere", "--out", "o")


def test_demo_runs_end_to_end(cli, tmp_path):
    out = tmp_path / "demo"
    code, stdout, stderr = cli("demo", "--out", out, "--minutes", "0.1", "--train-images", "2",
                               "--test-images", "1", "--device", "cpu")
    assert code == 0, stderr
    from qpcell.recipe import default_model

    config = json.loads((out / "model" / "config.json").read_text())
    assert base_spec(config["model"])["name"] == default_model("fast")  # what qpcell train trains
    assert (out / "predictions" / "test-000.geojson").exists()
    assert (out / "predictions" / "test-000.overlay.png").exists()
    scores = json.loads((out / "evaluation.json").read_text())
    assert 0 <= scores["detection"]["f1"] <= 1
    assert "detection F1" in stdout


def test_train_without_model_takes_the_default_network_or_the_one_it_continues(
        cli, project, model, tmp_path):
    from qpcell.cli.train import implied_model

    out = tmp_path / "unet"
    code, _, stderr = cli("train", project, "--out", out, "--base", "4",
                          "--epochs", "1", "--max-steps", "2", "--patch-size", "64",
                          "--model-mpp", "native", "--device", "cpu")
    assert code == 0, stderr
    spec = json.loads((out / "config.json").read_text())["model"]
    assert spec["name"] == "unet" and spec["class_weights"] == "cells"  # the fast recipe's
    assert implied_model("fast", None, None) == "unet"
    assert implied_model("paper", None, None) == "s-drdin"
    # a starting model or a resumed run keeps its own network
    assert implied_model("fast", out, None) == "unet"
    assert implied_model("fast", None, out) == "unet"
    assert implied_model("fast", None, model) == "s-drdin"
    (tmp_path / "sep" / "detection").mkdir(parents=True)
    assert implied_model("fast", None, tmp_path / "sep") == "separate"
