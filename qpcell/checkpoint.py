"""Model folders: self-describing, safe to load from strangers.

A model is a folder (like StarDist's): ``config.json`` says everything needed to rebuild and
use the model (architecture, classes and colours, µm/px, mask and post-processing settings,
tuned threshold, training summary, qpcell version) and ``weights.safetensors`` holds the
tensors. Nothing is unpickled, so a checkpoint from someone else cannot run code.
A "pipeline" (separate detection + classification models) holds one such folder per part; an
"ensemble" (:mod:`qpcell.ensemble`) one per member, whose maps are averaged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from qpcell import __version__
from qpcell.config import PostprocessConfig, from_dict, to_dict
from qpcell.device import pick_device
from qpcell.ensemble import mean_maps
from qpcell.errors import QpcellError
from qpcell.inference import model_maps
from qpcell.io.atomic import atomic_write_bytes, atomic_write_text
from qpcell.points import CellClass, Detections
from qpcell.views import DEFAULT_VIEWS, VIEWS, view_mean

FORMAT = "qpcell-model"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"


def save_model(folder: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """Write ``model`` and its description ``meta`` to ``folder`` (weights first, atomically).

    ``meta`` must hold ``classes`` (list of {name, color}), ``mpp``, ``postprocess_kind`` and
    ``postprocess``; the model's own ``spec()`` and the format header are added here.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, save(state))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "qpcell_version": __version__,
              "kind": "single", "model": model.spec(), **meta}
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, allow_nan=False))
    return folder


def save_pipeline(folder: str | Path, parts: dict[str, Path], meta: dict) -> Path:
    """Describe a pipeline of separately trained models (sub-folders of ``folder``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "qpcell_version": __version__,
              "kind": "pipeline",
              "components": {k: str(Path(v).relative_to(folder)) for k, v in parts.items()},
              **meta}
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, allow_nan=False))
    return folder


def save_ensemble(folder: str | Path, members: Sequence[Path], meta: dict) -> Path:
    """Describe an ensemble of model folders (sub-folders of ``folder``) whose maps are
    averaged (:mod:`qpcell.ensemble`); ``meta`` as for :func:`save_model`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "qpcell_version": __version__,
              "kind": "ensemble",
              "members": [str(Path(m).relative_to(folder)) for m in members], **meta}
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, allow_nan=False))
    return folder


def read_config(folder: str | Path) -> dict:
    """The validated ``config.json`` of a model folder."""
    folder = Path(folder)
    path = folder / CONFIG if folder.is_dir() else folder
    if not path.exists():
        raise QpcellError("not a qpcell model (no config.json; pass the model folder "
                          "that `qpcell train --out` wrote)", folder)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QpcellError(f"corrupt model description ({err})", path) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise QpcellError("not a qpcell model description", path)
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise QpcellError(f"written by a newer qpcell ({config.get('qpcell_version')}); "
                          f"upgrade qpcell to load it", path)
    for key in ("classes", "postprocess_kind", "postprocess"):
        if key not in config:
            raise QpcellError(f"model description lacks {key!r}", path)
    return config


