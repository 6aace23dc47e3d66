"""Post-processing on the device (qpcell.postprocess_torch, qpcell.device_cells) finds the
cells of the CPU path (qpcell.postprocess), on CPU tensors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from qpcell.checkpoint import ModelBundle, load_model
from qpcell.config import PostprocessConfig
from qpcell.device_cells import (
    DeviceCells,
    auto_batch_size,
    batch_size_for_memory,
    resolve_postprocess,
)
from qpcell.errors import QpcellError
from qpcell.io.slides import Slide, open_slide
from qpcell.metrics import match_points
from qpcell.points import make_classes
from qpcell.postprocess import postprocess_sdrdin
from qpcell.postprocess_torch import (
    cells_of_batch,
    label_components,
    sdrdin_batch,
    squared_distance_map,
)
from qpcell.predict import Predictor, predict_slide

CLASSES = make_classes(["a", "b", "c"])


def smooth_maps(rng: np.random.Generator, n: int, size: int, binary: bool = False):
    """``n`` detection maps of blobs (smoothed noise) in [0, 1], and class maps."""
    dets = []
    for _ in range(n):
        d = ndimage.gaussian_filter(rng.random((size, size)), rng.uniform(1.5, 4))
        d = (d - d.min()) / (d.max() - d.min())
        dets.append((d > 0.5).astype(np.float32) if binary else d.astype(np.float32))
    return np.stack(dets), rng.random((n, 3, size, size)).astype(np.float32)


def cpu_cells(det, cls, cfg, valid, core):
    """The CPU path on one tile as ``qpcell.predict`` runs it: crop, cells, core filter."""
    x0, y0, x1, y1 = valid
    d = postprocess_sdrdin(det[y0:y1, x0:x1], cls[:, y0:y1, x0:x1], cfg, CLASSES)
    xy = d.xy + [x0, y0]
    keep = ((xy[:, 0] >= core[0]) & (xy[:, 0] < core[2]) & (xy[:, 1] >= core[1])
            & (xy[:, 1] < core[3]))
    return xy[keep], d.labels[keep], d.scores[keep], d.class_probs[keep]


@pytest.mark.parametrize("binary", [False, True])
def test_batch_gives_the_cells_of_the_cpu_path_on_cropped_tiles(binary):
    rng = np.random.default_rng(3 + binary)
    det, cls = smooth_maps(rng, 6, 80, binary)
    det[5] = 1.0  # no background at all: scipy's convention for the distances
    valid = [(0, 0, 80, 80), (9, 0, 80, 80), (0, 13, 71, 80), (0, 0, 64, 58), (5, 7, 75, 70),
             (0, 0, 50, 60)]
    core = [(12, 12, 68, 68)] * 6
    for cfg in (PostprocessConfig(min_area_px=25, peak_window_px=15, class_box_px=49,
                                  class_gain=(1.0, 3.0, 0.5)),
                PostprocessConfig(threshold=0.6, min_area_px=0, peak_window_px=5,
                                  class_box_px=7),
                PostprocessConfig(threshold=0.6, min_area_px=0, peak_window_px=5,
                                  class_box_px=7, context_radius_px=9.5, context_weight=0.5,
                                  class_gain=(1.0, 3.0, 0.5))):
        # as DeviceCells: with the context, the cells around the core first, then the core
        grow = 10 if cfg.context_weight else 0
        batch = sdrdin_batch(torch.from_numpy(det), torch.from_numpy(cls), cfg, valid=valid,
                             core=np.array(core) + [-grow, -grow, grow, grow])
        got = cells_of_batch(batch, 6, cfg, CLASSES, core=core if grow else None)
        n = 0
        for i in range(6):
            xy, labels, scores, probs = cpu_cells(det[i], cls[i], cfg, valid[i], core[i])
            np.testing.assert_allclose(got[i].xy, xy, rtol=0, atol=1e-9)
            np.testing.assert_array_equal(got[i].labels, labels)
            np.testing.assert_array_equal(got[i].scores, scores)
            np.testing.assert_allclose(got[i].class_probs, probs, atol=1e-6)
            n += len(xy)
        assert n > 20


def test_components_and_distances_are_scipys():
    rng = np.random.default_rng(0)
    det, _ = smooth_maps(rng, 3, 64, binary=True)
    fg = torch.from_numpy(det > 0)
    lab = label_components(fg).numpy()
    for i in range(3):
        ref, n = ndimage.label(det[i] > 0, structure=np.ones((3, 3)))
        pairs = set(zip(ref[ref > 0].tolist(), lab[i][ref > 0].tolist(), strict=True))
        assert len(pairs) == n == len(np.unique(lab[i][lab[i] > 0]))  # the same partition
    inside = torch.zeros_like(fg)
    inside[:, 4:60, 0:50] = True
    d2 = squared_distance_map(fg & inside, inside).numpy()
    for i in range(3):
        crop = det[i, 4:60, 0:50] > 0
        ref = ndimage.distance_transform_edt(crop) ** 2
        np.testing.assert_array_equal(d2[i, 4:60, 0:50], np.rint(ref).astype(np.int64))


def test_batch_size_follows_free_memory_and_modes_resolve():
    gib = 2 ** 30
    assert batch_size_for_memory(80 * gib, 0.5 * gib) == 64  # capped
    assert batch_size_for_memory(8 * gib, 0.5 * gib) == 8
    assert batch_size_for_memory(gib, 0.7 * gib) == 1
    assert batch_size_for_memory(0, gib) == 1
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_postprocess("auto", cpu) == "cpu"
    assert resolve_postprocess("auto", cuda) == "device"
    assert resolve_postprocess("auto", cuda, "peaks") == "cpu"
    assert resolve_postprocess("device", cpu) == "device"
    with pytest.raises(QpcellError, match="peaks"):
        resolve_postprocess("device", cpu, "peaks")
    with pytest.raises(QpcellError, match="--postprocess"):
        resolve_postprocess("gpu", cpu)


def agreement(a, b, radius: float = 2.0) -> tuple[float, float]:
    """Detection F1 of ``a`` against ``b`` at ``radius`` px, and the share of matched cells
    with the same class."""
    m = match_points(a.xy, b.xy, radius)
    f1 = 2 * m.tp / max(1, len(a) + len(b))
    same = float(np.mean(a.labels[m.pred_idx] == b.labels[m.true_idx])) if m.tp else 1.0
    return f1, same


def both_paths(bundle, slide: Slide, **kw):
    cpu = Predictor.from_bundle(bundle, backend="torch", postprocess="cpu")
    dev = Predictor.from_bundle(bundle, backend="torch", postprocess="device")
    assert cpu.batch_cells is None and isinstance(dev.batch_cells, DeviceCells)
    out = []
    for p in (cpu, dev):
        out.append(predict_slide(slide, p.map_fn, p.postprocess_fn, mpp=bundle.mpp,
                                 classes=bundle.classes, reach_px=p.reach_px,
                                 batch_cells=p.batch_cells, **kw))
    return out


@pytest.mark.parametrize("context_px", [0.0, 12.0])
def test_synthetic_slide_cells_are_the_same_on_both_paths(tiny_model, context_px):
    from qpcell.synthetic import render_image

    bundle = load_model(tiny_model, device="cpu")
    image, _, _ = render_image((260, 380), 3, rng=11)
    slide = Slide.from_array(image)
    det, _ = bundle.predict_maps(image[None])
    # the barely trained model's maps, cut where a fifth of the pixels are cells
    bundle.postprocess = replace(bundle.postprocess, min_area_px=20,
                                 threshold=float(np.quantile(det, 0.8)),
                                 context_radius_px=context_px, context_weight=0.5)
    cpu, dev = both_paths(bundle, slide, tile_size=160, batch_size=5)
    assert len(cpu) > 60
    f1, same = agreement(dev, cpu)
    assert f1 >= 0.995 and same >= 0.995
    assert auto_batch_size(bundle, 160) == 4  # no CUDA here


class NucleusMaps(torch.nn.Module):
    """A hand-set "model" that finds real nuclei: dark blobs of haematoxylin or DAB
    (detection F1 about 0.7 on EndoNuke at 5 px); classes from the stain's colour."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        od = -torch.log(x.clamp_min(1 / 255))  # optical density per channel
        od = F.avg_pool2d(od, 5, 1, 2, count_include_pad=False)
        det = 8 * (od.sum(1, keepdim=True) - 1.9)
        cls = torch.cat([4 * (od[:, :1] - od[:, 2:]), 4 * (od[:, 2:] - od[:, 1:2]),
                         od[:, 1:2] - 1.0], dim=1)
        return {"det": det, "cls": cls}

    def maps(self, out):
        return torch.sigmoid(out["det"][:, 0]), torch.softmax(out["cls"], dim=1)


