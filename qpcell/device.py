"""Choosing the torch device: CUDA, then Apple MPS, then CPU, unless the user says."""

from __future__ import annotations

import torch

from qpcell.errors import QpcellError


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on.

    Parameters
    ----------
    requested
        ``None`` or ``"auto"`` picks CUDA, then MPS, then CPU; otherwise a torch device
        string such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``, checked to be available.
    """
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise QpcellError(f"--device {requested!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QpcellError(f"--device {requested!r}: this torch has no CUDA device "
                          f"(torch {torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise QpcellError(f"--device {requested!r}: MPS is not available here")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device`` (None = run in float32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def describe(device: torch.device) -> str:
    """A short human description, e.g. ``cuda (NVIDIA H100)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
