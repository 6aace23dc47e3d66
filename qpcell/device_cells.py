"""Cells of a batch of tiles where the model runs: the maps never leave its device.

:class:`DeviceCells` is the whole per-batch step of :func:`qpcell.predict.iter_plan` for
S-DRDIN-style models (``postprocess_kind == "sdrdin"``): uint8 tiles in, copied to the device
(pinned host memory, non-blocking, on CUDA), the model's maps computed and post-processed
there by :mod:`qpcell.postprocess_torch`, and only the cells (centres, scores, box means)
brought back. On a CPU the same code runs on CPU tensors.

Where post-processing runs (``qpcell predict --postprocess``, :func:`resolve_postprocess`):
``"device"`` here, ``"cpu"`` the per-tile numpy path of :mod:`qpcell.postprocess` in a thread
pool, ``"auto"`` the device on CUDA and the CPU path elsewhere (the faster one on CPUs,
``benchmarks/speed.py``). Models with MTL-IHC's peak post-processing always use the CPU path.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from qpcell.config import PostprocessConfig
from qpcell.errors import QpcellError
from qpcell.points import CellClass, Detections
from qpcell.postprocess_torch import cells_of_batch, sdrdin_batch
from qpcell.views import DEFAULT_VIEWS, VIEWS, unview_map, view_tiles

POSTPROCESS_MODES = ("auto", "device", "cpu")
#: Share of the free device memory that ``auto_batch_size`` plans to use.
MEMORY_SHARE = 0.5
#: Largest batch ``auto_batch_size`` picks (more gains nothing once the device is busy).
MAX_AUTO_BATCH = 64
#: Batch size on CPUs and wherever free memory cannot be measured.
DEFAULT_BATCH = 4


def resolve_postprocess(mode: str, device: torch.device, kind: str = "sdrdin") -> str:
    """``"device"`` or ``"cpu"``: where ``mode`` (one of :data:`POSTPROCESS_MODES`) runs the
    post-processing of a model on ``device`` whose ``postprocess_kind`` is ``kind``."""
    if mode not in POSTPROCESS_MODES:
        raise QpcellError(f"unknown --postprocess {mode!r}; choose from "
                          f"{', '.join(POSTPROCESS_MODES)}")
    if mode == "auto":
        return "device" if device.type == "cuda" and kind == "sdrdin" else "cpu"
    if mode == "device" and kind != "sdrdin":
        raise QpcellError(f"--postprocess device needs S-DRDIN post-processing; this model "
                          f"uses {kind!r} (use --postprocess cpu)")
    return mode


def batch_size_for_memory(free_bytes: int, bytes_per_tile: float, *,
                          share: float = MEMORY_SHARE, cap: int = MAX_AUTO_BATCH) -> int:
    """Tiles per batch that fit ``share`` of ``free_bytes`` at ``bytes_per_tile`` each, as a
    power of two between 1 and ``cap``.

    >>> batch_size_for_memory(80 * 2**30, 600 * 2**20)
    64
    >>> batch_size_for_memory(8 * 2**30, 600 * 2**20)
    4
    """
    if bytes_per_tile <= 0:
        return cap
    fit = int(share * free_bytes // bytes_per_tile)
    return max(1, min(cap, 2 ** int(math.log2(fit)) if fit >= 1 else 1))


class DeviceCells:
    """Tiles -> cells per tile, computed on ``bundle``'s device (see the module notes).

    Parameters
    ----------
    bundle
        A loaded model (``qpcell.checkpoint.ModelBundle``) with S-DRDIN post-processing.
    backend
        Inference backend (:mod:`qpcell.inference`).
    profile
        Wait for the device after each stage, so that :attr:`seconds` splits the time into
        ``copy``, ``forward`` and ``postprocess`` (slower on GPUs; for benchmarks).
    """

    def __init__(self, bundle, backend: str = "fast", profile: bool = False) -> None:
        if getattr(bundle, "postprocess_kind", "sdrdin") != "sdrdin":
            raise QpcellError("device post-processing needs a model with S-DRDIN "
                              "post-processing")
        self.bundle = bundle
        self.backend = backend
        self.device = torch.device(bundle.device)
        self.classes: tuple[CellClass, ...] = tuple(bundle.classes)
        self.profile = profile
        self.seconds = {"copy": 0.0, "forward": 0.0, "postprocess": 0.0}

    @property
    def cfg(self) -> PostprocessConfig:
        """The bundle's post-processing settings (read at each batch)."""
        return self.bundle.postprocess

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tick(self, key: str, t0: float) -> float:
        if self.profile:
            self._sync()
        t1 = time.perf_counter()
        self.seconds[key] += t1 - t0
        return t1

    def maps(self, tiles: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 maps of ``tiles`` (B, H, W, 3) uint8, on the device (CPU tensors for ONNX
        Runtime)."""
        from qpcell.inference import runner_for, using_backend

        tiles = np.asarray(tiles)
        pixels = int(np.prod(tiles.shape[:3]))
        models = self.bundle.models
        parts = ([(models["detection"], 0), (models["classification"], 1)]
                 if "detection" in models else [(m, None) for m in self.bundle.members])
        views = VIEWS[getattr(self.bundle, "views", DEFAULT_VIEWS)]
        out: list[torch.Tensor | None] = [None, None]
        with using_backend(self.backend):
            for view in views:
                seen = view_tiles(tiles, view) if len(views) > 1 else tiles
                size = seen.shape[1:3]
                for module, which in parts:
                    runner = runner_for(module, self.device, self.backend, pixels)
                    t0 = time.perf_counter()
                    if hasattr(runner, "prepare"):
                        x = runner.prepare(seen)
                        t0 = self._tick("copy", t0)
                        maps = runner.forward(x, size)
                    else:
                        det, cls = runner(seen)
                        maps = (torch.from_numpy(det),
                                None if cls is None else torch.from_numpy(cls))
                    maps = tuple(None if m is None else unview_map(m, view) for m in maps)
                    self._tick("forward", t0)
                    # members and views are summed; a pipeline's parts give one map each
                    out = [o if m is None or (which is not None and k != which)
                           else m if o is None else o + m
                           for k, (o, m) in enumerate(zip(out, maps, strict=True))]
        # the mean over the views and (an ensemble) the members
        n = len(views) * (1 if "detection" in models else len(parts))
        if n > 1:
            out = [None if o is None else o / n for o in out]
        return out[0], out[1]

    def __call__(self, tiles: np.ndarray, cores: np.ndarray, plan) -> list[Detections]:
        """Cells of each tile whose centre is in its core, in grid px (the cells of
        ``qpcell.predict._tile_cells`` for every tile of the batch)."""
        det, cls = self.maps(tiles)
        return self.postprocess(det, cls, cores, plan)

    def postprocess(self, det: torch.Tensor, cls: torch.Tensor | None, cores: np.ndarray,
                    plan) -> list[Detections]:
        """:meth:`__call__` from the batch's maps (:meth:`maps`)."""
        cores = np.asarray(cores, dtype=np.int64).reshape(-1, 4)
        t0 = time.perf_counter()
        gw, gh = plan.grid
        tx, ty = cores[:, 0] - plan.halo, cores[:, 1] - plan.halo  # tile origins, grid px
        valid = np.stack([np.maximum(0, -tx), np.maximum(0, -ty),
                          np.minimum(plan.tile, gw - tx), np.minimum(plan.tile, gh - ty)], 1)
        core = np.stack([cores[:, 0] - tx, cores[:, 1] - ty, cores[:, 2] - tx,
                         cores[:, 3] - ty], 1)
        cfg = self.cfg
        grow = math.ceil(cfg.context_radius_px) if cfg.context_weight > 0 else 0
        batch = sdrdin_batch(det, cls, cfg, valid=valid,
                             core=core + np.array([-grow, -grow, grow, grow]))
        cells = cells_of_batch(batch, len(cores), cfg, self.classes,
                               offsets=np.stack([tx, ty], 1), core=core if grow else None)
        self._tick("postprocess", t0)
        return cells

    def probe_bytes_per_tile(self, tile: int, n: int = 2) -> float:
        """Peak CUDA memory (bytes) of one batch of ``n`` ``tile``-px tiles, per tile,
        maps and post-processing included (weights counted too: a safe overestimate)."""
        if self.device.type != "cuda":
            raise QpcellError("device memory can only be measured on CUDA")
        rng = np.random.default_rng(0)
        tiles = rng.integers(0, 256, (n, tile, tile, 3), dtype=np.uint8)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        det, cls = self.maps(tiles)
        sdrdin_batch(det, cls, self.cfg)
        del det, cls
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - base) / n


def auto_batch_size(bundle, tile: int, backend: str = "fast") -> int:
    """Tiles per batch for ``bundle``: from the free memory of a CUDA device
    (:func:`batch_size_for_memory` of a measured batch), else :data:`DEFAULT_BATCH`."""
    device = torch.device(bundle.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_BATCH
    probe = DeviceCells(bundle, backend) if bundle.postprocess_kind == "sdrdin" else None
    if probe is None:
        return DEFAULT_BATCH
    per_tile = probe.probe_bytes_per_tile(tile)
    torch.cuda.empty_cache()  # the probe's blocks count as free again
    free, _ = torch.cuda.mem_get_info(device)
    return batch_size_for_memory(free, per_tile)


__all__ = ["POSTPROCESS_MODES", "resolve_postprocess", "batch_size_for_memory", "DeviceCells",
           "auto_batch_size", "DEFAULT_BATCH", "MAX_AUTO_BATCH"]
