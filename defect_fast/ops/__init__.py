"""The three fused ops behind one front.

``memory_address``, ``aw_ssim`` and ``msfr`` run the native kernels (CUDA for CUDA tensors,
C++ for CPU tensors) when the extension is available, and the pure-PyTorch definitions in
:mod:`defect_fast.ops.reference` otherwise. :func:`backend` says which; falling back to the
reference is announced once with a warning that says why.

Set ``DEFECT_FAST_BACKEND=reference`` to force the reference for the whole process (for
debugging and comparisons); :func:`reference_only` forces it inside a ``with`` block, for the
calling thread only (what tracing for an export uses: other threads keep the kernels).

Under ``torch.autocast`` (CPU or CUDA, float16 or bfloat16) the three ops are on autocast's
float32 list, like softmax and the losses: inputs in float16/bfloat16 are upcast to float32
(float64 when any input is float64, aw_ssim's sigma aside), the op runs with autocast off (native kernels and reference
alike), and **the outputs are float32** (float64 in the float64 case), whatever mix of dtypes
came in; gradients flow back to each input in that input's dtype. (msfr on bfloat16/float16 CPU
features skips the copies: its kernel widens each value as it reads it, the same float32 map.)
Outside autocast nothing is
cast: the inputs must share one dtype, and the outputs have it. The native ops are also
registered with :func:`torch.library.register_autocast` (float32) where the installed torch has
it, so calling ``torch.ops.defect_fast.<op>`` under autocast upcasts float16/bfloat16 inputs to float32 too;
it leaves float64 ones as they are (a float64 input beside a bfloat16 one is then refused as a
mix of dtypes, where the front computes in float64).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from typing import Iterator, Sequence

import torch

from . import reference

_WARNED = False
# True inside reference_only(): a context variable, so each thread (and nested block) has its own
_REFERENCE_ONLY = contextvars.ContextVar("defect_fast_reference_only", default=False)


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Run the ops as their pure-PyTorch reference inside the block, in this thread only."""
    token = _REFERENCE_ONLY.set(True)
    try:
        yield
    finally:
        _REFERENCE_ONLY.reset(token)


def _loader():
    return importlib.import_module(f"{__name__}._native")


def _native_module():
    """The loaded native module or None (the first failure is warned about once)."""
    global _WARNED
    if _REFERENCE_ONLY.get() or os.environ.get("DEFECT_FAST_BACKEND", "").lower() == "reference":
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
        return "cuda" if _loader().has_cuda(device) else "reference"
    return "cpu"


def _use_native(*tensors: torch.Tensor) -> bool:
    return backend(tensors[0].device) != "reference"


def _autocast_dtype(*tensors) -> torch.dtype | None:
    """The dtype the ops compute in under autocast (float32, or float64 if an input is), None when off."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    device_type = tensors[0].device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _upcast(t, dtype: torch.dtype):
    """``t`` in ``dtype`` if it is a floating tensor (anything else is left for the checks to reject)."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def memory_address(z: torch.Tensor, memory: torch.Tensor, shrink_threshold: float, temperature: float = 1.0, p: int = 1):
    """See :func:`defect_fast.ops.reference.memory_address` (same signature and results).

    Under autocast: computed in float32; z_hat [B, C] and weights [B, N] are float32.
    """
    dtype = _autocast_dtype(z, memory)
    if dtype is not None:
        with torch.autocast(z.device.type, enabled=False):
            return memory_address(_upcast(z, dtype), _upcast(memory, dtype), shrink_threshold, temperature, p)
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
    """See :func:`defect_fast.ops.reference.aw_ssim` (same signature and results).

    Under autocast: computed in float32 (float64 when x or y is); the score [B] (and the map)
    are in that dtype. ``sigma``, the window widths, does not decide the precision: a float64 sigma
    with bfloat16 images ran the float64 kernels (slow on most GPUs).
    """
    dtype = _autocast_dtype(x, y)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            x, y = (_upcast(t, dtype) for t in (x, y))
            if not (isinstance(sigma, torch.Tensor) and sigma.dtype == torch.float64):  # kept as given
                sigma = _upcast(sigma, dtype)
            return aw_ssim(x, y, sigma, alpha, beta, gamma, window, combine, data_range, return_map)
    # the kernel gives sigma no gradient (the schedule's never asks one): a sigma that asks goes to the reference
    if _use_native(x, y) and not (isinstance(sigma, torch.Tensor) and sigma.requires_grad and torch.is_grad_enabled()):
        from . import _aw_ssim

        return _aw_ssim.aw_ssim(x, y, sigma, alpha, beta, gamma, window, combine, data_range, return_map)
    return reference.aw_ssim(x, y, sigma, alpha, beta, gamma, window, combine, data_range, return_map)


def msfr(feats_x: Sequence[torch.Tensor], feats_r: Sequence[torch.Tensor], out_size, weights: Sequence[float] | None = None):
    """See :func:`defect_fast.ops.reference.msfr` (same signature and results; inference only).

    Under autocast: computed in float32; the map [B, 1, H, W] is float32.
    """
    dtype = _autocast_dtype(*feats_x, *feats_r) if len(feats_x) else None
    if dtype is not None:
        if dtype == torch.float32 and _use_native(feats_x[0]):  # bf16/fp16 CPU features, widened as read
            from . import _msfr

            out = _msfr.msfr_float(feats_x, feats_r, out_size, weights)
            if out is not None:
                return out
        with torch.autocast(feats_x[0].device.type, enabled=False):
            return msfr([_upcast(t, dtype) for t in feats_x], [_upcast(t, dtype) for t in feats_r], out_size, weights)
    if len(feats_x) and _use_native(feats_x[0]):  # the native front hands grad-requiring calls to the reference
        from . import _msfr

        return _msfr.msfr(feats_x, feats_r, out_size, weights)
    return reference.msfr(feats_x, feats_r, out_size, weights)


__all__ = ["backend", "memory_address", "aw_ssim", "msfr", "reference", "reference_only"]
