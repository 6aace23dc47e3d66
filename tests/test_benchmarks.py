"""The benchmark scripts run end to end (smoke settings) and write what they promise."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qpcell.recipe import default_model

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkey = pytest.MonkeyPatch()
    monkey.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        monkey.undo()
    return module


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The scripts run with ``--threads 1`` (a shared machine); restore the suite's setting."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_accuracy_smoke_writes_tables_json_and_sweeps(endonuke, tmp_path, monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    acc = load_script("accuracy")
    out = tmp_path / "acc.json"
    md = tmp_path / "acc.md"
    acc.main(["--smoke", "--methods", "s-drdin,classical", "--json", str(out),
              "--markdown", str(md), "--plots", str(tmp_path / "plots"), "--device", "cpu",
              "--threads", "1"])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["dataset"] == "endonuke" and "CC BY 4.0" in result["attribution"]
    assert result["class_names"] == ["stroma", "epithelium", "other"]
    assert result["radius_px"] == 6.0 and result["n_test_images"] == 3
    assert list(result["summary"]) == ["s-drdin", "classical"]
    for run in result["runs"]:
        s = run["scores"]
        assert s["tp"] + s["fn"] == result["n_test_cells"]
        for key in ("detection_f1", "weighted_f1", "mean_class_aware_f1", "f1[epithelium]",
                    "totalF1[stroma]", "meanF1[other]"):
            assert 0.0 <= s[key] <= 1.0
        assert run["train_seconds"] > 0
    deep = result["runs"][0]
    assert deep["method"] == "s-drdin" and deep["history"] and deep["postprocess"]["threshold"]
    # the classical baseline finds cells even in three images
    assert result["summary"]["classical"]["detection_f1"]["mean"] > 0.5
    assert result["goal"]["detection_f1"]["target"] == 0.92
    text = md.read_text(encoding="utf-8")
    assert "| S-DRDIN |" in text and "weighted F1" in text and "totalF1 epithelium" in text
    for method in ("s-drdin", "classical"):
        png = Path(result["sweeps"][method]["png"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(result["sweeps"][method]["detection_f1"]) == 12  # radii 1..12 px


def test_accuracy_keep_epochs_scores_every_epoch_and_each_rule(endonuke, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    acc = load_script("accuracy")
    out = tmp_path / "acc.json"
    acc.main(["--smoke", "--epochs", "2", "--methods", "s-drdin", "--select-on", "combined",
              "--keep-epochs", "--json", str(out), "--markdown", str(tmp_path / "acc.md"),
              "--device", "cpu", "--threads", "1"])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["settings"]["select_on"] == "combined"
    run = result["runs"][0]
    assert [row["epoch"] for row in run["epochs"]] == [1, 2]
    assert [row["val_f1"] for row in run["epochs"]] == [h["val_f1"] for h in run["history"]]
    picks = run["picks"]
    assert set(picks) == {"kept on detection", "kept on combined", "last epoch",
                          "best test detection_f1", "best test weighted_f1",
                          "best test mean_class_aware_f1"}
    # trained with --select-on combined: the kept model is that rule's epoch, scored alike
    assert picks["kept on combined"]["epoch"] == run["best_epoch"]
    assert picks["kept on combined"]["test"] == run["scores"]
    assert picks["last epoch"]["test"] == run["epochs"][-1]["test"]
    best = max(row["test"]["detection_f1"] for row in run["epochs"])
    assert picks["best test detection_f1"]["test"]["detection_f1"] == best
    assert "Test scores of the epoch each rule keeps" in (tmp_path / "acc.md").read_text()
    with pytest.raises(SystemExit):
        acc.main(["--smoke", "--methods", "separate", "--keep-epochs"])


def test_accuracy_says_where_the_data_should_be(tmp_path, monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(tmp_path))
    acc = load_script("accuracy")
    with pytest.raises(SystemExit, match="EndoNuke not found.*QPCELL_DATA"):
        acc.main(["--smoke"])
    with pytest.raises(SystemExit):
        acc.main(["--methods", "s-drdin,nonsense"])
    with pytest.raises(SystemExit):
        acc.main(["--patch-size", "200"])
    with pytest.raises(SystemExit, match="^post-processing variants: .*EndoNuke not found"):
        load_script("postprocess_variants").main([str(tmp_path)])


def test_train_speed_compares_joint_and_separate_training(tmp_path, monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(tmp_path))  # synthetic patches: no data needed
    speed = load_script("train_speed")
    out = tmp_path / "speed.json"
    result = speed.main(["--size", "64", "--batches", "1", "--warmup", "0", "--threads", "1",
                         "--precisions", "fp32,bf16", "--json", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["precisions"].keys() == {"fp32", "bf16"}
    assert saved["precisions"]["bf16"]["autocast"] == "torch.bfloat16"
    assert {k: b["layout"] for k, b in saved["precisions"].items()} == {
        "fp32": "contiguous_format", "bf16": "channels_last"}
    for block in result["precisions"].values():
        rows = block["models"]
        assert set(rows) == {"s-drdin", "drdin-detection", "drdin-classification", "unet",
                             "separate"}
        sep = rows["drdin-detection"]["seconds_per_batch"] + rows["drdin-classification"][
            "seconds_per_batch"]
        assert rows["separate"]["seconds_per_batch"] == pytest.approx(sep)
        assert block["s_drdin_over_separate_time"] == pytest.approx(
            rows["s-drdin"]["seconds_per_batch"] / sep)
    fp32, bf16 = (result["precisions"][k]["models"]["unet"]["seconds_per_batch"]
                  for k in ("fp32", "bf16"))
    assert result["speedup_over_fp32"]["bf16"]["unet"] == pytest.approx(fp32 / bf16)
    assert "synthetic" in result["patches"] and result["paper_ratio"] == pytest.approx(0.75)
    layouts = speed.main(["--size", "32", "--batches", "1", "--warmup", "0", "--threads", "1",
                          "--precisions", "fp32", "--layouts", "nchw,channels-last"])
    assert {k: b["layout"] for k, b in layouts["precisions"].items()} == {
        "fp32 nchw": "contiguous_format", "fp32 channels-last": "channels_last"}
    assert set(layouts["speedup_over_fp32 nchw"]) == {"fp32 channels-last"}
    with pytest.raises(SystemExit):
        speed.main(["--layouts", "nhwc"])


def untrained_endonuke_model(folder: Path, post, **meta) -> Path:
    """A narrow, untrained S-DRDIN with EndoNuke's classes, saved to ``folder``."""
    from qpcell.checkpoint import save_model
    from qpcell.config import to_dict
    from qpcell.models import create_model

    torch.manual_seed(0)
    classes = [{"name": n, "color": [200, 40 * i, 40]}
               for i, n in enumerate(["stroma", "epithelium", "other"])]
    save_model(folder, create_model("s-drdin", 3, base=4),
               {"classes": classes, "mpp": None, "postprocess_kind": "sdrdin",
                "postprocess": to_dict(post), **meta})
    return folder


