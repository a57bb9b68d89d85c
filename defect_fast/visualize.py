"""PNG output for anomaly maps: grey maps and heat overlays (no plotting library needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


# zlib level of the PNGs written per inspected image. PIL's default (6) spent 24 ms per image on
# the map and the overlay of a 256-px run, a fifth of ``predict``'s time per image; level 1 writes
# them in 6.4 ms, 16 % larger (magnetic-tile maps and overlays of the recommended run, AMD EPYC:
# 11.9 -> 3.2 ms and 31 -> 36 KiB per file; PIL's ``Image.save(..., compress_level=L)`` timed on them).
PNG_COMPRESS_LEVEL = 1


def white_value(m: torch.Tensor, scale: float) -> float:
    """The map value drawn white: ``scale``, or where it is 0 the map's own maximum (1 for a map of
    zeros)."""
    return scale if scale > 0 else float(m.max()) or 1.0


def _unit(m: torch.Tensor, scale: float) -> np.ndarray:
    return (m.float() / white_value(m, scale)).clamp(0, 1).numpy()


def heat(u: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a blue-green-yellow-red ramp."""
    r = np.clip(1.5 - np.abs(4 * u - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * u - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * u - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def save_map(m: torch.Tensor, path: Path, scale: float, compress_level: int = PNG_COMPRESS_LEVEL) -> None:
    """Save map [H, W] as 8-bit grey, value ``scale`` and above white, a PNG (to a path or an open file)."""
    Image.fromarray((_unit(m, scale) * 255).astype(np.uint8), mode="L").save(path, format="PNG",
                                                                             compress_level=compress_level)


#: How much of the heat colour an overlay pixel at the value drawn white takes (less below it).
OVERLAY_ALPHA = 0.5


def save_overlay(image: torch.Tensor, m: torch.Tensor, path: Path, scale: float, alpha: float = OVERLAY_ALPHA,
                 compress_level: int = PNG_COMPRESS_LEVEL) -> None:
    """Save image uint8 [3, H, W] blended with the heat colours of map [H, W].

    Blended in bands of rows: the float temporaries of a whole photo at once took several GB for
    photos of a hundred megapixels; a band's are bounded, and the pixels are the same."""
    u = _unit(m, scale)
    pixels = image.permute(1, 2, 0).numpy()
    out = np.empty(pixels.shape, dtype=np.uint8)
    rows = max(1, OVERLAY_BAND_PIXELS // max(1, pixels.shape[1]))
    for a in range(0, pixels.shape[0], rows):
        out[a:a + rows] = tint(pixels[a:a + rows], u[a:a + rows], alpha)
    Image.fromarray(out, mode="RGB").save(path, format="PNG", compress_level=compress_level)


def tint(pixels: np.ndarray, u: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 [H, W, 3] ``pixels`` blended with the heat colours of ``u`` [H, W] in [0, 1], at
    weight ``alpha * u``: an overlay's pixels (and the report's scale of them)."""
    weight = (alpha * u)[..., None]
    blend = pixels.astype(np.float32) * (1 - weight) + heat(u).astype(np.float32) * weight
    return blend.clip(0, 255).astype(np.uint8)


#: Pixels per band of :func:`save_overlay` (its float temporaries are those of this many pixels).
OVERLAY_BAND_PIXELS = 1 << 20
