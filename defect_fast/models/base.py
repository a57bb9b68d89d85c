"""What every reconstruction model of defect_fast provides to the trainer and the detector."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class AnomalyModel(nn.Module):
    """A patch autoencoder trained in one or more stages, with an anomaly map rule.

    Subclasses set the class attributes and implement the methods below. Images and patches are
    float tensors [B, 3, P, P] in [-1, 1].

    Class attributes:
        name: the registry name (``--model``).
        stages: one entry per training stage, "normal" (inputs are defect-free patches and the
            target is the input) or "synthetic" (inputs carry synthetic anomalies from
            ``synthesis`` and the target is the clean patch).
        synthesis: "gaaga", "adga" or None (needed when a stage is "synthetic").
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ("normal",)
    synthesis: ClassVar[str | None] = None

    patch_size: int
    default_map: str  # "msfr" or "residual"

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``type(self)(**config)`` rebuilds the model."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B,3,P,P] -> {"recon": [B,3,P,P], ...extra outputs the loss needs}."""
        raise NotImplementedError

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor, stage: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss for ``stage`` (0-based) and a dict of its parts for logging."""
        raise NotImplementedError

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters the optimiser updates in ``stage`` (the rest stay frozen)."""
        return list(self.parameters())

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps used by the MSFR anomaly map, finest first."""
        raise NotImplementedError

    def msfr_weights(self) -> list[float]:
        """Weights of ``features`` scales in MSFR (receptive-field areas, Eq. 15 of CMA-AE)."""
        raise NotImplementedError

    def begin_epoch(self, stage: int, epoch: int) -> None:
        """Called by the trainer before each epoch (e.g. to reset a sigma schedule)."""
