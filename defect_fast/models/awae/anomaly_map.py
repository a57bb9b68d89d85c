"""AW-SSIM AE's anomaly maps: the pixel residual (the paper) or MSFR over encoder levels 0-2."""
from __future__ import annotations

from ..cmaae.anomaly_map import msfr, residual

ANOMALY_MAPS = {"residual": residual, "msfr": msfr}
