"""Artificial anomalies for the second training stage.

* :func:`gaaga` — CMA-AE's general artificial anomaly generation: rectangular natural-photo and
  blurred normal-image patches.
* :func:`adga` — the AW-SSIM two-stage AE's artificial defect generation: soft-edged random
  polygons cut from appearance-matched sources.
* :func:`load_sources` — the natural photos both draw from.
* :func:`synthesize` with :class:`SynthesisConfig` — the one entry point the trainer calls:
  ``variant="paper"`` runs the two above unchanged; ``variant="perlin"`` blends photos, generated
  textures, cut-paste from other normal images and low-contrast intensity changes into irregular
  Perlin-noise regions (:func:`perlin_mask`) with random opacity, for both methods.

Inputs and outputs are float ``[B, 3, H, W]`` images in [-1, 1]; every function takes a
``torch.Generator`` and uses no other randomness.
"""
from .adga import adga, appearance, polygon_mask, select_sources
from .gaaga import gaaga, gaussian_blur
from .perlin import fractal_noise, perlin_mask, perlin_noise, threshold_at_coverage
from .sources import builtin_source_paths, list_source_files, load_sources, resize_sources
from .synthesize import KINDS, METHODS, SHAPES, VARIANTS, SynthesisConfig, synthesize

__all__ = ["KINDS", "METHODS", "SHAPES", "SynthesisConfig", "VARIANTS", "adga", "appearance", "builtin_source_paths",
           "fractal_noise", "gaaga", "gaussian_blur", "list_source_files", "load_sources", "perlin_mask",
           "perlin_noise", "polygon_mask", "resize_sources", "select_sources", "synthesize", "threshold_at_coverage"]
