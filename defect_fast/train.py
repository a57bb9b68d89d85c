"""Multi-stage patch training (Algorithm 1 of CMA-AE, the two stages of the AW-SSIM AE).

An epoch visits every patch of every training image once: images are shuffled, and the patches
of each image follow in raster order (the order the AW-SSIM sigma schedule counts). All
randomness is drawn from generators seeded by (seed, stage, epoch, step), so an interrupted run
resumed from its last checkpoint continues exactly where it stopped: bit for bit on the same
CPU model, torch and thread count (:func:`compute_setting`, stored in the checkpoint; a resume
with another says so). On a GPU it draws the same batches, but cuDNN picks its algorithms per process and
some backward kernels (and ``scatter_add_``) add in no fixed order, so the sums may round
otherwise: the same training, not promised bit for bit.

Batches are cut, synthesised and augmented on the training device. On a GPU the training images
(uint8) stay there for the whole run when they take at most a quarter of its free memory
(:func:`images_fit_on_device`); otherwise each step copies only its images (uint8) there. The
random draws are small tensors made on the CPU by those generators and moved, so a GPU run
draws the same patches, anomalies and flips as a CPU run of the same settings.

The run folder layout is described in :mod:`defect_fast.runs`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .calibration import count_text, scores_named
from .data.dataset import to_model_range
from .data.io import image_keys
from .data.patches import grid_shape
from .layers import keep_matrix_weights_contiguous
from .losses.ssim import objective as ssim_objective
from .models import AnomalyModel, build_model
from .precision import cpu_model, cudnn_benchmark
from .runs import (CHECKPOINT_FILE, CHECKPOINT_VERSION, CONFIG_FILE, LOG_FILE, MODEL_FILE,  # noqa: F401
                   POSITION_KEYS, RESUME_KEYS, NonFiniteMaps, RunError, TrainingStopped, atomic_save, load_checkpoint, model_from_state, resolve_device, stage_file)
from .safety import LOCK_NAME, OutputFolder, RunLock, UserError, atomic_write_bytes, atomic_write_json, one_line, real_path

#: Map normalisations a run can ask for (``TrainConfig.normalize``).
NORMALIZATIONS = ("none", "position")
#: Images the map statistics (perceptual map, ``normalize="position"``) are fitted on (``TrainConfig.fit_on``).
FIT_SOURCES = ("train", "held-back")
#: Fewest held-back images when ``holdback`` > 0 (fewer images in all: none are held back, with a warning).
HOLDBACK_MIN = 4
#: Largest --lr the command line takes: Adam's step size; a larger one moves every weight by more than its
#: scale at each step (a run's stored setting is not checked against it: its resume goes on).
MAX_LR = 1.0


def brightness_note(rho: float | None, n: int, levelled: bool, trunk: bool) -> str | None:
    """The run log's line on how its held-back scores follow their images' mean brightness (rank
    correlation ``rho`` over ``n`` images; None: not measured), with a hint at
    ``--level-brightness`` when the correlation is significant (p <= 0.01,
    :func:`~defect_fast.diagnose.rank_significant`) and the run has an AlexNet trunk to level for
    (``trunk``) but does not."""
    from .diagnose import MIN_RANK_PAIRS, rank_significant

    if rho is None or not math.isfinite(rho) or n < MIN_RANK_PAIRS:
        return None
    line = f"held-back scores against their images' mean brightness: rank correlation {rho:+.2f} ({n} images)"
    if rank_significant(rho, n) and trunk and not levelled:
        line += ("; the lighting sets part of the scores: --level-brightness levels it before the trunk "
                 "(README, accuracy options)")
    return line

@dataclass
class TrainConfig:
    """Everything that decides a training run. Saved as config.json in the run folder."""

    data: str
    model: str = "cmaae"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 512
    stride: int | None = None  # patch stride; None = the model's patch size (no overlap)
    batch_size: int = 512  # patches per step
    epochs: list[int] = field(default_factory=lambda: [10, 10])  # per stage
    max_steps: list[int] | None = None  # per stage, optional cap on steps
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    checkpoint_every: int = 50  # steps
    anomaly_source: str | None = None
    device: str = "auto"
    calibration_images: int = 16  # training images used for thresholds when none are held back
    holdback: float = 0.1  # share of the defect-free images held back (never trained on) for thresholds
    far: float = 0.01  # target image false-alarm rate of the stored threshold
    normalize: str = "none"  # map normalisation fitted on defect-free maps: "none" | "position"
    # Images the map statistics are fitted on: "train" (every training image; all held-back images
    # then calibrate) or "held-back" (half of them; the other half calibrates).
    fit_on: str = "train"
    held_back: list[str] = field(default_factory=list)  # the held-back image files (filled by train())
    # Where training patches come from: "grid" (the fixed inference tiling, the papers') or
    # "random" (any position, so no pixel is always at a patch edge: removes seam artefacts).
    patch_sampling: str = "grid"
    flips: bool = False  # random horizontal and vertical flips of training patches
    lr_schedule: str = "constant"  # "constant" (the papers') or "cosine" (to 1 % of lr at each stage's end)
    # Arithmetic of the training steps: "float32", "bfloat16" (autocast, channels-last model and
    # patches; oneDNN's bf16 kernels on CPUs with AVX512-BF16/AMX, tensor cores on CUDA) or "auto"
    # (bfloat16 where the device computes it natively, else float32). Weights stay float32.
    # On an AVX512-BF16 CPU bf16 moved the magnetic-tile metrics by at most 0.23 point over three
    # seeds and trained CMA-AE 1.6x and the AW-SSIM AE 2.4x faster (benchmarks/README.md).
    precision: str = "auto"
    # How the finished run maps images (stored in model.pt; the defaults of ``defect_fast.load``):
    map: str = ""  # "" = the model's own default map; a model map name; or "perceptual" (fitted per fit_on)
    # The perceptual map's image pyramid (downsampling factors): 1 = the image, 2 = half its side;
    # the half-resolution level sees twice the area, for large low-contrast defects.
    map_scales: list[int] = field(default_factory=lambda: [1, 2])
    infer_stride: int | None = None  # inference patch stride; None = tiles (the patch size)
    blend: str = "none"  # "none" or "hann" (seam-free weights where patches overlap)
    smooth: float = 0.0  # Gaussian blur (pixels) of the full-image map
    # Add the image context to maps and scores (defect_fast/context.py): Gaussians of the whole image's
    # AlexNet conv3-5 statistics, fitted on the training images, and each position's share of the
    # image's deviation. Off: the run's own map and its top values (the papers').
    context: bool = False
    # With the context: also compare each row ("rows") or column ("columns") of the image with the
    # image's other rows (columns), for bands across the surface (defect_fast/context.py, "Profile");
    # "auto": across the streaks of the training images (context.profile_across_streaks).
    context_profile: str = "none"
    # Scale every image to the training images' mean brightness before the AlexNet trunk of the
    # perceptual map (the reconstruction by its input's factor) and of the context
    # (defect_fast/perceptual.py, "Brightness"): lighting out of the statistics. Off: as read.
    level_brightness: bool = False
    # the image score with --context: "combined" (map's top values + context score) or "context" alone
    image_score: str = "combined"
    # Where the perceptual map and the context put the trunk's feature cells on the image
    # (defect_fast/perceptual.py, PLACEMENTS): "cells", a resize by size alone, or "centres", each
    # cell on its receptive field's centre (right for a one-pixel spot; on magnetic tile it cost
    # 0.8 pixel AUROC on every run, experiments/README.md, "Eighth round").
    placement: str = "cells"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in dict(d).items() if k in known}
        d["betas"] = tuple(d.get("betas", (0.5, 0.999)))
        # runs written before these settings existed keep what they did then
        d.setdefault("fit_on", "held-back")
        if d.get("map") == "perceptual":
            d.setdefault("map_scales", [1])
        else:  # read by --map perceptual only; earlier versions stored (or lacked) it for every run
            d.pop("map_scales", None)
        d.setdefault("precision", "float32")
        return cls(**d)


TRAIN_PRECISIONS = ("float32", "bfloat16", "auto")


def train_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training ``precision`` on ``device`` (None: float32, no autocast).
    "auto": bfloat16 on CUDA GPUs that have it and on CPUs with AVX512-BF16/AMX, else float32."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    from .precision import default_precision

    return torch.bfloat16 if default_precision(device) == "bfloat16" else None


class ConfigError(UserError, ValueError):
    """A training setting that cannot work (named as its command-line option)."""


def check_config(cfg: TrainConfig, n_stages: int, patch: int) -> None:
    """Refuse settings that would train nothing or fail later; one line naming the option.

    Raises:
        ConfigError: epochs/max_steps per stage (count and >= 1), batch size, checkpoint interval,
            image size (>= the model's ``patch`` size), stride (1..patch), learning rate,
            holdback (in [0, 1)), far (in (0, 1)), normalize.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(len(cfg.epochs) == n_stages, f"--epochs: model {cfg.model} trains in {n_stages} stage(s); "
         f"give one value or {n_stages}, got {len(cfg.epochs)}")
    need(all(whole(e) and e >= 1 for e in cfg.epochs), f"--epochs must be whole numbers >= 1, got {cfg.epochs}")
    if cfg.max_steps is not None:
        need(len(cfg.max_steps) == n_stages, f"--max-steps: model {cfg.model} trains in {n_stages} stage(s); "
             f"give one value or {n_stages}, got {len(cfg.max_steps)}")
        need(all(whole(m) and m >= 1 for m in cfg.max_steps), f"--max-steps must be whole numbers >= 1, got {cfg.max_steps}")
    need(whole(cfg.batch_size) and cfg.batch_size >= 1, f"--batch-size must be a whole number >= 1, got {cfg.batch_size}")
    need(whole(cfg.checkpoint_every) and cfg.checkpoint_every >= 1,
         f"--checkpoint-every must be a whole number >= 1, got {cfg.checkpoint_every}")
    need(whole(cfg.image_size) and cfg.image_size >= patch,
         f"--image-size {cfg.image_size} is smaller than the {cfg.model} patch size {patch}; use at least {patch}")
    if cfg.stride is not None:
        need(whole(cfg.stride) and 1 <= cfg.stride <= patch,
             f"--stride must be a whole number from 1 to the patch size {patch}, got {cfg.stride}")
    need(isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a finite number > 0, got {cfg.lr}")
    # torch's generators take a seed of 64 bits (a larger one failed at the first draw, after
    # an --overwrite had cleared the earlier run)
    need(whole(cfg.seed) and 0 <= cfg.seed < 2**64, f"--seed must be a whole number from 0 to 2**64 - 1, got {cfg.seed}")
    need(0 <= cfg.holdback < 1, f"--holdback must be in [0, 1), got {cfg.holdback}")
    need(0 < cfg.far < 1, f"--far must be in (0, 1), got {cfg.far}")
    # 1/far, the held-back images the rate needs, overflows below it (after the training)
    need(cfg.far >= sys.float_info.min, f"--far must be at least {sys.float_info.min:.3g}, got {cfg.far}")
    need(cfg.normalize in NORMALIZATIONS, f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {cfg.normalize!r}")
    need(cfg.fit_on in FIT_SOURCES, f"--fit-on must be one of {', '.join(FIT_SOURCES)}, got {cfg.fit_on!r}")
    need(len(cfg.map_scales) >= 1 and all(whole(f) and f >= 1 for f in cfg.map_scales)
         and len(set(cfg.map_scales)) == len(cfg.map_scales),
         f"--map-scales must be distinct whole numbers >= 1, got {cfg.map_scales}")
    need(cfg.map == "perceptual" or list(cfg.map_scales) == TrainConfig.__dataclass_fields__["map_scales"].default_factory(),
         f"--map-scales {' '.join(str(f) for f in cfg.map_scales)} sets the pyramid of --map perceptual: add it")
    if cfg.map == "perceptual":
        need(cfg.image_size // max(cfg.map_scales) >= 32, f"--map-scales {max(cfg.map_scales)} leaves "
             f"{cfg.image_size // max(cfg.map_scales)} pixels at --image-size {cfg.image_size}; the perceptual map needs >= 32")
    need(cfg.patch_sampling in ("grid", "random"), f"--patch-sampling must be grid or random, got {cfg.patch_sampling!r}")
    need(cfg.lr_schedule in ("constant", "cosine"), f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    need(cfg.precision in TRAIN_PRECISIONS, f"--precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {cfg.precision!r}")
    need(isinstance(cfg.context, bool), f"--context is on or off, got {cfg.context!r}")
    if cfg.context:
        from .context import MIN_SIZE

        need(cfg.image_size >= MIN_SIZE, f"--context needs --image-size >= {MIN_SIZE}, got {cfg.image_size}")
    from .context import IMAGE_SCORES, PROFILE_CHOICES
    from .perceptual import PLACEMENTS

    need(cfg.context_profile in PROFILE_CHOICES,
         f"--context-profile must be one of {', '.join(PROFILE_CHOICES)}, got {cfg.context_profile!r}")
    need(cfg.context or cfg.context_profile == "none",
         f"--context-profile {cfg.context_profile} is part of the image context: add --context")
    need(isinstance(cfg.level_brightness, bool), f"--level-brightness is on or off, got {cfg.level_brightness!r}")
    need(cfg.image_score in IMAGE_SCORES, f"--image-score must be one of {', '.join(IMAGE_SCORES)}, got {cfg.image_score!r}")
    need(cfg.placement in PLACEMENTS, f"--placement must be one of {', '.join(PLACEMENTS)}, got {cfg.placement!r}")
    need(cfg.placement == "cells" or cfg.map == "perceptual" or cfg.context,
         f"--placement {cfg.placement} places the AlexNet cells of --map perceptual and --context: add one of them")
    need(cfg.context or cfg.image_score == "combined", f"--image-score {cfg.image_score} is part of the image context: add --context")
    need(not cfg.level_brightness or cfg.context or cfg.map == "perceptual",
         "--level-brightness levels the images the AlexNet trunk reads: it needs --map perceptual or --context")
    need(cfg.blend in ("none", "hann"), f"--blend must be none or hann, got {cfg.blend!r}")
    need(isinstance(cfg.smooth, (int, float)) and math.isfinite(cfg.smooth) and cfg.smooth >= 0,
         f"--smooth must be a finite number >= 0, got {cfg.smooth}")
    if cfg.infer_stride is not None:
        need(whole(cfg.infer_stride) and 1 <= cfg.infer_stride <= patch,
             f"--infer-stride must be a whole number from 1 to the patch size {patch}, got {cfg.infer_stride}")
    need(cfg.smooth <= cfg.image_size, f"--smooth {cfg.smooth} is wider than the image ({cfg.image_size} px); "
         "a blur that wide flattens the map")
    # the patch grids of training and inference must tile the image: checked here, not after training
    for option, stride in (("--stride", cfg.stride), ("--infer-stride", cfg.infer_stride)):
        try:
            grid_shape(cfg.image_size, patch, stride or patch)
        except ValueError as exc:
            given = f"{option} {stride}" if stride else f"{option} left at the patch size {patch}"
            raise ConfigError(f"--image-size {cfg.image_size} with {given}: {exc}") from None


def checked_model(cfg: TrainConfig, *, weights: bool = True) -> AnomalyModel:
    """A freshly built ``cfg.model`` once every setting of ``cfg`` has passed :func:`check_config`
    and (``weights``) the pretrained weights the run will need load (:func:`check_pretrained_weights`);
    raises :class:`ConfigError` otherwise. What ``train`` runs before it touches the output folder
    (``demo`` too)."""
    try:
        model = build_model(cfg.model, **cfg.model_kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model {cfg.model} with options {cfg.model_kwargs}: {exc}") from None
    check_config(cfg, len(model.stages), model.patch_size)
    try:  # (the command line offers every model's maps only; a TrainConfig may name any)
        model.check_map(cfg.map)
    except ValueError as exc:  # else found after the training, with its checkpoint left to resume into the same error
        raise ConfigError(f"--map: {exc}") from None
    if weights:
        check_pretrained_weights(cfg, model)
    return model


def check_pretrained_weights(cfg: TrainConfig, model: AnomalyModel) -> None:
    """Refuse, before any training, a run that will need the ImageNet AlexNet weights (the
    perceptual map, the image context, LPIPS in a training stage) when they cannot be loaded: each
    is built here as the end of the run builds it (the same search for the weights)."""
    from . import context, perceptual
    from .losses.lpips import WEIGHTS_NEEDED, load_lpips_heads
    from .models.awae.loss import default_lpips_factory

    for what, used, build in (
            ("--map perceptual", cfg.map == "perceptual", lambda: perceptual.PerceptualMap(cfg.image_size)),
            ("--context", cfg.context, lambda: context.ImageContext(
                cfg.image_size, profile="rows" if cfg.context_profile == "auto" else cfg.context_profile)),
            (f"{cfg.model}'s LPIPS loss", model.uses_lpips(),
             lambda: (default_lpips_factory(cfg.model_kwargs.get("lpips_weights")), load_lpips_heads()))):
        if used:
            try:
                build()
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                why = str(exc).removeprefix(f"{WEIGHTS_NEEDED}; ")  # said once
                # the LPIPS loss needs its linear heads too: the loader's message says which file is missing
                needs = "ImageNet AlexNet weights" if WEIGHTS_NEEDED in str(exc) else "pretrained weights"
                raise ConfigError(f"{what} needs {needs}: {why}") from None


def _generator(seed: int, *keys: int) -> torch.Generator:
    g = torch.Generator()
    s = seed
    for k in keys:
        s = (s * 1_000_003 + k + 1) % (2**63 - 1)
    g.manual_seed(s)
    return g


class PatchEpoch:
    """The patch order of one epoch: shuffled images, each image's patches in raster order."""

    def __init__(self, n_images: int, grid: tuple[int, int], generator: torch.Generator):
        self.order = torch.randperm(n_images, generator=generator)
        self.per_image = grid[0] * grid[1]
        self.grid = grid
        self.total = n_images * self.per_image

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image ids, grid rows, grid cols) of patches start..stop-1 of this epoch."""
        idx = torch.arange(start, stop)
        pos = idx % self.per_image
        return self.order[idx // self.per_image], pos // self.grid[1], pos % self.grid[1]


#: The share of a GPU's free memory the training images may take to stay there for the run.
RESIDENT_SHARE = 0.25


def images_fit_on_device(nbytes: int, free_bytes: int) -> bool:
    """Whether training images of ``nbytes`` stay on a GPU with ``free_bytes`` free (a quarter of
    it at most: activations of batches of thousands of patches need the rest)."""
    return nbytes <= RESIDENT_SHARE * free_bytes


def gather_patches(images: torch.Tensor, ids, rows, cols, patch: int, stride: int) -> torch.Tensor:
    """Patches [len(ids), C, patch, patch] of ``images`` [N, C, H, W] at grid (rows, cols), no copy per patch."""
    windows = images.unfold(2, patch, stride).unfold(3, patch, stride)  # [N, C, gh, gw, p, p]
    return windows[ids, :, rows, cols]


def train_layout(model: AnomalyModel, dtype: torch.dtype | None) -> AnomalyModel:
    """``model`` laid out as training runs it in ``dtype`` (:func:`train_dtype`): channels-last with
    a reduced-precision dtype, the matrix-product layers' weights kept contiguous; float32 stays
    in NCHW."""
    if dtype is None:
        return model
    return keep_matrix_weights_contiguous(model.to(memory_format=torch.channels_last))


def freeze_for_stage(model: AnomalyModel, stage: int) -> list[torch.nn.Parameter]:
    """Only ``model.trainable_parameters(stage)`` require gradients, the rest frozen (no step of
    training stage ``stage`` computes their gradient); returns those parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.trainable_parameters(stage)
    for p in params:
        p.requires_grad_(True)
    return params


def stage_adam(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam as training builds it: the fused kernel where every parameter allows it. It makes one
    pass over each parameter instead of a dozen elementwise ops (CMA-AE's 8.2 M parameters, 2
    threads, AMD EPYC: 49 -> 19 ms per step), the same update up to rounding; CPU and CUDA float
    parameters have it, anything else takes the default implementation."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=fused)


#: The errors of a write that more room would let through.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _kept_said(exc: OSError, out: Path, done: bool = False) -> OSError:
    """``exc`` of a run's write with what is kept and what to do next said in it."""
    fix = "make room" if exc.errno in _NO_ROOM else "fix that"
    if done:
        kept = f"the training is done and its {CHECKPOINT_FILE} kept: {fix}, then --resume writes the model file"
    elif (out / CHECKPOINT_FILE).is_file():
        kept = f"the last checkpoint is kept: {fix}, then --resume"
    else:
        kept = f"no checkpoint was saved yet: {fix}, then run the same command again"
    return OSError(exc.errno, f"{exc.strerror or exc} ({kept})", exc.filename)


def compute_setting(device: torch.device) -> dict[str, Any]:
    """What decides the order of a step's float sums besides the run's config: the device (the
    GPU's name; the CPU's model and the instructions torch's kernels use there), the intra-op CPU
    threads, the torch version and the fused ops' implementation (native, with its sources'
    digest, or the PyTorch reference). A resume with the same setting on a CPU retraces an
    uninterrupted run bit for bit (on a GPU, see the module's note); with another it trains the
    same way, rounded otherwise."""
    setting: dict[str, Any] = {"device": device.type, "threads": torch.get_num_threads(), "torch": str(torch.__version__)}
    if device.type == "cuda":
        setting["gpu"] = torch.cuda.get_device_name(device)
    else:  # another CPU generation takes other kernels (AVX2 against AVX512 and AMX): other roundings
        setting["cpu"] = cpu_model()
        setting["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        if isa:
            setting["onednn_max_cpu_isa"] = isa
    # the fused ops: the native kernels (of which sources) or the PyTorch reference sum otherwise
    from . import ops
    from .ops import _native

    setting["ops"] = ops.backend(device)
    if setting["ops"] != "reference":
        digest = (_native.build_info() or {}).get("source_digest")
        if digest:
            setting["ops_source"] = digest
    return setting


#: :func:`compute_setting` entries recorded since a later version: a checkpoint without them is not
#: said to differ for that
_RECORDED_LATER = ("ops", "ops_source")


def changed_setting(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The entries of :func:`compute_setting` that differ between a checkpoint's ``before`` and
    ``now``: those ``before`` records (a checkpoint of an earlier version records fewer), and,
    when it records as many kinds (the torch version), those only one of the two has (a oneDNN
    limit set for one of them)."""
    keys = [k for k in before if before[k] != now.get(k)]
    if "torch" in before:
        keys += [k for k in now if k not in before and (k not in _RECORDED_LATER or "ops" in before)]
    return keys


class _LineProgress:
    """tqdm's interface (update, set_postfix, close) for a stderr that is no terminal (a service's
    journal, a log file, CI): one plain line at most every ``interval`` seconds and at the end,
    where tqdm's bar, redrawn after a carriage return, ran into one line growing all training."""

    def __init__(self, total: int, initial: int, desc: str, interval: float = 60.0) -> None:
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self.postfix: dict[str, str] = {}
        self.last = time.monotonic()
        self.said: str | None = None  # the last line (close says the end once)

    def set_postfix(self, **values: str) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        line = f"{self.desc}: {self.n}/{self.total} steps" + "".join(f", {k} {v}" for k, v in self.postfix.items())
        if line != self.said:
            print(line, file=sys.stderr, flush=True)
            self.said = line


def _progress(total: int, initial: int, desc: str, shown: bool):
    """tqdm's bar on a terminal, :class:`_LineProgress` on any other stderr (or nothing)."""
    if shown and not (getattr(sys.stderr, "isatty", None) and sys.stderr.isatty()):
        return _LineProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, disable=not shown, desc=desc, unit="step")


class Trainer:
    """Runs the stages of one model over one set of defect-free images."""

    def __init__(self, cfg: TrainConfig, out: Path, images: torch.Tensor, *, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.cfg, self.out, self.images, self.progress, self.log = cfg, Path(out), images, progress, log
        self.device = resolve_device(cfg.device)
        self.stored = self._store(images)  # where the batches are cut from: the images, or their copy on the GPU
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, **cfg.model_kwargs).to(self.device)
        self.dtype = train_dtype(cfg.precision, self.device)
        self.model = train_layout(self.model, self.dtype)
        self.patch = self.model.patch_size
        self.stride = cfg.stride or self.patch
        self.grid = grid_shape(cfg.image_size, self.patch, self.stride)
        if len(cfg.epochs) != len(self.model.stages):
            raise ValueError(f"model {cfg.model} trains in {len(self.model.stages)} stage(s) "
                             f"({', '.join(self.model.stages)}); got epochs for {len(cfg.epochs)}")
        self.sources = None
        self.data_digest: str | None = None  # of the run's training images (set by train)
        self.sources_digest: str | None = None  # of its anomaly source photos, when it reads any (set by train)
        self.data_count: int | None = None
        self.data_files: list[list[str]] | None = None
        self.position = dict.fromkeys(POSITION_KEYS, 0)
        self.lock: RunLock | None = None  # the run folder's (set by train): checked before each file written
        # training time of earlier processes of this run (a resumed run adds its own to it)
        self.seconds_before, self.started = 0.0, time.perf_counter()
        self.optimizer = self._optimizer(0)

    # -- state ---------------------------------------------------------------------------
    def _optimizer(self, stage: int) -> torch.optim.Optimizer:
        return stage_adam(freeze_for_stage(self.model, stage), self.cfg.lr, self.cfg.betas)

    def state(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "model_name": self.cfg.model,
            "model_config": self.model.config(),
            "model_state": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},  # NCHW on disk
            "optimizer_state": self.optimizer.state_dict(),
            "position": dict(self.position),
            "train_config": self.cfg.to_json(),
            "patch_size": self.patch,
            "stride": self.stride,
            "image_size": self.cfg.image_size,
            "train_precision": "float32" if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "objective": self.model.objective(),  # what a resume checks the losses against
            "data_digest": self.data_digest,  # what a resume checks the training images against
            "sources_digest": self.sources_digest,  # and the anomaly source photos
            "data_count": self.data_count,
            "data_files": self.data_files,  # [name, key] of each: what a refused resume names
            "train_seconds": self.train_seconds(),
            "compute": compute_setting(self.device),
        }

    def weights(self) -> dict[str, Any]:
        """:meth:`state` without the optimiser's moments (twice the weights): a model file's state."""
        return {k: v for k, v in self.state().items() if k != "optimizer_state"}

    def train_seconds(self) -> float:
        """Seconds this run has trained, over every process of it (up to its last checkpoint for
        the processes that were interrupted)."""
        return self.seconds_before + (time.perf_counter() - self.started)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state. One that passes its digest check but does not fit
        this version's model or optimiser (a parameter renamed or resized since, another model's)
        is a one-line :class:`RunError` naming the file, as :func:`~defect_fast.runs.model_from_state`
        refuses such a model file."""
        try:
            self.model.load_state_dict(state["model_state"])
            self.position = dict(state["position"])
            self.seconds_before, self.started = float(state.get("train_seconds", 0.0)), time.perf_counter()
            # a run stopped after its last step (during the statistics, the calibration or the model
            # file's write) is at stage = the number of stages; its optimiser is the last stage's
            self.optimizer = self._optimizer(min(self.position["stage"], len(self.model.stages) - 1))
            self.optimizer.load_state_dict(state["optimizer_state"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            if isinstance(exc, RuntimeError) and type(exc) is not RuntimeError:
                raise  # torch.OutOfMemoryError, a CUDA error: the device's trouble, not the checkpoint's
            raise RunError(f"{self.out / CHECKPOINT_FILE}: does not load into this version's {self.cfg.model} "
                           f"({type(exc).__name__}: {one_line(str(exc))}); the run cannot be resumed, train a new "
                           "one") from None
        # Adam's fused kernels walk a parameter and its moments as flat arrays: the moments must
        # have the parameter's layout, also when the checkpoint was written with another one
        # (memory layouts of some layers changed between versions); copied, values unchanged
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p, {})
                for k, v in st.items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                        st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)

    def _check_lock(self) -> None:
        """A run folder whose lock file was removed by hand (or replaced) while this training held
        it may have a second training in it now: stop before writing over its files."""
        if self.lock is not None and not self.lock.still_held():
            then = ("continue with --resume" if (self.out / CHECKPOINT_FILE).is_file() else
                    "start the run again with --overwrite")
            raise RunError(f"{self.lock.lost_message()} (nothing written at step {self.position['global_step']}); when "
                           f"no other training uses the folder, {then}")

    def save_checkpoint(self) -> None:
        self._check_lock()
        # a second Ctrl-C while it is written waits for it (see _interrupt_at_step_boundaries)
        self.saving = True
        try:
            atomic_save(self.state(), self.out / CHECKPOINT_FILE)
        except OSError as exc:  # a full disk: what is kept, and what to do, said with it
            raise _kept_said(exc, self.out) from None
        finally:
            self.saving = False

    # -- data ----------------------------------------------------------------------------
    def _store(self, images: torch.Tensor) -> torch.Tensor:
        """The training images on the GPU when they fit (:func:`images_fit_on_device`), else as given."""
        if self.device.type != "cuda" or images.device == self.device:
            return images
        free, _total = torch.cuda.mem_get_info(self.device)
        mib = images.nbytes / 2**20
        if images_fit_on_device(images.nbytes, free):
            self.log(f"training images kept on {self.device} ({mib:.0f} MiB): batches are cut and synthesised there")
            return images.to(self.device)
        self.log(f"training images kept in host memory ({mib:.0f} MiB, more than {RESIDENT_SHARE:.0%} of the "
                 f"{free / 2**20:.0f} MiB free on {self.device}): each step copies its images there")
        return images

    def _take(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 images ``stored[index]`` on the training device."""
        return self.stored[index.to(self.stored.device, non_blocking=True)].to(self.device, non_blocking=True)

    def _synthesize(self, clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from .synthesis.sources import load_sources

        if self.sources is None:
            self.sources = load_sources(self.cfg.anomaly_source, size=self.cfg.image_size)
        if self.sources.device != clean.device:  # once: synthesis would move them on every step
            self.sources = self.sources.to(clean.device)
        out, _mask = self.model.synthesize(clean, self.sources, gen)
        return out

    def _positions(self, rows: torch.Tensor, cols: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Top-left pixel of each patch and the stride of the index grid they refer to."""
        if self.cfg.patch_sampling == "random":
            hi = self.cfg.image_size - self.patch + 1
            return torch.randint(0, hi, rows.shape, generator=gen), torch.randint(0, hi, cols.shape, generator=gen), 1
        return rows, cols, self.stride

    def _augment(self, xs: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        """The same random horizontal/vertical flips on every tensor of ``xs`` ([B,C,P,P] each)."""
        if not self.cfg.flips or xs[0].shape[0] == 0:
            return xs
        dev = xs[0].device
        fh = torch.rand(xs[0].shape[0], generator=gen).lt(0.5).view(-1, 1, 1, 1).to(dev, non_blocking=True)
        fv = torch.rand(xs[0].shape[0], generator=gen).lt(0.5).view(-1, 1, 1, 1).to(dev, non_blocking=True)
        out = []
        for x in xs:
            x = torch.where(fh, x.flip(-1), x)
            out.append(torch.where(fv, x.flip(-2), x))
        return out

    def _batch(self, stage: int, epoch_order: PatchEpoch, start: int, stop: int, gen: torch.Generator):
        ids, rows, cols = epoch_order.batch(start, stop)
        rows, cols, stride = self._positions(rows, cols, gen)
        if self.model.stages[stage] == "normal":
            at = self.stored.device  # cut where the images are (uint8), then moved: a quarter of the float bytes
            patches = gather_patches(self.stored, *(t.to(at, non_blocking=True) for t in (ids, rows, cols)), self.patch, stride)
            x = to_model_range(patches.to(self.device, non_blocking=True))
            x, = self._augment([x], gen)
            return x, x
        # Synthetic stage: anomalies are pasted on whole images, then cut into the same patches.
        uniq, inverse = torch.unique(ids, return_inverse=True)
        clean = to_model_range(self._take(uniq))
        dirty = self._synthesize(clean, gen)
        inverse, rows, cols = (t.to(self.device, non_blocking=True) for t in (inverse, rows, cols))
        x = gather_patches(dirty, inverse, rows, cols, self.patch, stride)
        y = gather_patches(clean, inverse, rows, cols, self.patch, stride)
        return tuple(self._augment([x, y], gen))

    def _lr_factor(self, done: int, total: int) -> float:
        """Learning-rate multiplier at step ``done`` of ``total`` in a stage."""
        if self.cfg.lr_schedule == "cosine" and total > 1:
            return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(done, total) / total))
        return 1.0

    # -- loop ----------------------------------------------------------------------------
    def _interrupt_at_step_boundaries(self) -> dict[int, Any]:
        """SIGINT and SIGTERM only ask the loop to stop: it stops after the step in hand, where the
        checkpoint is the state of whole steps (a stop inside a step would save batch-norm
        statistics or Adam moments of a step the resume then trains again). A second signal stops at
        once, keeping the last checkpoint; while a checkpoint is being written it waits for the write
        (a stop there lost the progress the first signal was saving, before the first checkpoint the
        whole run). Returns the handlers to put back (none off the main thread)."""
        self.stop_signal: int | None = None
        self.saving = False
        if threading.current_thread() is not threading.main_thread():
            return {}

        def ask(signum, _frame):
            if self.stop_signal is not None and self.saving:
                self.log(f"{signal.Signals(signum).name}: writing the checkpoint first, then stopping")
                return
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.log(f"{signal.Signals(signum).name}: stopping after the step in hand (again to stop at once)")

        # a signal the process was started ignoring stays ignored (a background job of a shell without job
        # control ignores SIGINT: it stopped in training, and not in the steps after it)
        return {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}

    def _stop_if_asked(self) -> None:
        if self.stop_signal is not None:
            self.save_checkpoint()
            raise TrainingStopped(f"interrupted at step {self.position['global_step']}; progress saved, continue with "
                                  f"--resume (run folder {self.out})", self.stop_signal)

    def run(self) -> AnomalyModel:
        cfg = self.cfg
        n = self.images.shape[0]
        per_epoch = n * self.grid[0] * self.grid[1]
        steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
        if cfg.batch_size > per_epoch and self.position["global_step"] == 0:
            self.log(f"--batch-size {cfg.batch_size}: an epoch holds {per_epoch} patches, so each step takes all of them")
        if (self.out / LOG_FILE).is_symlink():  # its lines went into the file it pointed at, outside the run (and
            # its trim, first, copied that file's lines into the run's log)
            raise RunError(f"{self.out / LOG_FILE}: a symbolic link where the run keeps its log; remove it (the run's "
                           "checkpoint is kept)")
        _trim_log(self.out / LOG_FILE, self.position["global_step"])  # steps a resume trains again are logged again
        log_file = open(self.out / LOG_FILE, "a", buffering=1)  # line-buffered: a crash keeps the log
        handlers = self._interrupt_at_step_boundaries()
        trained = False  # every stage ran: no error on its way when the log closes
        try:
            while self.position["stage"] < len(self.model.stages):
                stage = self.position["stage"]
                total_steps = stage_steps(cfg, stage, steps_per_epoch)
                done = self.position["epoch"] * steps_per_epoch + self.position["step"]
                bar = _progress(total_steps, min(done, total_steps),
                                f"stage {stage + 1}/{len(self.model.stages)} ({self.model.stages[stage]})", self.progress)
                self.model.train()
                while self.position["epoch"] < cfg.epochs[stage] and done < total_steps:
                    epoch = self.position["epoch"]
                    order = PatchEpoch(n, self.grid, _generator(cfg.seed, stage, epoch))
                    self.model.set_epoch_length(per_epoch, batch_size=cfg.batch_size)
                    self.model.begin_epoch(stage, epoch)
                    # Replaying the sigma schedule on resume: skip the patches already seen this epoch.
                    if self.position["step"]:
                        self.model.skip_patches(min(self.position["step"] * cfg.batch_size, per_epoch), cfg.batch_size)
                    while self.position["step"] < steps_per_epoch and done < total_steps:
                        step = self.position["step"]
                        t0 = time.perf_counter()
                        start, stop = step * cfg.batch_size, min((step + 1) * cfg.batch_size, per_epoch)
                        x, y = self._batch(stage, order, start, stop, _generator(cfg.seed, stage, epoch, step))
                        if self.dtype is not None:
                            x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
                        with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
                            out = self.model(x)
                            loss, parts = self.model.loss(out, y, stage)
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        for group in self.optimizer.param_groups:
                            group["lr"] = cfg.lr * self._lr_factor(done, total_steps)
                        self.optimizer.step()
                        # NB: the step's one host transfer, the loss and its parts for the log: on a GPU it waits
                        # for the step's kernels (backward and Adam in its time) where a check of the loss before
                        # backward, a float() of each part and a synchronize for the time made five waits a step
                        values = torch.stack([loss.detach().float()] + [torch.as_tensor(v, device=loss.device).float()
                                                                        for v in parts.values()]).tolist()
                        dt = time.perf_counter() - t0
                        if not math.isfinite(values[0]):
                            # nothing saved: the step spoilt the weights (and the batch-norm statistics) in memory only
                            saved = (f"{self.out / CHECKPOINT_FILE} keeps the state of an earlier step, from which a resume "
                                     "would run into the same step" if (self.out / CHECKPOINT_FILE).is_file()
                                     else "nothing was saved")
                            raise RunError(f"loss became {values[0]} at stage {stage + 1}, epoch {epoch + 1}, step {step + 1}; "
                                           f"{saved}: train a new run with a lower --lr (or other --set weights)")
                        self.position["step"] += 1
                        self.position["global_step"] += 1
                        done += 1
                        rec = {"stage": stage + 1, "epoch": epoch + 1, "step": self.position["global_step"],
                               "loss": values[0], **dict(zip(parts, values[1:])), "patches_per_s": (stop - start) / dt}
                        try:
                            log_file.write(json.dumps(rec) + "\n")
                        except OSError as exc:  # a full disk names no file
                            raise _kept_said(OSError(exc.errno, exc.strerror or str(exc), str(self.out / LOG_FILE)),
                                             self.out) from None
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", patches_s=f"{rec['patches_per_s']:.0f}")
                        bar.update(1)
                        if self.position["global_step"] % cfg.checkpoint_every == 0:
                            log_file.flush()
                            self.save_checkpoint()
                        if self.position["step"] < steps_per_epoch:  # else after the epoch's count moves on, below
                            self._stop_if_asked()
                    if self.position["step"] >= steps_per_epoch:
                        self.position["epoch"] += 1
                        self.position["step"] = 0
                    self._stop_if_asked()
                bar.close()
                # the next stage's optimiser first: every state saved from here on is the next stage's
                if stage + 1 < len(self.model.stages):
                    self.optimizer = self._optimizer(stage + 1)
                self.position.update(stage=stage + 1, epoch=0, step=0)
                # the stage's model (the checkpoint, written next, is what a resume continues from)
                self._check_lock()
                try:
                    atomic_save({**self.weights(), "position": dict(self.position)}, self.out / stage_file(stage + 1))
                except OSError as exc:
                    raise _kept_said(exc, self.out) from None
                self.save_checkpoint()
                self._stop_if_asked()
            trained = True
        except KeyboardInterrupt:  # a second signal, or one off the main thread: the last checkpoint stands
            signum = self.stop_signal if self.stop_signal is not None else signal.SIGINT
            if not (self.out / CHECKPOINT_FILE).is_file():
                raise TrainingStopped(f"interrupted before the first checkpoint: nothing was saved to resume from (run "
                                      f"folder {self.out})", signum) from None
            raise TrainingStopped(f"interrupted; the last checkpoint is kept, continue with --resume (run folder "
                                  f"{self.out})", signum) from None
        finally:
            try:
                log_file.close()  # flushes what is left: on a full disk, a failed line tried again
            except OSError as exc:
                if trained:  # the log's own failure, named, with what is kept
                    raise _kept_said(OSError(exc.errno, exc.strerror or str(exc), str(self.out / LOG_FILE)),
                                     self.out) from None
                # else the error on its way says what to do; that the log's last lines are lost (a
                # --resume does not log steps it does not train again) is said beside it
                with contextlib.suppress(Exception):
                    self.log(f"warning: {self.out / LOG_FILE}: its last lines could not be written "
                             f"({exc.strerror or exc})")
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        return self.model


def finish_run(model: AnomalyModel, cfg: TrainConfig, held_back_images: torch.Tensor,
               device: torch.device | str = "cpu", train_images: torch.Tensor | None = None,
               context_images: torch.Tensor | None = None, where: str | Path | None = None,
               images: str = "held-back images", trunk: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """What a finished run stores beside its weights, computed on the held-back images
    (``where`` names the run and ``images`` what those images are in the error for NaN or
    infinite maps).

    1. builds the :class:`~defect_fast.detect.Detector` of ``model`` (default map, tiles;
       :func:`defect_fast.evaluate.detector_for`);
    2. fits what the run's map needs (the perceptual map's statistics, ``--map perceptual``; the
       per-position normalisation, ``cfg.normalize == "position"``) on the training images
       (``cfg.fit_on == "train"``, when ``train_images`` are given) or on half of the held-back
       images (every other one, ``"held-back"``);
    3. with ``cfg.context``, fits the image context (:meth:`Detector.fit_context`) on
       ``context_images`` (default: ``train_images``, else the fitting images; it does not involve
       the model, so images the model was trained on serve), its combination with the run's map
       standardised on the calibration images;
    4. calibrates on the maps and scores of held-back images the statistics did not see (all of
       them, or the other half) (:func:`defect_fast.calibration.calibrate` at ``cfg.far``). Maps of
       the very images their statistics were fitted on are optimistic (a z-score is smallest in its
       own sample), so a threshold from them would raise far more false alarms than asked; with
       nothing to fit, every held-back image calibrates.

    Why training images can carry the statistics: per-position, per-channel variances need
    hundreds of images (a few dozen leave them noisy, and the noise shows up as false alarms), and
    the patch autoencoders reproduce the images they were trained on no better than unseen ones
    at the budgets used here (magnetic tile, CMA-AE 1+1 epochs: mean |x - recon| 0.102 +- 0.001
    on 540 training images, 0.107 +- 0.004 on 60 held-back ones;
    ``experiments/recon_error_split.py``). Where a model does memorise its
    training images, ``--fit-on held-back`` keeps the statistics on unseen images.

    Args:
        held_back_images: uint8 [N, 3, S, S] defect-free images the model was not trained on
            (N >= 1; N >= 4 when the statistics are fitted on them).
        train_images: uint8 [M, 3, S, S] the images the model was trained on (``fit_on == "train"``).
        context_images: uint8 [K, 3, S, S] defect-free images for the image context (K >= 10).
        trunk: AlexNet ``features.*`` weights for the perceptual map and the context (None: the
            file ``$DEFECT_FAST_ALEXNET_WEIGHTS`` names; ``audit`` gives the run's own).

    Returns:
        ``{"calibration": calibrate()'s dict (+ "pixel_q999", "source"), "normalization":
        {"mean": [S, S], "std": [S, S]} or None, "perceptual": its state or None, "context": its
        state or None, "detector": the stored inference settings}``.
    """
    from .calibration import calibrate, colour_scale
    from .diagnose import rank_correlation
    from .evaluate import check_finite, detector_for
    from .perceptual import brightness_level

    options = detector_options(cfg, model)
    det = detector_for(model, cfg.image_size, device, **options)
    image_level = options["map_kind"] in model.image_maps  # fitted below (the model's own map until then)
    perceptual = None
    fits = _fits_map_statistics(cfg, model)
    fit_images, calib_images = held_back_images, held_back_images
    # the calibration images' files, to name the one whose score is the threshold (train() fills
    # cfg.held_back in the order of held_back_images; callers without it get no names)
    calib_names = list(cfg.held_back) if len(cfg.held_back) == held_back_images.shape[0] else None
    on_train = fits and train_images is not None and _fits_on_train(cfg.fit_on, train_images.shape[0])
    if on_train:
        fit_images = train_images
    elif fits:
        if held_back_images.shape[0] < MIN_HELD_BACK_TO_FIT:
            raise RunError(f"--map {options['map_kind']} / --normalize {cfg.normalize} need at least 4 held-back images "
                           f"(half to fit, half to calibrate), got {held_back_images.shape[0]}; raise --holdback")
        fit_images, calib_images = held_back_images[0::2], held_back_images[1::2]
        calib_names = None if calib_names is None else calib_names[1::2]
    calib_images, calib_names = _without_blank_frames(calib_images, calib_names, where, images, need=2 if cfg.context else 1)
    # nor do the map statistics and the context measure a defect-free spread on them (one black frame
    # among the held-back half fitted on made the per-position spread 30 times wider)
    from .context import MIN_IMAGES as CONTEXT_MIN

    fit_images = _unblank(fit_images, 2)  # (the fits' least; with fewer left, as before: blank frames and all)
    context_images = None if context_images is None or not cfg.context else _unblank(context_images, CONTEXT_MIN)
    # one level for both trunks (so they still share their first layers): the training images'
    # mean brightness, or the fitting images' when there are none
    level = (brightness_level(True, train_images if train_images is not None else fit_images)
             if cfg.level_brightness else False)
    if image_level:
        det.fit_perceptual(fit_images, scales=tuple(cfg.map_scales), level_brightness=level, placement=cfg.placement,
                           trunk=trunk)
        perceptual = det.image_map.state()
    try:
        normalization = det.fit_normalization(fit_images) if cfg.normalize == "position" else None
    except RunError as exc:  # NaN or infinite maps: named with the run, as the check below names them
        raise type(exc)(f"{where}: {exc}" if where is not None else str(exc)) from None  # NonFiniteMaps stays one
    context = None
    if cfg.context:
        if context_images is None:
            context_images = train_images if train_images is not None else fit_images
        # the fit computes the calibration images' maps anyway: their predictions come with it
        _n, res = det._fit_context(context_images, calib_images, profile=cfg.context_profile,
                                   level_brightness=level, image_score=cfg.image_score, placement=cfg.placement,
                                   trunk=trunk)
        context = det.context.state()
    else:
        res = det.predict_batched(calib_images)
    check_finite(res, calib_names, where, det.precision, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few images is said in the note, printed by train()
        cal = calibrate(res["scores"], res["maps"], far=cfg.far, names=calib_names)
    # whether the defect-free scores follow the lighting (train() logs it: brightness_note)
    # per part: a float64 copy of every calibration image at once took 8 bytes a pixel
    brightness = torch.cat([c.double().mean(dim=(1, 2, 3)) for c in calib_images.split(16)])
    rho = rank_correlation(res["scores"].numpy(), brightness.numpy())
    cal["score_brightness_rank_correlation"] = rho if math.isfinite(rho) else None
    cal["pixel_q999"] = colour_scale(res["maps"])  # map colour scale of older readers
    cal["precision"] = det.precision  # what the scores were computed in (Detector.load warns of another)
    cal["source"] = ("held-back images (the map was fitted on the training images)" if on_train else
                     "held-back images (the half not used to fit the map)" if fits else "held-back images")
    cal["map_fitted_on"] = None if not fits else f"{fit_images.shape[0]} {'training' if on_train else 'held-back'} images"
    return {"calibration": cal, "normalization": normalization, "perceptual": perceptual, "context": context,
            "detector": detector_options(cfg, model)}


def _fits_map_statistics(cfg: TrainConfig, model: AnomalyModel) -> bool:
    """Whether :func:`finish_run` fits map statistics: those of an image-level map (the perceptual
    map) or the per-position normalisation."""
    return detector_options(cfg, model)["map_kind"] in model.image_maps or cfg.normalize == "position"


def fits_on_training_images(cfg: TrainConfig, model: AnomalyModel) -> bool:
    """Whether :func:`finish_run`, given the training images, fits anything on them besides
    ``model``'s weights: the map statistics with ``fit_on == "train"``, an image context, the
    brightness level of ``--level-brightness`` (``defect-fast audit``: else each fold's detector
    is the run's own)."""
    fits = _fits_map_statistics(cfg, model)
    return bool(cfg.context) or bool(cfg.level_brightness) or (fits and cfg.fit_on == "train")


def detector_options(cfg: TrainConfig, model: AnomalyModel) -> dict[str, Any]:
    """The inference settings a run stores for :meth:`Detector.load` (map, stride, blend, smoothing)."""
    return {"map_kind": cfg.map or model.default_map, "stride": cfg.infer_stride, "blend": cfg.blend,
            "smooth_sigma": float(cfg.smooth)}


def _unblank(images: torch.Tensor, at_least: int = 1) -> torch.Tensor:
    """``images`` but for blank frames, unless fewer than ``at_least`` would be left: then all of
    them, as before blank frames were left out (what a fit needs at least is not taken from it;
    the images thresholds are set on are checked by :func:`_without_blank_frames`)."""
    from .data.io import blank_images

    keep = ~blank_images(images)
    if bool(keep.all()) or int(keep.sum()) < at_least:  # the images themselves: a copy of every training image
        return images  # for nothing left out took their memory again
    return images[keep]


def _without_blank_frames(images: torch.Tensor, names: list[str] | None, where: str | Path | None,
                          what: str, need: int = 1) -> tuple[torch.Tensor, list[str] | None]:
    """``images`` (and ``names``) but for blank frames (one colour throughout: a failed exposure, a
    covered lens), which ``watch`` sets aside and never judges: a thresholds' image, a black frame's
    score set the image threshold 8 times higher than the parts' (said in a warning; fewer than
    ``need`` left: a RunError, which :func:`_check_fits` gives before the training)."""
    from .data.io import blank_images

    blank = blank_images(images)
    if not bool(blank.any()):
        return images, names
    prefix = f"{where}: " if where is not None else ""
    left = images.shape[0] - int(blank.sum())
    if left < need:
        raise RunError(f"{prefix}{int(blank.sum())} of the {images.shape[0]} {what} the thresholds are set on are blank "
                       f"frames, one colour throughout (a failed exposure, a covered lens?), which leaves {left}, fewer "
                       f"than the {need} needed; give more photographs of defect-free parts"
                       + (" (or raise --holdback)" if what.startswith("held-back") else ""))
    dropped = [names[i] for i in blank.nonzero().flatten().tolist()] if names is not None else []
    _warn(f"{prefix}{int(blank.sum())} of the {images.shape[0]} {what} the thresholds are set on are blank frames, one "
          "colour throughout (a camera fault, which watch sets aside and never judges), and are left out"
          + (f" ({', '.join(Path(n).name for n in dropped[:3])}{', ...' if len(dropped) > 3 else ''})" if dropped else ""))
    keep = ~blank
    return images[keep], None if names is None else [n for n, k in zip(names, keep.tolist()) if k]


#: Training images this many times smaller than ``--image-size`` (on their longer side) or more are
#: said to be enlarged for nothing.
UPSCALED = 2


def _warn(message: str) -> None:
    print(f"defect-fast: warning: {message}", file=sys.stderr)


def _split(cfg: TrainConfig, paths: list[Path]) -> tuple[list[int], list[int]]:
    """Indices (train, held back) of ``paths``: the stored list when resuming, else a fresh split."""
    from .calibration import holdback_count, split_holdback

    if cfg.held_back:
        held = set(cfg.held_back)
        missing = held - {str(p) for p in paths}
        if missing:
            raise RunError(f"{cfg.data}: held-back image(s) of this run are gone: {', '.join(sorted(missing)[:3])}")
        return [i for i, p in enumerate(paths) if str(p) not in held], [i for i, p in enumerate(paths) if str(p) in held]
    if cfg.holdback == 0:
        return list(range(len(paths))), []
    n_held = holdback_count(len(paths), cfg.holdback, HOLDBACK_MIN)
    if n_held > HOLDBACK_MIN and n_held >= len(paths):  # the share asked for, not the image count, is the problem
        raise ConfigError(f"--holdback {cfg.holdback:g} holds back {n_held} of the {len(paths)} images and leaves none "
                          "to train on; lower it")
    try:
        _train_p, held_p = split_holdback([str(p) for p in paths], cfg.holdback, min_count=HOLDBACK_MIN,
                                          seed=cfg.seed, min_train=1)
    except ValueError:
        _warn(f"{cfg.data}: only {len(paths)} image(s), too few to hold back {HOLDBACK_MIN} for thresholds; "
              "none held back (thresholds come from training images and are optimistic)")
        return list(range(len(paths))), []
    held = set(held_p)
    return [i for i, p in enumerate(paths) if str(p) not in held], [i for i, p in enumerate(paths) if str(p) in held]


#: Held-back images the map statistics need when they are fitted on them: half to fit, half to calibrate.
MIN_HELD_BACK_TO_FIT = 4


def _fits_on_train(fit_on: str, n_train: int) -> bool:
    """Whether :func:`finish_run` fits the map statistics on the training images (``--fit-on
    train`` and at least 2 of them), rather than on half of the held-back images."""
    return fit_on == "train" and n_train >= 2


def _warn_duplicates(keys: list[bytes], paths: list[Path], train_idx: list[int], held_idx: list[int]) -> None:
    """Warn when held-back images have identical copies (equal :func:`image_keys`) among the
    training images: the thresholds set on them would be optimistic."""
    trained = {keys[i] for i in train_idx}
    twins = [paths[i].name for i in held_idx if keys[i] in trained]
    if twins:
        _warn(f"{len(twins)} held-back image(s) have identical copies among the training images ({', '.join(twins[:3])}"
              f"{', ...' if len(twins) > 3 else ''}); the thresholds set on them will be optimistic: remove the copies")


def _check_objective(out: Path, state: dict[str, Any], now: dict[str, int], log: Callable[[str], None]) -> None:
    """Refuse to resume a run whose losses have changed definition since its checkpoint was
    written (its remaining steps would train towards another objective than its first ones).
    A checkpoint that records nothing predates the record: the resume goes on, with a warning
    for the losses whose definition changed before the record existed."""
    then = state.get("objective")
    if then is None:
        if now.keys() & ssim_objective().keys():
            log(f"warning: {out / CHECKPOINT_FILE} does not record which SSIM loss it trained with; a run "
                "started before the SSIM-family losses shifted their [-1, 1] inputs to [0, 2] now continues "
                "with the shifted loss (train a new run if this one is that old)")
        return
    changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
    if changed:
        said = ", ".join(f"{k} {then.get(k, 'none')} then, {now.get(k, 'none')} now" for k in changed)
        raise RunError(f"{out}: the run's losses changed definition since it started ({said}); --resume would "
                       "finish it towards another objective: train a new run, or finish this one with the "
                       "defect_fast version that started it")


def _check_fits(cfg: TrainConfig, model: AnomalyModel, images: torch.Tensor, keys: list[bytes], train_idx: list[int],
                held_idx: list[int], fit_on: str) -> None:
    """Refuse before the training what :func:`finish_run` would refuse after it: a brightness level
    of 0 (``--level-brightness`` on all-black training images) and map statistics or an image
    context fitted on copies of one image (identical maps: no spread to standardise by)."""
    from .data import DataError

    if cfg.level_brightness:
        from .perceptual import brightness_level

        try:
            brightness_level(True, images[train_idx] if train_idx else images[held_idx[0::2]])
        except DataError as exc:
            raise DataError(f"--level-brightness: {cfg.data}: {exc}") from None
    fitted = []
    if _fits_map_statistics(cfg, model):
        fitted.append(("map statistics", train_idx if _fits_on_train(fit_on, len(train_idx)) else held_idx[0::2]))
    if cfg.context:
        fitted.append(("image context", train_idx))
    for what, idx in fitted:
        if len(idx) >= 2 and len({keys[i] for i in idx}) == 1:
            raise DataError(f"{cfg.data}: the {what} would be fitted on {len(idx)} images that are all one image "
                            "(copies): there is no defect-free spread to measure; give different defect-free images")
    # the images the thresholds are set on, but for blank frames (finish_run leaves them out)
    from .data.io import blank_images

    halves = held_idx and _fits_map_statistics(cfg, model) and not _fits_on_train(fit_on, len(train_idx))
    calib = (held_idx[1::2] if halves else held_idx) or train_idx
    blank = blank_images(images[calib]) if calib else torch.zeros(0, dtype=torch.bool)
    need, left = (2 if cfg.context else 1), len(calib) - int(blank.sum())
    if calib and left < need:
        what = "held-back" if held_idx else "training"
        raise DataError(f"{cfg.data}: {int(blank.sum())} of the {len(calib)} {what} images the thresholds would be set "
                        f"on are blank frames, one colour throughout (a failed exposure, a covered lens?), which "
                        f"leaves {left}, fewer than the {need} needed; give more photographs of defect-free parts"
                        + (" or raise --holdback" if held_idx else ""))


def _trim_log(path: Path, last_step: int) -> None:
    """Drop the lines of the step log after ``last_step`` (logged after the checkpoint a resume
    starts from, so trained and logged again) and a torn last line; the file is left as it is when
    nothing is dropped."""
    if not path.is_file():
        return
    # bytes: a line cut in a multi-byte character, or other bytes a crash left, is dropped, not fatal
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            step = json.loads(line)["step"]  # a line that is not UTF-8: UnicodeDecodeError, a ValueError
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and step <= last_step and line.endswith(b"\n"):
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, b"".join(kept))


def where_now(names: list[str], paths: list[Path]) -> list[str]:
    """The files ``names`` (a run's held-back images, where it read them) among ``paths`` (its
    images where they are now, checked to be the same, names and pixels), by file name; a name
    not found is kept as it is."""
    by_name = {Path(p).name: str(p) for p in paths}
    return [by_name.get(Path(f).name, f) for f in names]


def images_digest(keys: list[bytes], paths: list[Path]) -> str:
    """SHA-256 of the training images as read: their names and :func:`image_keys`, in order."""
    h = hashlib.sha256()
    for p, key in zip(paths, keys):
        h.update(Path(p).name.encode("utf-8", "surrogateescape") + b"\0" + key)
    return "sha256:" + h.hexdigest()


def _changed_files(then: list | None, now: list[list[str]], shown: int = 3) -> str:
    """Which training images differ between ``then`` and ``now`` (lists of [name, key]) in words, at
    most ``shown`` names of each kind; "" when ``then`` is not known (a checkpoint from before it was
    recorded) or the lists differ only in order."""
    if not isinstance(then, list):
        return ""
    a = {str(n): str(k) for n, k in then}
    b = {str(n): str(k) for n, k in now}
    parts = []
    for kind, names in (("changed", [n for n in b if n in a and a[n] != b[n]]),
                        ("added", [n for n in b if n not in a]), ("removed", [n for n in a if n not in b])):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{kind}: {', '.join(sorted(names)[:shown])}{more}")
    return "; ".join(parts)


def sources_digest(sources: torch.Tensor | None) -> str | None:
    """SHA-256 of the anomaly source photos as read (None without any)."""
    if sources is None:
        return None
    return "sha256:" + hashlib.sha256(memoryview(sources.contiguous().view(torch.uint8).numpy())).hexdigest()


def _abs(path: str | None) -> str | None:
    return None if path is None else str(real_path(path, expand_user=True))


def _preload_sources(cfg: TrainConfig, stages: tuple[str, ...] | list[str]) -> torch.Tensor | None:
    """The anomaly source photos, read before anything is written (every bad file named)."""
    from .data import DataError
    from .synthesis.sources import load_sources

    if all(s == "normal" for s in stages) and cfg.anomaly_source is None:
        return None
    try:
        return load_sources(cfg.anomaly_source, size=cfg.image_size)
    except (OSError, ValueError) as exc:
        raise DataError(f"--anomaly-source: {exc}") from None


def stage_steps(cfg: TrainConfig, stage: int, steps_per_epoch: int) -> int:
    """The steps stage ``stage`` trains: its epochs, capped by ``cfg.max_steps`` when given."""
    total = cfg.epochs[stage] * steps_per_epoch
    return min(total, cfg.max_steps[stage]) if cfg.max_steps else total


def batch_norm_needs_two(model: AnomalyModel) -> bool:
    """Whether a batch of one patch cannot train ``model``: one of its batch normalisations sees a
    1x1 map (a linear layer's features), one value per channel, whose batch variance is undefined
    (the AW-SSIM AE at --set patch_size=32). Found by one forward pass of a patch in eval mode,
    which changes no statistic."""
    sizes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0][0, 0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, model.patch_size, model.patch_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return 1 in sizes


def _check_last_batch(cfg: TrainConfig, model: AnomalyModel, n_train: int,
                      position: dict[str, int] | None = None) -> None:
    """Refuse, before any training, a batch size that leaves a last batch of one patch in an epoch
    the run will train (the steps left after ``position`` on a resume, up to ``cfg.max_steps``)
    when the model cannot train on one (:func:`batch_norm_needs_two`): the run failed there, and
    every resume at the same step."""
    gh, gw = grid_shape(cfg.image_size, model.patch_size, cfg.stride or model.patch_size)
    per_epoch, b = n_train * gh * gw, cfg.batch_size
    every = min(b, per_epoch) == 1  # every batch is one patch
    if not every and per_epoch % b != 1:
        return
    spe = math.ceil(per_epoch / b)
    start = position["stage"] if position else 0
    reached = False
    for stage in range(start, len(cfg.epochs)):
        total = stage_steps(cfg, stage, spe)
        done = position["epoch"] * spe + position["step"] if position and stage == start else 0
        # the one-patch batch is the last step of each epoch (steps spe, 2 spe, ... of the stage)
        reached |= total > done if every else total // spe > done // spe
    if not reached or not batch_norm_needs_two(model):
        return
    why = f"{cfg.model} cannot train on one patch (its batch normalisation sees a 1x1 map)"
    if per_epoch == 1:
        raise ConfigError(f"{why}, and an epoch has one: add training images, or a larger --image-size")
    near = min((k for k in range(2, per_epoch + 1) if per_epoch % k != 1), key=lambda k: (abs(k - b), k))
    if position:
        raise ConfigError(f"this run cannot finish: at --batch-size {b} the {per_epoch} patches of an epoch leave a "
                          f"last batch of one patch, and {why}; train a new run with --batch-size {near}")
    raise ConfigError(f"--batch-size {b}: the {per_epoch} patches of an epoch leave a last batch of one patch, and "
                      f"{why}; use --batch-size {near}")


def _left_by_the_finish(out: Path, ckpt: Path) -> bool:
    """Whether ``ckpt`` is the checkpoint a finished run removes once its model file is in place
    (a stop between the two kept it for good, 86 MB beside the finished model): the model file
    and the checkpoint load, hold the same settings (the device aside), the same position, after
    the last step, and the same weights. Anything else (a model file put there by hand, another
    run's) is kept."""
    try:
        model, state = load_checkpoint(out / MODEL_FILE), load_checkpoint(ckpt, RESUME_KEYS)
        mine, theirs = TrainConfig.from_json(model["train_config"]), TrainConfig.from_json(state["train_config"])
    except (RunError, KeyError, TypeError, ValueError):
        return False
    done = isinstance(state["position"], dict) and state["position"].get("stage") == len(mine.epochs)
    weights, saved = model.get("model_state"), state["model_state"]
    return (done and model.get("position") == state["position"] and replace(mine, device="") == replace(theirs, device="")
            and isinstance(weights, dict) and isinstance(saved, dict) and weights.keys() == saved.keys()
            and all(torch.equal(weights[k], saved[k]) for k in weights))


def _check_same_run(out: Path, cfg: TrainConfig, ckpt: Path, given_data: str | None = None) -> None:
    """Refuse a checkpoint whose settings are not those of the run folder's ``config.json`` (the
    device aside, which a resume may change): another run's checkpoint copied in was resumed
    without a word, and the folder's config then described another training than its model's.
    Where the images are may differ when ``config.json`` names the folder given (``given_data``):
    a resume that read them elsewhere writes it there before its first checkpoint does (the
    images themselves are checked by their digest). A folder without a readable ``config.json``
    (removed, damaged) cannot be checked: it is written again from the checkpoint's settings,
    with a warning saying so."""
    try:
        theirs = TrainConfig.from_json(json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))).to_json()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        why = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({type(exc).__name__})"
        _warn(f"{out / CONFIG_FILE} is {why}: the checkpoint cannot be checked to be this folder's run; "
              f"{CONFIG_FILE} is written again from {ckpt.name}'s settings")
        atomic_write_json(out / CONFIG_FILE, cfg.to_json())
        return
    ours = json.loads(json.dumps(cfg.to_json()))  # as config.json holds it (a tuple is a list there)
    # the device a resume may change; "auto" precision, which a resume resolves (runs of earlier
    # versions wrote "auto" to config.json and the resolved precision to later checkpoints)
    free = {"device"} | ({"precision"} if "auto" in (ours.get("precision"), theirs.get("precision")) else set())
    if given_data and theirs.get("data") and real_path(given_data, expand_user=True) == real_path(theirs["data"]):
        free.add("data")  # a move the checkpoint does not record yet
    for d in (ours, theirs):  # the held-back images by name, wherever their folder is now
        d["held_back"] = [Path(f).name for f in d.get("held_back") or []]
    differ = sorted(k for k in set(ours) | set(theirs) if k not in free and ours.get(k) != theirs.get(k))
    if differ:
        scalar = lambda k: not isinstance(ours.get(k), (list, dict)) and not isinstance(theirs.get(k), (list, dict))  # noqa: E731
        differ.sort(key=lambda k: not scalar(k))  # settings with their values first, lists (held_back) by name
        shown = ", ".join(f"{k} {ours.get(k)!r:.40} vs {theirs.get(k)!r:.40}" if scalar(k) else f"other {k}"
                          for k in differ[:3])
        named = (f"; {CONFIG_FILE} names the run's images in {theirs.get('data')}: give that folder if this is the "
                 "run's checkpoint" if differ == ["data"] else "")
        raise RunError(f"{ckpt}: is not this folder's run: its settings differ from {out / CONFIG_FILE}'s ({shown}"
                       f"{', ...' if len(differ) > 3 else ''}); put the run's own checkpoint back, or train a new run"
                       f"{named}")


def _unknown_settings(stored: dict[str, Any]) -> str:
    """The settings of a stored config this version does not know ("a, b, ..."; up to five named),
    or "" when it knows them all: dropped, the run would go on without settings it started with."""
    unknown = sorted(set(stored) - {f.name for f in fields(TrainConfig)})
    return f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}"


def _start_again(out: Path, cfg: TrainConfig, device: str | None) -> tuple[TrainConfig, str]:
    """(the settings to train ``out``'s run again from its start with, what to say of it once the
    start's checks pass), for a ``--resume`` that finds no checkpoint: a run killed (kill -9, power
    loss) before its first one left its ``config.json`` and log only, and nothing is lost by
    starting it again; its options are not typed again. ``cfg.data`` (the images given, where
    they are now: nothing was trained on those it started with, so they are not compared) and
    ``device`` win over those stored. Any other folder without a checkpoint is refused, saying why."""
    if (out / MODEL_FILE).is_file():
        raise RunError(f"{out}: the run is finished ({MODEL_FILE} is written); nothing to resume")
    stages = sorted(p.name for p in out.glob("stage*.pt"))
    if stages:  # it had one: removed since (by hand?), the stages' models cannot resume
        raise RunError(f"{out}: nothing to resume: its {CHECKPOINT_FILE} is gone (it trained past "
                       f"{stages[-1]}); start the run again with the options it was started with "
                       f"({out / CONFIG_FILE}) and --overwrite instead of --resume")
    if OutputFolder.written_by(out) != "train":
        raise RunError(f"{out}: nothing to resume (no {CHECKPOINT_FILE})")
    if (out / LOCK_NAME).is_file():  # still training before its first checkpoint: in use by PID ...
        RunLock(out).acquire().release()
    try:
        stored = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        unknown = _unknown_settings(stored)
        saved = None if unknown else TrainConfig.from_json(stored)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        why = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({type(exc).__name__})"
        raise RunError(f"{out}: nothing to resume: the run stopped before its first {CHECKPOINT_FILE} and its "
                       f"{CONFIG_FILE} is {why}; start it again with the options it was started with and "
                       "--overwrite instead of --resume") from None
    if saved is None:
        raise RunError(f"{out / CONFIG_FILE}: its settings {unknown} "
                       "are unknown to this version of defect_fast (written by a later one?); start the run with the "
                       "version that wrote it")
    where = ""
    if cfg.data and real_path(cfg.data, expand_user=True) != real_path(saved.data):
        where = f", on the images in {cfg.data} (it started on {saved.data})"
        saved = replace(saved, data=cfg.data)
    if device is not None and device != saved.device:
        where += f", on --device {device} (it started on --device {saved.device})"
        saved = replace(saved, device=device)
    said = (f"{out}: the run stopped before its first {CHECKPOINT_FILE}, so nothing of its training was saved; it "
            f"starts again from the beginning with the settings it was started with ({CONFIG_FILE}){where}")
    return replace(saved, held_back=[]), said  # split again: the same images and seed hold back the same ones


def train(cfg: TrainConfig, out: Path | str, *, overwrite: bool = False, resume: bool = False,
          device: str | None = None, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train ``cfg.model`` on the defect-free images of ``cfg.data`` into run folder ``out``.

    A slice of the images (``cfg.holdback``) is held back and never trained on; at the end
    :func:`finish_run` sets the stored thresholds from it. The settings are checked
    (:func:`check_config`) and every image read before the run folder is made; the folder then
    carries a manifest and is locked while training (a second process gets "in use by PID").
    With ``resume``, continue from ``out/checkpoint.pt`` (the config saved there wins, but for
    ``device``: a run started on a GPU that is gone continues elsewhere, said in the log); a run
    killed before its first checkpoint starts again from the beginning with its ``config.json``.

    Returns the path of the finished model file (``out/model.pt``).
    Raises:
        ConfigError, DataError, RunError, OutputRefused, RunInUse: one-line user errors; nothing
        is left behind by a failed start.
    """
    from .data import load_train_images
    from .data.io import proportions

    out = Path(out)
    state = None
    said: list[str] = []  # what a resume says of itself, once the checks that could refuse it have passed
    started_again = False
    if resume and not (out / CHECKPOINT_FILE).is_file():  # started again from its settings, or refused
        (cfg, again), device = _start_again(out, cfg, device), None
        said.append(again)
        resume, overwrite, started_again = False, True, True
    if resume:
        ckpt = out / CHECKPOINT_FILE
        folder = OutputFolder.open(out, lock=True, what="--out", command="train")
    else:
        cfg = replace(cfg, data=_abs(cfg.data), anomaly_source=_abs(cfg.anomaly_source), held_back=[])
        folder = None
    moved_from: str | None = None  # the images' folder when the run started, where a resume reads them elsewhere
    try:
        if resume:
            if (out / MODEL_FILE).is_file():  # written last, once everything else is done (checked under the lock)
                try:
                    load_checkpoint(out / MODEL_FILE)
                except RunError as exc:  # damaged: the checkpoint beside it can finish the run again
                    raise RunError(f"{exc}; the run's {CHECKPOINT_FILE} is kept: move {MODEL_FILE} away, then --resume "
                                   "finishes the run again") from None
                left = ""
                if _left_by_the_finish(out, ckpt):  # the checkpoint's removal was cut off: done now
                    ckpt.unlink()
                    left = f"; its {CHECKPOINT_FILE}, left by a stop just after {MODEL_FILE} was written, is removed"
                raise RunError(f"{out}: the run is finished ({MODEL_FILE} is written); nothing to resume{left}")
            state = load_checkpoint(ckpt, RESUME_KEYS)  # a model.pt put there lacks the optimiser: named, not a KeyError
            pos = state["position"]
            if not (isinstance(pos, dict) and all(type(pos.get(k)) is int and pos[k] >= 0 for k in POSITION_KEYS)):
                raise RunError(f"{ckpt}: its position in the training ({one_line(repr(pos))[:120]}) is not this "
                               f"version's ({', '.join(POSITION_KEYS)}); the run cannot be resumed, train a new one")
            given_data = cfg.data
            unknown = _unknown_settings(state["train_config"])
            if unknown:
                raise RunError(f"{ckpt}: its settings {unknown} "
                               "are unknown to this version of defect_fast (written by a later one?); resume it with "
                               "the version that started it")
            cfg = TrainConfig.from_json(state["train_config"])
            _check_same_run(out, cfg, ckpt, given_data)
            if given_data and real_path(given_data, expand_user=True) != real_path(cfg.data):
                # the run goes on elsewhere (another machine, the data at another path): on the same images
                # only, names and pixels, as checked below against the checkpoint's digest
                moved_from = cfg.data
                cfg = replace(cfg, data=_abs(given_data))
            if device is not None and device != cfg.device:
                said.append(f"resuming on --device {device}; the run started with --device {cfg.device}")
                cfg = replace(cfg, device=device)
            pos = state["position"]
            if pos["stage"] >= len(cfg.epochs):  # stopped after training, in the steps that follow it
                said.append(f"resuming {out}: training is complete; running the steps after it (map statistics, "
                            "calibration)")
            else:
                said.append(f"resuming {out} at stage {pos['stage'] + 1}, epoch {pos['epoch'] + 1}, step {pos['step']}")
        probe = checked_model(cfg, weights=False)  # the weights once the data is known to be usable (below)
        if state is not None:
            _check_objective(out, state, probe.objective(), log)
        device = resolve_device(cfg.device)
        before, now = (state or {}).get("compute"), compute_setting(device)
        changed = changed_setting(before, now) if before else []
        if changed:
            said.append(f"resuming with {', '.join(f'{k} {now.get(k)}' for k in changed)} where the run trained with "
                        f"{', '.join(f'{k} {before.get(k)}' for k in changed)}: the steps that remain round their sums "
                        "in another order, so the run trains the same way but will not match an uninterrupted one bit "
                        "for bit")
        if cfg.precision == "auto":  # the run records what it does: a resume elsewhere keeps it
            cfg = replace(cfg, precision="float32" if train_dtype("auto", device) is None else "bfloat16")
        inputs = [cfg.data, cfg.anomaly_source]
        # what the run writes: a user's file at one of these names is refused, never replaced
        run_files = [CONFIG_FILE, CHECKPOINT_FILE, LOG_FILE, MODEL_FILE, *(stage_file(i + 1) for i in range(len(cfg.epochs)))]
        if not resume:
            ours = OutputFolder.written_by(out) == "train"
            # a run folder a live training works in says so first (not --resume's advice)
            if ours and (out / LOCK_NAME).is_file():
                RunLock(out).acquire().release()
            if not overwrite and (out / CHECKPOINT_FILE).is_file() and not (out / MODEL_FILE).exists() \
                    and ours:  # what --overwrite would say discards the progress
                raise RunError(f"{out}: holds an unfinished run (its {CHECKPOINT_FILE}); continue it with --resume, "
                               "or pass --overwrite to discard it and train anew")
            OutputFolder.check(out, overwrite=overwrite, inputs=inputs, command="train", names=run_files)
        sizes: list = []
        images, paths = load_train_images(cfg.data, cfg.image_size, sizes=sizes)
        keys = image_keys(images)
        data_digest = images_digest(keys, paths)
        data_files = [[Path(p).name, k.hex()] for p, k in zip(paths, keys)]
        if state is not None and state.get("data_digest", data_digest) != data_digest:
            then, now = state.get("data_count"), len(paths)
            what = _changed_files(state.get("data_files"), data_files) or \
                f"{then} then, {now} now{'' if then != now else ', other content'}"
            if moved_from is not None:
                raise RunError(f"{out} trains on {moved_from}; --resume continues it on those images, and {cfg.data} "
                               f"holds others ({what}): give the folder of the run's images")
            raise RunError(f"{cfg.data}: the training images changed since the run started ({what}); --resume "
                           "continues only on the images it started with: restore them, or train a new run")
        if moved_from is not None:
            said.insert(0, f"{out} trained on the images in {moved_from}; it goes on with the same images (names and "
                           f"pixels) in {cfg.data}")
            cfg = replace(cfg, held_back=where_now(cfg.held_back, paths))
        train_idx, held_idx = _split(cfg, paths)
        if not resume:
            log(f"{len(paths)} images in {cfg.data}: {len(train_idx)} to train on, {len(held_idx)} held back for the thresholds")
            longest = max((max(w, h) for w, h in sizes), default=0)
            if 0 < longest and UPSCALED * longest <= cfg.image_size:  # (the default 512 is the papers')
                _warn(f"{cfg.data}: its images are {longest} px or less on their longer side, enlarged {cfg.image_size / longest:.1f} "
                      f"times or more to --image-size {cfg.image_size}: that adds no detail, and every image costs "
                      f"{(cfg.image_size / longest) ** 2:.0f} times the pixels to train on and inspect; a --image-size "
                      f"near {longest} keeps their own")
            if len(train_idx) < len(held_idx):  # at least 4 are held back: a handful of images leaves the model few
                advice = ("lower --holdback" if len(held_idx) > HOLDBACK_MIN else
                          "add defect-free images (or --holdback 0 to train on all of them, with optimistic "
                          "thresholds set on training images)")
                _warn(f"{cfg.data}: only {len(train_idx)} of the {len(paths)} images are left to train on, with "
                      f"{len(held_idx)} held back for the thresholds; {advice}")
            _warn_duplicates(keys, paths, train_idx, held_idx)
        need = 2 if cfg.fit_on == "held-back" else 1  # to fit on and to calibrate on
        if cfg.normalize != "none" and len(held_idx) < need:
            raise ConfigError(f"--normalize {cfg.normalize} --fit-on {cfg.fit_on} needs at least {need} held-back "
                              f"image(s), got {len(held_idx)} (raise --holdback or add images)")
        # what finish_run fits the perceptual map's statistics on, checked before the training (with
        # nothing held back it fits them on the training images, below)
        fit_on = cfg.fit_on if held_idx else "train"
        if not resume and cfg.map == "perceptual" and fit_on != cfg.fit_on:
            log(f"--fit-on {cfg.fit_on}: no image is held back, so the perceptual map's statistics are fitted on the "
                "training images")
        if cfg.map == "perceptual" and not _fits_on_train(fit_on, len(train_idx)) \
                and len(held_idx) < MIN_HELD_BACK_TO_FIT:
            if held_idx:
                raise ConfigError(f"--map perceptual fits its statistics on held-back images: {len(held_idx)} are too "
                                  f"few ({MIN_HELD_BACK_TO_FIT}, half to fit and half to calibrate needed; add "
                                  "images or raise --holdback)")
            raise ConfigError(f"--map perceptual fits its statistics on training images: {len(train_idx)} are too "
                              "few (2 needed; add images)")
        cfg.held_back = [str(paths[i]) for i in held_idx]
        _check_fits(cfg, probe, images, keys, train_idx, held_idx, fit_on)
        if cfg.context:
            from .context import MIN_IMAGES

            if len(train_idx) < MIN_IMAGES:
                raise ConfigError(f"--context needs at least {MIN_IMAGES} training images to fit on, got {len(train_idx)} "
                                  f"({len(paths)} images, {len(held_idx)} of them held back for the thresholds); add "
                                  "defect-free images, or train without it (--no-context)")
            if cfg.context_profile == "auto":  # decided on the images the context is fitted on, before training
                from .context import profile_across_streaks

                try:
                    _profile, basis = profile_across_streaks(images[train_idx])
                except ValueError as exc:
                    raise ConfigError(f"--context-profile auto: {cfg.data}: {exc}") from None
                if not resume:
                    log(f"context profile: {basis}")
        _check_last_batch(cfg, probe, len(train_idx), state["position"] if state is not None else None)
        sources = _preload_sources(cfg, probe.stages)
        source_digest = sources_digest(sources)
        if state is not None and state.get("sources_digest", source_digest) != source_digest:
            # the rest of the run would cut its anomalies from other photos than its first steps did
            raise RunError(f"{cfg.anomaly_source or 'the built-in source photos'}: the anomaly source photos changed "
                           "since the run started; --resume continues only with the photos it started with: restore "
                           "them, or train a new run")
        check_pretrained_weights(cfg, probe)  # now, not after the training that needs them
        del probe
        if not resume:
            def still_unstarted() -> None:  # under the lock, before its files go: finished or resumed meanwhile?
                if (out / MODEL_FILE).is_file() or (out / CHECKPOINT_FILE).is_file():
                    raise RunError(f"{out}: another process finished or resumed the run while this one read its "
                                   f"images ({MODEL_FILE if (out / MODEL_FILE).is_file() else CHECKPOINT_FILE} is "
                                   "there now); nothing is started again")

            folder = OutputFolder.create(out, overwrite=overwrite, inputs=inputs, lock=True, command="train",
                                         names=run_files, before_clear=still_unstarted if started_again else None)
            folder.reserve(run_files[1:])
            folder.write_json(CONFIG_FILE, cfg.to_json())
        if moved_from is not None:  # the folder's settings, then its checkpoint, name where its images are now,
            # once every check has passed (a refused resume leaves them naming where the run was)
            folder.write_json(CONFIG_FILE, cfg.to_json())
            atomic_save({**state, "train_config": cfg.to_json()}, out / CHECKPOINT_FILE)
        for line in said:  # once the checks (and the start again's folder) that could refuse the resume have passed
            log(line)
    except BaseException:
        if folder is not None:
            # a start cut short after its folder was made (a full disk): nothing is left behind, but the
            # settings of a run started again by --resume, which the same command reads again
            if not resume and not started_again:
                with contextlib.suppress(OSError):
                    folder.discard()
            folder.release()
        raise
    try:
        train_images = images[train_idx]
        held_images = images[held_idx]
        del images  # the two parts are copies: the whole set beside them doubled the images' memory for the run
        trainer = Trainer(cfg, out, train_images, progress=progress, log=log)
        trainer.lock = folder.lock
        trainer.data_digest, trainer.data_count, trainer.data_files = data_digest, len(paths), data_files
        trainer.sources_digest = source_digest
        if sources is not None:
            trainer.sources = sources
        if state is not None:
            trainer.restore(state)
        with cudnn_benchmark(trainer.device.type == "cuda"):  # fixed batch shapes: cuDNN's search pays once per shape
            try:
                model = trainer.run()
            except TrainingStopped as exc:
                if started_again and not (out / CHECKPOINT_FILE).is_file():  # its settings are kept for it
                    raise TrainingStopped(f"interrupted before the first checkpoint; --resume starts the run again "
                                          f"from the beginning (run folder {out})", exc.signum) from None
                raise
        elapsed = trainer.train_seconds()  # every process of the run, not only this one
        finish_started = time.perf_counter()
        try:
            if held_images.shape[0]:
                finished = finish_run(model, cfg, held_images, trainer.device, train_images=train_images,
                                      context_images=train_images, where=out)
            else:
                # Nothing held back: thresholds from training images, optimistic, and said so.
                # (the map statistics from every training image, as --fit-on train fits them)
                finished = finish_run(model, replace(cfg, normalize="none", fit_on="train"),
                                      _unblank(train_images)[: cfg.calibration_images], trainer.device, train_images=train_images,
                                      context_images=train_images, where=out, images="training images")
        except NonFiniteMaps as exc:  # the weights trained are not usable: --resume would end here again
            raise NonFiniteMaps(f"{exc}: the training diverged; train a new run with a lower --lr (this run's "
                                "checkpoint holds the diverged weights)") from None
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, through the command line) in the steps after training
            raise TrainingStopped(f"interrupted in the map statistics and calibration after training; the trained "
                                  f"weights are kept, continue with --resume (run folder {out})") from None
        try:  # the model file, from the statistics and calibration: a stop on the way keeps the checkpoint
            if not held_images.shape[0]:
                finished["calibration"]["source"] = "training images"
                finished["calibration"].update(sufficient=False, far_expected=None, far_upper95=None)
                finished["calibration"]["note"] = ("no held-back images (--holdback 0 or too few images): threshold from "
                                                   f"{finished['calibration']['n_images']} training images, optimistic "
                                                   "(they were trained on); not a calibrated false-alarm rate")
            cal = finished["calibration"]
            finish_seconds = time.perf_counter() - finish_started
            # the model file is what inspection loads: the optimiser's moments (twice the weights) go with
            # the checkpoint, which a finished run no longer resumes from (removed once model.pt is in place)
            final = {**trainer.weights(), "calibration": cal, "held_back": list(cfg.held_back), "train_seconds": elapsed,
                     "finish_seconds": finish_seconds,
                     # the training images' width:height range: inspected images far outside it are said
                     "trained_proportions": proportions(sizes),
                     # which images the run has seen, by their pixels as read (defect-fast calibrate refuses them)
                     "image_keys": {"trained": [keys[i].hex() for i in train_idx],
                                    "held_back": [keys[i].hex() for i in held_idx]}}
            if finished["normalization"] is not None:
                final["normalization"] = finished["normalization"]
            if finished["perceptual"] is not None:
                final["perceptual"] = finished["perceptual"]
            if finished["context"] is not None:
                final["context"] = finished["context"]
            final["detector"] = finished["detector"]
            trainer._check_lock()
            atomic_save(final, out / MODEL_FILE)
        except KeyboardInterrupt:
            if not (out / MODEL_FILE).is_file():  # came before the file was begun: the checkpoint stays
                raise TrainingStopped(f"interrupted before {out / MODEL_FILE} was written; the trained weights are "
                                      f"kept, continue with --resume (run folder {out})") from None
            # came while it was written, held until it was: the run is complete
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)
            raise TrainingStopped(f"interrupted as the run ended: {out / MODEL_FILE} is written whole, the run is "
                                  "complete") from None
        except OSError as exc:  # a full disk: the training is not lost
            raise _kept_said(exc, out, done=True) from None
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
        if not cal.get("sufficient", True):
            _warn(cal["note"])
        log(f"trained {cfg.model} in {elapsed:.1f} s, then {finish_seconds:.1f} s for the map statistics and "
            f"calibration; image threshold {cal['image_threshold']:.4g} from {cal['n_images']} {cal['source']}; "
            f"model saved to {out / MODEL_FILE}")
        if cal.get("highest_scores"):
            log(f"the image threshold is the score of {cal['threshold_image']}; the highest held-back scores: "
                + scores_named(cal["highest_scores"])
                + "; another false-alarm rate needs no retraining: --far RATE on predict, watch, report, "
                "evaluate and export (evaluate lists what each gives on a labelled test set)")
        if not cal.get("sufficient", True) and cal.get("n_needed") and cfg.held_back:
            log(f"{count_text(cal['n_needed'] - cal['n_images'])} more defect-free images the run has not seen would let "
                f"'defect-fast calibrate {out} IMAGES --with-held-back --out NEW_RUN' set the threshold for far "
                f"{cfg.far:g} without training again")
        note = brightness_note(cal.get("score_brightness_rank_correlation"), cal["n_images"], cfg.level_brightness,
                               cfg.context or cfg.map == "perceptual")
        if note and cfg.holdback > 0 and cfg.held_back:
            log(note)
    except BaseException:
        # a failed start leaves nothing behind (a run started again by --resume its settings, which
        # the same command reads again); a finished run (its model file written, its checkpoint
        # removed) stays whatever comes after, a Ctrl-C during the closing lines too
        unstarted = not (out / CHECKPOINT_FILE).exists() and not (out / MODEL_FILE).exists()
        if unstarted and not (resume or started_again):
            folder.discard()
        elif unstarted and started_again:
            for i in range(len(cfg.epochs)):  # this start's stage files (a full disk at the first checkpoint):
                with contextlib.suppress(OSError):  # left, a --resume took the run for one past them
                    (out / stage_file(i + 1)).unlink(missing_ok=True)
        raise
    finally:
        folder.release()
    return out / MODEL_FILE
