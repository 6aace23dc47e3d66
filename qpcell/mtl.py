"""Training the multi-task IHC framework of paper 003 (MTL-IHC): prior model, then the full model.

:func:`train_mtl` runs the paper's two stages with :func:`qpcell.train.train`:

1. **Tissue prior** (only when ``"prior" in aux``): a model with the same encoder + main decoder,
   trained with CE alone on the circle masks and stopped early, after
   ``MTLConfig.prior_epochs`` epochs (paper: 10), into ``out/prior-model``. ``train`` keeps the
   best-validated of those epochs, a normal model folder. Its sigmoid maps of the prior classes,
   on every training image at the model's scale, are the prior targets.
2. **The framework**: encoder + main decoder (``Lm``) + the auxiliary decoders named in ``aux``
   (dynamic: ``Ld``, ``Lc``; prior: ``Lp``), Adam with the paper's learning rate 1e-3 and
   weight decay 2e-5 (``MTLConfig.lr`` / ``weight_decay``, which replace ``train_cfg``'s).

The model folder ``out`` then holds the **encoder and main decoder only** (what the paper uses
at test time): its ``config.json`` has ``model.aux = []`` and a ``"mtl"`` entry saying what
was trained (``inference``, ``aux_trained``, ``prior_classes``, ``prior_model``,
``config``).

Prior classes. The paper uses the positive tumour class, "because other types of tissue
cells are not in a state of aggregation". Without a name (``prior_classes=None``) we take the
**most clustered class** (:func:`clustered_class`): the class whose points have the largest
excess of same-class neighbours among their 6 nearest, over the share expected if labels were
spread at random (so a class is not chosen merely for being the most common).

Pixel scale. ``MTLConfig.circle_radius_px`` and ``dynamic_radius_px`` are stated at
``mtl_cfg.mpp`` µm/px and carried to the model's µm/px like every other pixel constant.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qpcell import train as train_mod
from qpcell.config import PAPER_MPP, MaskConfig, MTLConfig, TrainConfig, to_dict
from qpcell.errors import QpcellError
from qpcell.points import AnnotatedImage, CellClass

MODEL_NAME = "mtl-ihc"
PRIOR_DIR = "prior-model"
INFERENCE_NOTE = "encoder + main decoder only"
NEIGHBOURS = 6


# --------------------------------------------------------------------------- prior classes
def class_clustering(points: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int,
                     k: int = NEIGHBOURS) -> np.ndarray:
    """How clustered each class is: ``(C,)`` excess share of same-class neighbours.

    For every point, the share of its ``k`` nearest neighbours (same image) that have its
    class; averaged over the points of each class, minus that class's share of all points
    (the value expected with randomly shuffled labels). NaN for a class without points.

    Parameters
    ----------
    points
        ``(xy (N, 2), labels (N,))`` per image.
    """
    from scipy.spatial import cKDTree

    same = np.zeros(n_classes)
    count = np.zeros(n_classes)
    total = np.zeros(n_classes)
    for xy, labels in points:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        total += np.bincount(labels, minlength=n_classes)[:n_classes]
        kk = min(k, len(xy) - 1)
        if kk < 1:
            continue
        _, idx = cKDTree(xy).query(xy, k=kk + 1)
        frac = (labels[idx[:, 1:]] == labels[:, None]).mean(axis=1)
        same += np.bincount(labels, weights=frac, minlength=n_classes)[:n_classes]
        count += np.bincount(labels, minlength=n_classes)[:n_classes]
    share = total / max(total.sum(), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = same / count - share
    return np.where(count > 0, score, np.nan)


def clustered_class(points: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int,
                    k: int = NEIGHBOURS) -> int:
    """Index of the most clustered class (:func:`class_clustering`; ties: lowest index)."""
    score = class_clustering(points, n_classes, k)
    if np.all(np.isnan(score)):
        return 0
    return int(np.nanargmax(score))


def resolve_prior_classes(prior_classes: Sequence[str] | str | None,
                          classes: Sequence[CellClass], data) -> list[int]:
    """Indices of the prior classes: the named ones, or the most clustered class."""
    names = [c.name for c in classes]
    if prior_classes is None:
        return [clustered_class([(d.xy, d.labels) for d in data], len(names))]
    if isinstance(prior_classes, str):
        prior_classes = [prior_classes]
    missing = [p for p in prior_classes if p not in names]
    if missing or not prior_classes:
        raise QpcellError(f"prior class(es) {missing or prior_classes} are not among the "
                          f"classes {names}")
    return [names.index(p) for p in dict.fromkeys(prior_classes)]


# --------------------------------------------------------------------------- stages
def prior_maps(model_dir: str | Path, data, indices: Sequence[int],
               device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """Sigmoid maps of classes ``indices`` of the model in ``model_dir`` on every image.

    Returns ``{image name: (K, H, W) float32}`` at the images' (the model's) scale.
    """
    from qpcell.checkpoint import load_model

    bundle = load_model(model_dir, device=device)
    out = {}
    for d in data:
        _, cls = train_mod.image_maps(bundle.predict_maps, d.pixels)
        if cls is None:
            raise QpcellError("the prior model produced no class maps", model_dir)
        out[d.name] = np.ascontiguousarray(cls[list(indices)], dtype=np.float32)
    return out


def _resume_epoch(folder: Path) -> int:
    """Last finished epoch recorded in ``folder``'s resume state (0 when there is none)."""
    path = folder / train_mod.RESUME
    if not path.exists():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - an unreadable state means: start this stage again
        return 0