def test_precision_scores_one_model_through_two_backends(endonuke, tmp_path, monkeypatch):
    from qpcell.config import PostprocessConfig

    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    untrained_endonuke_model(tmp_path / "m", PostprocessConfig(threshold=0.3, min_area_px=0))
    out = tmp_path / "precision.json"
    result = load_script("precision").main(
        ["--model", str(tmp_path / "m"), "--backends", "eager,torch-bf16", "--max-test", "2",
         "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["reference"] == "eager" and saved["n_test_images"] == 2
    rows = result["backends"]
    assert set(rows) == {"eager", "torch-bf16"} and rows["eager"]["seconds"] > 0
    for key in ("detection_f1", "weighted_f1", "mean_class_aware_f1"):
        assert result["deltas"]["torch-bf16"][key] == pytest.approx(
            rows["torch-bf16"][key] - rows["eager"][key])


def test_speed_times_forward_pipeline_and_slide_at_the_asked_tile_size(tiny_model, tmp_path):
    from PIL import Image

    from qpcell.synthetic import synthetic_dataset

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, (_, px) in enumerate(synthetic_dataset(3, (200, 200), 3, seed=1)):
        Image.fromarray(px).save(tiles / f"{i}.png")
    slide = tmp_path / "slide.ome.tif"
    load_script("make_slide").main(["--size", "1400", "--images", str(tiles), "--out",
                                    str(slide)])
    out = tmp_path / "speed.json"
    result = load_script("speed").main(
        ["--model", str(tiny_model), "--slide", str(slide), "--tiles", "1", "--tile-size", "256",
         "--repeats", "1", "--slide-region", "1", "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["ratios"] == result["ratios"]
    t = result["tiles"]
    assert t["tile_px"] == 256 and t["core_px"] == 256 - 2 * t["halo_px"] and t["tiles"] == 1
    for key in ("eager_forward", "default_forward", "fp32_forward"):
        assert t[key]["ms_per_tile"] > 0 and t[key]["mpx_per_s"] > 0
    # the ratio is rounded to 3 decimals: with a tiny model on a busy machine it can be
    # near 0.05, where that rounding alone is 1%
    assert result["ratios"]["pipeline_vs_forward"] == pytest.approx(
        t["pipeline"]["mpx_per_s"] / t["eager_forward"]["mpx_per_s"], rel=0.01, abs=1e-3)
    assert result["conv_reference_gmac_per_s"]["torch eager fp32"] > 0
    dp = t["device_postprocess"]  # the device path, here on CPU tensors
    assert dp["model_only"]["minutes_per_cm2"] > 0 and dp["pipeline_device"]["seconds"] > 0
    assert dp["pipeline_cpu_postprocess_vs_device"] == pytest.approx(
        t["pipeline"]["seconds"] / dp["pipeline_device"]["seconds"], rel=0.01)
    assert all(v >= 0 for v in dp["stages_ms_per_tile"].values())
    (run,) = result["slide_runs"]
    assert run["tiles"] == 1 and run["peak_rss_mb"] > run["rss_before_model_mb"] > 0
    assert run["minutes_per_cm2"] > 0


def test_flip_maps_undoes_each_flip_before_averaging():
    from qpcell.train import image_maps

    variants = load_script("postprocess_variants")
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)

    def follows_pixels(tiles):  # flip-equivariant: TTA must give back the plain maps
        red = tiles[..., 0].astype(np.float32) / 255
        return red, np.stack([red, 1 - red], axis=1)

    plain = image_maps(follows_pixels, pixels)
    tta = variants.flip_maps(follows_pixels, pixels, image_maps)
    np.testing.assert_allclose(tta[0], plain[0], atol=1e-6)
    np.testing.assert_allclose(tta[1], plain[1], atol=1e-6)

    def column_ramp(tiles):  # ignores the pixels: flips average it to its mean
        b, h, w = tiles.shape[:3]
        ramp = np.broadcast_to(np.arange(w, dtype=np.float32), (b, h, w))
        return ramp.copy(), None

    det, cls = variants.flip_maps(column_ramp, pixels, image_maps)
    assert cls is None
    np.testing.assert_allclose(det, np.full((24, 40), 19.5), atol=1e-5)


def test_peak_cells_finds_each_blob_and_its_class():
    from qpcell.points import CellClass

    variants = load_script("postprocess_variants")
    yy, xx = np.mgrid[:40, :50]
    centres = [(10, 12), (30, 35)]  # (row, col)
    det = sum(np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 8.0) for r, c in centres)
    cls = np.zeros((2, 40, 50), np.float32)
    cls[0, :, :25], cls[1, :, 25:] = 1.0, 1.0
    classes = (CellClass("a", (255, 0, 0)), CellClass("b", (0, 255, 0)))
    found = variants.peak_cells(det.astype(np.float32), cls, classes, threshold=0.5,
                                min_distance=2, sigma=1.0, box=5)
    order = np.argsort(found.xy[:, 0])
    assert found.xy[order].tolist() == [[12.0, 10.0], [35.0, 30.0]]
    assert found.labels[order].tolist() == [0, 1]
    assert not len(variants.peak_cells(det.astype(np.float32), cls, classes, threshold=2.0,
                                       min_distance=2, sigma=0.0, box=5))


def test_edge_breakdown_counts_misses_at_the_edge_and_scores_the_inside():
    from types import SimpleNamespace

    variants = load_script("postprocess_variants")
    truth = SimpleNamespace(xy=np.array([[1.0, 20.0], [25.0, 25.0], [48.0, 10.0]]),
                            labels=np.zeros(3, np.int64))
    found = SimpleNamespace(xy=np.array([[25.0, 26.0], [48.0, 10.0], [30.0, 40.0]]),
                            labels=np.zeros(3, np.int64))
    pixels = np.zeros((50, 50, 3), np.uint8)
    got = variants.edge_breakdown([found], [truth], [pixels], 3.0, 3.0)
    # (1, 20) is missed at the left edge, (48, 10) found at the right one; inside, (25, 25)
    # is found and (30, 40) is a false positive: F1 = 2 * 1 / (2 * 1 + 1 + 0)
    assert got["edge_cells"] == 2 and got["edge_missed"] == 1 and got["missed"] == 1
    assert got["inner_f1"] == pytest.approx(2 / 3)


def test_postprocess_variants_score_one_model_three_ways(endonuke, tmp_path, monkeypatch):
    from qpcell.config import PostprocessConfig

    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    untrained_endonuke_model(tmp_path / "m", PostprocessConfig(),
                             training={"val_images": ["1014", "1028"]})
    out = tmp_path / "variants.json"
    result = load_script("postprocess_variants").main(
        [str(tmp_path / "m"), "--max-test", "2", "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["n_test_images"] == 2 and saved["variants"] == ["plain", "flip-tta",
                                                                 "det-peaks"]
    rows = result["models"][str(tmp_path / "m")]
    assert set(rows) == {"plain", "flip-tta", "det-peaks"}
    assert rows["det-peaks"]["setting"]["threshold"] > 0
    for row in rows.values():
        assert 0.0 <= row["detection_f1"] <= 1.0 and row["seconds"] > 0
        assert 0 <= row["edge_missed"] <= row["edge_cells"] and 0.0 <= row["inner_f1"] <= 1.0


def test_postprocess_variants_refuse_a_peak_model(endonuke, tmp_path, monkeypatch):
    from qpcell.config import PostprocessConfig

    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    folder = untrained_endonuke_model(tmp_path / "m", PostprocessConfig(),
                                      training={"val_images": ["1014"]})
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["postprocess_kind"] = "peaks"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(SystemExit, match="post-processing is 'peaks'"):
        load_script("postprocess_variants").main([str(folder), "--max-test", "1"])


def test_time_to_accuracy_smoke_at_two_scales(endonuke, tmp_path, monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    tta = load_script("time_to_accuracy")
    out = tmp_path / "tta.json"
    result = tta.main(["--smoke", "--datasets", "endonuke,endonuke-x2", "--minutes", "0.15",
                       "--workdir", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
                       "--json", str(out), "--plot", str(tmp_path / "tta.png"),
                       "--device", "cpu", "--set", "patch.class_balance=0"])
    assert json.loads(out.read_text(encoding="utf-8"))["summary"] == json.loads(
        json.dumps(result["summary"]))
    runs = {r["dataset"]: r for r in result["runs"]}
    assert set(runs) == {"endonuke", "endonuke-x2"}
    for run in runs.values():
        assert run["train_seconds"] < 0.15 * 60 * 2 + 20  # the budget held (plus loading)
        assert run["overrides"] == ["patch.class_balance=0"]
        assert 0.0 <= run["scores"]["detection_f1"] <= 1.0
        assert run["source_mpp"]["how"] == "estimated"
        assert run["steps_per_second"] == pytest.approx(run["steps"] / run["train_seconds"])
        assert run["model"] == run["model_spec"]["name"] == default_model("fast")  # as train
        assert run["precision"] == result["machine"]["precision"]
        assert run["views"] == "flips" and run["context_radius_px"] > 0  # as the fast recipe
        assert tta.curve(run)[3] == "flips + neighbours"
    # the 2x copy is twice as fine: its estimated pixel size is about half
    ratio = runs["endonuke-x2"]["source_mpp"]["value"] / runs["endonuke"]["source_mpp"]["value"]
    assert ratio == pytest.approx(0.5, rel=0.15)
    assert (tmp_path / "tta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["init"] == "none" for r in result["runs"])
    # the figure of recorded runs, redrawn from their JSON without training
    replot = tta.main(["--plot-from", str(out), str(out), "--plot", str(tmp_path / "re.png")])
    assert len(replot["runs"]) == 2 * len(result["runs"])
    assert (tmp_path / "re.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="unknown dataset"):
        tta.main(["--smoke", "--datasets", "kidney"])


def test_time_to_accuracy_scores_the_ensemble_of_earlier_runs(endonuke, tmp_path, monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    tta = load_script("time_to_accuracy")
    common = ["--smoke", "--datasets", "endonuke", "--workdir", str(tmp_path / "runs"),
              "--device", "cpu"]
    single = tta.main([*common, "--minutes", "0.1", "--seeds", "0,1", "--members", "1"])
    assert [r["members"] for r in single["runs"]] == [1, 1]
    folders = [r["model_dir"] for r in single["runs"]]
    out = tmp_path / "ens.json"
    result = tta.main([*common, "--ensembles-of", *folders, "--group", "2", "--json", str(out)])
    (run,) = result["runs"]
    assert run["seeds"] == [0, 1] and run["members"] == folders
    thresholds = [r["threshold"] for r in single["runs"]]
    assert run["postprocess"]["threshold"] == pytest.approx(np.mean(thresholds))
    assert 0.0 <= run["scores"]["detection_f1"] <= 1.0
    assert json.loads(out.read_text(encoding="utf-8"))["summary"]
    with pytest.raises(SystemExit, match="do not make groups of 2"):
        tta.main([*common, "--ensembles-of", folders[0], "--group", "2"])


def test_time_to_accuracy_scores_every_round_and_what_each_rule_keeps(endonuke, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    tta = load_script("time_to_accuracy")
    # no refit, so that every round is validated and any of them could be kept
    result = tta.main(["--smoke", "--datasets", "endonuke", "--minutes", "0.15",
                       "--workdir", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
                       "--device", "cpu", "--score-rounds", "--set", "train.refit_share=0"])
    run = result["runs"][0]
    rounds = run["round_scores"]
    assert [r["round"] for r in rounds] == list(range(1, run["rounds"] + 1))
    assert all(0.0 <= r["test"]["detection_f1"] <= 1.0 for r in rounds)
    picks = run["picks"]
    # the fast recipe keeps on "combined": that rule's round is the kept model (whose own
    # scores come after the whole search at the end, its round's after the threshold alone)
    assert picks["kept on combined"]["epoch"] == run["best_round"]
    assert picks["last epoch"]["test"] == rounds[-1]["test"]
    best = max(r["test"]["weighted_f1"] for r in rounds)
    assert picks["best test weighted_f1"]["test"]["weighted_f1"] == best


def test_time_to_accuracy_names_the_network_of_an_ensemble(tmp_path):
    from qpcell.checkpoint import classes_to_meta, save_model
    from qpcell.config import PostprocessConfig, to_dict
    from qpcell.models import create_model
    from qpcell.points import make_classes
    from qpcell.train_ensemble import write_ensemble

    tta = load_script("time_to_accuracy")
    classes = classes_to_meta(make_classes(["a", "b"]))
    members = [save_model(tmp_path / "ens" / "members" / f"member-{k}",
                          create_model("unet", 2, base=4, class_weights="cells"),
                          {"classes": classes, "mpp": 0.5, "postprocess_kind": "sdrdin",
                           "mask": {}, "postprocess": to_dict(PostprocessConfig(mpp=0.5))})
               for k in (1, 2)]
    write_ensemble(tmp_path / "ens", members)
    spec = tta.network_spec(tmp_path / "ens")  # the ensemble's config names no network
    assert spec == tta.network_spec(members[0])
    assert spec["name"] == "unet" and spec["class_weights"] == "cells"


def test_time_to_accuracy_figure_keeps_precisions_apart(tmp_path):
    tta = load_script("time_to_accuracy")
    scores = {"detection_f1": 0.9, "weighted_f1": 0.9, "mean_class_aware_f1": 0.5}
    run = {"dataset": "endonuke", "minutes": 10.0, "recipe": "fast", "model": "unet",
           "model_spec": {"class_weights": "cells"}, "init": "none", "scores": scores}
    files = []
    for precision in ("fp32", "bf16"):
        files.append(tmp_path / f"{precision}.json")
        files[-1].write_text(json.dumps({"machine": {"precision": precision},
                                         "runs": [run, run]}), encoding="utf-8")
    legacy = tmp_path / "legacy.json"  # a record from before runs carried their precision
    legacy.write_text(json.dumps({"runs": [run]}), encoding="utf-8")
    out = tmp_path / "fig.png"
    replot = tta.main(["--plot-from", *map(str, files), str(legacy), "--plot", str(out)])
    curves = [tta.curve(r) for r in replot["runs"]]
    assert [c[-1] for c in curves] == ["fp32", "fp32", "bf16", "bf16", None]
    assert len(set(curves)) == 3 and len({c[:-1] for c in curves}) == 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs that predict another way (test-time views, neighbours' classes) get lines of their own
    flips = {**run, "views": "flips", "precision": "bf16"}
    both = {**flips, "context_radius_px": 22.7}
    assert [tta.curve(r)[3] for r in (run, flips, both)] == ["", "flips", "flips + neighbours"]


def script_with_a_model(name: str, endonuke: Path, tmp_path: Path, monkeypatch):
    """Benchmark script ``name`` and EndoNuke's split, with a model folder as
    ``time_to_accuracy.py`` keeps them at ``tmp_path / "m"``: two steps of a base-4 network on
    four training images, the first one validating."""
    from dataclasses import replace

    from qpcell.config import PatchConfig, TrainConfig
    from qpcell.train import train

    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    script = load_script(name)
    split = script.load_split("endonuke", endonuke.parent, tmp_path / "cache")
    images = split.trainval[:4]
    train(images, split.classes, tmp_path / "m", model_kwargs={"base": 4},
          train_cfg=replace(TrainConfig(), epochs=1), val_names=[images[0].name],
          patch_cfg=replace(PatchConfig(), size=64, stride=64), device="cpu",
          max_steps_per_epoch=2)
    return script, split


def test_class_gains_tunes_each_grid_on_validation_and_scores_test(endonuke, tmp_path,
                                                                   monkeypatch):
    gains, split = script_with_a_model("class_gains", endonuke, tmp_path, monkeypatch)
    out = tmp_path / "gains.json"
    rows = gains.main(["--models", str(tmp_path / "m"), "--grid", "1,2", "--grid",
                       "0.1,1,2,5", "--max-test", "2", "--cache", str(tmp_path / "cache"),
                       "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(rows))
    assert [r["grid"] for r in rows] == [[1.0, 2.0], [0.1, 1.0, 2.0, 5.0]]
    for row in rows:
        assert len(row["gain"]) == len(split.classes)
        assert set(row["gain"]) <= set(row["grid"])
    # gains move classes, never cells
    assert rows[0]["scores"]["detection_f1"] == rows[1]["scores"]["detection_f1"]


def test_class_context_scores_each_setting_on_the_same_cells(endonuke, tmp_path, monkeypatch):
    context, split = script_with_a_model("class_context", endonuke, tmp_path, monkeypatch)
    out = tmp_path / "context.json"
    result = context.main(["--models", str(tmp_path / "m"), "--settings", "0:0,10:0.5,400:1",
                           "--tune-radius", "10", "--max-test", "2", "--cache",
                           str(tmp_path / "cache"), "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [(r["radius_um"], r["weight"]) for r in rows] == [(0, 0), (10, 0.5), (400, 1),
                                                             (10, "tuned")]
    assert len({r["scores"]["detection_f1"] for r in rows}) == 1  # classes move, cells stay
    assert list(result["summary"]) == ["0:0", "10:0.5", "400:1", "10:tuned"]
    assert result["summary"]["0:0"]["weighted_f1"]["diff"] == 0.0
    from qpcell.tuning import CONTEXT_WEIGHTS

    (chosen,) = result["summary"]["10:tuned"]["chosen_weights"]
    assert chosen in CONTEXT_WEIGHTS and rows[-1]["chosen_weight"] == chosen
    # radius in µm at the image's pixel size: 2 µm reaches a cell 4 px away at 0.44 µm/px
    from qpcell.points import Detections

    cells = Detections(np.array([[0.0, 0.0], [4.0, 0.0], [40.0, 0.0]]), np.array([0, 1, 0]),
                       np.ones(3), np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2]]),
                       split.classes[:2], mpp=0.44)
    (mixed,) = context.with_context([cells], 2.0, 1.0, mpp=1.0)
    assert mixed.labels.tolist() == [1, 0, 0]
    np.testing.assert_allclose(mixed.class_probs[2], [0.8, 0.2])


def test_fixed_postprocess_scores_the_saved_and_the_fixed_settings(endonuke, tmp_path,
                                                                 monkeypatch):
    fixed, _ = script_with_a_model("fixed_postprocess", endonuke, tmp_path, monkeypatch)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["postprocess"]
    out = tmp_path / "fixed.json"
    result = fixed.main(["--models", str(tmp_path / "m"), "--box", "7", "--max-test", "2",
                         "--cache", str(tmp_path / "cache"), "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    (row,) = result["models"]
    variants = row["variants"]
    assert list(variants) == list(fixed.VARIANTS)
    assert variants["tuned"]["setting"]["threshold"] == saved["threshold"]
    assert variants["tuned"]["setting"]["class_box_px"] == saved["class_box_px"]
    assert variants["threshold-0.5"]["setting"]["threshold"] == 0.5
    assert variants["untuned"]["setting"] == {"threshold": 0.5, "min_area_px": 10.0,
                                              "peak_window_px": 15, "class_box_px": 7,
                                              "class_gain": []}
    # gains move classes, never cells
    assert (variants["tuned"]["scores"]["detection_f1"]
            == variants["tuned-no-gain"]["scores"]["detection_f1"])
    one = result["summary"]["untuned"]["detection_f1"]
    assert one == {"mean": variants["untuned"]["scores"]["detection_f1"], "std": 0.0}


def test_memoised_maps_compute_each_batch_once():
    fixed = load_script("fixed_postprocess")
    calls = []

    def maps(tiles):
        calls.append(tiles.shape)
        return tiles.sum()

    memo = fixed.memoised(maps)
    a, b = np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 8, 8, 3), np.uint8)
    assert [memo(a), memo(b), memo(a.copy()), memo(b)] == [0, 192, 0, 192]
    assert len(calls) == 2


def test_time_to_accuracy_trains_on_a_few_images_drawn_by_the_seed_at_a_chosen_scale(
        endonuke, tmp_path, monkeypatch):
    from qpcell.checkpoint import read_config

    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    tta = load_script("time_to_accuracy")
    result = tta.main(["--smoke", "--datasets", "endonuke", "--minutes", "0.1", "--seeds", "0",
                       "--train-images", "4", "--workdir", str(tmp_path / "runs"),
                       "--cache", str(tmp_path / "cache"), "--device", "cpu",
                       "--model-mpp", "0.66"])
    (run,) = result["runs"]
    assert run["train_images"] == 4 and run["method"] == "endonuke 0.1 min (4 images)"
    assert run["model_mpp"] == 0.66
    split = tta.load_split("endonuke", endonuke.parent, tmp_path / "cache", max_trainval=6)
    (folder,) = (tmp_path / "runs").iterdir()
    assert read_config(folder)["mpp"] == 0.66  # the model works at the scale asked for
    training = read_config(folder)["training"]
    used = training["train_images"] + training["val_images"]
    assert len(used) == 4 and set(used) <= {a.name for a in split.trainval}
    with pytest.raises(SystemExit, match="--train-images 7"):
        tta.main(["--smoke", "--datasets", "endonuke", "--train-images", "7"])


def test_class_separability_counts_matched_cells_and_bounds_each_class():
    sep = load_script("class_separability")
    names = ["a", "b", "c"]
    truth = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    probs = np.array([[.9, .1, 0], [.8, .1, .1], [.6, .3, .1], [.2, .7, .1],
                      [.3, .6, .1], [.1, .8, .1], [.5, .1, .4], [.6, .1, .3]])
    row = sep.separability(probs, probs.argmax(axis=1), truth, names)
    assert row["confusion"] == [[3, 1, 0], [0, 2, 0], [2, 0, 0]]
    a, c = row["classes"]["a"], row["classes"]["c"]
    assert a["n"] == 4 and a["share"] == 0.5
    # "c" is never called, yet its probability ranks its two cells first: AUC and AP 1, and a
    # threshold of 0.3 calls exactly them
    assert c["auc"] == 1.0 and c["ap"] == 1.0 and c["best_f1"] == 1.0
    assert c["best_threshold"] == pytest.approx(0.3)
    assert 0.5 < a["auc"] < 1.0 and a["best_f1"] < 1.0
    # a class absent from the matched cells has no AUC
    row = sep.separability(probs[:6], probs[:6].argmax(axis=1), truth[:6], names)
    assert row["classes"]["c"]["auc"] is None and row["classes"]["c"]["best_f1"] == 0.0


def test_class_separability_runs_on_a_model_folder(endonuke, tmp_path, monkeypatch):
    sep, split = script_with_a_model("class_separability", endonuke, tmp_path, monkeypatch)
    out = tmp_path / "sep.json"
    rows = sep.main(["--models", str(tmp_path / "m"), "--max-test", "2", "--cache",
                     str(tmp_path / "cache"), "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(rows))
    (row,) = rows
    assert list(row["classes"]) == [c.name for c in split.classes]
    matched = int(np.sum(row["confusion"]))
    assert matched == sum(s["n"] for s in row["classes"].values())
    assert matched <= sum(len(a.xy) for a in split.test[:2])


def test_views_retunes_each_model_for_its_views_and_reproduces_training(endonuke, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    tta = load_script("time_to_accuracy")
    common = ["--smoke", "--datasets", "endonuke", "--workdir", str(tmp_path / "runs"),
              "--device", "cpu"]
    single = tta.main([*common, "--minutes", "0.1", "--seeds", "0,1", "--members", "1"])
    folders = [r["model_dir"] for r in single["runs"]]
    ens = tta.main([*common, "--ensembles-of", *folders, "--group", "2"])["runs"][0]
    views = load_script("views")
    out = tmp_path / "views.json"
    result = views.main([folders[0], str(tmp_path / "runs" / "endonuke-ensemble-seeds-0-1"),
                         "--dataset", "endonuke", "--views", "none,flips",
                         "--one-view-with-their-settings", "--max-test", "3", "--json",
                         str(out)])
    rows = result["models"][folders[0]]
    assert set(rows) == {"none", "flips", "none@flips"}
    # the fast recipe tunes for the four flips: the same weights, tuning and test images give
    # the run's own scores again (alone exactly; in the whole suite other torch thread counts
    # change the maps' last bits, and a tie in the threshold search may then go the other way)
    own = single["runs"][0]["scores"]
    assert rows["flips"]["scores"]["detection_f1"] == pytest.approx(own["detection_f1"],
                                                                    abs=0.05)
    assert rows["none@flips"]["setting"] == rows["flips"]["setting"]  # one view, their settings
    ens_rows = result["models"][str(tmp_path / "runs" / "endonuke-ensemble-seeds-0-1")]
    # its members re-tuned for the flips combine to the settings their training chose
    assert ens_rows["flips"]["setting"]["threshold"] == pytest.approx(
        ens["postprocess"]["threshold"], abs=0.051)  # at most one member one grid step away
    assert result["summary"]["flips"]["minus_none"]["detection_f1"]["of"] == 2
    assert json.loads(out.read_text(encoding="utf-8"))["dataset"] == "endonuke"


def test_cell_classifier_scores_each_share_on_the_same_network(endonuke, tmp_path, monkeypatch):
    cells, _ = script_with_a_model("cell_classifier", endonuke, tmp_path, monkeypatch)
    out = tmp_path / "cells.json"
    result = cells.main(["--models", str(tmp_path / "m"), "--shares", "0,0.5", "--steps", "3",
                         "--max-test", "2", "--cache", str(tmp_path / "cache"), "--workdir",
                         str(tmp_path / "w"), "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [r["share"] for r in rows] == [0.0, 0.5, "tuned"]
    assert rows[-1]["chosen_share"] in (0.0, 0.5) and rows[0]["classifier_steps"] == 3
    assert result["summary"]["0.0"]["weighted_f1"]["diff"] == 0.0
    from qpcell.checkpoint import read_config

    assert read_config(tmp_path / "w" / "m" / "share-0.5")["model"]["share"] == 0.5
    assert read_config(tmp_path / "w" / "m" / "share-0")["model"]["name"] == "s-drdin"


def test_cell_classifier_dense_scores_windows_and_the_dense_map(tmp_path):
    dense = load_script("cell_classifier_dense")
    out = tmp_path / "dense.json"
    result = dense.main(["--margins", "0,8", "--steps", "2", "--images", "3", "--train", "2",
                         "--size", "64", "--crop-px", "16", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == result
    assert [(r["margin_px"], r["steps"]) for r in result["rows"]] == [(0, 2), (8, 2)]
    assert result["test_cells"] > 0
    assert all(0.0 <= r["windows"] <= 1.0 and 0.0 <= r["dense"] <= 1.0 for r in result["rows"])
