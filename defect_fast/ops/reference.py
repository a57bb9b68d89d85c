"""Pure-PyTorch definitions of the three fused ops.

These are the oracles: the native CPU and CUDA kernels compute the same functions, and the
tests compare against them. They are written step by step, in the order the kernels do the
work, so that a difference between the two can be traced to one step.

Every function here is differentiable by plain autograd where the docstring says so.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
import torch.nn.functional as F

# NB: eps used in the cosine normalisation (as torch.nn.functional.normalize) and in the
# L1/L2 renormalisation after shrinkage (as MemAE's F.normalize(p=1)).
NORM_EPS = 1e-12
# NB: eps in the hard-shrinkage denominator |w - t| + eps (Eq. 3 of CMA-AE, MemAE's value).
SHRINK_EPS = 1e-12


def memory_address(
    z: torch.Tensor,
    memory: torch.Tensor,
    shrink_threshold: float,
    temperature: float = 1.0,
    p: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory addressing of CMA-AE / MemAE: cosine attention, softmax, hard shrinkage, read-out.

    Args:
        z: [B, C] queries (latent codes of B patches), floating point.
        memory: [N, C] memory items, same dtype and device as ``z``.
        shrink_threshold: t >= 0; weights below t are removed (CMA-AE uses t = 1/N).
            t = 0 disables shrinkage (the weights are then the softmax itself).
        temperature: > 0; logits are cos(z_b, m_n) / temperature.
        p: 1 or 2, the norm used to renormalise the shrunk weights (L1 is MemAE's choice).

    Steps, per query b:
        1. s_n = <z_b/max(|z_b|,e), m_n/max(|m_n|,e)> / temperature      (e = NORM_EPS)
        2. w = softmax_n(s)
        3. w'_n = relu(w_n - t) * w_n / (|w_n - t| + SHRINK_EPS)           (t = 0: w' = w)
        4. w''  = w' / max(||w'||_p, NORM_EPS)
        5. z_hat_b = sum_n w''_n m_n

    Returns:
        (z_hat [B, C], weights [B, N]): the read-out and the renormalised weights w''.
        Both are differentiable with respect to ``z`` and ``memory``; the weights feed the
        entropy loss of Eq. 5, so their gradient matters too.
    """
    if z.dim() != 2 or memory.dim() != 2 or z.shape[1] != memory.shape[1]:
        raise ValueError(f"memory_address: expected z [B,C] and memory [N,C], got {tuple(z.shape)} and {tuple(memory.shape)}")
    if p not in (1, 2):
        raise ValueError(f"memory_address: p must be 1 or 2, got {p}")
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    mn = memory / memory.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    logits = zn @ mn.t() / temperature
    w = torch.softmax(logits, dim=1)
    if shrink_threshold > 0:
        shifted = w - shrink_threshold
        w = torch.relu(shifted) * w / (shifted.abs() + SHRINK_EPS)
    if p == 1:
        norm = w.abs().sum(dim=1, keepdim=True)
    else:
        norm = w.pow(2).sum(dim=1, keepdim=True).sqrt()
    w = w / norm.clamp_min(NORM_EPS)
    return w @ memory, w


def gaussian_windows(sigma: torch.Tensor, window: int) -> torch.Tensor:
    """Normalised 1-D Gaussian windows, one per sample.

    Args:
        sigma: [B] standard deviations (> 0).
        window: odd window length K.
    Returns:
        [B, K] with g[b, k] = exp(-(k - K//2)^2 / (2 sigma_b^2)), each row summing to 1.

    Centred on the window's middle tap K//2: the second paper's Eq. 8 writes the centre as
    "zeta, the sliding window size", which would put the peak outside the window.
    """
    offsets = torch.arange(window, device=sigma.device, dtype=sigma.dtype) - window // 2
    g = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    return g / g.sum(dim=1, keepdim=True)


