"""A small synthetic texture data set in the MVTec layout, for tests and the README demo.

Good images are a near-gray oriented texture: two sinusoidal gratings with a fixed orientation
and random phase, a slight brightness jitter and fine noise (cheap for an autoencoder to learn).
Defective images carry hard-edged defects painted at exactly the pixels of their mask, far outside
the texture's value range (texture about 0.2..0.8, defects near 0.05 or 0.95), so even a plain
residual detector finds them:

- ``scratch``: a thin straight line, dark or bright;
- ``spot``: one to three small discs, dark or bright;
- ``blob``: one larger irregular region of flat, shifted brightness.

Everything is a function of ``seed`` (each image has its own seed derived from it), so the same
call writes byte-identical files.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEFECT_KINDS", "make_synthetic_dataset", "synthetic_defect", "synthetic_texture"]

#: Defect classes :func:`make_synthetic_dataset` can draw.
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "blob")

_TINT = np.array([1.0, 0.96, 0.90])  # grayscale-ish: a faint warm tint
_SPLITS = {"train": 0, "test_good": 1}


def synthetic_texture(size: int, rng: np.random.Generator, angle: float = 0.5) -> np.ndarray:
    """One defect-free texture, float64 [size, size] with values in about [0.2, 0.8].

    ``angle`` (radians) is the main grating's orientation; phases, a small angle jitter,
    brightness and noise are drawn from ``rng``.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    a1 = angle + rng.normal(0.0, 0.03)
    a2 = a1 + 1.2
    g1 = np.sin(2 * np.pi * 8.0 * (x * np.cos(a1) + y * np.sin(a1)) + rng.uniform(0, 2 * np.pi))
    g2 = np.sin(2 * np.pi * 3.0 * (x * np.cos(a2) + y * np.sin(a2)) + rng.uniform(0, 2 * np.pi))
    img = 0.5 + rng.uniform(-0.03, 0.03) + 0.17 * g1 + 0.06 * g2 + rng.normal(0.0, 0.015, (size, size))
    return np.clip(img, 0.0, 1.0)


def _scratch(size: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of a thin straight segment (distance to the segment <= half width)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    length = rng.uniform(0.3, 0.55) * size
    theta = rng.uniform(0, np.pi)
    d = np.array([np.cos(theta), np.sin(theta)]) * length
    margin = 0.08 * size
    half = np.abs(d) / 2  # keep the whole segment inside the image, margin included
    center = np.array([rng.uniform(margin + half[0], size - margin - half[0]), rng.uniform(margin + half[1], size - margin - half[1])])
    p0 = center - d / 2
    half_width = max(0.9, rng.uniform(0.008, 0.014) * size)
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (length**2), 0.0, 1.0)
    dist = np.hypot(x - (p0[0] + t * d[0]), y - (p0[1] + t * d[1]))
    return dist <= half_width


def _spots(size: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of one to three small discs."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        r = max(2.0, rng.uniform(0.03, 0.06) * size)
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        mask |= np.hypot(x - cx, y - cy) <= r
    return mask


def _blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of one irregular star-shaped region (radius modulated by a few harmonics)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    r0 = rng.uniform(0.08, 0.14) * size
    cx, cy = rng.uniform(1.45 * r0 + 1, size - 1.45 * r0 - 1, size=2)
    ang = np.arctan2(y - cy, x - cx)
    radius = r0 * (1.0 + sum(rng.uniform(0.05, 0.15) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)))
    return np.hypot(x - cx, y - cy) <= radius


def synthetic_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect of ``kind`` (see :data:`DEFECT_KINDS`) into a texture.

    Args:
        image: float [S, S] texture in [0, 1] (not modified).

    Returns:
        (float [S, S] image with the defect, bool [S, S] mask of exactly the changed pixels).
    """
    size = image.shape[0]
    if kind == "scratch":
        mask = _scratch(size, rng)
        value = np.full(image.shape, 0.06 if rng.random() < 0.5 else 0.94)
    elif kind == "spot":
        mask = _spots(size, rng)
        value = np.full(image.shape, 0.05 if rng.random() < 0.5 else 0.95)
    elif kind == "blob":
        mask = _blob(size, rng)
        value = (0.12 if rng.random() < 0.5 else 0.88) + rng.normal(0.0, 0.02, image.shape)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(DEFECT_KINDS)}")
    out = image.copy()
    out[mask] = np.clip(value[mask], 0.0, 1.0)
    return out, mask


def _to_rgb8(gray: np.ndarray) -> Image.Image:
    rgb = np.clip(np.rint(gray[..., None] * _TINT * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def make_synthetic_dataset(
    root: str | os.PathLike,
    n_train: int = 32,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    size: int = 128,
    seed: int = 0,
    *,
    classes: tuple[str, ...] = ("scratch", "spot"),
    overwrite: bool = False,
) -> Path:
    """Write a synthetic MVTec-style data set under ``root``.

    Layout: ``train/good/NNN.png`` (n_train), ``test/good/NNN.png`` (n_test_good),
    ``test/<class>/NNN.png`` and ``ground_truth/<class>/NNN_mask.png`` (0/255) for each class in
    ``classes`` (n_test_defect images per class). Images are 8-bit RGB PNGs of ``size`` x ``size``.

    Args:
        root: output folder; created if missing.
        seed: everything written is a deterministic function of the arguments.
        classes: defect classes, a subset of :data:`DEFECT_KINDS`.
        overwrite: if ``root`` exists and is not empty, the call fails unless this is True; then
            only ``root/train``, ``root/test`` and ``root/ground_truth`` are replaced.

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` is a non-empty folder (or a file) and overwrite is False.
        ValueError: unknown class, ``size`` < 32 or negative counts.
    """
    root = Path(root)
    unknown = [c for c in classes if c not in DEFECT_KINDS]
    if unknown or len(set(classes)) != len(classes) or "good" in classes:
        raise ValueError(f"classes must be distinct names from {', '.join(DEFECT_KINDS)}, got {list(classes)}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise ValueError("image counts must not be negative")
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a folder")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root}: folder is not empty; pass overwrite=True to replace its train/, test/ and ground_truth/")
        for sub in ("train", "test", "ground_truth"):
            if (root / sub).is_dir():
                shutil.rmtree(root / sub)
            elif (root / sub).exists():
                (root / sub).unlink()

    angle = float(np.random.default_rng([seed, 99]).uniform(0.2, 1.3))

    def texture(split: int, i: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng([seed, split, i])
        return synthetic_texture(size, rng, angle), rng

    def write(folder: Path, count: int, split: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _to_rgb8(texture(split, i)[0]).save(folder / f"{i:03d}.png")

    write(root / "train" / "good", n_train, _SPLITS["train"])
    write(root / "test" / "good", n_test_good, _SPLITS["test_good"])
    for c in classes:
        split = 10 + DEFECT_KINDS.index(c)
        img_dir, gt_dir = root / "test" / c, root / "ground_truth" / c
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_test_defect):
            base, rng = texture(split, i)
            img, mask = synthetic_defect(base, c, rng)
            _to_rgb8(img).save(img_dir / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(gt_dir / f"{i:03d}_mask.png")
    return root
