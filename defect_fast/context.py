"""Image context: how far an image's overall texture lies from that of defect-free images, and where.

The anomaly map judges each position by its neighbourhood: the perceptual map's conv2 features
see 51 pixels of the 256-pixel image (102 at the pyramid's half-size level), compared with the
same position of defect-free images. Some defects change the surface of a whole region with
little contrast at any one place. On magnetic tile, "uneven" is a band of the tile ground
differently from the rest (stronger or weaker vertical grinding streaks, a straight boundary):
at each position the streaks look like those of some defect-free tile, so the map ranks these
regions weakly, and the image score, which follows the map, ranks their images weakly too.

The context describes the whole image instead, with the outputs of AlexNet conv3, conv4 and
conv5 (fields of 99, 131 and 163 pixels; the frozen ImageNet trunk the perceptual map already
uses). Per layer l, with f(p) the feature vector at position p and fbar its mean over positions:

- **Score**: the descriptor [fbar, per-channel spread over positions] (texture statistics of the
  surface's grain) and its Mahalanobis distance to a Gaussian of defect-free descriptors
  (Ledoit-Wolf shrinkage: hundreds of images for 512-768 dimensions), the image-level detector of
  Rippel, Mertens and Merhof, "Modeling the Distribution of Normal Data in Pre-Trained Deep
  Features for Anomaly Detection" (ICPR 2020).
- **Map**: where that deviation comes from. For a Gaussian (mu, P) of fbar alone, the squared
  distance (fbar - mu)^T P (fbar - mu) is the mean over positions of
  c(p) = (fbar - mu)^T P (f(p) - mu): each position's share, large where the position deviates in
  the direction in which the image as a whole deviates. On a defect-free image fbar is near mu
  and c is small everywhere; on an uneven tile the band's positions carry the deviation. c is
  standardised per position with its defect-free mean and spread, averaged over the layers
  (conv3-5 by default; ``layers`` picks others) and upsampled to the image.

- **Profile** (``profile="rows"`` or ``"columns"``, off by default): a band across the surface,
  compared with the rest of its own image. On magnetic tile the grinding streaks run top to
  bottom and an uneven band runs across them, over most of the tile's width; at any one position
  the band looks like some defect-free tile, but along a row the whole width shows it. So per row
  y (``"rows"``; per column for ``"columns"``) the texture is summarised across the image as the
  median over the row of the log-energies log(1 + f) of the AlexNet conv1 and conv2 outputs (the
  fine texture the streaks are made of, before their max-pools, on the conv2 grid: 31 rows at
  256 px; conv1's 63 rows are brought there by a 3 x 3 average with stride 2, the geometry of
  its own pool, so that every conv1 row counts: :attr:`ImageContext.profile_resample`): r(y). The median ignores defects that cover under half the row (a blowhole, a crack
  along the streaks); a band across the row moves it. d(y) = r(y) minus the image's own median
  row is the row's difference from the rest of its image, and its Mahalanobis distance
  s(y) = (d(y) - mu(y))^T P (d(y) - mu(y)) to the defect-free d at that row (mean per row, one
  Ledoit-Wolf precision pooled over rows) is standardised per row and spread along it. It is
  added to the context map, but not to the map the image score takes its top values from: a
  row's value lands on every pixel of the row, 256 at 256 px against the score's 66 top pixels,
  so in a defect-free image one high row would set the score (12 of the 100 good test photos of
  magnetic tile had over half of their top pixels on rows with a profile value >= 2:
  ``experiments/profile_score_probe.py``); the
  image decision rests on the map's local peaks and the whole-image distance, the profile
  localises bands. Which way the streaks run is a property of the surface; :func:`profile_across_streaks` reads
  it from the defect-free images (``profile="auto"`` of :meth:`Detector.fit_context` and
  ``train --context-profile auto``).

Both are standardised on defect-free images they were not fitted on (five-fold cross-fitting on
the fitting images: a Gaussian's distances of its own sample are too small). The Detector then
adds them to its own: map = (anomaly map - m) / s + context map, and image score =
(top values of that map without the profile - m') / s' + context score, the anomaly map's and
the score's m and s measured on the run's calibration images (:meth:`Detector.fit_context`).
Every term is in units of its defect-free spread; no weight is tuned.

**Image score** (:attr:`ImageContext.image_score`): "combined", the sum above (default), or
"context", the context score alone, the map then localising only. On magnetic tile, with every
image levelled to one brightness, the context score alone ranked the test images better than
the sum on every run (image AUROC +0.95 to +1.18, three seeds; ``experiments/README.md``,
v7, "The image score"); an option, not the default: it was chosen on those test labels, and
a defect that only the local map sees (small, on a surface whose whole-image statistics hide it)
no longer moves the score.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import (_ALEXNET, _LPIPS_SCALE, _LPIPS_SHIFT, FrozenTrunk, alexnet_centres, checked_placement,
                         place_features, place_profile)
from .tracing import exporting

#: The conv layers (1-based) the context reads by default.
LAYERS = (3, 4, 5)
#: Cross-fitting folds for the defect-free statistics of distances and map values.
FOLDS = 5
#: Fewest images to fit on (two per fold).
MIN_IMAGES = 2 * FOLDS
#: Smallest image side (conv3-5 then have a 3 x 3 grid).
MIN_SIZE = 64
#: The profiles the context can add (``profile``): none, per row, per column.
PROFILES = ("none", "rows", "columns")
#: The conv layers (1-based, before their max-pools) whose log-energies the profile summarises.
PROFILE_LAYERS = (1, 2)
#: What ``profile`` accepts where the defect-free images are at hand (:func:`profile_across_streaks`).
PROFILE_CHOICES = PROFILES + ("auto",)
#: What the Detector's image score is with a context (:attr:`ImageContext.image_score`).
IMAGE_SCORES = ("combined", "context")
#: Largest two-sided sign-test p-value with which ``"auto"`` takes the images' streak direction as shared.
AUTO_P_VALUE = 0.01


def checked_image_score(value: str) -> str:
    """``value`` if it is one of :data:`IMAGE_SCORES`, else ValueError naming them."""
    if value not in IMAGE_SCORES:
        raise ValueError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {value!r}")
    return value


def grid_side(image_size: int, layer: int = 3) -> int:
    """Side of a layer's grid for an image of side ``image_size`` (conv2-5: 15 at 256; conv1: 31).
    conv1 and conv2 are read after the max-pool that follows them."""
    h = (image_size + 4 - 11) // 4 + 1  # conv1
    h = (h - 3) // 2 + 1  # pool
    return h if layer == 1 else (h - 3) // 2 + 1  # pool; conv3-5 keep the size


def _gaussian(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors [n, d] (float64) -> (mean [d], precision [d, d]) of the Ledoit-Wolf shrunk Gaussian, float32."""
    from sklearn.covariance import LedoitWolf

    if not np.any(x != x[:1]):  # identical descriptors: a zero covariance, whose (pseudo-)inverse is zero
        from .data.io import DataError  # (a ValueError too; one line on the command line)

        raise DataError(f"the image context cannot be fitted on {x.shape[0]} identical images (their descriptors "
                         "do not vary, so every image would score 0); give different defect-free images")
    lw = LedoitWolf().fit(x)
    return torch.from_numpy(lw.location_).float(), torch.from_numpy(lw.precision_).float()


