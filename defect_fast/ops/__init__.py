"""The three fused ops behind one front.

``memory_address``, ``aw_ssim`` and ``msfr`` run the native kernels (CUDA for CUDA tensors,
C++ for CPU tensors) when the extension is available, and the pure-PyTorch definitions in
:mod:`defect_fast.ops.reference` otherwise. :func:`backend` says which; falling back to the
reference is announced once with a warning that says why.

Set ``DEFECT_FAST_BACKEND=reference`` to force the reference (for debugging and comparisons).
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Sequence

import torch

from . import reference

_WARNED = False


def _loader():
    return importlib.import_module(f"{__name__}._native")


def _native_module():
    """The loaded native module or None (the first failure is warned about once)."""
    global _WARNED
    if os.environ.get("DEFECT_FAST_BACKEND", "").lower() == "reference":
        return None
    module, reason = _loader().load()
    if module is None and not _WARNED:
        _WARNED = True
        warnings.warn(f"defect_fast: native kernels unavailable, using the PyTorch reference ({reason})", RuntimeWarning, stacklevel=3)
    return module


def backend(device: torch.device | str | None = None) -> str:
    """Which implementation runs for tensors on ``device``: "cuda", "cpu" or "reference".

    With no device given, the answer is for CUDA when a GPU is visible, else for the CPU.
    """
    if _native_module() is None:
        return "reference"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda":
        return "cuda" if _loader().has_cuda() else "reference"
    return "cpu"


def _use_native(*tensors: torch.Tensor) -> bool:
    return backend(tensors[0].device) != "reference"


def memory_address(z: torch.Tensor, memory: torch.Tensor, shrink_threshold: float, temperature: float = 1.0, p: int = 1):
    """See :func:`defect_fast.ops.reference.memory_address` (same signature and results)."""
    if _use_native(z, memory):
        from . import _memory_address

        return _memory_address.memory_address(z, memory, shrink_threshold, temperature, p)
    return reference.memory_address(z, memory, shrink_threshold, temperature, p)


def aw_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    window: int = 11,
    combine: str = "sum",
    data_range: float = 1.0,
    return_map: bool = False,
):
    """See :func:`defect_fast.ops.reference.aw_ssim` (same signature and results)."""
    if _use_native(x, y):
        from . import _aw_ssim

        return _aw_ssim.aw_ssim(x, y, sigma, alpha, beta, gamma, window, combine, data_range, return_map)
    return reference.aw_ssim(x, y, sigma, alpha, beta, gamma, window, combine, data_range, return_map)


def msfr(feats_x: Sequence[torch.Tensor], feats_r: Sequence[torch.Tensor], out_size, weights: Sequence[float] | None = None):
    """See :func:`defect_fast.ops.reference.msfr` (same signature and results; inference only)."""
    if _use_native(feats_x[0]):  # the native front hands grad-requiring calls to the reference
        from . import _msfr

        return _msfr.msfr(feats_x, feats_r, out_size, weights)
    return reference.msfr(feats_x, feats_r, out_size, weights)


__all__ = ["backend", "memory_address", "aw_ssim", "msfr", "reference"]
