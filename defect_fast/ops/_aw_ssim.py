"""Native AW-SSIM: fake kernels and autograd for ``defect_fast::aw_ssim``, and the Python front.

The ops ``defect_fast::aw_ssim`` and ``defect_fast::aw_ssim_backward`` are defined in
``csrc/aw_ssim/aw_ssim.cpp`` (schemas and shapes), with CPU kernels in ``cpu/aw_ssim_cpu.cpp``
and CUDA kernels in ``cuda/``. The forward computes, in one pass per image plane, the five
Gaussian-filtered statistics, the index map, its per-sample mean and the per-pixel partial
derivatives of the index with respect to the statistics; the backward op is a second (adjoint)
filtering pass over those partials (kept from the forward on CUDA, recomputed plane by plane in
cache on the CPU). :func:`aw_ssim` has the signature and results of
:func:`defect_fast.ops.reference.aw_ssim`.

Importing this module raises ImportError when the native extension cannot be loaded.
"""
from __future__ import annotations

import torch

from . import _native, reference

_COMBINE = {"sum": 0, "product": 1}
_STATS = 5  # mu_x, mu_y, E[x^2], E[y^2], E[xy]


_module, _reason = _native.load()
if _module is None:
    raise ImportError(f"defect_fast.ops._aw_ssim: native extension unavailable ({_reason})")


def _partials_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 / bfloat16 inputs keep their partial derivatives in float32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@torch.library.register_fake("defect_fast::aw_ssim")
def _aw_ssim_fake(x, y, sigma, alpha, beta, gamma, window, combine, data_range, return_map, save_partials):
    torch._check(x.dim() == 4 and x.shape == y.shape, lambda: "aw_ssim: x and y must be one [B, C, H, W] shape")
    B, C, H, W = x.shape
    ho, wo = H - window + 1, W - window + 1
    pdt = _partials_dtype(x.dtype)
    score = x.new_empty((B,))
    map_ = x.new_empty((B, C, ho, wo)) if return_map else x.new_empty((0,))
    partials = x.new_empty((B, C, _STATS, ho, wo), dtype=pdt) if save_partials else x.new_empty((0,), dtype=pdt)
    return score, map_, partials


@torch.library.register_fake("defect_fast::aw_ssim_backward")
def _aw_ssim_backward_fake(grad_score, grad_map, x, y, sigma, partials, alpha, beta, gamma, window, combine, data_range, output_mask):
    grad_x = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    grad_y = y.new_empty(y.shape) if output_mask[1] else y.new_empty((0,))
    return grad_x, grad_y


def _setup_context(ctx, inputs, output):
    x, y, sigma, alpha, beta, gamma, window, combine, data_range, _return_map, _save_partials = inputs
    _score, _map, partials = output
    ctx.save_for_backward(x, y, sigma, partials)
    ctx.params = (alpha, beta, gamma, window, combine, data_range)
    ctx.mark_non_differentiable(partials)


def _backward(ctx, grad_score, grad_map, _grad_partials):
    x, y, sigma, partials = ctx.saved_tensors
    _native.no_double_backward("aw_ssim", x, y, grad_score, grad_map)
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    grad_x = grad_y = None
    if need[0] or need[1]:
        if grad_score is None:
            grad_score = x.new_zeros((x.shape[0],))
        if grad_map is None:
            grad_map = x.new_empty((0,))
        grad_x, grad_y = torch.ops.defect_fast.aw_ssim_backward(grad_score, grad_map, x, y, sigma, partials, *ctx.params, need)
        grad_x = grad_x if need[0] else None
        grad_y = grad_y if need[1] else None
    return grad_x, grad_y, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("defect_fast::aw_ssim", _backward, setup_context=_setup_context)
_native.register_autocast_float32("defect_fast::aw_ssim", "defect_fast::aw_ssim_backward")  # see defect_fast.ops: float32 under autocast


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
    """Adaptive weighted SSIM with a per-sample Gaussian window, on the native kernels.

    Same arguments and results as :func:`defect_fast.ops.reference.aw_ssim`:

    Args:
        x, y: [B, C, H, W] images, same shape, dtype and device; H, W >= window. float32 or
            float64 (float16 / bfloat16 too: CUDA accumulates them in float32, the CPU computes
            them in float32).
        sigma: [B] Gaussian standard deviation per sample (> 0), floating point, same device.
            No gradient flows to it.
        alpha, beta, gamma: weights ("sum") or exponents ("product") of luminance, contrast, structure.
        window: odd window length K.
        combine: "sum" (AW-SSIM) or "product" (standard SSIM at 1, 1, 1; powers sign-preserving).
        data_range: L > 0, the dynamic range of the pixel values.
        return_map: also return the per-pixel index map.

    Returns:
        score [B] (mean of the index over C, H-K+1, W-K+1), and with ``return_map`` also the map
        [B, C, H-K+1, W-K+1]. Differentiable with respect to ``x`` and ``y``.
    """
    reference.check_aw_ssim_arguments(x, y, sigma, window, combine, data_range)
    # NB: the partial derivatives are kept for the backward only on CUDA, and only when a gradient
    # can be asked for; the CPU backward recomputes them plane by plane in cache, which is faster
    # than writing and re-reading B*C*5*(H-K+1)*(W-K+1) values (and saves that memory).
    save_partials = x.is_cuda and torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    score, map_, _ = torch.ops.defect_fast.aw_ssim(
        x, y, sigma, float(alpha), float(beta), float(gamma), window, _COMBINE[combine], float(data_range), bool(return_map), save_partials
    )
    return (score, map_) if return_map else score


__all__ = ["aw_ssim"]
