"""Multi-stage patch training (Algorithm 1 of CMA-AE, the two stages of the AW-SSIM AE).

An epoch visits every patch of every training image once: images are shuffled, and the patches
of each image follow in raster order (the order the AW-SSIM sigma schedule counts). All
randomness is drawn from generators seeded by (seed, stage, epoch, step), so an interrupted run
resumed from its last checkpoint continues exactly where it stopped.

The run folder layout is described in :mod:`defect_fast.runs`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .data.dataset import to_model_range
from .data.patches import grid_shape
from .models import AnomalyModel, build_model
from .runs import (CHECKPOINT_FILE, CHECKPOINT_VERSION, CONFIG_FILE, LOG_FILE, MODEL_FILE, RunError,  # noqa: F401
                   atomic_save, load_checkpoint, model_from_state, prepare_run_folder, resolve_device, stage_file)

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
    calibration_images: int = 16
    # Where training patches come from: "grid" (the fixed inference tiling, the papers') or
    # "random" (any position, so no pixel is always at a patch edge: removes seam artefacts).
    patch_sampling: str = "grid"
    flips: bool = False  # random horizontal and vertical flips of training patches
    lr_schedule: str = "constant"  # "constant" (the papers') or "cosine" (to 1 % of lr at each stage's end)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.5, 0.999)))
        return cls(**d)


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


def gather_patches(images: torch.Tensor, ids, rows, cols, patch: int, stride: int) -> torch.Tensor:
    """Patches [len(ids), C, patch, patch] of ``images`` [N, C, H, W] at grid (rows, cols), no copy per patch."""
    windows = images.unfold(2, patch, stride).unfold(3, patch, stride)  # [N, C, gh, gw, p, p]
    return windows[ids, :, rows, cols]


class Trainer:
    """Runs the stages of one model over one set of defect-free images."""

    def __init__(self, cfg: TrainConfig, out: Path, images: torch.Tensor, *, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.cfg, self.out, self.images, self.progress, self.log = cfg, Path(out), images, progress, log
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, **cfg.model_kwargs).to(self.device)
        self.patch = self.model.patch_size
        self.stride = cfg.stride or self.patch
        self.grid = grid_shape(cfg.image_size, self.patch, self.stride)
        if len(cfg.epochs) != len(self.model.stages):
            raise ValueError(f"model {cfg.model} trains in {len(self.model.stages)} stage(s) "
                             f"({', '.join(self.model.stages)}); got epochs for {len(cfg.epochs)}")
        if cfg.patch_sampling not in ("grid", "random"):
            raise ValueError(f"patch_sampling must be 'grid' or 'random', got {cfg.patch_sampling!r}")
        if cfg.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
        self.sources = None
        self.position = {"stage": 0, "epoch": 0, "step": 0, "global_step": 0}
        self.optimizer = self._optimizer(0)

    # -- state ---------------------------------------------------------------------------
    def _optimizer(self, stage: int) -> torch.optim.Optimizer:
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = self.model.trainable_parameters(stage)
        for p in params:
            p.requires_grad_(True)
        return torch.optim.Adam(params, lr=self.cfg.lr, betas=tuple(self.cfg.betas))

    def state(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "model_name": self.cfg.model,
            "model_config": self.model.config(),
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "position": dict(self.position),
            "train_config": self.cfg.to_json(),
            "patch_size": self.patch,
            "stride": self.stride,
            "image_size": self.cfg.image_size,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model_state"])
        self.position = dict(state["position"])
        self.optimizer = self._optimizer(self.position["stage"])
        self.optimizer.load_state_dict(state["optimizer_state"])

    def save_checkpoint(self) -> None:
        atomic_save(self.state(), self.out / CHECKPOINT_FILE)

    # -- data ----------------------------------------------------------------------------
    def _synthesize(self, clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from .synthesis.sources import load_sources

        if self.sources is None:
            self.sources = load_sources(self.cfg.anomaly_source, size=self.cfg.image_size)
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
        fh = torch.rand(xs[0].shape[0], generator=gen).lt(0.5).view(-1, 1, 1, 1)
        fv = torch.rand(xs[0].shape[0], generator=gen).lt(0.5).view(-1, 1, 1, 1)
        out = []
        for x in xs:
            x = torch.where(fh, x.flip(-1), x)
            out.append(torch.where(fv, x.flip(-2), x))
        return out

    def _batch(self, stage: int, epoch_order: PatchEpoch, start: int, stop: int, gen: torch.Generator):
        ids, rows, cols = epoch_order.batch(start, stop)
        rows, cols, stride = self._positions(rows, cols, gen)
        if self.model.stages[stage] == "normal":
            x = to_model_range(gather_patches(self.images, ids, rows, cols, self.patch, stride))
            x, = self._augment([x], gen)
            return x, x
        # Synthetic stage: anomalies are pasted on whole images, then cut into the same patches.
        uniq, inverse = torch.unique(ids, return_inverse=True)
        clean = to_model_range(self.images[uniq])
        dirty = self._synthesize(clean, gen)
        x = gather_patches(dirty, inverse, rows, cols, self.patch, stride)
        y = gather_patches(clean, inverse, rows, cols, self.patch, stride)
        return tuple(self._augment([x, y], gen))

    def _lr_factor(self, done: int, total: int) -> float:
        """Learning-rate multiplier at step ``done`` of ``total`` in a stage."""
        if self.cfg.lr_schedule == "cosine" and total > 1:
            return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(done, total) / total))
        return 1.0

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> AnomalyModel:
        cfg = self.cfg
        n = self.images.shape[0]
        per_epoch = n * self.grid[0] * self.grid[1]
        steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
        log_file = open(self.out / LOG_FILE, "a", buffering=1)  # line-buffered: a crash keeps the log
        try:
            while self.position["stage"] < len(self.model.stages):
                stage = self.position["stage"]
                cap = cfg.max_steps[stage] if cfg.max_steps else None
                total_steps = cfg.epochs[stage] * steps_per_epoch if cap is None else min(cap, cfg.epochs[stage] * steps_per_epoch)
                done = self.position["epoch"] * steps_per_epoch + self.position["step"]
                bar = tqdm(total=total_steps, initial=min(done, total_steps), disable=not self.progress,
                           desc=f"stage {stage + 1}/{len(self.model.stages)} ({self.model.stages[stage]})", unit="step")
                self.model.train()
                while self.position["epoch"] < cfg.epochs[stage] and done < total_steps:
                    epoch = self.position["epoch"]
                    order = PatchEpoch(n, self.grid, _generator(cfg.seed, stage, epoch))
                    self.model.set_epoch_length(per_epoch)
                    self.model.begin_epoch(stage, epoch)
                    # Replaying the sigma schedule on resume: skip the patches already seen this epoch.
                    if self.position["step"]:
                        self.model.skip_patches(min(self.position["step"] * cfg.batch_size, per_epoch))
                    while self.position["step"] < steps_per_epoch and done < total_steps:
                        step = self.position["step"]
                        t0 = time.perf_counter()
                        start, stop = step * cfg.batch_size, min((step + 1) * cfg.batch_size, per_epoch)
                        x, y = self._batch(stage, order, start, stop, _generator(cfg.seed, stage, epoch, step))
                        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                        out = self.model(x)
                        loss, parts = self.model.loss(out, y, stage)
                        if not torch.isfinite(loss):
                            self.save_checkpoint()
                            raise RunError(f"loss became {float(loss)} at stage {stage + 1}, epoch {epoch + 1}, step {step + 1}; "
                                           f"last good state saved in {self.out / CHECKPOINT_FILE}")
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        for group in self.optimizer.param_groups:
                            group["lr"] = cfg.lr * self._lr_factor(done, total_steps)
                        self.optimizer.step()
                        dt = time.perf_counter() - t0
                        self.position["step"] += 1
                        self.position["global_step"] += 1
                        done += 1
                        rec = {"stage": stage + 1, "epoch": epoch + 1, "step": self.position["global_step"],
                               "loss": float(loss.detach()), **parts, "patches_per_s": (stop - start) / dt}
                        log_file.write(json.dumps(rec) + "\n")
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", patches_s=f"{rec['patches_per_s']:.0f}")
                        bar.update(1)
                        if self.position["global_step"] % cfg.checkpoint_every == 0:
                            log_file.flush()
                            self.save_checkpoint()
                    if self.position["step"] >= steps_per_epoch:
                        self.position["epoch"] += 1
                        self.position["step"] = 0
                bar.close()
                self.position.update(stage=stage + 1, epoch=0, step=0)
                atomic_save({**self.state(), "position": dict(self.position)}, self.out / stage_file(stage + 1))
                if self.position["stage"] < len(self.model.stages):
                    self.optimizer = self._optimizer(self.position["stage"])
                self.save_checkpoint()
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise RunError(f"interrupted; progress saved, continue with --resume (run folder {self.out})") from None
        finally:
            log_file.close()
        return self.model


def train(cfg: TrainConfig, out: Path | str, *, overwrite: bool = False, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train ``cfg.model`` on the defect-free images of ``cfg.data`` into run folder ``out``.

    With ``resume``, continue from ``out/checkpoint.pt`` (the config saved there wins).
    Returns the path of the finished model file (``out/model.pt``).
    """
    from .data import load_train_images
    from .evaluate import calibrate

    out = Path(out)
    state = None
    if resume:
        ckpt = out / CHECKPOINT_FILE
        if not ckpt.exists():
            raise RunError(f"{out}: nothing to resume (no checkpoint.pt)")
        state = load_checkpoint(ckpt)
        cfg = TrainConfig.from_json(state["train_config"])
        log(f"resuming {out} at stage {state['position']['stage'] + 1}, epoch {state['position']['epoch'] + 1}, "
            f"step {state['position']['step']}")
    else:
        prepare_run_folder(out, overwrite)
        (out / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2))
    images, _paths = load_train_images(cfg.data, cfg.image_size)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out, images, progress=progress, log=log)
    if state is not None:
        trainer.restore(state)
    model = trainer.run()
    elapsed = time.perf_counter() - t0
    # Calibrate on a few training images: the map values of defect-free surface set the scale
    # that predict uses for thresholds and colour maps.
    calib = calibrate(model, cfg.image_size, images[: cfg.calibration_images], device=trainer.device)
    final = {**trainer.state(), "calibration": calib, "train_seconds": elapsed}
    atomic_save(final, out / MODEL_FILE)
    log(f"trained {cfg.model} in {elapsed:.1f} s; model saved to {out / MODEL_FILE}")
    return out / MODEL_FILE