def check_aw_ssim_arguments(x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, window: int, combine: str,
                            data_range: float) -> None:
    """The checks of :func:`aw_ssim`'s arguments the native kernels make too (TypeError, ValueError),
    but sigma's values (their check reads them: a sync on a GPU): one call checked alike whichever
    computes it."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or not isinstance(sigma, torch.Tensor):
        raise TypeError("aw_ssim: x, y and sigma must be tensors")
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"aw_ssim: expected x and y of one shape [B,C,H,W], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point() or x.dtype != y.dtype:
        raise ValueError(f"aw_ssim: x and y must have one floating dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device or sigma.device != x.device:
        raise ValueError(f"aw_ssim: x, y and sigma must be on one device, got {x.device}, {y.device}, {sigma.device}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 != 1 or x.shape[-1] < window or x.shape[-2] < window:
        raise ValueError(f"aw_ssim: window must be odd and fit in the image, got window={window} for {tuple(x.shape)}")
    if sigma.shape != (x.shape[0],) or not sigma.is_floating_point():
        raise ValueError(f"aw_ssim: sigma must be a floating tensor of shape [B]={x.shape[0]}, got {tuple(sigma.shape)} {sigma.dtype}")
    if combine not in ("sum", "product"):
        raise ValueError(f"aw_ssim: combine must be 'sum' or 'product', got {combine!r}")
    try:
        value = float(data_range)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"aw_ssim: data_range must be finite and > 0, got {data_range}")


def _signed_pow(v: torch.Tensor, e: float) -> torch.Tensor:
    if e == 1.0:
        return v
    return torch.sign(v) * v.abs().pow(e)


def aw_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    window: int = 11,
    combine: str = "sum",
    data_range: float = 1.0,
    return_map: bool = False,
):
    """Adaptive weighted SSIM with a per-sample Gaussian window (valid windows only).

    Args:
        x, y: [B, C, H, W] images, same shape, dtype and device; H, W >= window.
        sigma: [B] Gaussian standard deviation per sample (> 0), same device (computed in x's dtype).
        alpha, beta, gamma: weights (``combine="sum"``) or exponents (``combine="product"``)
            of luminance l, contrast c and structure s.
        window: odd window length K (11 in both papers).
        combine: "sum" -> alpha*l + beta*c + gamma*s (AW-SSIM, Eq. 7 of the second paper);
            "product" -> l^alpha * c^beta * s^gamma (Eq. 6; standard SSIM at 1, 1, 1), the power
            of s taken sign-preserving (sign(s)|s|^gamma) so that it is defined for s < 0.
        data_range: L, the dynamic range of the pixel values, which must lie in [0, L]: the
            luminance term is not shift-invariant (shift images in [-1, 1] by +1, with L = 2).
        return_map: also return the per-pixel index map.

    Definitions (per sample b and channel, g = gaussian_windows(sigma, K), separable 2-D window):
        mu_x = g*x, mu_y = g*y, var_x = g*(x^2) - mu_x^2, var_y likewise, cov = g*(xy) - mu_x mu_y
        C1 = (0.01 L)^2, C2 = (0.03 L)^2, C3 = C2 / 2
        sd_x = sqrt(max(var_x, 0) + VAR_EPS), sd_y likewise, VAR_EPS = (1e-4 L)^2
        l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
        c = (2 sd_x sd_y + C2) / (var_x + var_y + C2)
        s = (cov + C3) / (sd_x sd_y + C3)
    NB: VAR_EPS keeps the gradient of sd finite where a window is flat; with C3 = C2/2 the
    product c*s does not depend on it, so "product" at 1, 1, 1 is exactly standard SSIM.

    NB (float32): a variance is the difference of two moments, each rounded (one float32 step
    of E[x^2] = 0.64 is 6e-8, over VAR_EPS at L = 1). Over an exactly flat window it can be a
    rounding residue of up to a few 1e-7 instead of 0, and where such a window meets texture in
    the other image, c and s and their gradients move (in the map by up to 0.05 at a grey level
    of 0.3 and up to 0.2 above 0.7, as measured; levels of 0.5 and 1 round exactly), differently
    in this reference, the CPU kernel and the CUDA kernel, which sum in other orders.
    Photographs seldom hold exactly flat windows: on magnetic-tile images against a blurred
    copy, also brightened to [0.55, 1], float32 stays within 3.2e-3 of float64 in the map and
    1.1e-5 in the score (sigma 0.7 to 3; experiments/aw_ssim_float32.py). Images with exactly
    flat areas (synthetic ones): pass float64.

    Returns:
        score [B] (mean of the index over C, H-K+1, W-K+1), and with ``return_map`` also the
        map [B, C, H-K+1, W-K+1]. Differentiable with respect to ``x`` and ``y``.
    """
    check_aw_ssim_arguments(x, y, sigma, window, combine, data_range)
    bad = ~((sigma > 0) & torch.isfinite(sigma))
    if bool(bad.any()):  # as the kernels refuse it (a sync on a GPU: this path is the slow one)
        raise ValueError(f"aw_ssim: sigma must be finite and > 0, got {sigma[bad][0].item()} (sample "
                         f"{int(bad.nonzero()[0, 0])})")
    B, C, H, W = x.shape
    # built in x's dtype, or a wider one: a bfloat16 sigma's windows did not sum to 1 (the kernels build them in float64)
    g = gaussian_windows(sigma.to(torch.promote_types(x.dtype, torch.float32)), window).to(x.dtype)  # [B, K]

    def blur(t: torch.Tensor) -> torch.Tensor:
        # Separable valid filtering with one kernel per sample: grouped conv over B*C planes.
        if B * C == 0:  # no planes (conv2d refuses groups=0): the empty result, still connected to t
            return t[..., window - 1:, window - 1:]
        planes = t.reshape(1, B * C, t.shape[-2], t.shape[-1])
        kh = g.repeat_interleave(C, dim=0)[:, None, None, :]  # [B*C, 1, 1, K]
        kv = g.repeat_interleave(C, dim=0)[:, None, :, None]  # [B*C, 1, K, 1]
        planes = F.conv2d(planes, kh, groups=B * C)
        planes = F.conv2d(planes, kv, groups=B * C)
        return planes.reshape(B, C, planes.shape[-2], planes.shape[-1])

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    c3 = c2 / 2
    var_eps = (1e-4 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    sd_x = torch.sqrt(var_x.clamp_min(0) + var_eps)
    sd_y = torch.sqrt(var_y.clamp_min(0) + var_eps)
    lum = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    con = (2 * sd_x * sd_y + c2) / (var_x + var_y + c2)
    struct = (cov + c3) / (sd_x * sd_y + c3)
    if combine == "sum":
        index = alpha * lum + beta * con + gamma * struct
    else:
        index = _signed_pow(lum, alpha) * _signed_pow(con, beta) * _signed_pow(struct, gamma)
    score = index.mean(dim=(1, 2, 3))
    return (score, index) if return_map else score


def msfr(
    feats_x: Sequence[torch.Tensor],
    feats_r: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Multi-scale feature residual map (Eq. 15 of CMA-AE).

    Args:
        feats_x: S feature maps of the input, feats_x[i] of shape [B, C_i, H_i, W_i].
        feats_r: S feature maps of the reconstruction, same shapes as ``feats_x``.
        out_size: (H, W) of the output map.
        weights: S non-negative weights (not all zero); ``None`` means equal weights. The
            models pass the receptive-field areas of their scales, which is Eq. 15.

    Returns:
        [B, 1, H, W] = sum_i w_i * up_i(mean_c (F_i - F'_i)^2) / sum_i w_i, where up_i is
        bilinear resizing to (H, W) with align_corners=False. Inference only (no autograd
        through the native kernels); the reference is differentiable but nothing relies on it.
    """
    out_size, weights = check_msfr_arguments(feats_x, feats_r, out_size, weights)
    total = float(sum(weights))
    out = None
    for fx, fr, w in zip(feats_x, feats_r, weights):
        residual = (fx - fr).pow(2).mean(dim=1, keepdim=True)
        up = F.interpolate(residual, size=tuple(out_size), mode="bilinear", align_corners=False)
        out = up * (w / total) if out is None else out + up * (w / total)
    return out


def check_msfr_arguments(feats_x: Sequence[torch.Tensor], feats_r: Sequence[torch.Tensor], out_size,
                         weights: Sequence[float] | None) -> tuple[tuple[int, int], list[float]]:
    """(out_size, weights) as :func:`msfr` takes them (equal weights for None), after the checks
    the native kernels make too (ValueError): one call checked alike whichever computes it."""
    if len(feats_x) != len(feats_r) or len(feats_x) == 0:
        raise ValueError(f"msfr: need the same non-zero number of scales, got {len(feats_x)} and {len(feats_r)}")
    weights = [1.0] * len(feats_x) if weights is None else [float(w) for w in weights]
    if len(weights) != len(feats_x):
        raise ValueError(f"msfr: {len(weights)} weights for {len(feats_x)} scales")
    if sum(weights) <= 0 or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"msfr: weights must be finite, non-negative and not all zero, got {weights}")
    try:  # whole numbers of any integer type (a float 7.9 is no size)
        size = tuple(operator.index(v) for v in out_size if not isinstance(v, bool))
    except TypeError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"msfr: out_size must be two positive ints (H, W), got {out_size!r}")
    for i, (fx, fr) in enumerate(zip(feats_x, feats_r)):
        if fx.shape != fr.shape:
            raise ValueError(f"msfr: scale {i} shapes differ: {tuple(fx.shape)} vs {tuple(fr.shape)}")
        if fx.dim() != 4:
            raise ValueError(f"msfr: scale {i} must be [B, C, H, W], got shape {tuple(fx.shape)}")
        if fx.shape[0] != feats_x[0].shape[0]:  # else broadcast into a map of another batch
            raise ValueError(f"msfr: scale {i} has batch {fx.shape[0]} but scale 0 has {feats_x[0].shape[0]}")
        if min(fx.shape[1:]) < 1:  # a mean over no channel: NaN
            raise ValueError(f"msfr: scale {i} needs C, H, W >= 1, got {tuple(fx.shape)}")
    return size, weights


def receptive_field_areas(layers: Sequence[tuple[int, int]]) -> list[float]:
    """Receptive-field areas (RF^2) after each of a chain of (kernel, stride) layers."""
    rf, jump, areas = 1, 1, []
    for kernel, stride in layers:
        rf += (kernel - 1) * jump
        jump *= stride
        areas.append(float(rf * rf))
    return areas


__all__ = ["memory_address", "aw_ssim", "msfr", "gaussian_windows", "receptive_field_areas", "check_aw_ssim_arguments",
           "check_msfr_arguments", "NORM_EPS", "SHRINK_EPS"]

