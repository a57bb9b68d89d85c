"""Inference: full images -> anomaly maps and image scores.

A 512x512 image is cut into the model's patches (64 patches of 64x64 for CMA-AE), reconstructed
in one batch, mapped per patch (MSFR or pixel residual) and stitched back.

Optional smoothing (``smooth_sigma`` > 0, off by default as in both papers): a Gaussian blur of
the stitched map, the usual post-processing of anomaly maps (sigma 4 at 256 px in anomalib).

Image score rule: the mean of the largest 0.1 % of the map's values (at least one pixel). It
follows the strongest defect evidence, like the map maximum, but a single noisy pixel cannot set
it on its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import ops
from .models import AnomalyModel

TOP_FRACTION = 0.001


def image_scores(maps: torch.Tensor, top_fraction: float = TOP_FRACTION) -> torch.Tensor:
    """maps [N, H, W] -> [N]: mean of the top ``top_fraction`` of each map's values."""
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(round(flat.shape[1] * top_fraction)))
    return flat.topk(k, dim=1).values.mean(dim=1)


class Detector:
    """A trained model plus the rules that turn its reconstructions into defect maps.

    Args:
        model: a trained :class:`~defect_fast.models.AnomalyModel`.
        image_size: side S of the square images the model was trained on.
        map_kind: "msfr" or "residual"; ``None`` uses the model's default.
        stride: patch stride at inference; ``None`` = patch size (no overlap).
        device: where the model runs.
        batch_size: patches per forward pass.
        calibration: statistics of defect-free maps from :meth:`calibrate` (optional).
        smooth_sigma: Gaussian blur (pixels) of the full-image map; 0 = none.
    """

    def __init__(self, model: AnomalyModel, image_size: int, map_kind: str | None = None, stride: int | None = None,
                 device: torch.device | str = "cpu", batch_size: int = 512, calibration: dict[str, Any] | None = None,
                 smooth_sigma: float = 0.0):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.image_size = image_size
        self.patch = model.patch_size
        self.stride = stride or self.patch
        self.map_kind = map_kind or model.default_map
        if self.map_kind not in ("msfr", "residual"):
            raise ValueError(f"map must be 'msfr' or 'residual', got {self.map_kind!r}")
        self.batch_size = batch_size
        self.calibration = calibration or {}
        if smooth_sigma < 0:
            raise ValueError(f"smooth_sigma must be >= 0, got {smooth_sigma}")
        self.smooth_sigma = smooth_sigma

    @classmethod
    def load(cls, run: Path | str, device: str = "auto", map_kind: str | None = None, stride: int | None = None,
             smooth_sigma: float = 0.0) -> "Detector":
        """Load the finished model of a run folder (``RUN/model.pt``) or a model file."""
        from .train import RunError, load_checkpoint, model_from_state, resolve_device

        run = Path(run)
        path = run / "model.pt" if run.is_dir() else run
        if run.is_dir() and not path.exists():
            hint = " (training did not finish: continue it with --resume)" if (run / "checkpoint.pt").exists() else ""
            raise RunError(f"{run}: no model.pt{hint}")
        state = load_checkpoint(path)
        if "model_name" not in state:
            raise RunError(f"{path}: not a defect_fast model file")
        model = model_from_state(state)
        return cls(model, image_size=state["image_size"], map_kind=map_kind, stride=stride,
                   device=resolve_device(device), calibration=state.get("calibration"), smooth_sigma=smooth_sigma)

    @torch.no_grad()
    def _patch_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon = self.model(x)["recon"]
        if self.map_kind == "msfr":
            m = ops.msfr(self.model.features(x), self.model.features(recon), (self.patch, self.patch), self.model.msfr_weights())
        else:
            m = (x - recon).pow(2).mean(dim=1, keepdim=True)
        return m, recon

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps, scores and reconstructions for a batch of images.

        Args:
            images: uint8 [N, 3, S, S] (0..255) or float [N, 3, S, S] in [-1, 1], S = image_size.
        Returns:
            {"maps": [N, S, S] float (>= 0, larger = more anomalous), "scores": [N],
             "recon": [N, 3, S, S] in [-1, 1]}
        """
        from .data.patches import extract_patches, stitch_patches
        from .data.dataset import to_model_range

        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"expected images [N, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        x = to_model_range(images) if images.dtype == torch.uint8 else images.float()
        n = x.shape[0]
        patches = extract_patches(x, self.patch, self.stride)
        maps, recons = [], []
        for chunk in patches.split(self.batch_size):
            m, r = self._patch_maps(chunk.to(self.device))
            maps.append(m.float().cpu())
            recons.append(r.float().cpu())
        size = (self.image_size, self.image_size)
        full_maps = stitch_patches(torch.cat(maps), size, self.patch, self.stride)[:, 0]
        full_recon = stitch_patches(torch.cat(recons), size, self.patch, self.stride)
        if self.smooth_sigma > 0:
            from .synthesis.gaaga import gaussian_blur

            full_maps = gaussian_blur(full_maps, self.smooth_sigma)
        assert full_maps.shape[0] == n
        return {"maps": full_maps, "scores": image_scores(full_maps), "recon": full_recon}

    def predict_batched(self, images: torch.Tensor, images_per_batch: int = 8) -> dict[str, torch.Tensor]:
        """:meth:`predict` over a large set, a few images at a time."""
        parts = [self.predict(chunk) for chunk in images.split(images_per_batch)]
        return {k: torch.cat([p[k] for p in parts]) for k in ("maps", "scores", "recon")}

    def calibrate(self, normal_images: torch.Tensor) -> dict[str, float]:
        """Statistics of maps on defect-free images, used to scale maps and pick thresholds.

        Returns {"pixel_q999": 99.9th percentile of pixel scores, "score_max": the largest image
        score, "score_mean", "score_std"} over ``normal_images`` (uint8 [N,3,S,S]).
        """
        res = self.predict_batched(normal_images)
        flat = res["maps"].flatten()
        if flat.numel() > 2_000_000:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
        scores = res["scores"]
        self.calibration = {
            "pixel_q999": float(torch.quantile(flat, 0.999)),
            "score_max": float(scores.max()),
            "score_mean": float(scores.mean()),
            "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "n_images": int(normal_images.shape[0]),
        }
        return self.calibration