def _distance(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    d = x - mean
    return ((d @ precision) * d).sum(1).clamp_min(0).sqrt()


def _contribution(f: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Features [N,C,G,G] -> each position's share c(p) = (fbar - mu)^T P (f(p) - mu) [N,G,G]."""
    v = (f.mean(dim=(2, 3)) - mean) @ precision
    return torch.einsum("nc,nchw->nhw", v, f - mean.view(1, -1, 1, 1))


def trunk_depth(layers: tuple[int, ...], profile: str) -> int:
    """How many AlexNet conv layers a context with ``layers`` and ``profile`` runs."""
    return max(layers + (PROFILE_LAYERS if profile != "none" else ()))


def _descriptor(f: torch.Tensor) -> torch.Tensor:
    return torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], 1)


def _sorted_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The lower median along ``dim`` (``torch.median``'s values) through a sort, which ONNX has."""
    return x.sort(dim=dim).values.select(dim, (x.shape[dim] - 1) // 2)


@functools.lru_cache(maxsize=None)
def _median_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchanges that put the lower median of ``n`` values in position (n - 1) // 2:
    Batcher's odd-even merge sort of ``n`` (any n), less every compare-exchange that position
    does not depend on (31 values: 152 of 186)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    need, kept = {(n - 1) // 2}, []
    for a, b in reversed(pairs):
        if a in need or b in need:
            kept.append((a, b))
            need |= {a, b}
    return tuple(reversed(kept))


#: Rows a network median runs on at once: 16384 rows of 31 values (2 MB) stay in a CPU's cache.
_NETWORK_ROWS = 16384
#: Fewest rows for which the network pays: on 2048 rows of 31 values (the second median of a
#: batch of eight 256-px images) its 2 x 152 elementwise calls take 0.39 ms and ``torch.median``
#: 0.39 ms; on 4096, 0.49 ms against 0.82 ms (2 threads, AMD EPYC family 26; a scratch timing).
_NETWORK_MIN_ROWS = 4096


def _network_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The lower median along ``dim`` by :func:`_median_network`, on every row at once: each
    compare-exchange is one elementwise minimum and maximum over all the rows, which a CPU
    vectorises, where ``torch.median`` selects in each row apart, with a branch per comparison.
    Minima and maxima are exact, so the values are ``torch.median``'s, bit for bit (a NaN in a
    row gives NaN, as there)."""
    n = x.shape[dim]
    rows = x.movedim(dim, -1).reshape(-1, n).t().contiguous()  # [n, rows]: one vector per position
    pairs, out = _median_network(n), []
    for block in rows.split(_NETWORK_ROWS, dim=1):
        v = list(block.unbind(0))
        for a, b in pairs:
            v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
        out.append(v[(n - 1) // 2])
    shape = x.movedim(dim, -1).shape[:-1]
    return torch.cat(out).reshape(shape)


def _median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The lower median along ``dim``, the same values by any route: on a CPU, for
    :data:`_NETWORK_MIN_ROWS` rows or more, by a selection network over all rows at once
    (:func:`_network_median`; the profile's 256 x 31 rows of 31 values per 256-px image: the
    recommended run's inference 22.9 -> 22.2 ms per magnetic-tile photo, benchmarks/README.md);
    through a sort while exporting to ONNX, which has no median operator; ``torch.median``
    elsewhere (fewer rows; a GPU, where one kernel per compare-exchange would cost more than it
    saves; traced or scripted graphs, which keep one operator)."""
    if torch.onnx.is_in_onnx_export() or exporting():
        return _sorted_median(x, dim)
    if x.device.type == "cpu" and x.numel() >= _NETWORK_MIN_ROWS * x.shape[dim] > 0 \
            and not torch.jit.is_tracing() and not torch.jit.is_scripting():
        return _network_median(x, dim)
    return x.median(dim=dim).values


#: How the profile brings conv1's log-energies to the grid: "pool", a 3 x 3 average with stride
#: 2 (conv1's own pool geometry, which lands exactly on the conv2 grid), or "bilinear", a plain
#: bilinear resize without antialiasing (files from before the choice), which reads at most 2 of
#: conv1's 63 rows for each of the grid's 31 (weights drifting from 0.48 / 0.52 at the top row to
#: 0.02 / 0.98 at the middle), so half of conv1's rows near the centre were never read.
PROFILE_RESAMPLES = ("pool", "bilinear")


def _to_grid(h: torch.Tensor, grid: int, resample: str) -> torch.Tensor:
    """A map [N, C, H, W] on the grid x grid raster (see :data:`PROFILE_RESAMPLES`)."""
    if tuple(h.shape[-2:]) == (grid, grid):
        return h
    if resample == "pool" and all((n - 3) // 2 + 1 == grid for n in h.shape[-2:]):
        return F.avg_pool2d(h, 3, 2)
    return F.interpolate(h, size=(grid, grid), mode="bilinear", align_corners=False)


def _profile(stems: list[torch.Tensor], grid: int, axis: str, resample: str = "pool") -> torch.Tensor:
    """conv1, conv2 ReLU outputs [N,C_l,H_l,W_l] -> d [N, C, grid]: per row ("rows") or column,
    the median across the image of log(1 + f) on a grid x grid raster, minus the image's own
    median over rows (columns)."""
    f = torch.cat([_to_grid(torch.log1p(h.float()), grid, resample) for h in stems], 1)
    r = _median(f, 3 if axis == "rows" else 2)  # [N, C, grid]
    return r - _median(r, 2).unsqueeze(2)


def profile_across_streaks(images: torch.Tensor) -> tuple[str, str]:
    """The band profile across the streaks of defect-free images: ("rows" or "columns", why).

    Per image, the mean absolute difference of neighbouring grey levels across the width (gx) and
    down the height (gy): streaks that run top to bottom make gx the larger (on magnetic tile,
    592 of the 600 training images, median gx / gy 1.81), and bands across them are rows. The
    direction is taken when the images agree on it beyond chance (two-sided sign test, p <=
    :data:`AUTO_P_VALUE`; 10 images need 10 of 10, 100 need 64).

    Args:
        images: uint8 [N,C,H,W] defect-free images (0..255), as the context is fitted on.
    Raises:
        ValueError: fewer than 2 images, or no shared direction (the message gives the counts).
    """
    from scipy.stats import binomtest

    if images.dim() != 4 or images.shape[0] < 2 or min(images.shape[2:]) < 2:
        raise ValueError(f"profile auto needs at least 2 images of at least 2 x 2 pixels, got shape {tuple(images.shape)}")
    gx, gy = [], []
    for c in images.split(32):
        g = c.float().mean(1)
        gx.append((g[:, :, 1:] - g[:, :, :-1]).abs().mean((1, 2)))
        gy.append((g[:, 1:] - g[:, :-1]).abs().mean((1, 2)))
    gx, gy = torch.cat(gx).double(), torch.cat(gy).double()
    across, along = int((gx > gy).sum()), int((gx < gy).sum())
    n = across + along
    flat = (gx == 0) & (gy == 0)  # a blank frame: no direction, and no ratio (0 / 0)
    ratio = f"{float((gx / gy.clamp_min(1e-12))[~flat].median()):.3g}" if not bool(flat.all()) else "n/a"
    p = binomtest(across, n, 0.5).pvalue if n else 1.0
    counts = (f"in {across} of {n} defect-free images the grey levels vary more across the width than down the "
              f"height (median ratio {ratio}; sign test p = {p:.2g})")
    if bool(flat.any()):
        counts += (f"; {int(flat.sum())} of the {images.shape[0]} images are of one grey level throughout (blank "
                   "frames?) and count neither way")
    if p > AUTO_P_VALUE:
        raise ValueError(f"the images share no streak direction: {counts}; "
                         "choose the profile (rows, columns or none)")
    if across > along:
        return "rows", f"rows, across streaks that run top to bottom: {counts}"
    return "columns", f"columns, across streaks that run side to side: {counts}"


def _profile_distance(d: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """d [N, C, G] -> per row (column) Mahalanobis distance squared to (mean [C, G], precision [C, C]) [N, G]."""
    e = (d - mean).transpose(1, 2)
    return ((e @ precision) * e).sum(-1)


class ImageContext(FrozenTrunk):
    """The image context score and map; see the module docstring.

    Args:
        image_size: side S of the images (>= :data:`MIN_SIZE`).
        trunk: AlexNet ``features.*`` state dict (``None``: :func:`defect_fast.losses.lpips.load_alexnet_trunk`).
        layers: the conv layers read (1-based, default :data:`LAYERS`; conv1 and conv2 after their max-pools).
        profile: "none" (default), "rows" or "columns": the band profile of the module docstring.
        placement: where the map puts each feature cell (:data:`defect_fast.perceptual.PLACEMENTS`).
    """

    def __init__(self, image_size: int, trunk: dict[str, torch.Tensor] | None = None,
                 layers: tuple[int, ...] | list[int] = LAYERS, profile: str = "none", placement: str = "cells"):
        super().__init__()
        if image_size < MIN_SIZE:
            raise ValueError(f"the image context needs images of at least {MIN_SIZE} pixels, got {image_size}")
        layers = tuple(layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= 5 for i in layers) \
                or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct whole numbers from 1 to 5, got {list(layers)}")
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
        self.profile = profile
        self.profile_basis: str | None = None  # why "auto" chose the profile (Detector.fit_context)
        # how conv1 reaches the profile's grid (PROFILE_RESAMPLES): fitted now, "pool"; files
        # from before the choice, "bilinear", which their statistics were fitted with
        self.profile_resample = "pool"
        # whether the Detector's image score takes its top values from the map with the profile
        # (files written before this choice: yes; fitted now: no, see the module docstring)
        self.profile_in_score = False
        # the Detector's image score: "combined" (its map's top values, standardised, plus the
        # context score) or "context" (the context score alone; see "Image score" above)
        self.image_score = "combined"
        # where the map puts the grids' cells on the image (perceptual.PLACEMENTS; files from
        # before the choice: "cells", the default)
        self.placement = checked_placement(placement)
        self.layers = tuple(sorted(layers))
        if trunk is None:
            from .losses.lpips import load_alexnet_trunk

            trunk, _origin = load_alexnet_trunk(os.environ.get("DEFECT_FAST_ALEXNET_WEIGHTS"))
        self.image_size = int(image_size)
        self.convs = nn.ModuleList()
        for idx, cin, cout, k, s, p in _ALEXNET[:trunk_depth(self.layers, profile)]:
            conv = nn.Conv2d(cin, cout, k, stride=s, padding=p)
            conv.weight.data.copy_(trunk[f"features.{idx}.weight"])
            conv.bias.data.copy_(trunk[f"features.{idx}.bias"])
            conv.requires_grad_(False)
            self.convs.append(conv)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        for i in self.layers:
            c, g = _ALEXNET[i - 1][2], grid_side(self.image_size, i)
            self.register_buffer(f"mean_{i}", torch.zeros(2 * c))  # score: Gaussian of [fbar, spread]
            self.register_buffer(f"precision_{i}", torch.zeros(2 * c, 2 * c))
            self.register_buffer(f"map_mean_{i}", torch.zeros(c))  # map: Gaussian of fbar
            self.register_buffer(f"map_precision_{i}", torch.zeros(c, c))
            self.register_buffer(f"pos_mean_{i}", torch.zeros(g, g))  # c(p): defect-free mean and spread
            self.register_buffer(f"pos_std_{i}", torch.ones(g, g))
        if profile != "none":
            c, g = sum(_ALEXNET[i - 1][2] for i in PROFILE_LAYERS), self.profile_grid
            self.register_buffer("profile_mean", torch.zeros(c, g))  # defect-free d per row (column)
            self.register_buffer("profile_precision", torch.zeros(c, c))
            self.register_buffer("profile_pos_mean", torch.zeros(g))  # s: defect-free mean and spread per row
            self.register_buffer("profile_pos_std", torch.ones(g))
        self.register_buffer("dist_mean", torch.zeros(len(self.layers)))
        self.register_buffer("dist_std", torch.ones(len(self.layers)))
        # the Detector's own map and score, defect-free mean and spread (set_detector_stats)
        self.register_buffer("base_mean", torch.zeros(()))
        self.register_buffer("base_std", torch.ones(()))
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))
        self.register_buffer("fitted", torch.zeros(()))

    @property
    def profile_grid(self) -> int:
        """Rows (columns) of the profile: conv1's grid after its max-pool (31 at 256 px)."""
        return grid_side(self.image_size, 1)

    # -- inference -------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, dtype: torch.dtype | None = None, channels_last: bool = False,
                 stem: list[torch.Tensor] | None = None, with_profile: bool = True) -> list[torch.Tensor]:
        """Images [N,3,S,S] in [-1, 1] -> the float32 outputs of ``self.layers`` [N, C, G, G], and
        with a ``profile`` (unless ``with_profile`` is False) last the profile's d [N, C, G'] (the
        module docstring).

        ``dtype`` (None: float32) and ``channels_last``: how the trunk runs. ``stem``: the float32
        ReLU outputs of the first convolutions on these images, before their max-pools (what
        :meth:`PerceptualMap.features <defect_fast.perceptual.PerceptualMap.features>` gives with
        the same trunk weights and options): taken instead of computing them again, with the same
        result (casting a low-precision output to float32 and back is exact, and max-pooling
        commutes with it)."""
        k = 0 if stem is None else min(len(stem), len(self.convs))
        h = self._trunk_input(x, dtype, channels_last, self.gain(x)) if k == 0 else None
        out, stems = [], []
        for i in range(1, len(self.convs) + 1):
            h = stem[i - 1] if i <= k else self._trunk_conv(i - 1, h)
            if with_profile and self.profile != "none" and i in PROFILE_LAYERS:
                stems.append(h)
            if i <= 2:
                h = F.max_pool2d(h, 3, 2)
            if i in self.layers:
                out.append(h.float())
            if i == k and k < len(self.convs):  # the rest of the trunk continues in its own dtype
                h = self._trunk_format(h, dtype, channels_last)
        if stems:
            out.append(_profile(stems, self.profile_grid, self.profile, self.profile_resample))
        return out

    def shares_stem(self, other: nn.Module) -> int:
        """How many leading convolutions ``other`` (a :class:`FrozenTrunk`) runs with exactly the
        same weights and input scaling as this context: the length of ``stem`` it can hand to
        :meth:`features` (0: none)."""
        if not isinstance(other, FrozenTrunk) or not (torch.equal(self.shift, other.shift)
                                                       and torch.equal(self.scale, other.scale)
                                                       and self.brightness == other.brightness):
            return 0
        n = 0
        for a, b in zip(self.convs, other.convs):
            if not (a.stride == b.stride and a.padding == b.padding and a.weight.shape == b.weight.shape
                    and torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)):
                break
            n += 1
        return n

    def score(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`features` -> context score [N]: the mean over layers of the standardised
        distances (0: a typical defect-free image; units of the defect-free spread)."""
        cols = [_distance(_descriptor(f), getattr(self, f"mean_{i}"), getattr(self, f"precision_{i}"))
                for i, f in zip(self.layers, feats)]
        return ((torch.stack(cols, 1) - self.dist_mean) / self.dist_std).mean(1)

    def map(self, feats: list[torch.Tensor], size: int) -> torch.Tensor:
        """:meth:`features` -> context map [N, size, size]: per position, the standardised share of
        the image's deviation, mean over layers (each upsampled bilinearly; layers of one grid
        together), plus the profile's map with a profile."""
        out, values = self.map_parts(feats, size)
        return out if values is None else out + self.spread(values, size)

    def map_parts(self, feats: list[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`features` -> (context map without the profile [N, size, size], the profile's
        value per row (column) [N, size], or None without a profile): :meth:`map` is the first
        plus the second spread across the image. The Detector smooths the two apart and takes
        the image score's top values without the profile unless :attr:`profile_in_score`."""
        per_grid: dict[tuple, torch.Tensor] = {}
        for i, f in zip(self.layers, feats):
            c = _contribution(f, getattr(self, f"map_mean_{i}"), getattr(self, f"map_precision_{i}"))
            z = (c - getattr(self, f"pos_mean_{i}")) / getattr(self, f"pos_std_{i}")
            g = (z.shape[-1], alexnet_centres(i, pooled=True))  # conv1, conv2 after their pools
            per_grid[g] = z if g not in per_grid else per_grid[g] + z
        if self.placement == "cells":
            total = sum(F.interpolate(z.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                        for z in per_grid.values())
        else:
            total = sum(place_features(z, *centres, size, self.image_size) for (_, centres), z in per_grid.items())
        out = total / len(self.layers)
        return out, (self.profile_values(feats[-1], size) if self.profile != "none" else None)

    def profile_values(self, d: torch.Tensor, size: int) -> torch.Tensor:
        """The profile's d [N, C, G] -> per row (column) its standardised distance [N, size],
        interpolated along the image."""
        s = _profile_distance(d, self.profile_mean, self.profile_precision)
        z = (s - self.profile_pos_mean) / self.profile_pos_std
        if self.placement == "cells":
            return F.interpolate(z.unsqueeze(1), size=size, mode="linear", align_corners=False)[:, 0]
        return place_profile(z, *alexnet_centres(1, pooled=True), size, self.image_size)  # conv1's pooled rows

    def profile_map(self, d: torch.Tensor, size: int) -> torch.Tensor:
        """The profile's d [N, C, G] -> its map [N, size, size]: :meth:`profile_values` along the
        image, the same across it."""
        return self.spread(self.profile_values(d, size), size)

    def spread(self, values: torch.Tensor, size: int) -> torch.Tensor:
        """Per row (column) values [N, size] -> [N, size, size], the same across the image."""
        return values.unsqueeze(2).expand(-1, -1, size) if self.profile == "rows" else values.unsqueeze(1).expand(-1, size, -1)

    def combine_maps(self, maps: torch.Tensor, context_map: torch.Tensor) -> torch.Tensor:
        """The Detector's maps [N,S,S] and :meth:`map` -> combined maps."""
        return (maps - self.base_mean) / self.base_std + context_map

    def combine_scores(self, scores: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Scores of the combined maps [N] and :meth:`features` -> the image scores: their sum
        with the context score, both in units of their defect-free spread, or with
        :attr:`image_score` "context" the context score alone."""
        context = self.score(feats)
        return context if self.image_score == "context" else (scores - self.score_mean) / self.score_std + context

    # -- fitting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, batches: Callable[[], Iterable[torch.Tensor]], dtype: torch.dtype | None = None,
            channels_last: bool = False) -> int:
        """Fit the Gaussians and the defect-free statistics of distances and map values.

        Args:
            batches: called twice; each call returns a fresh iterable of the same defect-free
                image batches [n,3,S,S] in [-1, 1], in the same order.
            dtype, channels_last: how the trunk runs (:meth:`features`; the Detector passes its
                own, so that the statistics describe the features it computes).
        Returns:
            the number of images (at least :data:`MIN_IMAGES`).
        """
        dev = self.shift.device
        descs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        profiles: list[torch.Tensor] = []
        for x in batches():
            feats = self.features(x.to(dev), dtype, channels_last)
            for acc, f in zip(descs, feats):
                acc.append(_descriptor(f).double().cpu())
            if self.profile != "none":
                profiles.append(feats[-1].double().cpu())
        n = sum(d.shape[0] for d in descs[0])
        if n < MIN_IMAGES:
            raise ValueError(f"the image context needs at least {MIN_IMAGES} defect-free images to fit, got {n}")
        folds = torch.arange(n) % FOLDS
        if profiles:
            self._fit_profile(torch.cat(profiles), folds)
        fold_maps = []  # per layer, per fold: the map Gaussian fitted without that fold
        for j, (i, acc) in enumerate(zip(self.layers, descs)):
            x = torch.cat(acc)
            c = x.shape[1] // 2
            held = torch.empty(n)
            per_fold = []
            for k in range(FOLDS):
                out = folds == k
                mean, precision = _gaussian(x[~out].numpy())
                held[out] = _distance(x[out].float(), mean, precision)
                per_fold.append(tuple(t.to(dev) for t in _gaussian(x[~out, :c].numpy())))
            fold_maps.append(per_fold)
            for name, (mean, precision) in (("", _gaussian(x.numpy())), ("map_", _gaussian(x[:, :c].numpy()))):
                getattr(self, f"{name}mean_{i}").copy_(mean)
                getattr(self, f"{name}precision_{i}").copy_(precision)
            self.dist_mean[j] = held.mean()
            self.dist_std[j] = held.std().clamp_min(1e-12)
        # second pass: each image's map values from the Gaussian that did not see it
        s1 = [0.0 for _ in self.layers]
        s2 = [0.0 for _ in self.layers]
        start = 0
        for x in batches():
            feats = self.features(x.to(dev), dtype, channels_last, with_profile=False)  # fitted in the first pass
            fk = folds[start:start + x.shape[0]]
            for j, f in enumerate(feats):
                c = torch.empty(f.shape[0], *f.shape[2:], device=dev)
                for k in fk.unique().tolist():
                    sel = (fk == k).to(dev)
                    c[sel] = _contribution(f[sel], *fold_maps[j][k])
                s1[j] = s1[j] + c.double().sum(0)
                s2[j] = s2[j] + (c.double() ** 2).sum(0)
            start += x.shape[0]
        if start != n:
            raise ValueError(f"batches() gave {start} images on its second pass, {n} on its first")
        for j, i in enumerate(self.layers):
            mean = s1[j] / n
            var = ((s2[j] - n * mean * mean) / (n - 1)).clamp_min(0)
            getattr(self, f"pos_mean_{i}").copy_(mean.float())
            getattr(self, f"pos_std_{i}").copy_(var.sqrt().float().clamp_min(1e-6))
        self.fitted.fill_(float(n))
        return n

    def _fit_profile(self, d: torch.Tensor, folds: torch.Tensor) -> None:
        """The profile's defect-free Gaussian from d [n, C, G] (float64), and the mean and spread
        per row of the distances of each fold from the Gaussian fitted without it."""
        def gaussian(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mean = d[sel].mean(0)  # [C, G]
            res = (d[sel] - mean).transpose(1, 2).reshape(-1, d.shape[1])  # every row of every image
            return mean.float(), _gaussian(res.numpy())[1]

        held = torch.empty(d.shape[0], d.shape[2])
        for k in range(FOLDS):
            out = folds == k
            mean, precision = gaussian(~out)
            held[out] = _profile_distance(d[out].float(), mean, precision)
        mean, precision = gaussian(torch.ones(d.shape[0], dtype=torch.bool))
        self.profile_mean.copy_(mean)
        self.profile_precision.copy_(precision)
        self.profile_pos_mean.copy_(held.mean(0))
        self.profile_pos_std.copy_(held.std(0).clamp_min(1e-6))

    def set_detector_stats(self, base_maps: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> None:
        """Defect-free mean and spread of the Detector's own maps (all values of ``base_maps``
        [N,S,S]) or of the combined maps' scores (``scores`` [N]), on images no statistics saw."""
        for values, mean, std, what in ((base_maps, self.base_mean, self.base_std, "map"),
                                        (scores, self.score_mean, self.score_std, "score")):
            if values is None:
                continue
            if values.shape[0] < 2:
                raise ValueError(f"the {what}'s defect-free spread needs at least 2 images, got {values.shape[0]}")
            m, sd = float(values.double().mean()), float(values.double().std())
            if not sd > 1e-9 * max(1.0, abs(m)):  # a floor of 1e-12 made every later score about 1e12
                from .data.io import DataError

                raise DataError(f"the {what}'s defect-free spread over {values.shape[0]} calibration images is {sd:.3g} "
                                "(identical images?); give different defect-free images")
            mean.fill_(m)
            std.fill_(sd)

    def state(self) -> dict:
        """What a model file stores to rebuild the context (trunk included)."""
        return {"image_size": self.image_size, "layers": list(self.layers), "profile": self.profile,
                "profile_basis": self.profile_basis, "profile_in_score": self.profile_in_score,
                "profile_resample": self.profile_resample,
                "image_score": self.image_score, "brightness": self.brightness, "placement": self.placement,
                "tensors": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict) -> "ImageContext":
        layers = tuple(state.get("layers", LAYERS))
        profile = state.get("profile", "none")  # files written before the profile have none
        t = state["tensors"]
        trunk = {}
        for i, (idx, *_rest) in enumerate(_ALEXNET[:trunk_depth(layers, profile)]):
            trunk[f"features.{idx}.weight"] = t[f"convs.{i}.weight"]
            trunk[f"features.{idx}.bias"] = t[f"convs.{i}.bias"]
        m = cls(state["image_size"], trunk=trunk, layers=layers, profile=profile)
        m.load_state_dict(t)
        m.profile_basis = state.get("profile_basis")
        m.profile_in_score = bool(state.get("profile_in_score", True))  # as files before the choice scored
        m.profile_resample = state.get("profile_resample", "bilinear")  # as files before the choice were fitted
        if m.profile_resample not in PROFILE_RESAMPLES:
            raise ValueError(f"profile_resample must be one of {', '.join(PROFILE_RESAMPLES)}, "
                             f"got {m.profile_resample!r}")
        m.brightness = state.get("brightness")  # files written before the option: not levelled
        m.image_score = checked_image_score(state.get("image_score", "combined"))  # files before the option: the sum
        m.placement = checked_placement(state.get("placement", "cells"))  # as files before the choice were fitted
        return m


__all__ = ["IMAGE_SCORES", "ImageContext", "LAYERS", "PROFILES", "PROFILE_CHOICES", "checked_image_score", "grid_side",
           "profile_across_streaks", "trunk_depth"]
