"""Colour augmentation of training patches: the stain and scanner differences a model must survive.

Staining varies from lab to lab and scanners render the same slide differently. The usual
remedy (Tellez et al., "Quantifying the effects of data augmentation and stain color
normalization", Med. Image Anal. 2019) perturbs each stain's optical density in the
haematoxylin-eosin-DAB space (Ruifrok & Johnston's stain vectors, as ``skimage.color``), then
brightness and contrast. Pure numpy; the geometry (flips, rotations) stays in
:class:`qpcell.patches.PatchDataset`.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

_LOG_ADJUST = np.log(1e-6)  # skimage's separate_stains / combine_stains convention


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0
                 ) -> np.ndarray:
    """A randomly re-stained copy of an RGB patch.

    Each stain's optical density ``s`` becomes ``s * a + b`` with ``a ~ U(1 - 0.05k, 1 + 0.05k)``
    and ``b ~ U(-0.01k, 0.01k)`` (``k = strength``; Tellez et al.'s "HED-light" at 1), then
    brightness ``* U(1 - 0.1k, 1 + 0.1k)`` and contrast about the mean ``* U(1 - 0.1k, 1 + 0.1k)``.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
    rng : the patch's random generator
    strength : 0 returns the patch unchanged

    Returns
    -------
    (H, W, 3) uint8
    """
    if strength <= 0:
        return rgb
    k = float(strength)
    x = np.maximum(rgb[..., :3].astype(np.float32) / 255.0, 1e-6)
    stains = (np.log(x) / _LOG_ADJUST) @ hed_from_rgb.astype(np.float32)
    a = rng.uniform(1 - 0.05 * k, 1 + 0.05 * k, 3).astype(np.float32)
    b = rng.uniform(-0.01 * k, 0.01 * k, 3).astype(np.float32)
    stains = stains * a + b
    out = np.exp((-(stains * -_LOG_ADJUST)) @ rgb_from_hed.astype(np.float32))
    out = out * rng.uniform(1 - 0.1 * k, 1 + 0.1 * k)
    mean = out.mean()
    out = (out - mean) * rng.uniform(1 - 0.1 * k, 1 + 0.1 * k) + mean
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


__all__ = ["stain_jitter"]
