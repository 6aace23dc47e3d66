"""Choosing the torch device: CUDA, then Apple MPS, then CPU, unless the user says."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

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


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def _cpuinfo() -> str:
    """The text of ``/proc/cpuinfo`` (empty where there is none), read once."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def name_from_cpuinfo(text: str) -> str:
    """The CPU named in ``/proc/cpuinfo`` text, with its family and model numbers, which tell
    apart machines sold under one name (``AMD EPYC (family 25, model 1)``); without a model
    name, what :mod:`platform` knows."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_name() -> str:
    """This machine's CPU (:func:`name_from_cpuinfo`), for benchmark records."""
    return name_from_cpuinfo(_cpuinfo())


def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where bf16
    convolutions run several times faster than float32 (``benchmarks/speed.py``)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The mixed-precision dtype for ``device`` (None = run in float32).

    ``precision``: ``"fp32"`` never casts; ``"bf16"`` always uses bfloat16 autocast;
    ``"auto"`` uses bf16 (or fp16 where CUDA lacks bf16) on CUDA, bf16 on CPUs with native
    bf16 instructions (:func:`cpu_has_bf16`), float32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise QpcellError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def training_layout(device: torch.device, amp: torch.dtype | None) -> torch.memory_format:
    """The memory format a model trains in: channels-last under autocast on CPUs and CUDA,
    NCHW otherwise.

    Channels-last float32 steps are 1.11-1.14x faster on a 2-core AVX2 EPYC, but on NuCLS
    (5 minutes, six seeds in each layout) detection F1 came out 0.028 lower than NCHW's on
    average, lower in four seeds and level in two, unexplained, so float32 keeps NCHW until
    that is understood (docs/RESULTS.md, "Channels-last in float32" and "Channels-last on NuCLS";
    ``benchmarks/train_speed.py --layouts nchw,channels-last`` measures the speed).
    """
    if amp is not None and device.type in ("cpu", "cuda"):
        return torch.channels_last
    return torch.contiguous_format


def describe(device: torch.device) -> str:
    """A short human description, e.g. ``cuda (NVIDIA H100)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