def untrained_sdrdin(folder: Path, classes) -> ModelBundle:
    """A narrow, untrained S-DRDIN (fixed seed), saved and loaded as ``qpcell predict`` does."""
    from qpcell.checkpoint import classes_to_meta, save_model
    from qpcell.config import to_dict
    from qpcell.models import create_model

    torch.manual_seed(0)
    save_model(folder, create_model("s-drdin", len(classes), base=4),
               {"classes": classes_to_meta(classes), "mpp": None, "postprocess_kind": "sdrdin",
                "postprocess": to_dict(PostprocessConfig())})
    return load_model(folder, device="cpu")


def test_endonuke_test_split_cells_are_the_same_on_both_paths(endonuke, tmp_path):
    from PIL import Image

    names = sorted((p.stem for p in (endonuke / "images").glob("*.png")), key=int)
    test = [endonuke / "images" / f"{n}.png" for i, n in enumerate(names) if i % 3 == 0]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in test])
    classes = make_classes(["stroma", "epithelium", "other"])
    hand = ModelBundle(Path("nucleus"), {"model": {"name": "nucleus"}}, classes, None,
                       PostprocessConfig(min_area_px=20, peak_window_px=7, class_box_px=11,
                                         class_gain=(1.0, 1.5, 4.0)),
                       "sdrdin", torch.device("cpu"), {"model": NucleusMaps().eval()})
    untrained = untrained_sdrdin(tmp_path / "m", classes)
    for bundle, step in ((hand, 1), (untrained, 3)):
        tiles = pixels[::step]
        maps = [bundle.predict_maps(tiles[i:i + 16]) for i in range(0, len(tiles), 16)]
        det = np.concatenate([m[0] for m in maps])
        cls = np.concatenate([m[1] for m in maps])
        cfg = bundle.postprocess
        if bundle is untrained:  # cut its maps where a fifth of the pixels are cells
            cfg = replace(cfg, min_area_px=20, threshold=float(np.quantile(det, 0.8)))
        dev = cells_of_batch(sdrdin_batch(torch.from_numpy(det), torch.from_numpy(cls), cfg),
                             len(det), cfg, classes)
        n_cpu = n_dev = tp = same = 0
        for i in range(len(det)):
            cpu = postprocess_sdrdin(det[i], cls[i], cfg, classes)
            m = match_points(dev[i].xy, cpu.xy, 2.0)
            n_cpu, n_dev, tp = n_cpu + len(cpu), n_dev + len(dev[i]), tp + m.tp
            same += int(np.sum(dev[i].labels[m.pred_idx] == cpu.labels[m.true_idx]))
        f1 = 2 * tp / (n_cpu + n_dev)
        assert n_cpu > 30 * len(det), bundle.path
        assert f1 >= 0.995 and same / tp >= 0.995, (bundle.path, f1, same / tp)
    # the hand-set model finds real cells: most annotated nuclei of the first images


