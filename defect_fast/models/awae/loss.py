"""Training losses of the AW-SSIM two-stage autoencoder, per loss mode and stage.

Modes (``loss_mode``), with ``a`` = ``ssim_weight`` (Eq. 10's alpha; the paper gives the SSIM-type
term the larger weight in every combined loss, a > 0.5, and the default 0.8 does; any a in [0, 1]
is taken, for ablations):

    mode          stage 0 ("normal")            stage 1 ("synthetic")
    awssim        AW-SSIM                       a * AW-SSIM + (1 - a) * LPIPS      (Eq. 10)
    awssim_only   AW-SSIM                       AW-SSIM
    ssim_l1       a * SSIM + (1 - a) * L1       same
    lpips_ssim    a * SSIM + (1 - a) * LPIPS    same

"AW-SSIM" and "SSIM" stand for the losses 1 - index (:mod:`defect_fast.losses.ssim`); LPIPS is the
mean of :class:`defect_fast.losses.lpips.LPIPS` distances (AlexNet), built on first use and kept
out of the model's parameters and state_dict (it is a frozen measuring device, not part of the
autoencoder). The last three modes are the one-stage ablations of Table 2.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...losses.ssim import AWSSIMLoss, SSIMLoss, Weights

LOSS_MODES = ("awssim", "awssim_only", "ssim_l1", "lpips_ssim")


def default_lpips_factory(weights_path: str | None) -> nn.Module:
    """Build the frozen LPIPS measure (imported here so this module loads without it).

    ``weights_path``: the AlexNet trunk file (first argument of ``LPIPS``); None lets LPIPS look
    for it itself (its environment variable, then the torch hub cache).
    """
    from ...losses.lpips import LPIPS

    net = LPIPS(weights_path) if weights_path is not None else LPIPS()
    net.eval()
    net.requires_grad_(False)
    return net


class AWAELoss(nn.Module):
    """The stage losses of :class:`defect_fast.models.awae.model.AWAE`.

    Args:
        mode: one of :data:`LOSS_MODES`.
        ssim_weights: AW-SSIM (alpha, beta, gamma) or a preset name.
        sigma0, sigma_end, sigma_k, sigma_step: the AW-SSIM sigma schedule (see SigmaSchedule).
        ssim_weight: a in the combined losses (Eq. 10), in [0, 1].
        lpips_weights: AlexNet trunk weights file handed to ``LPIPS`` (None: its default search).
        window: Gaussian window length.

    Call: ``loss(recon, target, stage) -> (scalar, {part: detached 0-d tensor})``, recon and target
    [B, 3, P, P] in [-1, 1].
    """

    def __init__(
        self,
        mode: str = "awssim",
        ssim_weights: Weights = "balanced",
        sigma0: float = 0.5,
        sigma_end: float = 3.0,
        sigma_k: float | None = None,
        sigma_step: str = "patch",
        ssim_weight: float = 0.8,
        lpips_weights: str | None = None,
        window: int = 11,
    ):
        super().__init__()
        if mode not in LOSS_MODES:
            raise ValueError(f"AWAE: unknown loss_mode {mode!r}; choose one of {LOSS_MODES}")
        if not 0.0 <= ssim_weight <= 1.0:
            raise ValueError(f"AWAE: stage2_ssim_weight must lie in [0, 1], got {ssim_weight}")
        self.mode = mode
        self.ssim_weight = float(ssim_weight)
        self.lpips_weights = lpips_weights
        self.lpips_factory: Callable[[str | None], nn.Module] = default_lpips_factory
        if mode in ("awssim", "awssim_only"):
            self.structural: nn.Module = AWSSIMLoss(ssim_weights, sigma0=sigma0, k=sigma_k, sigma_end=sigma_end,
                                                    sigma_step=sigma_step, window=window)
        else:
            self.structural = SSIMLoss(window=window)
        # A list, not an attribute: a registered submodule would put LPIPS's frozen AlexNet into
        # the autoencoder's parameters(), state_dict() and optimiser.
        self._lpips: list[nn.Module] = []

    @property
    def schedule(self):
        """The AW-SSIM sigma schedule, or None for the SSIM-based modes."""
        return getattr(self.structural, "schedule", None)

    def uses_lpips(self, n_stages: int) -> bool:
        """Whether training with ``n_stages`` stages computes LPIPS (see :meth:`forward`)."""
        return self.mode == "lpips_ssim" or (self.mode == "awssim" and n_stages > 1)

    def lpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance of two [B, 3, P, P] batches in [-1, 1] (scalar)."""
        if not self._lpips:
            self._lpips.append(self.lpips_factory(self.lpips_weights))
        net = self._lpips[0]
        ref = next(iter(net.parameters()), None)
        # under autocast the network stays float32 (autocast runs its convolutions in low precision);
        # casting it to a bfloat16 batch's dtype would round its weights for good
        if ref is not None:
            dtype = ref.dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
            if ref.device != x.device or ref.dtype != dtype:
                net = net.to(device=x.device, dtype=dtype)
                self._lpips[0] = net
        return net(x, y).mean()

    def forward(self, recon: torch.Tensor, target: torch.Tensor, stage: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mode, a = self.mode, self.ssim_weight
        if mode == "awssim_only" or (mode == "awssim" and stage == 0):
            s = self.structural(recon, target)
            return s, {"awssim": s.detach()}
        if mode == "awssim":
            s = self.structural(recon, target)
            p = self.lpips(recon, target)
            total = a * s + (1.0 - a) * p
            return total, {"awssim": s.detach(), "lpips": p.detach(), "total": total.detach()}
        s = self.structural(recon, target)
        if mode == "ssim_l1":
            other, name = (recon - target).abs().mean(), "l1"
        else:
            other, name = self.lpips(recon, target), "lpips"
        total = a * s + (1.0 - a) * other
        return total, {"ssim": s.detach(), name: other.detach(), "total": total.detach()}


__all__ = ["LOSS_MODES", "AWAELoss", "default_lpips_factory"]
