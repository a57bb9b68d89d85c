"""Native memory addressing (CMA-AE / MemAE): op registration and the Python function.

The ops ``defect_fast::memory_address`` and ``defect_fast::memory_address_backward`` are defined in
``csrc/memory_address/memory_address.cpp`` (schemas and shapes), with CPU kernels in
``cpu/memory_address_cpu.cpp`` and CUDA kernels in ``cuda/``. This module attaches their fake
kernels (for torch.compile and meta tensors) and the autograd formula, and exposes
:func:`memory_address` with the signature and results of
:func:`defect_fast.ops.reference.memory_address`.

Importing it raises ImportError when the native extension cannot be loaded.
"""
from __future__ import annotations

import math

import torch

from . import _native

_module, _reason = _native.load()
if _module is None:
    raise ImportError(f"defect_fast.ops._memory_address: native extension unavailable ({_reason})")

_OP = torch.ops.defect_fast.memory_address.default
_BACKWARD = torch.ops.defect_fast.memory_address_backward.default


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved softmax and norms: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("defect_fast::memory_address")
def _memory_address_fake(z, memory, shrink_threshold, temperature, p, need_backward):
    torch._check(z.dim() == 2 and memory.dim() == 2, lambda: f"memory_address: expected z [B, C] and memory [N, C], got {tuple(z.shape)} and {tuple(memory.shape)}")
    torch._check(z.shape[1] == memory.shape[1], lambda: f"memory_address: z and memory differ in C: {tuple(z.shape)} and {tuple(memory.shape)}")
    torch._check(z.dtype == memory.dtype, lambda: f"memory_address: z and memory dtypes differ: {z.dtype} and {memory.dtype}")
    torch._check(z.device == memory.device, lambda: f"memory_address: z and memory devices differ: {z.device} and {memory.device}")
    B, C = z.shape
    N = memory.shape[0]
    acc = _acc_dtype(z.dtype)
    saves_units = need_backward and z.device.type == "cuda"  # the CUDA kernel keeps the normalised rows
    probs = z.new_empty((B, N), dtype=acc) if need_backward else z.new_empty((0,), dtype=acc)
    return (
        z.new_empty((B, C)),
        z.new_empty((B, N)),
        probs,
        z.new_empty((B,), dtype=acc),
        z.new_empty((N,), dtype=acc),
        z.new_empty((B,), dtype=acc),
        z.new_empty((B, C) if saves_units else (0,)),
        z.new_empty((N, C) if saves_units else (0,)),
    )


@torch.library.register_fake("defect_fast::memory_address_backward")
def _memory_address_backward_fake(grad_z_hat, grad_weights, z, memory, weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit, shrink_threshold, temperature, p, output_mask):
    torch._check(probs.dim() == 2, lambda: "memory_address_backward: the forward ran with need_backward=False")
    grad_z = z.new_empty(z.shape) if output_mask[0] else z.new_empty((0,))
    grad_m = memory.new_empty(memory.shape) if output_mask[1] else memory.new_empty((0,))
    return grad_z, grad_m


def _setup_context(ctx, inputs, output):
    z, memory, shrink_threshold, temperature, p, _need_backward = inputs
    _z_hat, weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit = output
    ctx.mark_non_differentiable(probs, z_norm, m_norm, w_norm, z_unit, m_unit)
    ctx.save_for_backward(z, memory, weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit)
    ctx.params = (shrink_threshold, temperature, p)


def _backward(ctx, grad_z_hat, grad_weights, *_unused):
    z, memory, weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit = ctx.saved_tensors
    _native.no_double_backward("memory_address", z, memory, grad_z_hat, grad_weights)
    shrink_threshold, temperature, p = ctx.params
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    if grad_z_hat is None:
        grad_z_hat = z.new_zeros((z.shape[0], z.shape[1]))
    if grad_weights is None:
        grad_weights = weights.new_zeros(weights.shape)
    grad_z, grad_m = _BACKWARD(grad_z_hat, grad_weights, z, memory, weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit, shrink_threshold, temperature, p, mask)
    return (grad_z if mask[0] else None, grad_m if mask[1] else None, None, None, None, None)


torch.library.register_autograd("defect_fast::memory_address", _backward, setup_context=_setup_context)
_native.register_autocast_float32("defect_fast::memory_address", "defect_fast::memory_address_backward")  # see defect_fast.ops: float32 under autocast


def _check_args(z, memory, shrink_threshold, temperature, p) -> None:
    """Raises ValueError/TypeError naming the problem (the reference's messages where it has them)."""
    if not isinstance(z, torch.Tensor) or not isinstance(memory, torch.Tensor):
        raise TypeError(f"memory_address: z and memory must be tensors, got {type(z).__name__} and {type(memory).__name__}")
    if z.dim() != 2 or memory.dim() != 2 or z.shape[1] != memory.shape[1]:
        raise ValueError(f"memory_address: expected z [B,C] and memory [N,C], got {tuple(z.shape)} and {tuple(memory.shape)}")
    if p not in (1, 2):
        raise ValueError(f"memory_address: p must be 1 or 2, got {p}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"memory_address: temperature must be finite and > 0, got {temperature}")
    if not 0 <= shrink_threshold < math.inf:
        raise ValueError(f"memory_address: shrink_threshold must be finite and >= 0, got {shrink_threshold}")
    if z.dtype != memory.dtype:
        raise TypeError(f"memory_address: z and memory must have the same dtype, got {z.dtype} and {memory.dtype}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"memory_address: z and memory must be floating point, got {z.dtype}")
    if z.device != memory.device:
        raise ValueError(f"memory_address: z and memory must be on the same device, got {z.device} and {memory.device}")
    if z.device.type == "cpu" and z.dtype not in (torch.float32, torch.float64, *_CPU_WIDENED):
        raise TypeError(f"memory_address: the CPU kernel supports float32 and float64 (float16 and bfloat16 "
                        f"through float32), got {z.dtype}")


#: Dtypes the CPU computes in float32 and hands back in their own (as aw_ssim does; the
#: reference takes them, and a bfloat16 model called outside autocast was refused here).
_CPU_WIDENED = (torch.float16, torch.bfloat16)


def memory_address(z: torch.Tensor, memory: torch.Tensor, shrink_threshold: float, temperature: float = 1.0, p: int = 1):
    """Memory addressing: cosine attention, softmax, hard shrinkage, Lp renormalisation, read-out.

    Same function as :func:`defect_fast.ops.reference.memory_address`, computed by the native
    kernels (CPU: float32/float64, float16/bfloat16 computed in float32; CUDA: also
    float16/bfloat16 with float accumulation).

    Args:
        z: [B, C] queries.
        memory: [N, C] memory items, same dtype and device as ``z``.
        shrink_threshold: t >= 0 (CMA-AE uses 1/N); 0 disables shrinkage.
        temperature: > 0; logits are cos(z_b, m_n) / temperature.
        p: 1 or 2, the norm of the renormalisation.

    Returns:
        (z_hat [B, C], weights [B, N]), both differentiable with respect to ``z`` and ``memory``.
    """
    _check_args(z, memory, shrink_threshold, temperature, p)
    if z.device.type == "cpu" and z.dtype in _CPU_WIDENED:
        z_hat, weights = memory_address(z.float(), memory.float(), shrink_threshold, temperature, p)
        return z_hat.to(z.dtype), weights.to(z.dtype)
    need_backward = torch.is_grad_enabled() and (z.requires_grad or memory.requires_grad)
    z_hat, weights, *_saved = _OP(z, memory, float(shrink_threshold), float(temperature), int(p), need_backward)
    return z_hat, weights


__all__ = ["memory_address"]
