"""Artificial anomalies for the second training stage.

* :func:`gaaga` — CMA-AE's general artificial anomaly generation: rectangular natural-photo and
  blurred normal-image patches.
* :func:`adga` — the AW-SSIM two-stage AE's artificial defect generation: soft-edged random
  polygons cut from appearance-matched sources.
* :func:`load_sources` — the natural photos both draw from.

Inputs and outputs are float ``[B, 3, H, W]`` images in [-1, 1]; every function takes a
``torch.Generator`` and uses no other randomness.
"""
from .adga import adga, appearance, polygon_mask, select_sources
from .gaaga import gaaga, gaussian_blur
from .sources import builtin_source_paths, list_source_files, load_sources, resize_sources

__all__ = ["adga", "appearance", "builtin_source_paths", "gaaga", "gaussian_blur", "list_source_files",
           "load_sources", "polygon_mask", "resize_sources", "select_sources"]
