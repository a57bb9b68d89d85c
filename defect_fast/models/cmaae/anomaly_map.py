"""CMA-AE's anomaly maps: MSFR over the first three encoder scales (the paper), the pixel residual,
or 1 - SSIM (the AE-SSIM baseline's, Bergmann et al. 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...maps import msfr_map, residual_map
from ...ops.reference import gaussian_windows
from ...tracing import constant_cache

#: The SSIM map's window: 11 x 11, Gaussian of std 1.5 (Bergmann et al., as the SSIM loss here).
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
#: Its 1-D taps, the reference op's window, as plain numbers (an export records them as constants).
_TAPS = gaussian_windows(torch.tensor([SSIM_SIGMA], dtype=torch.float64), SSIM_WINDOW)[0].tolist()


def msfr(model, x: torch.Tensor, recon: torch.Tensor, x_features=None) -> torch.Tensor:
    """Eq. 15: receptive-field-weighted feature residuals of x and recon [B,3,P,P] -> [B,1,P,P]
    (the encoder runs on x only when its features are not given)."""
    fx = model.features(x) if x_features is None else x_features
    return msfr_map(fx, model.features(recon), tuple(x.shape[-2:]), model.msfr_weights())


def residual(model, x: torch.Tensor, recon: torch.Tensor, x_features=None) -> torch.Tensor:
    """Mean squared pixel residual over channels, [B,1,P,P]."""
    return residual_map(x, recon)


def ssim(model, x: torch.Tensor, recon: torch.Tensor, x_features=None) -> torch.Tensor:
    """1 - SSIM(x, recon) per pixel, the channel mean, [B,1,P,P]: Bergmann et al.'s map for an
    autoencoder trained with the SSIM loss (the index of :class:`defect_fast.losses.ssim.SSIMLoss`:
    11 x 11 Gaussian window of std 1.5, K1 = 0.01, K2 = 0.03, images in [-1, 1] shifted to [0, 2],
    l * c * s with C3 = C2 / 2, i.e. Wang et al.'s two-factor form). Each pixel is the centre of
    its window; the window's half-width beyond the patch is its edge pixels repeated, so the map
    has the patch's size. Fixed separable convolutions (no per-sample window), so that every export
    format takes it."""
    with torch.autocast(x.device.type, enabled=False):  # E[x^2] - mu^2 cancels: float32, whatever the model ran in
        return _one_minus_ssim(x.float() + 1, recon.float() + 1)


def _one_minus_ssim(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    pad = (SSIM_WINDOW // 2,) * 4
    stats = torch.stack([xs, ys, xs * xs, ys * ys, xs * ys])  # [5, B, C, P, P]
    shape = stats.shape
    g = _taps(xs.device)
    flat = F.pad(stats.reshape(-1, 1, shape[-2], shape[-1]), pad, mode="replicate")  # every plane on its own
    flat = F.conv2d(F.conv2d(flat, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))
    mx, my, exx, eyy, exy = flat.reshape(shape).unbind(0)
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    vx, vy, cov = exx - mx * mx, eyy - my * my, exy - mx * my
    index = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return (1 - index).mean(dim=1, keepdim=True)


@constant_cache(maxsize=16)
def _taps(device: torch.device) -> torch.Tensor:
    """The window's taps as a float32 tensor on ``device``, made once per device: a call makes no
    host-to-device copy (none inside a CUDA graph's capture, which refuses a blocking one; the
    warm-up before it makes the tensor); made outside inference mode, so that a call recording
    gradients can use it. Read only: callers share it."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(_TAPS, dtype=torch.float32, device=device)


ANOMALY_MAPS = {"msfr": msfr, "residual": residual, "ssim": ssim}
