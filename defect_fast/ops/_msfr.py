"""Native multi-scale feature residual map (MSFR, Eq. 15 of CMA-AE): registration and front.

The op ``defect_fast::msfr`` is defined in ``csrc/msfr/msfr.cpp`` (schema and shapes), with a CPU
kernel in ``cpu/msfr_cpu.cpp`` (float32, float64) and CUDA kernels in ``cuda/`` (float32, float64,
float16, bfloat16 with float accumulation). This module attaches its fake kernel (torch.compile,
meta tensors), an autograd entry that refuses to differentiate, and :func:`msfr` with the
signature and results of :func:`defect_fast.ops.reference.msfr`.

The op is inference only. :func:`msfr` hands the call to the differentiable reference when a
gradient is asked for (grad mode on and a feature that requires grad); calling
``torch.ops.defect_fast.msfr`` directly in that case gives an output whose backward raises.

Importing this module raises ImportError when the native extension cannot be loaded.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..precision import LOW_PRECISION
from . import _native, reference

_module, _reason = _native.load()
if _module is None:
    raise ImportError(f"defect_fast.ops._msfr: native extension unavailable ({_reason})")

_OP = torch.ops.defect_fast.msfr.default

# Dtypes each device's kernel takes; other dtypes go to the reference.
_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


@torch.library.register_fake("defect_fast::msfr")
def _msfr_fake(feats_x, feats_r, out_size, weights):
    torch._check(len(feats_x) >= 1, lambda: "msfr: needs at least one scale")
    torch._check(len(feats_x) == len(feats_r), lambda: f"msfr: {len(feats_x)} and {len(feats_r)} scales")
    torch._check(len(weights) == len(feats_x), lambda: f"msfr: {len(weights)} weights for {len(feats_x)} scales")
    torch._check(len(out_size) == 2, lambda: f"msfr: out_size must be (H, W), got {list(out_size)}")
    first = feats_x[0]
    for i, (x, r) in enumerate(zip(feats_x, feats_r)):
        torch._check(x.dim() == 4, lambda: f"msfr: feats_x[{i}] must be [B, C, H, W], got {tuple(x.shape)}")
        torch._check(x.shape == r.shape, lambda: f"msfr: scale {i} shapes differ: {tuple(x.shape)} vs {tuple(r.shape)}")
        torch._check(x.shape[0] == first.shape[0], lambda: f"msfr: scale {i} has batch {x.shape[0]}, scale 0 has {first.shape[0]}")
        torch._check(x.dtype == first.dtype and r.dtype == first.dtype, lambda: f"msfr: scale {i} dtype differs from scale 0")
        torch._check(x.device == first.device and r.device == first.device, lambda: f"msfr: scale {i} device differs from scale 0")
    return first.new_empty((first.shape[0], 1, out_size[0], out_size[1]))


@torch.library.register_fake("defect_fast::msfr_float")
def _msfr_float_fake(feats_x, feats_r, out_size, weights):
    out = _msfr_fake(feats_x, feats_r, out_size, weights)
    return out.to(torch.float64 if out.dtype == torch.float64 else torch.float32)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    raise RuntimeError(
        "defect_fast::msfr is inference only and has no backward; "
        "use defect_fast.ops.reference.msfr (or defect_fast.ops.msfr with grad enabled) for gradients"
    )


torch.library.register_autograd("defect_fast::msfr", _backward, setup_context=_setup_context)
torch.library.register_autograd("defect_fast::msfr_float", _backward, setup_context=_setup_context)
_native.register_autocast_float32("defect_fast::msfr")  # see defect_fast.ops: float32 under autocast


def _checked_call(feats_x, feats_r, out_size, weights) -> tuple[list[int], list[float]]:
    """(out_size, weights) as the op takes them, after the reference's checks (ValueError)."""
    size, weights = reference.check_msfr_arguments(feats_x, feats_r, out_size, weights)
    return list(size), weights


def _wants_grad(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def msfr(
    feats_x: Sequence[torch.Tensor],
    feats_r: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Multi-scale feature residual map with the fused kernel (inference only).

    Args:
        feats_x: S >= 1 feature maps of the input, feats_x[i] of shape [B, C_i, H_i, W_i].
        feats_r: S feature maps of the reconstruction, same shapes as ``feats_x``.
        out_size: (H, W) of the output map.
        weights: S finite non-negative weights, not all zero; ``None`` means equal weights.

    Returns:
        [B, 1, H, W] = sum_i w_i * up_i(mean_c (F_i - F'_i)^2) / sum_i w_i, up_i the bilinear
        resize of F.interpolate(align_corners=False); values >= 0, dtype of the features.

    The native kernel runs when every feature has one dtype and one device and the kernel
    takes that dtype there (CPU: float32, float64; CUDA: also float16, bfloat16). Otherwise,
    and whenever a gradient is asked for, :func:`defect_fast.ops.reference.msfr` computes the
    same function (differentiably).
    """
    size, weights = _checked_call(feats_x, feats_r, out_size, weights)
    tensors = list(feats_x) + list(feats_r)
    first = tensors[0]
    native = (
        not _wants_grad(tensors)
        and first.dtype in _NATIVE_DTYPES.get(first.device.type, ())
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
    )
    if not native:
        return reference.msfr(feats_x, feats_r, tuple(size), weights)
    return _OP(list(feats_x), list(feats_r), size, weights)


_FLOAT_OP = torch.ops.defect_fast.msfr_float.default


def msfr_float(
    feats_x: Sequence[torch.Tensor],
    feats_r: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    weights: Sequence[float] | None = None,
) -> torch.Tensor | None:
    """:func:`msfr` of float32 copies of bfloat16/float16 CPU features, without making the copies:
    the CPU kernel widens each value as it reads it, so the float32 map is the one the upcast
    features give, exactly. None when that does not apply (other dtypes or devices, mixed dtypes,
    a gradient asked for): the caller upcasts instead. What :func:`defect_fast.ops.msfr` runs under
    CPU autocast; the upcast copies of a CMA-AE chunk's features took about 10 ms per 512x512 image."""
    tensors = list(feats_x) + list(feats_r)
    if not tensors or _wants_grad(tensors):
        return None
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in LOW_PRECISION:
        return None
    if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
        return None
    size, weights = _checked_call(feats_x, feats_r, out_size, weights)
    return _FLOAT_OP(list(feats_x), list(feats_r), size, weights)


__all__ = ["msfr", "msfr_float"]
