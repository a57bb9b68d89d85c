"""What every reconstruction model of defect_fast provides to the trainer and the detector."""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

# An anomaly map rule: (model, x [B,3,P,P], recon [B,3,P,P], x_features) -> [B,1,P,P] (>= 0, larger =
# more anomalous); x_features: the encoder features of x the forward pass already computed
# (``out["features"]``, the list ``features(x)`` would return) or None.
MapFn = Callable[["AnomalyModel", torch.Tensor, torch.Tensor, "list[torch.Tensor] | None"], torch.Tensor]


class AnomalyModel(nn.Module):
    """A patch autoencoder trained in one or more stages, with its own anomaly-map rules.

    Subclasses set the class attributes and implement the methods below; a new method is one
    folder under ``models/`` (model.py, anomaly_map.py, optionally loss.py) registered with
    :func:`defect_fast.models.register`. Images and patches are float tensors [B, 3, P, P] in [-1, 1].

    Class attributes:
        name: the registry name (``--model``).
        Config: a dataclass whose fields are exactly the constructor's keyword arguments, with
            their types and defaults; ``--set key=value`` is checked against it.
        anomaly_maps: {map name: rule} (see ``MapFn``), from the model's ``anomaly_map.py``.
        demo_options: constructor arguments for ``defect-fast demo`` (small, quick settings).

    Instance attributes:
        stages: one entry per training stage, "normal" (inputs are defect-free patches and the
            target is the input) or "synthetic" (inputs from :meth:`synthesize`, target the clean patch).
        patch_size: side P of the patches.
        default_map: the key of ``anomaly_maps`` used when none is asked for.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    anomaly_maps: ClassVar[dict[str, MapFn]] = {}
    # Maps of whole images that every model shares: {name: module class}, built by the detector from
    # the statistics stored in the model file (see :mod:`defect_fast.perceptual`).
    image_maps: ClassVar[tuple[str, ...]] = ("perceptual",)
    demo_options: ClassVar[dict[str, Any]] = {}
    stages: tuple[str, ...] = ("normal",)

    patch_size: int
    default_map: str

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``type(self)(**config)`` rebuilds the model."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B,3,P,P] -> {"recon": [B,3,P,P], ...extra outputs the loss needs}; models with an MSFR
        map also return "features": the list :meth:`features` of x (computed on the way, so the
        map need not run the encoder on x again)."""
        raise NotImplementedError

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor, stage: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar training loss for ``stage`` (0-based) and a dict of its parts for logging, as
        detached 0-d tensors: the trainer reads the loss and its parts in one host transfer per
        step (a float() of each was a GPU synchronisation of its own; numbers are accepted too)."""
        raise NotImplementedError

    def unused_options(self, keys) -> list[str]:
        """Those of the option names ``keys`` that this model, as built, does not use (a memory's
        size where it has no memory): given explicitly they would change nothing, without a word."""
        return []

    def objective(self) -> dict[str, int]:
        """Revisions of the losses this model trains with whose definition has changed between
        versions of defect_fast ({name: revision}; empty when none has). A training checkpoint
        records them, and a resume refuses to continue a run whose objective they say has changed."""
        return {}

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters the optimiser updates in ``stage`` (the rest stay frozen)."""
        return list(self.parameters())

    def synthesize(self, clean: torch.Tensor, sources: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic anomalies for a "synthetic" stage.

        Args:
            clean: defect-free images [B, 3, H, W] in [-1, 1] (not modified).
            sources: natural photos [M, 3, h, w] in [-1, 1] (anomaly material) or None.
            generator: the only source of randomness.
        Returns:
            (images [B, 3, H, W] in [-1, 1], mask [B, 1, H, W] of the altered pixels).
        """
        raise NotImplementedError(f"model {self.name!r} has no synthetic training stage")

    def anomaly_map(self, x: torch.Tensor, recon: torch.Tensor, kind: str | None = None,
                    x_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Map of patches x [B,3,P,P] and their reconstructions -> [B,1,P,P] with rule ``kind``
        (``x_features``: ``out["features"]`` of the forward pass that made ``recon``, if any)."""
        return self.anomaly_maps[self.check_map(kind)](self, x, recon, x_features)

    def check_map(self, kind: str | None) -> str:
        """``kind`` (None: the default) if this model has that map, else a ValueError naming the choices."""
        kind = kind or self.default_map
        if kind not in self.anomaly_maps and kind not in self.image_maps:
            raise ValueError(f"model {self.name!r} has no map {kind!r}; "
                             f"choose one of {sorted(self.anomaly_maps) + list(self.image_maps)}")
        return kind

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps used by the MSFR anomaly map, finest first."""
        raise NotImplementedError

    def msfr_weights(self) -> list[float]:
        """Weights of ``features`` scales in MSFR (receptive-field areas, Eq. 15 of CMA-AE)."""
        raise NotImplementedError

    # -- epoch hooks (no-ops unless a model needs them) -------------------------------------------
    def uses_lpips(self) -> bool:
        """Whether a training stage computes LPIPS (and so needs the ImageNet AlexNet weights)."""
        return False

    def begin_epoch(self, stage: int, epoch: int) -> None:
        """Called by the trainer before each epoch (e.g. to reset a sigma schedule)."""

    def set_epoch_length(self, patches_per_epoch: int | None, stage: int | None = None,
                         batch_size: int | None = None) -> None:
        """Called by the trainer before each epoch with the number of patches it will visit, in
        batches of ``batch_size``."""

    def skip_patches(self, n: int, batch_size: int | None = None) -> None:
        """Called by the trainer when it resumes in the middle of an epoch, ``n`` patches (in
        batches of ``batch_size``) in."""
