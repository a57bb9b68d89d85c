"""Natural source photos for anomaly synthesis (GAAGA's ``I_n``, ADGA's candidate sources).

CMA-AE crops its natural patches from ImageNet photos. Offline, the default pool is the two
sample photos that scikit-learn ships (``china.jpg``, ``flower.jpg``, 640x427 each, read straight
from the installed package's ``datasets/images`` folder); a folder of the user's own photos
(``--anomaly-source DIR``) adds to them (or replaces them with ``include_builtin=False``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "builtin_source_paths", "list_source_files", "load_sources", "resize_sources"]

#: File suffixes (lower case) taken as images in a source folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")


def builtin_source_paths() -> list[Path]:
    """Paths of scikit-learn's sample photos (``sklearn/datasets/images/*.jpg``), found without importing sklearn.

    Raises FileNotFoundError when scikit-learn or its sample images are not installed.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("built-in anomaly sources need scikit-learn's sample images, but scikit-learn "
                                "is not installed; install it or pass a folder of photos (--anomaly-source DIR)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no sample photos (*.jpg) found; pass a folder of photos (--anomaly-source DIR)")
    return paths


def list_source_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file (by suffix, see ``IMAGE_SUFFIXES``) under ``folder``, recursively, sorted.

    Raises FileNotFoundError / NotADirectoryError / ValueError naming the folder when it does not
    exist, is not a folder, or holds no image file.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"anomaly source folder {root}: does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"anomaly source folder {root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"anomaly source folder {root}: no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_square(path: Path, size: int) -> torch.Tensor:
    """One photo as ``[3, size, size]`` in [-1, 1]: shorter side resized to ``size``, centre crop.
    Decoded as the package reads every image (:mod:`defect_fast.data.io`: 16-bit and float
    scaled, EXIF orientation applied, bad or oversized files a DataError naming the file)."""
    from ..data.io import read_image

    rgb = Image.fromarray(read_image(path, None).permute(1, 2, 0).numpy())  # 8-bit RGB at its own size
    w, h = rgb.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    arr = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_sources(folder: str | os.PathLike | None = None, size: int = 256, *,
                 include_builtin: bool = True, max_images: int | None = None) -> torch.Tensor:
    """Natural source photos as one tensor.

    Args:
        folder: optional folder of photos; every image file in it (recursively, sorted by path).
        size: side of the square each photo becomes (shorter side resized to ``size``, centre
            crop). 256 matches CMA-AE's 256x256 ImageNet crops.
        include_builtin: also take scikit-learn's sample photos (default True).
        max_images: keep at most this many photos from ``folder`` (first in sorted order).

    Returns:
        float32 ``[M, 3, size, size]`` in [-1, 1], built-in photos first.

    Raises:
        ValueError naming every file of ``folder`` that could not be read as an image (all files
        are tried first, so one error lists them all); FileNotFoundError as in
        :func:`list_source_files` / :func:`builtin_source_paths`.
    """
    if size < 1:
        raise ValueError(f"load_sources: size must be positive, got {size}")
    paths: list[Path] = []
    if include_builtin:
        paths += builtin_source_paths()
    if folder is not None:
        files = list_source_files(folder)
        paths += files[:max_images] if max_images is not None else files
    if not paths:
        raise ValueError("load_sources: no sources requested (include_builtin=False and no folder)")
    images, bad = [], []
    for p in paths:
        try:
            images.append(_read_square(p, size))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, MemoryError) as exc:
            bad.append(str(exc) if str(exc).startswith(str(p)) else f"{p}: {exc}")
    if bad:
        raise ValueError(f"{len(bad)} anomaly source file(s) could not be read as images:\n  " + "\n  ".join(bad))
    return torch.stack(images)


def resize_sources(sources: torch.Tensor, size: int) -> torch.Tensor:
    """``[M, 3, h, w]`` -> ``[M, 3, size, size]`` (bilinear, antialiased); for matching a working resolution."""
    return F.interpolate(sources, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(-1, 1)
