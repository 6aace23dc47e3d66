"""Inference backends: every backend gives the eager PyTorch maps, and the fast one is the
default path of ``qpcell predict`` (``ModelBundle.predict_maps`` / ``Predictor``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpcell import inference
from qpcell.checkpoint import load_model, save_model
from qpcell.config import PostprocessConfig, to_dict
from qpcell.errors import QpcellError
from qpcell.inference import (
    AUTO_EXPORT_MIN_PIXELS,
    model_maps,
    onnxruntime_available,
    resolve_backend,
    runner_for,
    to_array,
    to_tensor,
)
from qpcell.models import create_model
from qpcell.predict import Predictor

CPU = torch.device("cpu")
needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime not installed")


def small_model(name: str = "s-drdin", base: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, 3, base=base).eval()


def tiles(shape=(2, 96, 80), seed: int = 0) -> np.ndarray:
    """Random RGB tiles: every pixel is different, so any misplaced pixel shows."""
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def assert_maps_close(a, b, tol=1e-4):
    assert a[0].shape == b[0].shape and a[0].dtype == np.float32
    np.testing.assert_allclose(a[0], b[0], atol=tol, rtol=0)
    assert (a[1] is None) == (b[1] is None)
    if a[1] is not None:
        assert a[1].shape == b[1].shape
        np.testing.assert_allclose(a[1], b[1], atol=tol, rtol=0)


def test_to_array_is_to_tensor_in_numpy():
    t = tiles((3, 37, 50))
    a = to_array(t)
    b = to_tensor(t, CPU).numpy()
    assert a.shape == b.shape == (3, 3, 48, 64)  # edge-padded to multiples of 16
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :, 36, :50],
                                  t[:, 36].transpose(0, 2, 1).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(a[:, :, 47, 63], a[:, :, 36, 49])  # replicated corner


@pytest.mark.parametrize(("name", "backend"), [
    ("s-drdin", "torch"), ("s-drdin", "onnxruntime"),
    ("drdin-detection", "onnxruntime"),  # detection map only
    ("unet", "onnxruntime"),  # classification maps only
])
def test_backends_give_the_eager_maps(name, backend):
    if backend == "onnxruntime" and not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    model = small_model(name)
    t = tiles()
    eager = model_maps(model, t, CPU, backend="eager")
    runner = runner_for(model, CPU, backend)
    assert runner.name == backend  # built, not fallen back
    got = runner(t)
    assert_maps_close(got, eager)
    assert got[0].shape == (2, 96, 80)
    # another size and batch size through the same (dynamic) runner, not a multiple of 16
    t2 = tiles((3, 50, 70), seed=1)
    assert_maps_close(runner(t2), model_maps(model, t2, CPU, backend="eager"))


def test_single_tile_without_batch_axis():
    model = small_model()
    t = tiles((1, 48, 32))
    a = model_maps(model, t[0], CPU, backend="torch")
    assert a[0].shape == (1, 48, 32)
    assert_maps_close(a, model_maps(model, t, CPU, backend="eager"))


@pytest.mark.parametrize("bf16", [False, True])
def test_auto_picks_the_fast_backend_for_slide_sized_calls_only(monkeypatch, bf16):
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: bf16)
    small, big = AUTO_EXPORT_MIN_PIXELS - 1, AUTO_EXPORT_MIN_PIXELS
    assert resolve_backend("auto", CPU, small) == "torch"
    fp32_fast = "onnxruntime" if onnxruntime_available() else "torch"
    assert resolve_backend("auto", CPU, big) == ("torch-bf16" if bf16 else fp32_fast)
    assert resolve_backend("auto", torch.device("cuda"), big) == "torch"
    assert resolve_backend("eager", CPU, big) == "eager"
    assert resolve_backend("fast", CPU, 1) == resolve_backend("auto", CPU, big)
    assert resolve_backend("fast", torch.device("cuda"), big) == "torch"
    with pytest.raises(ValueError, match="unknown inference backend"):
        resolve_backend("tensorrt", CPU)


def test_runner_is_cached_and_rebuilt_when_the_weights_change():
    model = small_model()
    t = tiles()
    first = runner_for(model, CPU, "torch")
    assert runner_for(model, CPU, "torch") is first
    before = first(t)
    with torch.no_grad():  # an optimiser step changes parameters in place
        model.cls_head.bias[0] += 0.5  # softmax ignores a shift of every class alike
    second = runner_for(model, CPU, "torch")
    assert second is not first
    after = second(t)
    assert np.abs(after[1] - before[1]).max() > 1e-3
    assert_maps_close(after, model_maps(model, t, CPU, backend="eager"))
    # a model in training mode always runs as it is
    model.train()
    assert runner_for(model, CPU, "auto").name == "eager"
    model.eval()


def test_export_failure_or_mismatch_falls_back_to_torch(monkeypatch):
    if not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    model = small_model()

    def broken(*args, **kwargs):
        raise RuntimeError("exporter says no")

    monkeypatch.setattr(inference, "export_onnx", broken)
    with pytest.warns(UserWarning, match="exporter says no"):
        assert runner_for(model, CPU, "onnxruntime").name == "torch"
    monkeypatch.undo()
    monkeypatch.setattr(inference, "check_runner", lambda *a, **k: 0.5)
    other = small_model(seed=1)
    with pytest.warns(UserWarning, match="differs from PyTorch by 0.5"):
        assert runner_for(other, CPU, "onnxruntime").name == "torch"


def test_model_whose_export_bakes_shapes_in_is_not_used_exported():
    """MTL-IHC's upsampling sizes are traced as constants: the check at another size than the
    traced one catches it, and PyTorch runs it instead."""
    if not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    torch.manual_seed(0)
    model = create_model("mtl-ihc", 2).eval()
    with pytest.warns(UserWarning):
        runner = runner_for(model, CPU, "onnxruntime")
    assert runner.name == "torch"
    t = tiles((1, 64, 64))
    assert_maps_close(runner(t), model_maps(model, t, CPU, backend="eager"))


@needs_ort
def test_predictor_runs_onnxruntime_and_gives_the_eager_maps(tmp_path, monkeypatch):
    """``qpcell predict``'s path: a saved model, loaded, through ``Predictor.from_bundle``,
    runs exported whatever the tile size and gives the eager maps (on a CPU without native
    bf16, where "fast" means ONNX Runtime)."""
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: False)
    model = small_model(base=8)
    classes = [{"name": n, "color": [i * 60, 80, 200 - i * 60]}
               for i, n in enumerate(["a", "b", "c"])]
    save_model(tmp_path / "m", model, {"classes": classes, "mpp": 0.44,
                                      "postprocess_kind": "sdrdin",
                                      "postprocess": to_dict(PostprocessConfig())})
    bundle = load_model(tmp_path / "m", device="cpu")
    predictor = Predictor.from_bundle(bundle)
    calls = []
    run = inference._OnnxRunner.__call__

    def counted(self, t):
        calls.append(t.shape)
        return run(self, t)

    monkeypatch.setattr(inference._OnnxRunner, "__call__", counted)
    t = tiles((2, 96, 80), seed=2)
    got = predictor.map_fn(t)
    assert calls[-1] == (2, 96, 80, 3)  # after the check made when it was built
    calls.clear()
    predictor.map_fn(t)
    assert calls == [(2, 96, 80, 3)]
    assert_maps_close(got, model_maps(bundle.models["model"], t, CPU, backend="eager"))
    bundle.predict_maps(t)  # elsewhere, a small call runs in PyTorch ("auto")
    assert len(calls) == 1
    with inference.using_backend("fast"):
        bundle.predict_maps(t)
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_channels_last_with_autocast_is_close_to_fp32():
    model = small_model().to("cuda")
    t = tiles()
    got = model_maps(model, t, torch.device("cuda"))
    ref = model_maps(model.cpu(), t, CPU, backend="eager")
    assert_maps_close(got, ref, tol=2e-2)  # bf16 / fp16 autocast


def test_bf16_backend_is_close_to_float32_and_says_what_it_is():
    model = small_model()
    t = tiles((2, 64, 48))
    runner = inference.runner_for(model, CPU, "torch-bf16")
    assert runner.name == "torch-bf16" and runner.amp == torch.bfloat16
    det, cls = runner(t)
    ref_det, ref_cls = model_maps(model, t, CPU, backend="eager")
    assert det.dtype == np.float32 and det.shape == ref_det.shape
    # bfloat16 keeps 8 bits of mantissa: close to float32, but not equal to it
    assert 0 < np.max(np.abs(det - ref_det)) < 0.05
    assert np.max(np.abs(cls - ref_cls)) < 0.05


def test_predictor_uses_the_backend_it_is_given(tmp_path):
    model = small_model(base=8)
    save_model(tmp_path / "m", model, {"classes": [{"name": "a", "color": [1, 2, 3]},
                                                   {"name": "b", "color": [3, 2, 1]},
                                                   {"name": "c", "color": [9, 9, 9]}],
                                       "mpp": 0.44, "postprocess_kind": "sdrdin",
                                       "postprocess": to_dict(PostprocessConfig())})
    bundle = load_model(tmp_path / "m", device="cpu")
    t = tiles((1, 64, 64), seed=3)
    bf16 = Predictor.from_bundle(bundle, backend="torch-bf16").map_fn(t)
    fp32 = Predictor.from_bundle(bundle, backend="eager").map_fn(t)
    assert_maps_close(fp32, model_maps(bundle.models["model"], t, CPU, backend="eager"))
    assert np.max(np.abs(bf16[0] - fp32[0])) > 0  # it did run in bf16
    with pytest.raises(QpcellError, match="unknown inference backend 'tensorrt'"):
        Predictor.from_bundle(bundle, backend="tensorrt")
