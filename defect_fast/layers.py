"""Convolution layers that run as one matrix product on the input sizes oneDNN handles poorly.

Table I's last encoder layer (4x4 -> 1x1) and first decoder layer (1x1 -> 4x4) are a convolution
with one output position and a transposed convolution of one input position: each is a single
matrix product. These modules have the parameters, state dict keys and function of
``nn.Conv2d`` / ``nn.ConvTranspose2d`` and take the product for exactly those sizes (the
convolution itself for any other). The CMA-AE network is built with them, for training and
inference; :func:`defect_fast.fuse.fuse_for_inference` turns plain layers of those shapes in any
other model into them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import is_channels_last


class KernelSizedConv2d(nn.Conv2d):
    """A Conv2d that runs as one matrix product when its input is exactly its kernel's size (an
    unpadded layer with one output position: Table I's last encoder layer, 4x4 -> 1x1).

    The same parameters and function as ``nn.Conv2d`` (state dicts are interchangeable). oneDNN
    handles that shape poorly in training too: forward + backward of the 256 -> 512 layer on 64
    patches in bf16, 2 threads, AMD EPYC, 43 -> 15 ms. The product is a view of the weight in
    either layout: a channels-last weight is flattened with the input in (kh, kw, C) order, a
    default-layout one in (C, kh, kw) order (a channels-last input is then copied: one 4x4 map
    per patch). Flattening a channels-last weight in (C, kh, kw) order would copy its 2M values
    on every call. Inference copies hold channels-last weights; training keeps these in the
    default layout (:func:`keep_matrix_weights_contiguous`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 4 and tuple(x.shape[-2:]) == tuple(self.kernel_size) and self.padding == (0, 0)
                and self.groups == 1 and self.dilation == (1, 1)):  # unbatched [C, H, W]: the convolution
            w = self.weight
            if is_channels_last(w):  # flattened in (kh, kw, C) order: views of both, no copies
                return F.linear(x.permute(0, 2, 3, 1).flatten(1), w.permute(0, 2, 3, 1).flatten(1), self.bias)[:, :, None, None]
            return F.linear(x.flatten(1), w.flatten(1), self.bias)[:, :, None, None]
        return super().forward(x)


class PointConvTranspose2d(nn.ConvTranspose2d):
    """A ConvTranspose2d that runs as one matrix product on a 1x1 input (an unpadded stride-1
    layer: Table I's first decoder layer, 1x1 -> 4x4). The same parameters and function as
    ``nn.ConvTranspose2d``; forward + backward of the 512 -> 256 layer as above: 46 -> 13 ms."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if (output_size is None and x.dim() == 4 and tuple(x.shape[-2:]) == (1, 1) and self.stride == (1, 1)
                and self.padding == (0, 0) and self.output_padding == (0, 0) and self.groups == 1
                and self.dilation == (1, 1)):  # unbatched [C, 1, 1]: the transposed convolution
            w = self.weight  # [Cin, Cout, kh, kw]
            cin, cout, kh, kw = w.shape
            if is_channels_last(w):  # the product in (kh, kw, Cout) order: a view of the weight, channels-last output
                out = torch.matmul(x.flatten(1), w.permute(0, 2, 3, 1).reshape(cin, -1)).view(-1, kh, kw, cout).permute(0, 3, 1, 2)
            else:
                out = torch.matmul(x.flatten(1), w.reshape(cin, -1)).view(-1, cout, kh, kw)
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        return super().forward(x, output_size)


def rebuilt_as(cls: type, m: nn.Module) -> nn.Module:
    """A ``cls`` module with the shape and the parameters (values, dtypes, device) of the ungrouped,
    undilated convolution or transposed convolution ``m``: a plain layer as one of this module's
    matrix-product layers, or one of them as the plain layer it stands for (``cls`` of the same
    kind: :class:`KernelSizedConv2d` / ``nn.Conv2d``, :class:`PointConvTranspose2d` /
    ``nn.ConvTranspose2d``)."""
    kw = {"output_padding": m.output_padding} if isinstance(m, nn.ConvTranspose2d) else {}
    new = torch.nn.utils.skip_init(cls, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                   bias=m.bias is not None, device=m.weight.device, **kw)  # no initial draw: replaced
    new.load_state_dict(m.state_dict())
    for name, p in new.named_parameters():
        p.data = p.data.to(getattr(m, name).dtype)
    return new


def keep_matrix_weights_contiguous(model: nn.Module) -> nn.Module:
    """Put the weights of ``model``'s :class:`KernelSizedConv2d` and :class:`PointConvTranspose2d`
    layers back in the default layout after ``model.to(memory_format=torch.channels_last)``, in
    place; returns ``model``.

    For training. Both layouts make the products views of the weight, but Adam's fused CPU
    kernel copies every gradient that is not contiguous in the default layout on every step
    (``grad.contiguous()``, a transposing copy of a channels-last gradient); for CMA-AE's two
    2M-value weights 4.2 ms each per bf16 step at batch 64 on 2 EPYC cores, under the torch
    profiler. With default-layout weights the gradients come out in that layout, and only the
    small activation at these layers (one 4x4 map per patch) is copied into (C, kh, kw) order.
    Whole steps: 0.98-0.99 of the time (``benchmarks/bench_replaced.py --cases train_layout``)."""
    for m in model.modules():
        if isinstance(m, (KernelSizedConv2d, PointConvTranspose2d)) and is_channels_last(m.weight):
            m.weight.data = m.weight.data.contiguous()
    return model
