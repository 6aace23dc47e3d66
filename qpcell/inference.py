"""Running a model on RGB tiles: uint8 arrays in, probability maps out."""

from __future__ import annotations

import numpy as np
import torch

from qpcell.device import autocast_dtype

MULTIPLE = 16  # 4 poolings by 2 (S-DRDIN 2.3): sizes must divide by 16


def to_tensor(tiles: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H', W')`` float32 in [0, 1], edge-padded to x16."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    h, w = tiles.shape[1:3]
    x = torch.from_numpy(np.ascontiguousarray(tiles)).to(device).permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    ph, pw = (-h) % MULTIPLE, (-w) % MULTIPLE
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def model_maps(model: torch.nn.Module, tiles: np.ndarray, device: torch.device,
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Detection and class probability maps of ``model`` for RGB tiles.

    Parameters
    ----------
    tiles
        ``(B, H, W, 3)`` uint8 RGB (any H, W; padded internally).

    Returns
    -------
    det : (B, H, W) float32; cls : (B, C, H, W) float32 or None
    """
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    h, w = tiles.shape[1:3]
    x = to_tensor(tiles, device)
    amp = autocast_dtype(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32,
                                                 enabled=amp is not None):
        det, cls = model.maps(model(x))
    det_np = det[:, :h, :w].float().cpu().numpy()
    cls_np = None if cls is None else cls[:, :, :h, :w].float().cpu().numpy()
    return det_np, cls_np
