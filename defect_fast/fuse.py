"""An inference copy of a model with cheaper layers that compute the same function.

:func:`fuse_for_inference` returns a deep copy (the model given is left as it is) in eval mode with

- every batch norm that follows a convolution or transposed convolution folded into its weights
  (``torch.nn.utils.fusion.fuse_conv_bn_eval``; the norm becomes ``nn.Identity``), and
- every unpadded convolution and every unpadded stride-1 transposed convolution as
  :class:`~defect_fast.layers.KernelSizedConv2d` / :class:`~defect_fast.layers.PointConvTranspose2d`,
  which run as one matrix product when the input is the kernel's size (one output position) or
  1x1. oneDNN handles these shapes poorly on a CPU (AMD EPYC, 1 thread, one 512x512 image's 64
  patches: 18.1 -> 11.2 ms and 25.8 -> 14.1 ms). The CMA-AE network is built with those layers
  already; they stay as they are;
- every other stride-1 transposed convolution as the plain convolution it equals (weights
  flipped, in and out swapped, padding k - 1 - p: CMA-AE's 3x3 decoder layer, 16.4 -> 16.2 ms,
  about even there);
- every stride-2, 4x4, padding-1 transposed convolution with at most 4 output channels (an image
  decoder's last layer) in its sub-pixel form
  (:class:`SubPixelConvTranspose2d`: a 2x2 convolution, a pixel shuffle and a crop).

Per-layer figures: ``python benchmarks/bench_fuse_layers.py --rounds 30``
(``benchmarks/results/fuse_layers_cpu.json``).

``weight_dtype`` (bfloat16 or float16: the dtype of the autocast region the copy will run in)
stores the weights of every convolution, transposed convolution and linear layer in that dtype
once, instead of autocast casting them again on every call: the same rounding, so the outputs
are those of the float32 copy run under autocast. Biases and everything else (memory items, batch
norms left unfolded) stay float32.

Outputs equal the original model's up to float32 summation order. Used by
:class:`~defect_fast.detect.Detector` (options ``fuse`` and ``precision``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layers import KernelSizedConv2d, PointConvTranspose2d, rebuilt_as
from .precision import LOW_PRECISION

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _transposed_as_conv(m: nn.ConvTranspose2d) -> nn.Conv2d:
    """The Conv2d equal to a stride-1, ungrouped, undilated transposed convolution."""
    k = tuple(m.kernel_size)
    # no initial weights drawn (they are replaced; the draw took the caller's random numbers)
    conv = skip_init(nn.Conv2d, m.in_channels, m.out_channels, k, 1, (k[0] - 1 - m.padding[0], k[1] - 1 - m.padding[1]),
                     bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    conv.weight.copy_(m.weight.transpose(0, 1).flip(2, 3))
    if m.bias is not None:
        conv.bias.copy_(m.bias)
    return conv


# Sub-pixel form of a stride-2, 4x4, padding-1 transposed convolution. Output row y reads input rows
# (y - 1) // 2 and (y + 1) // 2 with kernel rows 3, 1 (y even) or 2, 0 (y odd), and columns likewise.
# A 2x2 convolution of the input padded by 1 has an output row h that reads input rows h - 1 and h:
# that is output row 2h - 1 (odd, "phase 0") or 2h (even, "phase 1"). So 4 x C_out channels, one per
# (row phase, column phase), a pixel shuffle to rows 0 .. 2H + 1, and rows and columns 1 .. 2H
# kept. _TAPS: phase -> the kernel rows (columns) the 2x2 window's offsets 0 and 1 take.
_TAPS = {0: (2, 0), 1: (3, 1)}


# oneDNN's stride-2 transposed convolution is slow with very few output channels (an image
# decoder's last layer); there the sub-pixel form, though (1 + 1/H)^2 x the multiply-adds, is
# faster: CMA-AE's 32 -> 3 layer, 64 patches, 2 threads, AVX512-BF16 EPYC: x2.08 in bf16, x1.97 in
# float32; for 32 to 128 output channels it is slower, x0.62-0.83 (benchmarks/bench_fuse_layers.py
# --threads 2 --precision ..., fuse_layers_cpu_avx512bf16_*.json).
SUBPIXEL_MAX_OUT_CHANNELS = 4


class SubPixelConvTranspose2d(nn.Module):
    """A stride-2, 4x4, padding-1 transposed convolution as a 2x2 convolution (padding 1) to
    4 x C_out channels, one per output phase, a 2x pixel shuffle and a one-pixel crop: the same
    function."""

    def __init__(self, m: nn.ConvTranspose2d):
        super().__init__()
        w = m.weight.detach()  # [Cin, Cout, 4, 4]
        cin, cout = w.shape[:2]
        wc = w.new_zeros(cout, 2, 2, cin, 2, 2)
        for a, rows in _TAPS.items():
            for b, cols in _TAPS.items():
                for r, kh in enumerate(rows):
                    for c, kw in enumerate(cols):
                        wc[:, a, b, :, r, c] = w[:, :, kh, kw].t()
        self.conv = skip_init(nn.Conv2d, cin, 4 * cout, 2, 1, 1, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        self.conv.weight.copy_(wc.reshape(4 * cout, cin, 2, 2))
        if m.bias is not None:
            self.conv.bias.copy_(m.bias.detach().repeat_interleave(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)[:, :, 1:-1, 1:-1]


def subpixel_candidate(m: nn.Module) -> bool:
    """Whether ``m`` is a transposed convolution :class:`SubPixelConvTranspose2d` can replace."""
    return (isinstance(m, nn.ConvTranspose2d) and tuple(m.kernel_size) == (4, 4) and tuple(m.stride) == (2, 2)
            and tuple(m.padding) == (1, 1) and tuple(m.output_padding) == (0, 0) and m.groups == 1
            and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros")


def _dense(m: nn.Module) -> nn.Module:
    simple = m.groups == 1 and tuple(m.dilation) == (1, 1) and getattr(m, "padding_mode", "zeros") == "zeros"
    plain = simple and tuple(m.padding) == (0, 0)
    if isinstance(m, (KernelSizedConv2d, PointConvTranspose2d)):
        return m
    if isinstance(m, nn.ConvTranspose2d):
        if simple and tuple(m.stride) == (1, 1) and tuple(m.output_padding) == (0, 0):
            if plain:
                return rebuilt_as(PointConvTranspose2d, m)
            if all(p < k for p, k in zip(m.padding, m.kernel_size)):
                return _transposed_as_conv(m)
        elif subpixel_candidate(m) and m.out_channels <= SUBPIXEL_MAX_OUT_CHANNELS:
            return SubPixelConvTranspose2d(m)
    elif isinstance(m, nn.Conv2d) and plain:
        return rebuilt_as(KernelSizedConv2d, m)
    return m


def _rewrite(module: nn.Module) -> None:
    """Fold conv + BN pairs and densify convolutions below ``module``, in place."""
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        if isinstance(child, _CONVS):
            nxt = module._modules.get(names[i + 1]) if i + 1 < len(names) else None
            # (torch's folding scales a transposed weight [in, out / groups, k, k] along its second
            # dim, which holds every output channel only with one group: a grouped one keeps its BN)
            if isinstance(module, nn.Sequential) and isinstance(nxt, nn.BatchNorm2d) and nxt.track_running_stats \
                    and not (isinstance(child, nn.ConvTranspose2d) and child.groups != 1):
                child = fuse_conv_bn_eval(child, nxt, transpose=isinstance(child, nn.ConvTranspose2d))
                module._modules[names[i + 1]] = nn.Identity()
            module._modules[name] = _dense(child)
        else:
            _rewrite(child)


def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Weights (not biases) of convolutions, transposed convolutions and linear layers below
    ``model`` to ``dtype``, in place."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            m.weight.data = m.weight.data.to(dtype)


def fuse_for_inference(model: nn.Module, weight_dtype: torch.dtype | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` with BN folded and 1x1-output convolutions as matrix products;
    ``weight_dtype`` (None, torch.bfloat16 or torch.float16): the dtype of the autocast region it
    will run in, to store the layer weights in (see the module docstring)."""
    if weight_dtype is not None and weight_dtype not in LOW_PRECISION:
        raise ValueError(f"weight_dtype must be None, torch.bfloat16 or torch.float16, got {weight_dtype}")
    fused = copy.deepcopy(model).eval()
    with torch.no_grad():
        _rewrite(fused)
        if weight_dtype is not None:
            _cast_weights(fused, weight_dtype)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused
