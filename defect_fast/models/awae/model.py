"""AW-SSIM two-stage autoencoder (second paper): conv AE with two skip connections.

The paper describes a convolutional encoder and a transposed-convolution decoder, each layer
conv -> batch norm -> activation, on 128x128 patches, with skip connections at two "strategically
placed" levels (skips at every level let the decoder copy defects), but gives no layer table.
This is the one used here (defaults; C = ``base_channels`` = 32, latent = ``latent_channels``):

    block    layer                                              output (C x H x W)
    input                                                       3    x 128 x 128
    enc0     Conv 4x4 s2 p1, BN, LeakyReLU(0.2)                 C    x 64 x 64      level 0
    enc1     Conv 4x4 s2 p1, BN, LeakyReLU(0.2)                 2C   x 32 x 32      level 1
    enc2     Conv 4x4 s2 p1, BN, LeakyReLU(0.2)                 4C   x 16 x 16      level 2  -> skip
    enc3     Conv 4x4 s2 p1, BN, LeakyReLU(0.2)                 8C   x 8 x 8        level 3  -> skip
    enc4     Conv 4x4 s2 p1, BN, LeakyReLU(0.2)                 16C  x 4 x 4        level 4
    squeeze  Conv 3x3 p1, BN, LeakyReLU(0.2)                    latent x 4 x 4      (bottleneck)
    expand   Conv 3x3 p1, BN, ReLU                              16C  x 4 x 4
    dec4     ConvT 4x4 s2 p1, BN, ReLU                          8C   x 8 x 8
    join3    concat enc3                                        16C  x 8 x 8        skip 1
    dec3     ConvT 4x4 s2 p1, BN, ReLU                          4C   x 16 x 16
    join2    concat enc2                                        8C   x 16 x 16      skip 2
    dec2     ConvT 4x4 s2 p1, BN, ReLU                          2C   x 32 x 32
    dec1     ConvT 4x4 s2 p1, BN, ReLU                          C    x 64 x 64
    dec0     ConvT 4x4 s2 p1, BN, ReLU                          C    x 128 x 128
    head     Conv 3x3 p1, tanh                                  3    x 128 x 128

Decoder block ``dec<i>`` reads the level-i map (joined with ``enc<i>``'s output when i is a skip
level) and doubles the resolution. ~7.4 M parameters at the defaults.

Why skips at levels 2 and 3 (16x16 and 8x8), not at the finest levels:
- A 4x4x``latent`` bottleneck alone loses the high-frequency layout of a texture, so the
  reconstruction of normal background is blurred and noisy, which is the residual noise the paper
  sets out to remove. A skip hands the decoder that layout directly.
- But what a skip carries reaches the output whether or not it is normal. Level-0/1 features
  (receptive fields of 4 and 10 pixels, 64x64 and 32x32 maps) are close to a copy of the pixels:
  too little context for the encoder to tell a defect from texture, and enough capacity to pass
  the defect straight through (the paper's all-level skips "partially reconstruct" defects).
- Level-2/3 features see 22 and 46 pixels, enough context to recognise a local anomaly, which
  stage-2 training (synthetic defect in, clean patch as target) teaches the encoder to map to
  normal-looking features; and there are still three to four upsampling blocks between a skip
  and the output, so pixel-exact detail must be re-synthesised from normal-patch statistics
  instead of being copied. They carry the texture's placement at 8- and 16-pixel granularity,
  which is what the bottleneck drops.
``skip_levels`` is configurable (any distinct levels in 0..4) for experiments; the default is the
paper's count of exactly two.

Anomaly maps: "residual" (the paper's input-minus-reconstruction), or MSFR over :meth:`features`
(encoder maps of levels 0-2) weighted by their receptive-field areas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch
from torch import nn

from ...losses.ssim import PRESETS, Weights, resolve_weights
from ...losses.ssim import objective as ssim_objective
from ...ops.reference import receptive_field_areas
from .. import register
from ..base import AnomalyModel
from .anomaly_map import ANOMALY_MAPS
from .loss import LOSS_MODES, AWAELoss

DEPTH = 5  # stride-2 levels: 128 -> 4
KERNEL, STRIDE = 4, 2
MSFR_LEVELS = 3


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, KERNEL, STRIDE, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, KERNEL, STRIDE, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SkipJoin(nn.Module):
    """One skip connection: concatenates an encoder map to the decoder map of the same level."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def forward(self, decoded: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        return torch.cat([decoded, encoded], dim=1)

    def extra_repr(self) -> str:
        return f"level={self.level}"


