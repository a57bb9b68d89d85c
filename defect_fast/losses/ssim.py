"""SSIM-family reconstruction losses: AW-SSIM with its per-patch sigma schedule, and plain SSIM.

AW-SSIM (second paper, Eqs. 2-9) replaces SSIM's product l^a * c^b * s^g by the weighted sum
a*l + b*c + g*s (Eq. 7) and evaluates every patch with its own Gaussian window width sigma, which
grows by a constant k after each patch and starts again at the beginning of every epoch (Eq. 9).
The index itself is :func:`defect_fast.ops.aw_ssim`; this module supplies the weights, the sigma
schedule and the ``1 - index`` loss.

All losses here take images in [-1, 1]: the dynamic range L is 2, and the images are shifted by
+1 to [0, 2] before the index. The luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) is
not shift-invariant: it assumes intensities from 0 (Eq. 2 with C1 = (K1 L)^2). On zero-centred
values it falls towards 0 near mid-grey and turns negative where the two means differ in sign,
so a mid-grey texture brighter than its reconstruction by 5 % of the range (0.1 against 0 on
[-1, 1]) would score l = 0.04, where the same pair shifted to [0, 2] (1.1 against 1.0) scores 0.995.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from .. import ops

Weights = Union[str, Sequence[float]]

# What a training checkpoint records of these losses, so that a resume never changes a run's
# objective half-way (see ``AnomalyModel.objective``): 1 compared the network's [-1, 1] values
# as if they started at 0 (defect_fast up to the luminance fix described above), 2 shifts them
# to [0, 2] first.
INPUT_RANGE_REVISION = 2


def objective() -> dict[str, int]:
    """What a model trained with one of these losses returns from ``AnomalyModel.objective``."""
    return {"ssim_input_range": INPUT_RANGE_REVISION}

# Luminance, contrast and structure weights (alpha, beta, gamma) of Eq. 7, each set summing to 1.
# The paper's Fig. 4 ranks the three terms per category but prints no numbers; these values keep
# the ranking with a 3:1:1 ratio for the favoured term:
#   "structure": woven or grained textures (carpet, leather, wood, fabric), where the layout of
#                threads and grain defines the surface, so gamma dominates;
#   "luminance": tile-like surfaces and objects (tile, pill, hazelnut, magnetic tile), where
#                brightness, lighting and colour changes matter most, so alpha dominates;
#   "balanced":  equal weights, for anything else.
PRESETS: dict[str, tuple[float, float, float]] = {
    "balanced": (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0),
    "structure": (0.2, 0.2, 0.6),
    "luminance": (0.6, 0.2, 0.2),
}

# Which preset suits which dataset category (names as in MVTec AD and the magnetic-tile set): the
# paper's Fig. 4 names carpet, leather and wood (structure) and tile, pill and hazelnut
# (luminance); fabric, grid and magnetic tile are this project's guesses.
CATEGORY_PRESETS: dict[str, str] = {
    "carpet": "structure",
    "leather": "structure",
    "wood": "structure",
    "fabric": "structure",
    "grid": "structure",
    "tile": "luminance",
    "pill": "luminance",
    "hazelnut": "luminance",
    "magnetic-tile": "luminance",
    "magnetic_tile": "luminance",
}


def resolve_weights(weights: Weights) -> tuple[float, float, float]:
    """A preset name or an explicit (alpha, beta, gamma) -> three non-negative floats."""
    if isinstance(weights, str):
        if weights not in PRESETS:
            raise ValueError(f"unknown AW-SSIM weight preset {weights!r}; choose one of {sorted(PRESETS)} or give (alpha, beta, gamma)")
        return PRESETS[weights]
    values = tuple(float(w) for w in weights)
    if len(values) != 3 or any(w < 0 or not math.isfinite(w) for w in values):
        raise ValueError(f"AW-SSIM weights must be three finite non-negative numbers (alpha, beta, gamma), got {weights!r}")
    return values  # type: ignore[return-value]


def preset_for(category: str) -> str:
    """The weight preset for a dataset category ("balanced" when the category is not listed);
    case, spaces, "-" and "_" are alike ("Magnetic tile" is "magnetic-tile")."""
    return CATEGORY_PRESETS.get("-".join(category.lower().replace("_", " ").replace("-", " ").split()), "balanced")


class SigmaSchedule:
    """Per-patch standard deviation of the Gaussian window (Eq. 9 of the second paper).

    sigma starts at ``sigma0`` at the beginning of every epoch and grows by ``k`` after each
    patch, in the order the trainer feeds the patches; after an epoch of n steps it has reached
    ``sigma0 + n * k``, which is Eq. 9 (there n = ceil(images / batch) * (H/PH) * (W/PW), one step
    per batch of same-position patches; :meth:`next` with ``shared=True`` steps once per batch,
    though the trainer's batches are not of same-position patches: see there).

    The paper gives neither sigma0 nor k. Defaults: sigma0 = 0.5 (an almost 3x3 window, fine
    detail) and, when ``k`` is None, k derived as (sigma_end - sigma0) / steps_per_epoch so that
    the window widens to sigma_end = 3 (most of the 11x11 window) by the end of each epoch; the
    standard SSIM value 1.5 lies in between. Derived k needs the epoch length
    (:meth:`set_epoch_length`); until it is known, every patch gets the midpoint
    (sigma0 + sigma_end) / 2. With a derived k sigma is also capped at sigma_end, so a longer
    epoch than announced holds sigma_end instead of overshooting. A given k is used as is.

    Args:
        sigma0: sigma of the first patch of every epoch (> 0).
        k: increment per step (>= 0), or None to derive it from ``sigma_end``.
        sigma_end: sigma reached at the end of an epoch when k is derived (>= sigma0).
    """

    def __init__(self, sigma0: float = 0.5, k: float | None = None, sigma_end: float = 3.0):
        # the window is made in float32: a value it cannot hold (NaN, 1e308, 1e-300 -> 0) passed
        # these checks (NaN compares False) and failed at the first training step
        f32 = torch.finfo(torch.float32)
        for name, v in (("sigma0", sigma0), ("sigma_end", sigma_end), *((("k", k),) if k is not None else ())):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > f32.max:
                raise ValueError(f"SigmaSchedule: {name} must be a finite number float32 holds, got {v}")
        if not sigma0 >= f32.tiny:
            raise ValueError(f"SigmaSchedule: sigma0 must be > 0 (at least {f32.tiny:.3g}, float32's smallest "
                             f"normal number), got {sigma0}")
        if k is not None and k < 0:
            raise ValueError(f"SigmaSchedule: k must be >= 0, got {k}")
        if k is None and sigma_end < sigma0:
            raise ValueError(f"SigmaSchedule: sigma_end ({sigma_end}) must be >= sigma0 ({sigma0})")
        self.sigma0 = float(sigma0)
        self.sigma_end = float(sigma_end)
        self._given_k = None if k is None else float(k)
        self.epoch_length: int | None = None
        self.steps = 0  # steps taken since the last reset

    @property
    def k(self) -> float | None:
        """The increment per step: given, derived from the epoch length, or None (not yet known)."""
        if self._given_k is not None:
            return self._given_k
        if self.epoch_length:
            return (self.sigma_end - self.sigma0) / self.epoch_length
        return None

    def set_epoch_length(self, patches_per_epoch: int | None) -> None:
        """Announce how many steps (patches, or shared batches) an epoch has; None forgets it."""
        if patches_per_epoch is not None and int(patches_per_epoch) <= 0:
            raise ValueError(f"SigmaSchedule: patches_per_epoch must be > 0, got {patches_per_epoch}")
        self.epoch_length = None if patches_per_epoch is None else int(patches_per_epoch)

    def reset(self) -> None:
        """Start a new epoch: the next patch gets sigma0 again."""
        self.steps = 0

    def _at(self, steps: torch.Tensor) -> torch.Tensor:
        k = self.k
        if k is None:
            return torch.full_like(steps, 0.5 * (self.sigma0 + self.sigma_end))
        sigma = self.sigma0 + steps * k
        return sigma.clamp(max=self.sigma_end) if self._given_k is None else sigma

    @property
    def current(self) -> float:
        """sigma the next patch would get (after a full epoch of n steps: sigma0 + n*k, Eq. 9)."""
        return float(self._at(torch.tensor([float(self.steps)], dtype=torch.float64))[0])

    def next(self, n: int, *, shared: bool = False, device=None, dtype=torch.float32) -> torch.Tensor:
        """sigmas [n] for the next n patches, and advance.

        ``shared=False`` (the default, per patch): the patches get sigma_i, ..., sigma_{i+n-1}
        and the schedule advances n steps. ``shared=True``: all n patches get sigma_i and the
        schedule advances one step, as Eq. 9 counts it for batches of the patches at one position
        of several images. The trainer's batches hold the patches of each image in turn: an
        epoch has ceil(patches / batch) steps, Eq. 9's ceil(images / batch) x (H/PH) x (W/PW) up
        to rounding; what differs is which patches share a sigma (an image's neighbours, not one
        position of several images).
        """
        if n < 0:
            raise ValueError(f"SigmaSchedule.next: n must be >= 0, got {n}")
        if shared:
            steps = torch.full((n,), float(self.steps), dtype=torch.float64)
            self.steps += 1 if n > 0 else 0
        else:
            steps = torch.arange(self.steps, self.steps + n, dtype=torch.float64)
            self.steps += n
        return self._at(steps).to(device=device, dtype=dtype, non_blocking=True)  # no wait for the GPU

    def __repr__(self) -> str:
        return (f"SigmaSchedule(sigma0={self.sigma0}, k={self.k}, sigma_end={self.sigma_end}, "
                f"epoch_length={self.epoch_length}, steps={self.steps})")


class AWSSIMLoss(nn.Module):
    """1 - AW-SSIM(x, y), averaged over the batch, with per-patch window widths.

    Args:
        weights: preset name (see :data:`PRESETS`) or (alpha, beta, gamma). With weights summing
            to 1 the loss is 0 for a perfect reconstruction and at most 2.
        sigma0, k, sigma_end: the :class:`SigmaSchedule` (ignored with ``fixed_sigma``).
        fixed_sigma: use this sigma for every patch instead of the schedule.
        sigma_step: "patch" (sigma grows after every patch, the default) or "batch" (one sigma
            per call, growing once per call; see :meth:`SigmaSchedule.next`).
        eval_sigma: sigma used, without advancing the schedule, while the module is in eval mode
            (so validation losses are comparable between epochs); None keeps using the schedule.
        window: odd Gaussian window length (11 in the paper).
        combine: "sum" (AW-SSIM, Eq. 7) or "product" (Eq. 6, weights as exponents).
        data_range: L, the width of the input range (2 for [-1, 1]).
        low: the lowest value of the input range; inputs are shifted by ``-low`` to [0, L] before
            the index (the luminance term needs intensities from 0; see the module docstring).
            None: -1 with ``data_range=2`` (the network's [-1, 1]), else 0 (inputs in [0, L]).

    Forward:
        x, y: [B, C, H, W] in [-1, 1] (H, W >= window). ``sigma``: optional [B] override.
        Returns a scalar.
    """

    def __init__(
        self,
        weights: Weights = "balanced",
        sigma0: float = 0.5,
        k: float | None = None,
        sigma_end: float = 3.0,
        fixed_sigma: float | None = None,
        sigma_step: str = "patch",
        eval_sigma: float | None = 1.5,
        window: int = 11,
        combine: str = "sum",
        data_range: float = 2.0,
        low: float | None = None,
    ):
        super().__init__()
        if sigma_step not in ("patch", "batch"):
            raise ValueError(f"AWSSIMLoss: sigma_step must be 'patch' or 'batch', got {sigma_step!r}")
        if fixed_sigma is not None and not fixed_sigma > 0:
            raise ValueError(f"AWSSIMLoss: fixed_sigma must be > 0, got {fixed_sigma}")
        self.alpha, self.beta, self.gamma = resolve_weights(weights)
        self.schedule = SigmaSchedule(sigma0, k, sigma_end)
        self.fixed_sigma = None if fixed_sigma is None else float(fixed_sigma)
        self.sigma_step = sigma_step
        self.eval_sigma = None if eval_sigma is None else float(eval_sigma)
        self.window = int(window)
        self.combine = combine
        self.data_range = float(data_range)
        self.low = float(low) if low is not None else (-1.0 if float(data_range) == 2.0 else 0.0)

    def sigmas(self, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """[n] window widths for the next n patches (advances the schedule in training mode)."""
        if self.fixed_sigma is not None:
            return torch.full((n,), self.fixed_sigma, device=device, dtype=dtype)
        if not self.training and self.eval_sigma is not None:
            return torch.full((n,), self.eval_sigma, device=device, dtype=dtype)
        return self.schedule.next(n, shared=self.sigma_step == "batch", device=device, dtype=dtype)

    def score(self, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample index [B] of inputs in [low, low + L] with the given sigmas [B]."""
        if self.low != 0.0:  # in float32 at least: a bfloat16 shift would round pixels above mid-grey again
            dtype = torch.promote_types(x.dtype, torch.float32)
            x, y = x.to(dtype) - self.low, y.to(dtype) - self.low
        return ops.aw_ssim(x, y, sigma, self.alpha, self.beta, self.gamma, self.window, self.combine, self.data_range)

    def forward(self, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        if sigma is None:  # the schedule in float32 at least: bfloat16 would round it to 2-3 digits
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            sigma = self.sigmas(x.shape[0], device=x.device, dtype=dtype)
        return 1.0 - self.score(x, y, sigma).mean()

    def extra_repr(self) -> str:
        sig = f"fixed_sigma={self.fixed_sigma}" if self.fixed_sigma is not None else repr(self.schedule)
        return f"alpha={self.alpha:.4g}, beta={self.beta:.4g}, gamma={self.gamma:.4g}, combine={self.combine}, window={self.window}, {sig}"


class SSIMLoss(AWSSIMLoss):
    """Standard SSIM loss 1 - SSIM(x, y): l * c * s, fixed Gaussian sigma 1.5, 11x11 window.

    The loss of the AE-SSIM baseline and of the SSIM terms in the ablations. Equal to
    ``1 - pytorch_msssim.ssim((x + 1) / 2, (y + 1) / 2, data_range=1, win_size=11, win_sigma=1.5)``
    for [-1, 1] inputs (same constants K1 = 0.01, K2 = 0.03, valid windows).
    """

    def __init__(self, window: int = 11, sigma: float = 1.5, data_range: float = 2.0, low: float | None = None):
        super().__init__(weights=(1.0, 1.0, 1.0), fixed_sigma=sigma, window=window, combine="product",
                         data_range=data_range, low=low)


__all__ = ["PRESETS", "CATEGORY_PRESETS", "resolve_weights", "preset_for", "SigmaSchedule", "AWSSIMLoss", "SSIMLoss"]