def test_predict_cli_finds_the_same_cells_with_postprocess_device(cli, tiny_model,
                                                                   synthetic_project, tmp_path):
    outs = {}
    for mode in ("cpu", "device"):
        code, out, err = cli("predict", tiny_model, synthetic_project, "--out", tmp_path / mode,
                             "--device", "cpu", "--postprocess", mode, "--batch-size", "2")
        assert code == 0, err
        where = 'the device' if mode == 'device' else 'the CPU'
        assert f"cells found on {where}" in " ".join(out.split())
        outs[mode] = sorted(p for p in (tmp_path / mode).glob("*.csv") if p.name != "summary.csv")
    assert len(outs["cpu"]) == 3
    for a, b in zip(outs["cpu"], outs["device"], strict=True):
        assert a.read_text(encoding="utf-8") == b.read_text(encoding="utf-8")
    code, _, err = cli("predict", tiny_model, synthetic_project, "--out", tmp_path / "x",
                       "--postprocess", "gpu")
    assert code == 1 and "--postprocess" in err


def test_tiles_read_by_several_threads_are_the_tiles_read_by_one(tmp_path):
    import threading

    import tifffile

    from qpcell.predict import _read_batches, plan_tiles

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tiled.tif", image, tile=(64, 64), compression="zlib")
    with open_slide(tmp_path / "tiled.tif") as slide:
        plan = plan_tiles(slide, mpp=None, tile_size=160, tissue=False)
        one, four = ([t for t, _ in _read_batches(slide, plan, 5, threading.Event(), readers)]
                     for readers in (1, 4))
    assert len(one) == -(-len(plan) // 5) > 4
    for a, b in zip(one, four, strict=True):
        np.testing.assert_array_equal(a, b)


def test_postprocess_benchmark_times_both_paths_on_endonuke(endonuke, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("QPCELL_DATA", str(endonuke.parent))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "postprocess_device.py"
    spec = importlib.util.spec_from_file_location("bench_postprocess_device", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--step", "12", "--repeats", "1", "--json",
                             str(tmp_path / "pp.json")])
    finally:
        torch.set_num_threads(threads)
    assert result["tiles"] == 8 and result["cells"] > 300
    assert result["agreement_f1_2px"] >= 0.995 and result["agreement_same_class"] >= 0.995
    ms = result["ms_per_tile_process_cpu"]
    assert result["cpu_vs_device_process_cpu"] == pytest.approx(ms["cpu"] / ms["device"],
                                                                rel=0.05)
