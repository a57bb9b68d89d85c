"""Anomaly-map maths shared by the models' ``anomaly_map.py`` modules and the detector.

Every function here is a pure tensor function (no host round trip, no Python branch on values),
so the detector that uses them can be traced and exported.
"""
from __future__ import annotations

import math

import torch

from . import ops


def residual_map(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Pixel residual: x, recon [B, 3, P, P] -> [B, 1, P, P] = mean over channels of (x - recon)^2."""
    return (x - recon).pow(2).mean(dim=1, keepdim=True)


def msfr_map(features_x: list[torch.Tensor], features_r: list[torch.Tensor], size: tuple[int, int],
             weights: list[float]) -> torch.Tensor:
    """Multi-scale feature residual (Eq. 15 of CMA-AE) of encoder features -> [B, 1, *size]."""
    return ops.msfr(features_x, features_r, size, weights)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian (float64) of radius ``max(1, ceil(3 sigma))``; sigma > 0."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """[n, n] float64 matrix A with ``A @ v`` the Gaussian blur of v [n] (edges replicated).

    ``A_h @ map @ A_w.T`` blurs a map [..., H, W]; the same maths as
    :func:`defect_fast.synthesis.gaaga.gaussian_blur`, built once so inference is two matmuls.
    """
    k = gaussian_kernel(sigma)
    r = (k.numel() - 1) // 2
    rows = torch.arange(n).view(-1, 1)
    cols = (rows + torch.arange(-r, r + 1).view(1, -1)).clamp(0, n - 1)
    a = torch.zeros(n, n, dtype=torch.float64)
    return a.scatter_add_(1, cols, k.view(1, -1).expand(n, -1).contiguous())


def blend_window(patch: int, blend: str) -> torch.Tensor:
    """Stitching weights [patch, patch] (float32) for overlapping patches.

    "none": all ones (overlaps are a plain average). "hann": the outer product of
    ``sin^2(pi (i + 0.5) / patch)``, strictly positive, so a pixel covered by one patch keeps that
    patch's value and overlaps fade from one patch into the next without seams.
    """
    if blend == "none":
        return torch.ones(patch, patch)
    if blend == "hann":
        w = torch.sin(math.pi * (torch.arange(patch, dtype=torch.float64) + 0.5) / patch) ** 2
        return (w[:, None] * w[None, :]).float()
    raise ValueError(f"blend must be 'none' or 'hann', got {blend!r}")


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One map [S, S] at an image's own size (H, W), bilinear (the map itself when the sizes
    agree): how ``Detector.predict``, ``defect-fast predict`` and ``watch`` show a map on its photo."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return torch.nn.functional.interpolate(m[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def top_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """maps [N, H, W] -> [N]: mean of the ``k`` largest values of each map."""
    return maps.reshape(maps.shape[0], -1).topk(k, dim=1).values.mean(dim=1)


__all__ = ["residual_map", "msfr_map", "gaussian_kernel", "blur_matrix", "blend_window", "resize_map", "top_mean"]
