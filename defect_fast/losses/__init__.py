"""Training losses: LPIPS (perceptual) and SSIM-family (structural)."""
from .lpips import LPIPS

__all__ = ["LPIPS"]
