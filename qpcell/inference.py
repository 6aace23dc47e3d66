"""Running a model on RGB tiles: uint8 arrays in, probability maps out.

Backends
--------
:func:`model_maps` runs a model through one of these (``backend=``):

``"eager"``
    The module as it is: NCHW float32 (autocast to bf16/fp16 on CUDA).
``"torch"``
    A copy of the module in channels-last memory format (same weights; autocast on CUDA).
``"torch-bf16"``
    ``"torch"`` under bfloat16 autocast on any device: on CPUs with native bf16 (AVX512-BF16,
    AMX; :func:`qpcell.device.cpu_has_bf16`) about three times the float32 throughput. Maps
    differ from float32 by up to about 1e-2 (probabilities); ``benchmarks/precision.py``
    measures what that does to detection and classification F1.
``"onnxruntime"``
    The module exported once to ONNX (in memory, dynamic batch and tile size) and run by ONNX
    Runtime's CPU provider, whose fused, blocked-layout convolutions are several times faster
    than eager PyTorch on CPUs (``benchmarks/speed.py``), one tile at a time; the model's own
    ``maps`` (sigmoid / softmax) then run in PyTorch. Used only after it reproduced the eager
    maps to :data:`CHECK_TOLERANCE` on a test tile of another size than the one exported;
    otherwise (or when the export fails) the ``"torch"`` backend is used, with a warning.
``"fast"``
    On CPU: ``"torch-bf16"`` where the CPU has native bf16, else ``"onnxruntime"`` when it is
    installed, else ``"torch"``; on other devices ``"torch"``. What ``qpcell predict``
    runs (:meth:`qpcell.predict.Predictor.from_bundle` sets it with :func:`using_backend`).
``"auto"`` (the default elsewhere: training's validation, ``ModelBundle.predict_maps``)
    ``"fast"`` for calls of at least :data:`AUTO_EXPORT_MIN_PIXELS` pixels (batch x height x
    width), else ``"torch"``: the one-off export (a few seconds) only pays for itself on
    slide-sized work. The choice depends only on the call's shape, never on what ran before.

The runner built for a module is cached on it (weakly) and rebuilt when the module's
parameters or buffers change (in place, as an optimiser step does, or replaced), when it is
moved to another device, or when it switches to training mode. Results agree with
``"eager"`` to about 1e-6 (float32 summation order); ``tests/test_inference.py`` holds them
to 1e-4.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import io
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch

from qpcell.device import autocast_dtype, cpu_has_bf16

MULTIPLE = 16  # 4 poolings by 2 (S-DRDIN 2.3): sizes must divide by 16
BACKENDS = ("auto", "fast", "onnxruntime", "torch-bf16", "torch", "eager")
#: Largest difference (probabilities) an exported model may show against eager PyTorch.
CHECK_TOLERANCE = 1e-4
#: ``"auto"`` uses ONNX Runtime for calls of at least this many pixels (one 512 px tile).
AUTO_EXPORT_MIN_PIXELS = 512 * 512

Maps = tuple[np.ndarray, np.ndarray | None]
TensorMaps = tuple[torch.Tensor, torch.Tensor | None]


def _pad_amounts(h: int, w: int) -> tuple[int, int]:
    return (-h) % MULTIPLE, (-w) % MULTIPLE


def to_tensor(tiles: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H', W')`` float32 in [0, 1], edge-padded to x16.

    On CUDA the bytes travel through pinned memory, asynchronously.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    h, w = tiles.shape[1:3]
    x = torch.from_numpy(np.ascontiguousarray(tiles))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    ph, pw = _pad_amounts(h, w)
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def to_array(tiles: np.ndarray) -> np.ndarray:
    """As :func:`to_tensor`, in numpy: ``(B, 3, H', W')`` float32, edge-padded to x16."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    h, w = tiles.shape[1:3]
    ph, pw = _pad_amounts(h, w)
    if ph or pw:
        tiles = np.pad(tiles, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    x = np.empty((tiles.shape[0], 3, h + ph, w + pw), np.float32)
    np.divide(tiles.transpose(0, 3, 1, 2), np.float32(255.0), out=x)
    return x


class _LogitsModule(torch.nn.Module):
    """``x -> (output, ...)``: the model's output dict as a tuple, in ``keys`` order."""

    def __init__(self, model: torch.nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x: torch.Tensor):
        out = self.model(x)
        return tuple(out[k] for k in self.keys)


class _TorchRunner:
    """A module on its device; ``channels_last`` copies it in that memory format.

    ``bf16`` runs it under bfloat16 autocast; otherwise it autocasts only on CUDA
    (:func:`qpcell.device.autocast_dtype`).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, channels_last: bool,
                 bf16: bool = False) -> None:
        self.device = device
        self.channels_last = channels_last
        self.model = (copy.deepcopy(model).to(memory_format=torch.channels_last)
                      if channels_last else model)
        self.amp = (torch.bfloat16 if bf16 else
                    autocast_dtype(device, "auto" if device.type == "cuda" else "fp32"))
        self.name = "torch-bf16" if bf16 else "torch" if channels_last else "eager"

    def prepare(self, tiles: np.ndarray) -> torch.Tensor:
        """The input tensor of ``tiles`` on the runner's device (the host-to-device copy)."""
        x = to_tensor(tiles, self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> TensorMaps:
        """Float32 maps of a :meth:`prepare`-d batch, cropped to ``size`` (H, W), on the
        device."""
        h, w = size
        with torch.inference_mode(), torch.autocast(self.device.type,
                                                     dtype=self.amp or torch.float32,
                                                     enabled=self.amp is not None):
            det, cls = self.model.maps(self.model(x))
            det = det[:, :h, :w].float()
            cls = None if cls is None else cls[:, :, :h, :w].float()
        return det, cls

    def tensors(self, tiles: np.ndarray) -> TensorMaps:
        """``(det (B, H, W), cls (B, C, H, W) | None)`` float32 tensors on the device."""
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[None]
        return self.forward(self.prepare(tiles), tiles.shape[1:3])

    def __call__(self, tiles: np.ndarray) -> Maps:
        det, cls = self.tensors(tiles)
        return det.cpu().numpy(), None if cls is None else cls.cpu().numpy()


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime (with its CPU provider) can be imported."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CPUExecutionProvider" in onnxruntime.get_available_providers()


def export_onnx(model: torch.nn.Module, size: tuple[int, int] = (64, 64)
                ) -> tuple[bytes, tuple[str, ...]]:
    """ONNX bytes of ``model``'s forward pass, and the names of its outputs.

    Input ``x`` (B, 3, H, W) float32; one output per entry of the model's output dict (e.g.
    ``cls_logits``, ``det_logits``), each (B, K, H, W); B, H, W dynamic (H, W multiples of
    16). ``size`` is the (H, W) traced. The probability maps are left to the model's own
    ``maps`` (run by PyTorch: ONNX Runtime's channel softmax is slow).
    """
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        keys = tuple(sorted(model.eval()(x)))
    wrapper = _LogitsModule(model, keys).eval()
    axes = {k: {0: "batch", 2: "height", 3: "width"} for k in ("x", *keys)}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices
        torch.onnx.export(wrapper, (x,), buf, input_names=["x"], output_names=list(keys),
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True,
                          dynamo=False)
    return buf.getvalue(), keys


class _OnnxRunner:
    """An ONNX Runtime CPU session of :func:`export_onnx`; the model's ``maps`` in PyTorch."""

    name = "onnxruntime"

    def __init__(self, model: torch.nn.Module, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle worker threads sleep instead of spinning: the tile reader and the
        # post-processing threads need the same cores between forward passes
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        onnx, self.keys = export_onnx(model)
        self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        self.model = weakref.ref(model)  # for its maps; the cache must not keep it alive

    def __call__(self, tiles: np.ndarray) -> Maps:
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[None]
        h, w = tiles.shape[1:3]
        model = self.model()
        if model is None:
            raise RuntimeError("the model of this ONNX Runtime session no longer exists")
        dets, clss = [], []
        # one tile at a time: on a CPU a batch is no faster, and it multiplies the
        # activations ONNX Runtime keeps in its memory arena
        for tile in tiles:
            out = self.session.run(None, {"x": to_array(tile[None])})
            with torch.inference_mode():
                det, cls = model.maps({k: torch.from_numpy(v) for k, v in
                                       zip(self.keys, out, strict=True)})
            dets.append(det[:, :h, :w].float().numpy())
            clss.append(None if cls is None else cls[:, :, :h, :w].float().numpy())
        det = np.concatenate(dets)
        cls = None if clss[0] is None else np.concatenate(clss)
        return det, cls


def _max_difference(a: Maps, b: Maps) -> float:
    if (a[1] is None) != (b[1] is None):
        return float("inf")
    pairs = [(a[0], b[0])] + ([] if a[1] is None else [(a[1], b[1])])
    if any(x.shape != y.shape for x, y in pairs):
        return float("inf")
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)


def check_runner(runner: Callable[[np.ndarray], Maps], model: torch.nn.Module,
                 device: torch.device, *, size: tuple[int, int] = (80, 96), seed: int = 0
                 ) -> float:
    """Largest difference between ``runner`` and eager PyTorch on a random RGB tile of
    ``size`` (a size other than the traced one, to catch shapes frozen into an export)."""
    tiles = np.random.default_rng(seed).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    return _max_difference(runner(tiles), _TorchRunner(model, device, False)(tiles))


def _fingerprint(model: torch.nn.Module, device: torch.device) -> tuple:
    tensors = itertools.chain(model.parameters(), model.buffers())
    return (str(device), model.training,
            tuple((id(t), t._version, t.device.type) for t in tensors))


def resolve_backend(backend: str, device: torch.device, pixels: int | None = None) -> str:
    """The concrete backend ``"auto"`` or ``"fast"`` stands for (see the module notes)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        backend = "fast" if pixels is None or pixels >= AUTO_EXPORT_MIN_PIXELS else "torch"
    if backend == "fast":
        if device.type != "cpu":
            backend = "torch"
        elif cpu_has_bf16():
            backend = "torch-bf16"
        else:
            backend = "onnxruntime" if onnxruntime_available() else "torch"
    return backend


_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("qpcell_inference_backend",
                                                               default="auto")


@contextlib.contextmanager
def using_backend(backend: str) -> Iterator[None]:
    """Within the block, :func:`model_maps` calls that name no backend use ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; choose from {BACKENDS}")
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def _build(model: torch.nn.Module, device: torch.device, backend: str):
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"the onnxruntime backend runs on the CPU, not {device}")
        try:
            runner = _OnnxRunner(model)
            diff = check_runner(runner, model, device)
        except Exception as err:  # noqa: BLE001 - any export/runtime failure: use torch
            warnings.warn(f"ONNX Runtime unavailable for {type(model).__name__} "
                          f"({type(err).__name__}: {err}); using PyTorch", stacklevel=3)
        else:
            if diff <= CHECK_TOLERANCE:
                return runner
            warnings.warn(f"ONNX Runtime differs from PyTorch by {diff:.2g} for "
                          f"{type(model).__name__}; using PyTorch", stacklevel=3)
    return _TorchRunner(model, device, True, bf16=backend == "torch-bf16")


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def runner_for(model: torch.nn.Module, device: torch.device, backend: str = "auto",
               pixels: int | None = None):
    """The (cached) callable ``tiles (B, H, W, 3) uint8 -> (det, cls)`` for ``model``.

    ``pixels`` (B x H x W of the call) lets ``"auto"`` choose (:func:`resolve_backend`;
    ``None`` = big). A model in training mode always runs ``"eager"``. The runner's ``name``
    says which backend it is.
    """
    backend = resolve_backend(backend, device, pixels)
    if model.training or backend == "eager":
        # nothing to build; not cached either (it holds the model, which would keep the
        # weak cache entry alive)
        return _TorchRunner(model, device, False)
    key = _fingerprint(model, device)
    with _LOCK:
        built = _CACHE.setdefault(model, {})
        entry = built.get(backend)
        if entry is None or entry[0] != key:
            entry = built[backend] = (key, _build(model, device, backend))
        return entry[1]


def model_maps(model: torch.nn.Module, tiles: np.ndarray, device: torch.device, *,
               backend: str | None = None) -> Maps:
    """Detection and class probability maps of ``model`` for RGB tiles.

    Parameters
    ----------
    tiles
        ``(B, H, W, 3)`` uint8 RGB (any H, W; padded internally).
    backend
        One of :data:`BACKENDS` (see the module notes); ``None``: the one set by
        :func:`using_backend`, by default ``"auto"``.

    Returns
    -------
    det : (B, H, W) float32; cls : (B, C, H, W) float32 or None
    """
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    pixels = int(np.prod(tiles.shape[:3]))
    return runner_for(model, device, backend or _BACKEND.get(), pixels)(tiles)


def model_tensors(model: torch.nn.Module, tiles: np.ndarray, device: torch.device, *,
                  backend: str | None = None) -> TensorMaps:
    """As :func:`model_maps`, as float32 tensors left on ``device`` (PyTorch backends), or
    wrapping the host arrays of the others (ONNX Runtime) without a copy."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    pixels = int(np.prod(tiles.shape[:3]))
    runner = runner_for(model, device, backend or _BACKEND.get(), pixels)
    if hasattr(runner, "tensors"):
        return runner.tensors(tiles)
    det, cls = runner(tiles)
    return torch.from_numpy(det), None if cls is None else torch.from_numpy(cls)


__all__ = ["BACKENDS", "CHECK_TOLERANCE", "AUTO_EXPORT_MIN_PIXELS", "MULTIPLE", "to_tensor",
           "to_array", "export_onnx", "onnxruntime_available", "check_runner", "resolve_backend",
           "using_backend", "runner_for", "model_maps", "model_tensors"]
