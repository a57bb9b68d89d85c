"""CMA-AE's anomaly maps: MSFR over the first three encoder scales (the paper), or the pixel residual."""
from __future__ import annotations

import torch

from ...maps import msfr_map, residual_map


def msfr(model, x: torch.Tensor, recon: torch.Tensor, x_features=None) -> torch.Tensor:
    """Eq. 15: receptive-field-weighted feature residuals of x and recon [B,3,P,P] -> [B,1,P,P]
    (the encoder runs on x only when its features are not given)."""
    fx = model.features(x) if x_features is None else x_features
    return msfr_map(fx, model.features(recon), tuple(x.shape[-2:]), model.msfr_weights())


def residual(model, x: torch.Tensor, recon: torch.Tensor, x_features=None) -> torch.Tensor:
    """Mean squared pixel residual over channels, [B,1,P,P]."""
    return residual_map(x, recon)


ANOMALY_MAPS = {"msfr": msfr, "residual": residual}
