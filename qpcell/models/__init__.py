"""Models, created by name from a registry.

Every model takes ``x`` (B, 3, H, W) float32 in [0, 1] and returns a dict with ``"cls_logits"``
(B, C+1, H, W; background = last channel) and/or ``"det_logits"`` (B, 1, H, W), and has
``maps(out) -> (det (B,H,W), cls (B,C,H,W) | None)``, ``loss(out, targets) -> (total, parts)``
and ``spec() -> dict`` such that ``create_model(**model.spec())`` rebuilds it.

To add a model family, write its module and add one entry to :data:`MODELS` below (a callable
``builder(n_classes=..., **kwargs) -> nn.Module``), or call :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from qpcell.errors import QpcellError
from qpcell.models.blocks import count_parameters, glorot_init, gmacs
from qpcell.models.cell_classifier import NAME as WITH_CELLS
from qpcell.models.cell_classifier import WithCellClassifier
from qpcell.models.mtl_ihc import MTLIHC
from qpcell.models.sdrdin import SDRDIN, VARIANTS
from qpcell.models.unet import UNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(SDRDIN, variant=name) for name in VARIANTS},
    "unet": UNet,
    "mtl-ihc": MTLIHC,
}

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add ``builder(n_classes=..., **kwargs)`` to the registry under ``name``."""
    global MODEL_NAMES
    if name in MODELS:
        raise QpcellError(f"a model named {name!r} is already registered")
    MODELS[name] = builder
    MODEL_NAMES = tuple(MODELS)


def create_model(name: str, n_classes: int, **kwargs) -> nn.Module:
    """Build the model ``name`` (one of :data:`MODEL_NAMES`) for ``n_classes`` cell classes.

    Examples
    --------
    >>> m = create_model("s-drdin", 6)
    >>> create_model(**m.spec()).spec() == m.spec()
    True
    """
    try:  # a trained network with its cell classifier is built by name, never trained as one
        builder = WithCellClassifier if name == WITH_CELLS else MODELS[name]
    except KeyError:
        raise QpcellError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    try:
        return builder(n_classes=int(n_classes), **kwargs)
    except TypeError as err:
        raise QpcellError(f"model {name!r}: {err}") from None


__all__ = ["MODELS", "MODEL_NAMES", "register_model", "create_model", "count_parameters",
           "gmacs", "glorot_init", "SDRDIN", "UNet", "MTLIHC"]