def _load_module(folder: Path, config: dict, device: torch.device) -> torch.nn.Module:
    from qpcell.models import create_model

    spec = dict(config.get("model") or {})
    name = spec.pop("name", None)
    if name is None:
        raise QpcellError("model description has no model name", folder / CONFIG)
    try:
        model = create_model(name, **spec)
    except (TypeError, ValueError, KeyError) as err:
        raise QpcellError(f"cannot build model {name!r} ({err})", folder / CONFIG) from None
    path = folder / WEIGHTS
    if not path.exists():
        raise QpcellError("model weights are missing", path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise QpcellError(f"corrupt model weights ({err})", path) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise QpcellError(f"weights do not fit model {name!r}: {first}", path) from None
    return model.to(device).eval()


@dataclass
class ModelBundle:
    """A loaded model with everything needed to turn tiles into cells.

    Attributes
    ----------
    classes
        The model's cell classes.
    mpp
        µm per pixel the model works at, ``None`` when trained at the images' native scale.
    postprocess
        Post-processing settings at ``mpp`` (threshold tuned on validation).
    postprocess_kind
        ``"sdrdin"`` (detection map -> components -> peaks) or ``"peaks"`` (class-map peaks).
    views
        The test-time views whose maps are averaged (:mod:`qpcell.views`): those the
        post-processing was tuned for, unless the caller sets others.
    """

    path: Path
    meta: dict
    classes: tuple[CellClass, ...]
    mpp: float | None
    postprocess: PostprocessConfig
    postprocess_kind: str
    device: torch.device
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    views: str = DEFAULT_VIEWS

    @property
    def name(self) -> str:
        from qpcell.models.cell_classifier import display_name

        if self.meta.get("kind") == "pipeline":
            return "separate (" + " + ".join(
                display_name(m.spec()) for m in self.models.values()) + ")"
        if self.meta.get("kind") == "ensemble":
            first = display_name(next(iter(self.models.values())).spec())
            return f"ensemble of {len(self.models)} {first}"
        return display_name(self.meta["model"])

    @property
    def members(self) -> list[torch.nn.Module]:
        """The networks whose maps an ensemble averages (one for a single model; none for a
        pipeline, whose parts each give one of the maps)."""
        if self.meta.get("kind") == "pipeline":
            return []
        return list(self.models.values())

    def predict_maps(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probability maps for a batch of RGB tiles, averaged over an ensemble's members and
        over :attr:`views`.

        Parameters
        ----------
        tiles
            ``(B, H, W, 3)`` uint8 RGB.

        Returns
        -------
        det : (B, H, W) float32 detection probability
        cls : (B, C, H, W) float32 class probabilities, or None for a detection-only model
        """
        return view_mean(self._one_view_maps, tiles, self.views)

    def _one_view_maps(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if "detection" in self.models:
            det, _ = model_maps(self.models["detection"], tiles, self.device)
            _, cls = model_maps(self.models["classification"], tiles, self.device)
            return det, cls
        maps = [model_maps(m, tiles, self.device) for m in self.members]
        return maps[0] if len(maps) == 1 else mean_maps(maps)

    def to_detections(self, det: np.ndarray, cls: np.ndarray | None) -> Detections:
        """Cells from one tile's maps ((H, W) and (C, H, W)), in the maps' pixels."""
        from qpcell.postprocess import postprocess_peaks, postprocess_sdrdin

        if self.postprocess_kind == "peaks":
            peaks = self.meta.get("peaks", {})
            return postprocess_peaks(cls, threshold=float(peaks.get("threshold", 0.5)),
                                     min_distance_px=float(peaks.get("min_distance_px", 3)),
                                     classes=self.classes)
        return postprocess_sdrdin(det, cls, self.postprocess, self.classes)


def classes_from_meta(items: list[dict]) -> tuple[CellClass, ...]:
    """Class list from ``[{name, color}, ...]``."""
    return tuple(CellClass(c["name"], tuple(c["color"])) for c in items)


def classes_to_meta(classes) -> list[dict]:
    """``[{name, color}, ...]`` for a class list."""
    return [{"name": c.name, "color": list(c.color)} for c in classes]


def load_model(path: str | Path, device: str | torch.device | None = None) -> ModelBundle:
    """Load a model folder written by ``qpcell train`` (weights via safetensors only).

    Raises
    ------
    QpcellError
        If the folder is not a qpcell model, or its files are corrupt or do not match.
    """
    folder = Path(path)
    config = read_config(folder)
    device = device if isinstance(device, torch.device) else pick_device(device)
    models: dict[str, torch.nn.Module] = {}
    if config.get("kind") == "pipeline":
        for part, sub in (config.get("components") or {}).items():
            sub_folder = folder / sub
            models[part] = _load_module(sub_folder, read_config(sub_folder), device)
        if set(models) != {"detection", "classification"}:
            raise QpcellError("a pipeline needs a detection and a classification model",
                              folder / CONFIG)
    elif config.get("kind") == "ensemble":
        models = load_members(folder, config, device)
    else:
        models["model"] = _load_module(folder, config, device)
    try:
        classes = classes_from_meta(config["classes"])
        post = from_dict(PostprocessConfig, config["postprocess"])
    except (KeyError, TypeError, ValueError) as err:
        raise QpcellError(f"bad model description ({err})", folder / CONFIG) from None
    mpp = config.get("mpp")
    if mpp is not None and not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise QpcellError(f"bad pixel size {mpp!r}", folder / CONFIG)
    check_model_description(config, classes, post, models, folder / CONFIG)
    views = config.get("views", DEFAULT_VIEWS)
    if views not in VIEWS:
        raise QpcellError(f"unknown test-time views {views!r} (known: {', '.join(VIEWS)})",
                          folder / CONFIG)
    return ModelBundle(folder, config, classes, mpp, post, config["postprocess_kind"], device,
                       models, views)


def load_members(folder: Path, config: dict, device: torch.device
                 ) -> dict[str, torch.nn.Module]:
    """The member networks of the ensemble in ``folder``: each a model folder inside it with
    the ensemble's classes and pixel size (a one-line error naming what does not fit)."""
    members = config.get("members")
    if not isinstance(members, list) or not members:
        raise QpcellError("an ensemble lists no members", folder / CONFIG)
    models = {}
    for sub in members:
        sub_folder = (folder / str(sub)).resolve()
        if not sub_folder.is_relative_to(folder.resolve()):
            raise QpcellError(f"ensemble member {sub!r} lies outside the model folder",
                              folder / CONFIG)
        member = read_config(sub_folder)
        if member.get("kind", "single") != "single":
            raise QpcellError(f"ensemble member {sub!r} is not a single model", folder / CONFIG)
        if member.get("classes") != config.get("classes") or member.get("mpp") != config.get(
                "mpp"):
            raise QpcellError(f"ensemble member {sub!r} has other classes or another pixel "
                              "size than the ensemble", folder / CONFIG)
        models[str(sub)] = _load_module(sub_folder, member, device)
    return models


def _number_ok(value, low: float, high: float) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


def check_model_description(config: dict, classes: tuple[CellClass, ...],
                            post: PostprocessConfig, models: dict[str, torch.nn.Module],
                            path: Path) -> None:
    """Refuse a ``config.json`` whose classes or post-processing numbers cannot be right.

    The class list must have as many entries as the network has class maps, and every
    post-processing number must be finite and in range (a NaN threshold finds no cell).

    Raises
    ------
    QpcellError
        Naming ``path`` and the first value that is wrong.
    """
    if not classes:
        raise QpcellError("lists no classes", path)
    for part, module in models.items():
        n = getattr(module, "spec", dict)().get("n_classes")
        if isinstance(n, int) and getattr(module, "has_cls", True) and n != len(classes):
            where = "" if part == "model" else f" ({part} part)"
            raise QpcellError(f"lists {len(classes)} classes but the network{where} has {n} "
                              "class maps: the file was edited or belongs to another model",
                              path)
    checks = {"threshold": (post.threshold, 0.0, 1.0),
              "min_area_px": (post.min_area_px, 0.0, math.inf),
              "peak_window_px": (post.peak_window_px, 1, math.inf),
              "class_box_px": (post.class_box_px, 1, math.inf),
              "context_radius_px": (post.context_radius_px, 0.0, math.inf),
              "context_weight": (post.context_weight, 0.0, 1.0),
              "mpp": (post.mpp, 1e-6, math.inf)}
    peaks = config.get("peaks") or {}
    if config.get("postprocess_kind") == "peaks" and isinstance(peaks, dict):
        checks["peaks.threshold"] = (peaks.get("threshold", 0.5), 0.0, 1.0)
        checks["peaks.min_distance_px"] = (peaks.get("min_distance_px", 3), 0.0, math.inf)
    for name, (value, low, high) in checks.items():
        if not _number_ok(value, low, high):
            raise QpcellError(f"post-processing {name} is {value!r}; it must be a number "
                              f"from {low:g} to {high:g}", path)
    gains = post.class_gain or ()
    if gains and (len(gains) != len(classes) or
                  not all(_number_ok(g, 1e-12, math.inf) for g in gains)):
        raise QpcellError(f"post-processing class_gain {list(gains)!r} must hold one positive "
                          f"number per class ({len(classes)})", path)


def postprocess_meta(post: PostprocessConfig) -> dict:
    """JSON form of a post-processing config."""
    return to_dict(post)


def describe_kept(folder: str | Path) -> str | None:
    """What a (possibly interrupted) training run left in ``folder``, in words, or ``None``.

    Names the kept model's epoch and validation F1: for the message after Ctrl-C.
    """
    folder = Path(folder)
    try:
        config = read_config(folder)
    except QpcellError:
        return None
    training = config.get("training") or {}
    parts = ([training.get(p) or {} for p in ("detection", "classification")]
             if config.get("kind") == "pipeline" else
             list(training.get("members") or []) if config.get("kind") == "ensemble"
             else [training])
    found = [f"epoch {t['epoch']}, validation detection F1 {float(t['val_f1']):.3f}"
             for t in parts if "epoch" in t and "val_f1" in t]
    if not found:
        return None
    return f"the best model so far ({'; '.join(found)}) is kept in {folder}, ready to use"