def train_mtl(images: Sequence[AnnotatedImage], classes: Sequence[CellClass], out: str | Path,
              *, aux: Sequence[str] | None = None,
              prior_classes: Sequence[str] | str | None = None, backbone: str | None = None,
              mtl_cfg: MTLConfig = MTLConfig(), **train_kwargs) -> train_mod.TrainResult:
    """Train MTL-IHC (paper 003) on point annotations into the model folder ``out``.

    Parameters
    ----------
    images, classes, out
        As for :func:`qpcell.train.train`.
    aux
        Auxiliary decoders: ``()`` ("Ours"), ``("dynamic",)`` ("Ours+"), ``("dynamic",
        "prior")`` ("Ours++", the full framework); default ``mtl_cfg.aux`` (Ours++).
    prior_classes
        Class name(s) whose early-stopped maps are the prior targets; default: the most
        clustered class (see the module docstring). Used when ``"prior" in aux``.
    backbone
        ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (paper); default
        ``mtl_cfg.backbone`` (resnet18, CPU-friendly).
    mtl_cfg
        Loss weights, learning rate and weight decay, prior epochs, mask sizes.
    **train_kwargs
        Passed on to :func:`qpcell.train.train` (``model_mpp``, ``train_cfg``, ``patch_cfg``,
        ``device``, ``prepared``, ``max_steps_per_epoch``, ``callbacks``, ``resume``, ...;
        ``model_kwargs`` adds constructor options such as ``channels`` or
        ``pretrained_path``). ``mask_cfg`` defaults to ``MTLConfig.circle_radius_px`` at
        ``mtl_cfg.mpp``.

    Returns
    -------
    TrainResult
        Of the final stage (``seconds`` and ``n_patches`` cover both stages).
    """
    for key in ("model_name", "extra_maps", "extra_key"):
        if key in train_kwargs:
            raise QpcellError(f"train_mtl sets {key!r} itself")
    t0 = time.perf_counter()
    aux = tuple(mtl_cfg.aux if aux is None else aux)
    if not set(aux) <= {"dynamic", "prior"}:
        raise QpcellError(f"unknown auxiliary task(s) in {list(aux)}; choose from dynamic, prior")
    backbone = backbone or mtl_cfg.backbone
    mtl_cfg = replace(mtl_cfg, aux=aux, backbone=backbone)
    classes = tuple(classes)
    out = Path(out)
    train_cfg: TrainConfig = train_kwargs.pop("train_cfg", TrainConfig())
    train_cfg = replace(train_cfg, lr=mtl_cfg.lr, weight_decay=mtl_cfg.weight_decay,
                        decoupled_weight_decay=False)
    train_kwargs.setdefault("mask_cfg", MaskConfig(disc_radius_px=mtl_cfg.circle_radius_px,
                                                   mpp=mtl_cfg.mpp))
    resume = bool(train_kwargs.pop("resume", False))
    user_kwargs = dict(train_kwargs.pop("model_kwargs", None) or {})
    model_kwargs = {
        "backbone": backbone, "alpha": mtl_cfg.alpha, "lambda_c": mtl_cfg.lambda_c,
        "lambda_p": mtl_cfg.lambda_p, "lambda_d": mtl_cfg.lambda_d,
        "circle_radius_px": mtl_cfg.circle_radius_px,
        "dynamic_radius_px": tuple(mtl_cfg.dynamic_radius_px),
        "dynamic_vertices": tuple(mtl_cfg.dynamic_vertices), **user_kwargs}

    prepared = train_kwargs.pop("prepared", None)
    data = list(prepared) if prepared is not None else [
        train_mod.load_train_image(a, train_kwargs.get("model_mpp", PAPER_MPP),
                                   train_kwargs.get("fallback_mpp"))
        for a in images]
    if not data:
        raise QpcellError("no annotated images to train on")

    mtl_meta = {"inference": INFERENCE_NOTE, "aux_trained": list(aux), "prior_classes": [],
                "prior_model": None, "config": to_dict(mtl_cfg)}
    extra_maps = None
    n_patches = 0
    if "prior" in aux:
        idx = resolve_prior_classes(prior_classes, classes, data)
        prior_dir = out / PRIOR_DIR
        prior_cfg = replace(train_cfg, epochs=mtl_cfg.prior_epochs)
        if train_cfg.time_budget_s:  # a third of the budget for the early-stopped model
            prior_cfg = replace(prior_cfg, time_budget_s=train_cfg.time_budget_s / 3)
            train_cfg = replace(train_cfg, time_budget_s=train_cfg.time_budget_s * 2 / 3)
        done = _resume_epoch(prior_dir) if resume else 0
        if done < mtl_cfg.prior_epochs:
            stage1 = train_mod.train(
                images, classes, prior_dir, model_name=MODEL_NAME,
                model_kwargs={**model_kwargs, "aux": (), "main_loss": "ce"},
                train_cfg=prior_cfg, prepared=data, resume=resume and done > 0, **train_kwargs)
            n_patches += stage1.n_patches
        extra_maps = prior_maps(prior_dir, data, idx, train_kwargs.get("device"))
        model_kwargs["n_prior"] = len(idx)
        mtl_meta.update(prior_classes=[classes[i].name for i in idx], prior_model=PRIOR_DIR,
                        prior_epochs=mtl_cfg.prior_epochs)

    result = train_mod.train(
        images, classes, out, model_name=MODEL_NAME,
        model_kwargs={**model_kwargs, "aux": aux}, train_cfg=train_cfg, prepared=data,
        resume=resume and _resume_epoch(out) > 0, extra_maps=extra_maps, extra_key="prior",
        extra_meta={"mtl": mtl_meta}, **train_kwargs)
    return replace(result, n_patches=result.n_patches + n_patches,
                   seconds=time.perf_counter() - t0)


__all__ = ["MODEL_NAME", "PRIOR_DIR", "class_clustering", "clustered_class",
           "resolve_prior_classes", "prior_maps", "train_mtl"]