@dataclass
class AWAEConfig:
    """AW-SSIM AE's options (``--set key=value``); see :class:`AWAE` for each."""

    patch_size: int = 128
    base_channels: int = 32
    latent_channels: int = 128
    skip_levels: list[int] = field(default_factory=lambda: [2, 3])
    loss_mode: str = "awssim"
    two_stage: Union[bool, None] = None
    stage2_ssim_weight: float = 0.8
    ssim_weights: Union[str, list[float]] = "balanced"
    sigma0: float = 0.5
    sigma_end: float = 3.0
    sigma_k: Union[float, None] = None
    sigma_step: str = "patch"
    lpips_weights: Union[str, None] = None
    synthesis: str = "paper"


@register
class AWAE(AnomalyModel):
    """AW-SSIM two-stage autoencoder on [B, 3, P, P] patches in [-1, 1] (P = 128 in the paper).

    Args:
        patch_size: P, a multiple of 32 (>= 32).
        base_channels: channels of level 0 (doubling per level).
        latent_channels: channels of the 4x4 bottleneck (at P = 128).
        skip_levels: encoder levels (0..4) joined to the decoder; default (2, 3), see module doc.
        loss_mode: "awssim" (paper), or the one-stage ablations "awssim_only", "ssim_l1",
            "lpips_ssim" (see :mod:`defect_fast.models.awae.loss`).
        two_stage: train a second, "synthetic" stage (ADGA defects in, clean patch as target).
            None: True for "awssim", False for the ablation modes.
        stage2_ssim_weight: a in Eq. 10 (and in the ablations' combined losses), default 0.8.
        ssim_weights: AW-SSIM (alpha, beta, gamma) or a preset name ("balanced", "structure",
            "luminance").
        sigma0, sigma_end, sigma_k, sigma_step: the per-patch sigma schedule of Eq. 9 (see
            :class:`defect_fast.losses.ssim.SigmaSchedule`); sigma_k None derives k from
            sigma_end and the epoch length.
        lpips_weights: AlexNet trunk weights file for LPIPS (None: LPIPS's own search).
        synthesis: "paper" (ADGA polygons) or "perlin" (irregular Perlin-shaped anomalies, see
            :mod:`defect_fast.synthesis.synthesize`).
    """

    name = "awae"
    Config = AWAEConfig
    anomaly_maps = ANOMALY_MAPS
    stages = ("normal", "synthetic")  # the paper's default; each instance sets its own in __init__

    def __init__(
        self,
        patch_size: int = 128,
        base_channels: int = 32,
        latent_channels: int = 128,
        skip_levels: Sequence[int] = (2, 3),
        loss_mode: str = "awssim",
        two_stage: bool | None = None,
        stage2_ssim_weight: float = 0.8,
        ssim_weights: Weights = "balanced",
        sigma0: float = 0.5,
        sigma_end: float = 3.0,
        sigma_k: float | None = None,
        sigma_step: str = "patch",
        lpips_weights: str | None = None,
        synthesis: str = "paper",
    ):
        super().__init__()
        if synthesis not in ("paper", "perlin"):
            raise ValueError(f"AWAE: synthesis must be 'paper' or 'perlin', got {synthesis!r}")
        self.synthesis = synthesis
        if patch_size < 32 or patch_size % 32:
            raise ValueError(f"AWAE: patch_size must be a multiple of 32 (>= 32), got {patch_size}")
        for name, value in (("base_channels", base_channels), ("latent_channels", latent_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AWAE: {name} must be a whole number >= 1, got {value!r}")
        levels = tuple(sorted(int(i) for i in skip_levels))
        if len(set(levels)) != len(levels) or any(not 0 <= i < DEPTH for i in levels):
            raise ValueError(f"AWAE: skip_levels must be distinct levels in 0..{DEPTH - 1}, got {tuple(skip_levels)}")
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"AWAE: unknown loss_mode {loss_mode!r}; choose one of {LOSS_MODES}")
        if two_stage is None:
            two_stage = loss_mode == "awssim"
        self.patch_size = int(patch_size)
        self.default_map = "residual"
        self.stages = ("normal", "synthetic") if two_stage else ("normal",)
        weights = ssim_weights if isinstance(ssim_weights, str) else list(resolve_weights(ssim_weights))
        self._config: dict[str, Any] = dict(
            patch_size=self.patch_size, base_channels=int(base_channels), latent_channels=int(latent_channels),
            skip_levels=list(levels), loss_mode=loss_mode, two_stage=bool(two_stage),
            stage2_ssim_weight=float(stage2_ssim_weight), ssim_weights=weights, sigma0=float(sigma0),
            sigma_end=float(sigma_end), sigma_k=None if sigma_k is None else float(sigma_k), sigma_step=sigma_step,
            lpips_weights=lpips_weights, synthesis=synthesis,
        )

        chans = [base_channels * 2**i for i in range(DEPTH)]
        self.skip_levels = levels
        self.encoder = nn.ModuleList(_down(cin, cout) for cin, cout in zip([3] + chans[:-1], chans))
        self.bottleneck = nn.Sequential(
            nn.Conv2d(chans[-1], latent_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(latent_channels), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(latent_channels, chans[-1], 3, 1, 1, bias=False), nn.BatchNorm2d(chans[-1]), nn.ReLU(inplace=True),
        )
        self.joins = nn.ModuleDict({str(i): SkipJoin(i) for i in levels})
        # decoder[i] reads level i (2*chans[i] channels when joined) and outputs level i-1's size.
        outs = [chans[0]] + chans[:-1]
        self.decoder = nn.ModuleList(_up(chans[i] * (2 if i in levels else 1), outs[i]) for i in range(DEPTH))
        self.head = nn.Sequential(nn.Conv2d(chans[0], 3, 3, 1, 1), nn.Tanh())
        self.criterion = AWAELoss(loss_mode, ssim_weights, sigma0, sigma_end, sigma_k, sigma_step,
                                  stage2_ssim_weight, lpips_weights)
        self._epoch_lengths: dict[int, int] = {}  # measured patches per epoch, per stage
        self._announced: dict[int | None, int] = {}  # set_epoch_length values
        self._epoch_stage: int | None = None

    # -- interface ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-serialisable); ``AWAE(**config)`` rebuilds the same network."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self._config.items()}

    def objective(self) -> dict[str, int]:
        return ssim_objective()  # every loss mode has an SSIM-family term

    def uses_lpips(self) -> bool:
        return self.criterion.uses_lpips(len(self.stages))

    def unused_options(self, keys) -> list[str]:
        mode, unused = self.criterion.mode, set()
        if mode not in ("awssim", "awssim_only"):  # plain SSIM: no weights, no sigma schedule
            unused |= {"ssim_weights", "sigma0", "sigma_end", "sigma_k", "sigma_step"}
        elif self._config["sigma_k"] is not None:  # the increment given: no end to derive it from
            unused.add("sigma_end")
        if mode == "awssim_only" or (mode == "awssim" and len(self.stages) == 1):  # AW-SSIM alone, nothing combined
            unused.add("stage2_ssim_weight")
        if not self.uses_lpips():
            unused.add("lpips_weights")
        if "synthetic" not in self.stages:
            unused.add("synthesis")
        return [k for k in keys if k in unused]

    def encode(self, x: torch.Tensor, levels: int = DEPTH) -> list[torch.Tensor]:
        """x [B,3,P,P] -> outputs of encoder levels 0..levels-1, [B, C*2^i, P/2^(i+1), P/2^(i+1)]."""
        feats = []
        for block in self.encoder[:levels]:
            x = block(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """x [B,3,P,P] in [-1,1] -> {"recon": [B,3,P,P] in (-1,1), "features": features(x)}."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"AWAE: expected [B,3,H,W] with H, W multiples of 32, got {tuple(x.shape)}")
        feats = self.encode(x)
        h = self.bottleneck(feats[-1])
        for i in reversed(range(DEPTH)):
            if i in self.skip_levels:
                h = self.joins[str(i)](h, feats[i])
            h = self.decoder[i](h)
        return {"recon": self.head(h), "features": feats[:MSFR_LEVELS]}

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor, stage: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage loss of ``loss_mode`` (stage 0: normal patches; stage 1: Eq. 10 for "awssim")."""
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"AWAE: stage {stage} out of range for stages {self.stages}")
        return self.criterion(out["recon"], target, stage)

    def synthesize(self, clean: torch.Tensor, sources: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """ADGA anomalies on clean [B,3,H,W] -> (images, mask) ("paper": appearance-matched polygons;
        "perlin": irregular Perlin-shaped anomalies with ADGA's choice of photo)."""
        from ...synthesis import SynthesisConfig, synthesize

        return synthesize(clean, sources, generator, "adga", SynthesisConfig(variant=self.synthesis))

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Every stage trains the whole autoencoder (stage 2 fine-tunes stage 1's weights)."""
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"AWAE: stage {stage} out of range for stages {self.stages}")
        return list(self.parameters())

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps of levels 0, 1, 2 (finest first) for the MSFR anomaly map."""
        return self.encode(x, MSFR_LEVELS)

    def msfr_weights(self) -> list[float]:
        """Receptive-field areas of the :meth:`features` levels: [16, 100, 484] (4x4, stride 2)."""
        return receptive_field_areas([(KERNEL, STRIDE)] * MSFR_LEVELS)

    # -- sigma schedule ----------------------------------------------------------------------
    def set_epoch_length(self, patches_per_epoch: int | None, stage: int | None = None,
                         batch_size: int | None = None) -> None:
        """Announce the patches per epoch (of ``stage``, or of every stage) so the sigma schedule
        reaches ``sigma_end`` at the end of each epoch. Without it the length is measured during
        the first epoch of each stage, which holds the midpoint sigma meanwhile. With
        ``sigma_step="batch"`` the schedule steps once per batch: the epoch has
        ceil(patches / ``batch_size``) steps (the number given is taken as steps when
        ``batch_size`` is None)."""
        if patches_per_epoch is None:
            self._announced.pop(stage, None)
        else:
            self._announced[stage] = self._steps(int(patches_per_epoch), batch_size)
        if self._epoch_stage is not None and self.criterion.schedule is not None:
            self.criterion.schedule.set_epoch_length(self._length_for(self._epoch_stage))

    def _steps(self, patches: int, batch_size: int | None) -> int:
        """Schedule steps of ``patches`` patches fed in batches of ``batch_size``."""
        per_batch = getattr(self.criterion.structural, "sigma_step", "patch") == "batch"
        return -(-patches // batch_size) if per_batch and batch_size else patches

    def _length_for(self, stage: int) -> int | None:
        return self._announced.get(stage, self._announced.get(None, self._epoch_lengths.get(stage)))

    def begin_epoch(self, stage: int, epoch: int) -> None:
        """Reset the sigma schedule to sigma0 (and record the length of the epoch just ended)."""
        schedule = self.criterion.schedule
        if schedule is None:
            return
        if self._epoch_stage is not None and schedule.steps > 0:
            self._epoch_lengths[self._epoch_stage] = schedule.steps
        self._epoch_stage = stage
        schedule.set_epoch_length(self._length_for(stage))
        schedule.reset()

    def skip_patches(self, n: int, batch_size: int | None = None) -> None:
        """Advance the sigma schedule past ``n`` patches fed in batches of ``batch_size`` (a run
        resumed in the middle of an epoch): n steps, or ceil(n / batch_size) with ``sigma_step="batch"``."""
        schedule = self.criterion.schedule
        if schedule is not None and n > 0:
            schedule.next(self._steps(n, batch_size))


__all__ = ["AWAE", "SkipJoin", "PRESETS"]
