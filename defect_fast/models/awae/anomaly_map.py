"""AW-SSIM AE's anomaly maps: the pixel residual (the paper), MSFR over encoder levels 0-2, or 1 - SSIM."""
from __future__ import annotations

from ..cmaae.anomaly_map import msfr, residual, ssim

ANOMALY_MAPS = {"residual": residual, "msfr": msfr, "ssim": ssim}
