"""Cutting images into a regular grid of square patches and stitching patch outputs back.

Patches are ordered image by image, then row by row over the grid: patch ``k`` of image ``n`` at
grid position (i, j) has index ``n * gh * gw + i * gw + j``. Both directions are vectorised
(``Tensor.unfold`` / :func:`overlap_add`), with no Python loop over patches.

A grid fits an image side ``L`` when ``L >= patch`` and ``(L - patch) % stride == 0``; then the
patches cover the image exactly (for ``stride <= patch``) and no pixel is dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["extract_patches", "grid_shape", "overlap_add", "stitch_patches"]


def _pair(size: int | tuple[int, int] | torch.Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def _fit_hint(length: int, patch: int, stride: int, size_fixed: bool = False) -> str:
    """Nearby image sizes, and strides, that would fit ``patch`` exactly (strides only where the
    image size is fixed: a model file's)."""
    if length < patch:
        return f"use images of at least {patch} pixels (e.g. {patch}, {patch + stride}, {patch + 2 * stride})"
    k = (length - patch) // stride
    lo, hi = patch + k * stride, patch + (k + 1) * stride
    strides = [s for s in range(min(patch, length - patch), 0, -1) if (length - patch) % s == 0][:4]
    divides = f"a stride dividing {length - patch} (e.g. {', '.join(map(str, strides))})"
    return f"use {divides}; the image size is the model's" if size_fixed else f"use an image size of {lo} or {hi}, or {divides}"


def grid_shape(image_size: int | tuple[int, int], patch: int, stride: int | None = None, *,
               size_fixed: bool = False) -> tuple[int, int]:
    """Number of patch rows and columns (gh, gw) for an image of ``image_size`` (int or (H, W)).

    ``stride`` defaults to ``patch`` (no overlap). ``size_fixed``: the image size cannot be chosen
    (a trained model's), so a grid that does not fit is advised strides only.

    Raises:
        ValueError: patch or stride not positive, an image side smaller than ``patch``, or a side
            the grid does not fit exactly; the message says which sizes or strides would work.
    """
    stride = patch if stride is None else stride
    if patch <= 0 or stride <= 0:
        raise ValueError(f"patch and stride must be positive, got patch={patch}, stride={stride}")
    h, w = _pair(image_size)
    out = []
    for name, length in (("height", h), ("width", w)):
        if length < patch:
            raise ValueError(f"image {name} {length} is smaller than the patch size {patch}: {_fit_hint(length, patch, stride)}")
        if (length - patch) % stride:
            raise ValueError(
                f"image {name} {length} does not fit patch {patch} with stride {stride} "
                f"(({length} - {patch}) % {stride} = {(length - patch) % stride}): "
                f"{_fit_hint(length, patch, stride, size_fixed)}"
            )
        out.append((length - patch) // stride + 1)
    return out[0], out[1]


def extract_patches(images: torch.Tensor, patch: int, stride: int | None = None) -> torch.Tensor:
    """Cut images into patches on a regular grid.

    Args:
        images: [N, C, H, W], any dtype (uint8 images stay uint8).
        patch: patch side.
        stride: step between patches (default ``patch``: no overlap); ``stride < patch`` overlaps.

    Returns:
        [N * gh * gw, C, patch, patch] with (gh, gw) = :func:`grid_shape`; image-major, then
        row-major over the grid. A new contiguous tensor.

    Raises:
        ValueError: wrong rank, or a grid that does not fit (see :func:`grid_shape`).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    stride = patch if stride is None else stride
    n, c, h, w = images.shape
    gh, gw = grid_shape((h, w), patch, stride)
    # [N, C, gh, gw, p, p] view -> [N, gh, gw, C, p, p] copy
    tiles = images.unfold(2, patch, stride).unfold(3, patch, stride)
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(n * gh * gw, c, patch, patch)


def overlap_add(patches: torch.Tensor, grid: tuple[int, int], patch: int, stride: int) -> torch.Tensor:
    """Patches [N * gh * gw, C, patch, patch] (in :func:`extract_patches` order, on a grid that fits
    exactly) -> [N, C, H, W]: each pixel the sum of the patch values that cover it.

    When ``stride`` divides ``patch`` (tiles, half overlap, ...), with k = patch // stride, block
    (a, b) of k x k of patch (i, j) lands on output block (i + a, j + b): the sum is k^2 shifted
    copies of the patches' blocks, each padded to the image, added in the order col2im adds them
    (the same sums bit for bit). ``torch.nn.functional.fold`` (col2im) with its column layout is
    otherwise used: 5.4 ms against 0.37 ms for one 256-px image's 49 patches of 64 x 64 x 3 at
    stride 32 (2 threads, AMD EPYC), most of it the copy into its column layout.
    """
    gh, gw = grid
    n, c = patches.shape[0] // (gh * gw), patches.shape[1]
    h, w = (gh - 1) * stride + patch, (gw - 1) * stride + patch
    if patch % stride:
        cols = patches.reshape(n, gh * gw, c * patch * patch).transpose(1, 2)
        return F.fold(cols, output_size=(h, w), kernel_size=patch, stride=stride)
    k = patch // stride
    q = patches.reshape(n, gh, gw, c, k, stride, k, stride)
    out = None
    for a in range(k):
        for b in range(k):
            block = q[:, :, :, :, a, :, b, :].permute(0, 3, 1, 4, 2, 5)  # [N, C, gh, stride, gw, stride]
            if k > 1:
                block = F.pad(block, (0, 0, b, k - 1 - b, 0, 0, a, k - 1 - a))
            out = block if out is None else out + block
    return out.reshape(n, c, h, w)


def stitch_patches(patches: torch.Tensor, image_size: int | tuple[int, int], patch: int, stride: int | None = None) -> torch.Tensor:
    """Put patches (in :func:`extract_patches` order) back into images, averaging overlaps.

    Args:
        patches: [N * gh * gw, C, patch, patch]. Floating dtypes are kept; integer dtypes are
            converted to float32 (an average of integers is not an integer).
        image_size: H (square) or (H, W) of the images.
        patch, stride: as used for extraction (stride defaults to ``patch``; must be <= patch so
            every pixel is covered).

    Returns:
        [N, C, H, W]: each pixel the mean of every patch value covering it. For
        ``stride == patch`` this is the exact inverse of :func:`extract_patches`.

    Raises:
        ValueError: wrong shape, patch count not a multiple of the grid, stride > patch, or a
            grid that does not fit.
    """
    stride = patch if stride is None else stride
    h, w = _pair(image_size)
    gh, gw = grid_shape((h, w), patch, stride)
    if stride > patch:
        raise ValueError(f"stride {stride} > patch {patch} leaves pixels uncovered; stitching needs stride <= patch")
    if patches.ndim != 4 or patches.shape[2] != patch or patches.shape[3] != patch:
        raise ValueError(f"patches must be [N*P, C, {patch}, {patch}], got shape {tuple(patches.shape)}")
    per_image = gh * gw
    if patches.shape[0] % per_image:
        raise ValueError(f"{patches.shape[0]} patches is not a multiple of the {gh}x{gw}={per_image} patches per {h}x{w} image")
    if not patches.is_floating_point():
        patches = patches.to(torch.float32)
    n, c = patches.shape[0] // per_image, patches.shape[1]
    if n == 0:
        return patches.new_zeros((0, c, h, w))
    out = overlap_add(patches, (gh, gw), patch, stride)
    if stride == patch:
        return out
    ones = torch.ones((per_image, 1, patch, patch), dtype=patches.dtype, device=patches.device)
    return out / overlap_add(ones, (gh, gw), patch, stride)
