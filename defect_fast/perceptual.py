"""Perceptual MSFR: the multi-scale feature residual over a frozen ImageNet trunk, normalised per position.

CMA-AE's MSFR (Eq. 15) compares the input and its reconstruction in the autoencoder's own encoder
features. The paper names the alternative it set aside, a network pretrained on ImageNet; this map
is that alternative, with the statistics of defect-free images taken into account:

1. Input x and reconstruction r (full images [N, 3, S, S] in [-1, 1]) go through the first
   convolution layers of AlexNet (the LPIPS trunk, ReLU outputs of conv1 and conv2 by default,
   LPIPS input scaling).
2. The residual features e_l = phi_l(x) - phi_l(r) are resampled to one grid (S / 4).
3. Each channel at each grid position is standardised with the mean and variance of e over
   defect-free images (``fit``: the run's training images, or held-back ones), the variance
   shrunk towards the channel's average variance (``prior``) because a few dozen images
   estimate it poorly, and floored at 1e-3 of the mean variance over all channels and positions
   (which decides the scale of channels much quieter than the average):
   z = (e - mean) / sqrt(var + prior * mean_var_of_channel + 1e-3 * mean_var).
4. Per layer, the mean of z^2 over channels; layers are averaged with MSFR's receptive-field
   weights; the square root is upsampled (bilinear) to S x S.

Why the statistics: on real photographs the reconstruction of a patch autoencoder is smoother
than the input, so a plain feature residual measures the surface texture everywhere, and the
photographs share systematic responses (tile edges, background corners, lighting). The mean
removes the systematic part of the residual at each position; the variance scales what is left
by how much it varies on defect-free surfaces. Without ``fit`` the map is the plain residual
energy, mean over channels of e^2, per layer.

Image pyramid (``scales``): steps 1-4 run on the image and on 2x2-averaged copies of it, each
level with its own statistics, and the map is the mean of the levels' maps. A coarser level's
features see a larger part of the surface (conv2 sees 51 px of the image, 102 px of the original
at half size), for defects wider than the finest level's field of view (magnetic tile's
"uneven" bands); the finest level keeps small defects sharp.

Brightness (``brightness``, off by default): with a reference level set, each image is scaled
before the trunk so that its mean brightness is that level, and its reconstruction by the same
factor (:func:`brightness_gain`). On magnetic tile the defect-free images' scores rank-correlated
+0.67 with their mean brightness (60 held-back images, CMA-AE v6; the reading: a brighter tile
gives larger responses in the trunk's first layers, and statistics shared by all tiles take that
for anomaly). Scaling by one factor per image keeps what differs within the image (a band brighter
than the rest of its tile stays brighter) and drops the lighting. The Detector sets the level to
the mean brightness of the images it fits on (``level_brightness``; ``--level-brightness``).

Precision: the trunk's convolutions run in float32 by default. The Detector runs them in its own
precision (``dtype`` bfloat16/float16, channels-last with its ``channels_last`` option), when it
fits the statistics as when it makes maps; the features then go on in float32: residuals,
statistics and maps are float32 either way. On the magnetic-tile dev split a bfloat16 trunk at
inference moved the recommended runs' metrics by less than 0.05 point
(``experiments/tuned_vs_eager.py``).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .precision import is_channels_last
from .tracing import constant_cache, tracing

# torchvision's alexnet.features, conv layers: (index, in channels, out channels, kernel, stride,
# padding); a 3 x 3 max-pool with stride 2 follows conv1 and conv2
_ALEXNET = [(0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
            (10, 256, 256, 3, 1, 1)]
# conv1..conv3, the layers the map may read
_CONVS = _ALEXNET[:3]
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# Receptive-field side of conv1..conv3 outputs (11, 51 and 99 pixels): MSFR weights are their areas.
_RF = (11, 51, 99)


#: Where a map puts the trunk's feature cells on the image. "cells" (the default): a bilinear
#: resize by size alone, which spreads a grid over the whole image as if its cells tiled it.
#: AlexNet's grids do not tile the image: at 256 px conv2's 31 cells are centred on pixels 7, 15,
#: ..., 247, and the resize draws cell i at 8.26 i + 3.6, so the map of a one-pixel spot lies up
#: to 4 px towards the nearer edge, and the context's 16-px cells up to 8 px
#: (``tests/test_perceptual.py``, ``tests/test_context.py``, the spot tests). "centres":
#: each cell on the centre of its receptive field (:func:`alexnet_centres`), the spot's map centred
#: on it. On magnetic tile "centres" cost 0.8 pixel AUROC on each of five runs, in the interior as
#: at the border, with image AUROC and AUPRO within 0.2, and the maps of "centres" stretched back
#: by 3 % about the image centre recovered it: the annotated masks sit where the stretched maps
#: do (experiments/README.md, "Eighth round"). So "cells" stays the default, "centres" an option.
PLACEMENTS = ("cells", "centres")


def alexnet_centres(layer: int, pooled: bool = False) -> tuple[int, float]:
    """(a, b): cell i of the output of AlexNet conv ``layer`` (1-based; after the max-pool that
    follows conv1 and conv2 with ``pooled``) is centred on input pixel a * i + b (pixel j
    covering [j - 0.5, j + 0.5]): conv1 (4, 3), after its pool (8, 7), conv2 (8, 7), conv3-5 (16, 15)."""
    a, b = 1, 0.0
    for n, (_idx, _cin, _cout, k, s, p) in enumerate(_ALEXNET[:layer], 1):
        b += a * ((k - 1) / 2 - p)
        a *= s
        if n <= 2 and (n < layer or pooled):  # cell j of the pool reads cells 2j..2j+2
            b += a
            a *= 2
    return a, b


@constant_cache(maxsize=64)
def _placement_matrix(n: int, stride: int, offset: float, cells: int, extent: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """[cells, n]: row k the bilinear weights of the n feature cells (centred on pixels
    stride * i + offset) at the centre of cell k of ``cells`` equal cells across ``extent``
    pixels; beyond the first and last feature centres, the end cell's value (as a resize does).
    Kept per device and dtype, so that a call makes no host-to-device copy (none inside a CUDA
    graph's capture: the warm-up before it makes the matrix); made outside inference mode, so that
    a call recording gradients can save it. Read only: callers share it."""
    with torch.inference_mode(False), torch.no_grad():
        k = torch.arange(cells, dtype=torch.float64)
        idx = (((k + 0.5) * extent / cells - 0.5 - offset) / stride).clamp(0, n - 1)
        i0 = idx.floor().long()
        w = idx - i0
        m = torch.zeros(cells, n, dtype=torch.float64)
        m[k.long(), i0] += 1 - w
        m[k.long(), (i0 + 1).clamp_max(n - 1)] += w
        return m.to(device, dtype)


def place_features(f: torch.Tensor, stride: int, offset: float, cells: int, extent: int) -> torch.Tensor:
    """Features [..., n, n] whose cell i is centred on pixel ``stride * i + offset`` of an image
    ``extent`` pixels wide -> [..., cells, cells] on ``cells`` equal cells across the image,
    bilinear (see :data:`PLACEMENTS`). Two matrix products with the [cells, n] weights; a
    channels-last [N, C, n, n] stays channels-last (its positions' channel vectors are what the
    products combine)."""
    mh = _placement_matrix(f.shape[-2], stride, float(offset), cells, extent, f.device, f.dtype)
    mw = mh if f.shape[-1] == f.shape[-2] else \
        _placement_matrix(f.shape[-1], stride, float(offset), cells, extent, f.device, f.dtype)
    if f.dim() == 4 and is_channels_last(f) and f.shape[1] > 1:
        n = f.shape[0]
        y = torch.matmul(mw, f.permute(0, 2, 3, 1))  # [N, H, cells, C]
        y = torch.matmul(mh, y.reshape(n, f.shape[2], -1)).view(n, cells, cells, f.shape[1])
        return y.permute(0, 3, 1, 2)
    return mh @ f @ mw.t()


def place_profile(v: torch.Tensor, stride: int, offset: float, cells: int, extent: int) -> torch.Tensor:
    """:func:`place_features` along one axis: values [..., n] -> [..., cells]."""
    return v @ _placement_matrix(v.shape[-1], stride, float(offset), cells, extent, v.device, v.dtype).t()


def reference_brightness(images: torch.Tensor) -> float:
    """The mean brightness in [0, 1] of images [N, 3, H, W], uint8 (0..255) or float (in [-1, 1],
    as the Detector takes them; they were divided by 255 as well, a level near 0): the level
    :attr:`FrozenTrunk.brightness` brings every image to. Summed in float64 a few images at a
    time (a float64 copy of 540 images of 256 px is 850 MB; ``sum(dtype=torch.float64)`` makes one)."""
    mean = sum(float(c.sum(dtype=torch.float64)) for c in images.split(16)) / max(1, images.numel())
    return float((mean + 1) * 0.5) if images.is_floating_point() else float(mean / 255)


def brightness_level(level: bool | float, images: torch.Tensor) -> float | None:
    """``level_brightness`` of the fits -> the level a trunk levels to: None for False, the mean
    brightness of ``images`` (uint8) for True, else the float given (in (0, 1])."""
    if isinstance(level, np.bool_):  # np.bool_(True) was taken as the level 1.0
        level = bool(level)
    if level is False or level is None:
        return None
    if level is True:
        level = reference_brightness(images)
        if not 0 < level <= 1:  # every image black: a gain of 0 would make every image the same
            from .data.io import DataError

            raise DataError(f"level_brightness: the {images.shape[0]} images' mean brightness is {level:g} (all "
                            "black?); nothing to level to: give defect-free images of the surface")
        return level
    try:
        value = math.nan if isinstance(level, (str, bytes)) else float(level)  # "0.5" is not a level
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:
        raise ValueError(f"level_brightness must be True, False or a level in (0, 1], got {level!r}")
    return value


def brightness_gain(x: torch.Tensor, level: float) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> the factor [N, 1, 1, 1] that takes each image's mean
    brightness, ((x + 1) / 2) averaged over pixels and channels, to ``level`` (an all-black image's
    mean counts as 1/255, so the factor stays finite)."""
    if x.device.type == "cpu" and x.shape[0] > 1 and not tracing():
        # each image's mean alone: a batch's reduction sums in another order, and its last-bit
        # difference, scaled into the trunk's bf16 input, flipped roundings there (features by an
        # ulp, a score by 0.012 in a 128-px --preset photos run) with the images called with it
        return torch.cat([brightness_gain(x[k:k + 1], level) for k in range(x.shape[0])])
    mean = ((x.float() + 1) * 0.5).mean(dim=(1, 2, 3), keepdim=True).clamp_min(1 / 255)
    return level / mean


def _version(t: torch.Tensor) -> int:
    """``t``'s in-place change counter (0 for an inference tensor, which keeps none)."""
    return 0 if t.is_inference() else t._version


class FrozenTrunk(nn.Module):
    """Base of the modules that run frozen AlexNet convolutions ``self.convs`` on LPIPS-scaled
    images (``shift``/``scale`` buffers), in float32 or in a lower precision.

    In a lower precision the input is cast once and each convolution runs with a copy of its
    weights in that dtype (and, for channels-last inputs, that layout), made on first use and kept
    while the weights are unchanged (the same rounding as ``torch.autocast``, without casting or
    reordering 0.3-2.5 M weights again on every call).

    ``brightness``: None, or the mean brightness in [0, 1] every image is scaled to before the
    first convolution (the module docstring, "Brightness")."""

    brightness: float | None = None

    def gain(self, x: torch.Tensor) -> torch.Tensor | None:
        """The factor [N, 1, 1, 1] that levels images ``x`` to :attr:`brightness` (None when off)."""
        return None if self.brightness is None else brightness_gain(x, self.brightness)

    @staticmethod
    def _trunk_format(h: torch.Tensor, dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
        """``h`` in the dtype (None: float32) and memory format the trunk runs in."""
        h = h.to(dtype or torch.float32)
        return h.contiguous(memory_format=torch.channels_last) if channels_last else h

    def _trunk_input(self, x: torch.Tensor, dtype: torch.dtype | None, channels_last: bool,
                     gain: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the first convolution's input, in ``dtype`` (None: float32); with a
        ``gain`` [N, 1, 1, 1], the images' brightness scaled by it first."""
        x = x.float()
        if gain is not None:
            x = (x + 1) * gain - 1
        return self._trunk_format((x - self.shift) / self.scale, dtype, channels_last)

    def _kept(self, name: str, slot: tuple, tensors: tuple[torch.Tensor, ...],
              make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Copies derived from ``tensors``, made by ``make()`` once and kept in ``self.__dict__[name]``
        (not in the state dict) under ``slot`` while ``tensors`` are unchanged: same storage and,
        outside inference tensors, same in-place version; a change replaces the slot's entry.
        Copies made under ``torch.inference_mode`` are inference tensors, which a call recording a
        gradient cannot use: they are kept apart from the others (the mode is part of the slot)."""
        slot = slot + (torch.is_inference_mode_enabled(),)
        cache = self.__dict__.setdefault(name, {})
        key = slot + tuple((t.device, t.data_ptr(), _version(t)) for t in tensors)
        # two threads may fill the cache at once (a Detector shared by threads): iterate over a
        # snapshot, remove what may already be gone, return what this call holds
        kept = cache.get(key)
        if kept is None:
            for k in list(cache):
                if k[:len(slot)] == slot:
                    cache.pop(k, None)
            kept = cache[key] = make()
        return kept

    def trunk_weights(self, depth: int) -> dict[str, torch.Tensor] | None:
        """The AlexNet ``features.*`` weights of this module's first ``depth`` conv layers, as the
        constructors take them (``trunk``), or None when it runs fewer than ``depth`` of them."""
        if len(self.convs) < depth:
            return None
        return {f"features.{idx}.{name}": getattr(conv, name).detach()
                for (idx, *_), conv in zip(_ALEXNET[:depth], self.convs) for name in ("weight", "bias")}

    def _trunk_conv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """ReLU of convolution ``i`` of ``h``, in ``h``'s dtype.

        For a channels-last ``h`` the kept weight copy is channels-last too: oneDNN otherwise
        reorders the weight on every call (conv4 of a 256-px image in bf16: 2.67 -> 2.07 ms,
        2 threads, AMD EPYC)."""
        conv = self.convs[i]
        w, b = conv.weight, conv.bias
        channels_last = is_channels_last(h)
        if h.dtype != w.dtype or channels_last:
            memory_format = torch.channels_last if channels_last else torch.preserve_format
            w, b = self._kept("_cast_weights", (i, h.dtype, channels_last), (w, b),
                              lambda: (w.to(h.dtype, memory_format=memory_format), b.to(h.dtype)))
        return F.relu(F.conv2d(h, w, b, conv.stride, conv.padding))


class PerceptualMap(FrozenTrunk):
    """Perceptual MSFR map of full images; see the module docstring.

    Args:
        image_size: side S of the images.
        layers: how many AlexNet conv layers to use (1..3; default 2: conv1 and conv2).
        trunk: AlexNet ``features.*`` state dict (``None``: :func:`defect_fast.losses.lpips.load_alexnet_trunk`).
        prior: variance shrinkage towards the channel mean variance (>= 0).
        scales: the image pyramid, as downsampling factors (1: the image itself, 2: half its side,
            by 2x2 averaging); each level has its own statistics and the map is the mean of the
            levels' maps (default ``(1,)``: one level).
        placement: where the residual's cells go on the statistics' grid (:data:`PLACEMENTS`;
            default "cells", a resize by size alone).
    """

    def __init__(self, image_size: int, layers: int = 2, trunk: dict[str, torch.Tensor] | None = None,
                 prior: float = 0.01, scales: tuple[int, ...] | list[int] = (1,), placement: str = "cells"):
        super().__init__()
        if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or not 1 <= layers <= 3:
            raise ValueError(f"layers must be 1, 2 or 3, got {layers!r}")
        if not isinstance(scales, (tuple, list)):
            raise ValueError(f"scales must be a list of distinct whole numbers >= 1, got {scales!r}")
        scales = tuple(scales)
        if not scales or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in scales) \
                or len(set(scales)) != len(scales):
            raise ValueError(f"scales must be distinct whole numbers >= 1, got {list(scales)}")
        if image_size // max(scales) < 32:
            raise ValueError(f"image_size must be >= 32 at every pyramid level for the perceptual map, got "
                             f"{image_size} with scales {list(scales)} ({image_size // max(scales)} at the coarsest)")
        if isinstance(prior, bool) or not isinstance(prior, numbers.Real) or not 0 <= float(prior) < float("inf"):
            raise ValueError(f"prior must be a finite number >= 0, got {prior!r}")  # NaN or inf: NaN maps, silently
        if trunk is None:
            from .losses.lpips import load_alexnet_trunk

            trunk, _origin = load_alexnet_trunk(os.environ.get("DEFECT_FAST_ALEXNET_WEIGHTS"))
        self.image_size, self.layers, self.prior, self.scales = int(image_size), int(layers), float(prior), scales
        self.placement = checked_placement(placement)
        self.convs = nn.ModuleList()
        for idx, cin, cout, k, s, p in _CONVS[:layers]:
            conv = nn.Conv2d(cin, cout, k, s, p)
            conv.weight.data.copy_(trunk[f"features.{idx}.weight"])
            conv.bias.data.copy_(trunk[f"features.{idx}.bias"])
            self.convs.append(conv)
        self.requires_grad_(False)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        areas = torch.tensor([float(r * r) for r in _RF[:layers]])
        self.register_buffer("weights", areas / areas.sum())
        self.grids = [max(8, (self.image_size // f) // 4) for f in scales]
        channels = sum(c[2] for c in _CONVS[:layers])
        # Statistics of the residual features on defect-free images, per level (fit); fitted == 0: none.
        for i, g in enumerate(self.grids):
            self.register_buffer(f"mean_{i}", torch.zeros(channels, g, g))
            self.register_buffer(f"inv_std_{i}", torch.ones(channels, g, g))
        self.register_buffer("fitted", torch.zeros(()))

    @property
    def grid(self) -> int:
        """Side of the finest level's feature grid."""
        return self.grids[0]

    def stats(self, level: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, inv_std) of pyramid level ``level``, each [C, G, G]."""
        return getattr(self, f"mean_{level}"), getattr(self, f"inv_std_{level}")

    # -- features --------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, dtype: torch.dtype | None = None, channels_last: bool = False,
                 gain: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Images [N,3,H,W] in [-1, 1] -> the ReLU outputs of the trunk's layers (conv1, conv2, ...;
        before any max-pool), float32, computed in ``dtype`` (None: float32). With
        :attr:`brightness` set, the images are levelled first, by ``gain`` (a reconstruction by
        its input's) or by their own (:meth:`gain`)."""
        if gain is None:
            gain = self.gain(x)  # None when not levelling
        h = self._trunk_input(x, dtype, channels_last, gain)
        out = []
        for i in range(len(self.convs)):
            if i > 0:
                h = F.max_pool2d(h, 3, 2)
            h = self._trunk_conv(i, h)
            out.append(h.float())
        return out

    def residual(self, x: torch.Tensor, recon: torch.Tensor, level: int = 0, *, x_features: list[torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
        """x, recon [N,3,S,S] in [-1,1] -> residual features [N, C, G, G] of pyramid level ``level``
        (all layers, one grid). ``x_features``: :meth:`features` of ``x`` already computed (used
        at the full-size level); ``dtype``, ``channels_last``: how the trunk runs (:meth:`features`)."""
        return torch.cat(self._layer_residuals(x, recon, level, x_features, dtype, channels_last), 1)

    def _layer_residuals(self, x: torch.Tensor, recon: torch.Tensor, level: int, x_features: list[torch.Tensor] | None,
                         dtype: torch.dtype | None, channels_last: bool) -> list[torch.Tensor]:
        """:meth:`residual`, one tensor [N, C_l, G, G] per layer."""
        f = self.scales[level]
        x, recon = x.float(), recon.float()
        if f > 1:
            x, recon = F.avg_pool2d(x, f), F.avg_pool2d(recon, f)
        g = (self.grids[level], self.grids[level])
        gain = self.gain(x)  # the input's: the reconstruction is levelled with it
        fx = x_features if x_features is not None and f == 1 else self.features(x, dtype, channels_last, gain)
        fr = self.features(recon, dtype, channels_last, gain)
        if self.placement == "cells":
            return [F.interpolate(a - b, size=g, mode="bilinear", align_corners=False) for a, b in zip(fx, fr)]
        return [place_features(a - b, *alexnet_centres(i + 1), g[0], x.shape[-1]) for i, (a, b) in enumerate(zip(fx, fr))]

    def standardised(self, x: torch.Tensor, recon: torch.Tensor, level: int = 0, **trunk) -> torch.Tensor:
        """x, recon [N,3,S,S] in [-1,1] -> z = (residual - mean) * inv_std [N, C, G, G] of level
        ``level``; ``trunk``: the keyword options of :meth:`residual`."""
        r = self.residual(x, recon, level, **trunk)
        mean, inv_std = self._stats_like(level, r)
        return (r - mean) * inv_std

    def _stats_like(self, level: int, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`stats` of ``level`` laid out like the residual ``r``.

        A channels-last trunk gives a channels-last residual (its upsampling is also 10x faster
        in that layout). Standardising it with [C, G, G] statistics in the default layout makes
        every element a strided gather: 7.9 ms instead of 1.2 ms per 256-px image (2 threads,
        AMD EPYC). For such a residual the statistics are permuted to the same layout once and
        kept until they change (in place, by :meth:`fit` or by loading a state dict): the same
        values, so the same z bit for bit."""
        mean, inv_std = self.stats(level)
        if not is_channels_last(r):
            return mean, inv_std
        return self._kept("_stats_channels_last", (level,), (mean, inv_std),
                          lambda: tuple(t.permute(1, 2, 0).contiguous().permute(2, 0, 1) for t in (mean, inv_std)))

    def level_map(self, z: torch.Tensor, size: int) -> torch.Tensor:
        """Standardised residual z [N, C, G, G] -> one level's map [N, 1, size, size]: per layer the
        mean of z^2 over its channels, layers weighted, square root, bilinear upsampling."""
        z2 = z * z
        per_layer, start = [], 0
        for conv in self.convs:
            c = conv.out_channels
            per_layer.append(z2[:, start:start + c].mean(dim=1))
            start += c
        return self._weighted_map(per_layer, size)

    def _weighted_map(self, per_layer: list[torch.Tensor], size: int) -> torch.Tensor:
        """Per-layer means of z^2 [N, G, G] -> the level's map [N, 1, size, size] (:meth:`level_map`)."""
        m = (torch.stack(per_layer, 1) * self.weights.view(1, -1, 1, 1)).sum(1, keepdim=True).sqrt()
        return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)

    def _level_map_by_layer(self, x: torch.Tensor, recon: torch.Tensor, level: int, size: int, *,
                            x_features: list[torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                            channels_last: bool = False) -> torch.Tensor:
        """``level_map(standardised(x, recon, level))``, the same values bit for bit, layer by layer:
        each layer's residual is standardised and squared where it lies, with no concatenation of
        the layers and no second and third [N, C, G, G] tensor (the finest level of a 256-px batch
        of 8: 33 MB each, written and read again). The recommended run's inference: 25.0 -> 22.2
        ms per 256-px photo (2 threads, AMD EPYC; ``benchmarks/bench_context.py``,
        "concatenated"). In place only where no gradient is recorded (an in-place square would
        lose what its backward needs)."""
        layers = self._layer_residuals(x, recon, level, x_features, dtype, channels_last)
        mean, inv_std = self._stats_like(level, layers[0])
        in_place = not torch.is_grad_enabled() or not any(e.requires_grad for e in layers)
        per_layer, start = [], 0
        for e in layers:
            c = e.shape[1]
            m, s = mean[start:start + c], inv_std[start:start + c]
            z = e.sub_(m).mul_(s) if in_place else (e - m) * s
            per_layer.append((z.mul_(z) if in_place else z * z).mean(dim=1))
            start += c
        return self._weighted_map(per_layer, size)

    def forward(self, x: torch.Tensor, recon: torch.Tensor, size: int | None = None, **trunk) -> torch.Tensor:
        """x, recon [N,3,S,S] in [-1, 1] -> map [N, S, S] (>= 0, larger = more anomalous); ``size``:
        the map's side when not S (the statistics are per position of the normalised image);
        ``trunk``: the keyword options of :meth:`residual` (x_features, dtype, channels_last).
        Per level ``level_map(standardised(...))``, computed layer by layer (:meth:`_level_map_by_layer`)."""
        s = x.shape[-1] if size is None else size
        total = None
        for level in range(len(self.scales)):
            m = self._level_map_by_layer(x, recon, level, s, **trunk)
            total = m if total is None else total + m
        return total[:, 0] / len(self.scales)

    # -- statistics ------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, pairs, dtype: torch.dtype | None = None, channels_last: bool = False) -> int:
        """Per-level, per-position, per-channel mean and variance of the residual over defect-free images.

        Args:
            pairs: iterable of (x, recon) batches [n,3,S,S] in [-1, 1].
            dtype, channels_last: how the trunk runs (:meth:`features`; the Detector passes its
                own, so that the statistics describe the features its maps are made of).
        Returns:
            the number of images the statistics rest on (at least 2 are needed).
        """
        levels = range(len(self.scales))
        n, s1, s2 = 0, [None for _ in levels], [None for _ in levels]
        dev = self.fitted.device
        for x, recon in pairs:
            x, recon = x.to(dev), recon.to(dev)
            for i in levels:
                b1, b2 = self._batch_sums(x, recon, i, dtype, channels_last)
                s1[i] = b1 if s1[i] is None else s1[i] + b1
                s2[i] = b2 if s2[i] is None else s2[i] + b2
            n += x.shape[0]
        if n < 2:
            raise ValueError(f"the perceptual map needs at least 2 defect-free images to fit, got {n}")
        for i in levels:
            mean = s1[i] / n
            var = ((s2[i] - n * mean * mean) / (n - 1)).clamp_min(0)
            if not bool((var > 0).any()):  # the floor alone (1e-12): every later map about 1e6 times too large
                from .data.io import DataError

                raise DataError(f"the perceptual map cannot be fitted on {n} images whose residuals are identical "
                                "(the same image again?); give different defect-free images")
            channel_var = var.mean(dim=(1, 2), keepdim=True)
            floor = 1e-3 * var.mean() + 1e-12
            m, inv_std = self.stats(i)
            m.copy_(mean.float())
            inv_std.copy_((var + self.prior * channel_var + floor).rsqrt().float())
        self.fitted.fill_(float(n))
        self.__dict__.pop("_stats_channels_last", None)  # inference tensors keep no version to tell
        return n

    def _batch_sums(self, x: torch.Tensor, recon: torch.Tensor, level: int, dtype: torch.dtype | None,
                    channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums over the batch of the residual and of its square, in float64 [C, G, G] each (:meth:`fit`).

        Layer by layer, each layer's residual squared in place: the same sums bit for bit as the
        concatenated residual's (``e.sum(0)``, ``(e * e).sum(0)``), without writing the float64
        copy of all layers and its square (at 512 px, 268 MB each per batch of eight at the finest
        level): ``PerceptualMap.fit`` on 540 images of 256 px in 5.2 s instead of 8.0 s (2 threads,
        AMD EPYC; ``benchmarks/bench_context.py``, "perceptual_fit_seconds")."""
        ones, squares = [], []
        for a in self._layer_residuals(x, recon, level, None, dtype, channels_last):
            d = a.double()
            ones.append(d.sum(0))
            squares.append(d.mul_(d).sum(0))
        return torch.cat(ones), torch.cat(squares)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_stats_channels_last", None)
        super()._load_from_state_dict(*args, **kwargs)

    def state(self) -> dict:
        """What a model file stores to rebuild this map (trunk included: the file is self-contained)."""
        return {"image_size": self.image_size, "layers": self.layers, "prior": self.prior, "scales": list(self.scales),
                "brightness": self.brightness, "placement": self.placement, "tensors": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict) -> "PerceptualMap":
        t = dict(state["tensors"])
        if "mean" in t:  # one-level files written before the pyramid
            t["mean_0"], t["inv_std_0"] = t.pop("mean"), t.pop("inv_std")
        trunk = {}
        for i, (idx, *_rest) in enumerate(_CONVS[:state["layers"]]):
            trunk[f"features.{idx}.weight"] = t[f"convs.{i}.weight"]
            trunk[f"features.{idx}.bias"] = t[f"convs.{i}.bias"]
        m = cls(state["image_size"], state["layers"], trunk=trunk, prior=state["prior"],
                scales=tuple(state.get("scales", (1,))))
        m.load_state_dict(t)
        m.brightness = state.get("brightness")  # files written before the option: not levelled
        m.placement = checked_placement(state.get("placement", "cells"))  # as files before the choice were fitted
        return m


def checked_placement(value: str) -> str:
    """``value`` if it is one of :data:`PLACEMENTS`, else ValueError naming them (a damaged file)."""
    if value not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {value!r}")
    return value


__all__ = ["FrozenTrunk", "PLACEMENTS", "PerceptualMap", "alexnet_centres", "brightness_gain", "checked_placement",
           "place_features", "place_profile", "reference_brightness"]
