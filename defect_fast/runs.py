"""Run folders: layout, atomic saves, loading checkpoints and models, and the checks on them.

Run folder layout (written by :func:`defect_fast.train.train`):
    config.json       what was asked for (model, data, schedule)
    checkpoint.pt     latest state for --resume (model, optimiser, position), written atomically;
                      removed once model.pt is written (a finished run resumes no more)
    stage1.pt ...     the model at the end of each stage (without the optimiser)
    model.pt          the finished model (with calibration statistics), read by evaluate/predict/export
    log.jsonl         one line per logged step
    .defect_fast-manifest.json   the files above, as written by defect-fast (what --overwrite may remove)
    .defect_fast.lock            held by the process training in the folder (see safety.RunLock)

Every ``.pt`` file carries a SHA-256 digest of its tensors and settings
(:func:`defect_fast.safety.attach_digest`), checked on load: a damaged, foreign or older file is a
one-line error naming it, never a silent load or a KeyError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .models import AnomalyModel, build_model
from .safety import (DigestError, OutputFolder, RunInUse, RunLock, Stopped, UserError, check_device, load_file_with_digest, one_line,
                     save_with_digest)

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
LOG_FILE = "log.jsonl"
CHECKPOINT_VERSION = 2  # 2: files carry a tensor digest
#: Keys every checkpoint and model file holds (a file without them is not one of ours).
STATE_KEYS = ("model_name", "model_config", "model_state", "image_size")
#: What a training checkpoint holds beyond a model file's (a finished model.pt lacks the optimiser)
RESUME_KEYS = STATE_KEYS + ("optimizer_state", "position", "train_config")
#: A checkpoint's "position": where in the training it was written (whole steps done).
POSITION_KEYS = ("stage", "epoch", "step", "global_step")


class RunError(UserError, RuntimeError):
    """A run folder cannot be used as asked (exists, incompatible, incomplete, damaged)."""


class TrainingStopped(Stopped, RunError):
    """A training stopped by SIGINT or SIGTERM (:class:`~defect_fast.safety.Stopped`), its
    progress saved where there was any: the message says how to continue."""


class NonFiniteMaps(RunError):
    """A model gives NaN or infinite maps or scores (:func:`defect_fast.evaluate.check_finite`)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; a name this torch cannot use is a
    :class:`~defect_fast.safety.DeviceError` saying why (see :func:`defect_fast.safety.check_device`)."""
    if isinstance(device, torch.device) and device.type != "cuda":
        return device
    return check_device(str(device))  # a torch.device("cuda") on a torch without CUDA: said, not torch's AssertionError


def stage_file(stage: int) -> str:
    """File name of the model at the end of ``stage`` (1-based)."""
    return f"stage{stage}.pt"


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save ``obj`` with its tensor digest to a temporary file beside ``path``, fsync, rename."""
    save_with_digest(obj, path)


def load_checkpoint(path: Path, required_keys: tuple[str, ...] = STATE_KEYS) -> dict[str, Any]:
    """Load a checkpoint or model file (weights_only) and verify its tensor digest.

    Raises:
        RunError: missing, unreadable, foreign (lacks ``required_keys``), without a digest (older
            or foreign file), damaged (digest mismatch) or of a later file format (its ``version``
            above :data:`CHECKPOINT_VERSION`); one line naming the file.
    """
    return _load_checkpoint(path, required_keys)[0]


def _load_checkpoint(path: Path, required_keys: tuple[str, ...] = STATE_KEYS) -> tuple[dict[str, Any], str]:
    """:func:`load_checkpoint`, and the SHA-256 (hex) of the bytes it loaded."""
    def format_first(obj: Any) -> None:  # before the keys and the digest, which a later format may change
        version = obj.get("version", CHECKPOINT_VERSION) if isinstance(obj, dict) else CHECKPOINT_VERSION
        if isinstance(version, bool) or not isinstance(version, int):
            raise RunError(f"{path}: not a defect_fast file of a known format (its version is {version!r})")
        if version > CHECKPOINT_VERSION:
            raise RunError(f"{path}: written in file format {version} by a later defect_fast; this one reads "
                           f"format {CHECKPOINT_VERSION} and earlier (update defect_fast to load it)")

    try:
        return load_file_with_digest(path, required_keys=required_keys, check_first=format_first)
    except DigestError as exc:
        message = str(exc).replace("not a readable defect_fast file", "not a readable defect_fast checkpoint")
        raise RunError(message) from None


def model_from_state(state: dict[str, Any], path: Path | str = "model file") -> AnomalyModel:
    """The model saved in a checkpoint/model dict (weights loaded, mode unchanged); RunError naming
    ``path`` when the stored settings or weights do not fit the model they name."""
    try:
        model = build_model(state["model_name"], **state["model_config"])
        model.load_state_dict(state["model_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise RunError(f"{path}: the stored model does not load ({type(exc).__name__}: {one_line(str(exc))})") from None
    return model


def stored_trunk(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The AlexNet trunk a model dict carries (its image context's, else its perceptual map's;
    the context's has more layers), as :meth:`~defect_fast.detect.Detector.fit_perceptual` and
    ``fit_context`` take it (``trunk``): a refit runs the run's own trunk, with no weights file.
    None when it has neither."""
    from .context import ImageContext
    from .perceptual import PerceptualMap

    for key, cls in (("context", ImageContext), ("perceptual", PerceptualMap)):
        if state.get(key):
            module = cls.from_state(state[key])
            return module.trunk_weights(len(module.convs))
    return None


def model_file(run: Path | str) -> Path:
    """``RUN/model.pt`` for a run folder, or the file itself; RunError when a folder has none."""
    run = Path(run)
    if not run.is_dir():
        return run
    path = run / MODEL_FILE
    if not path.exists():
        if run.suffix == ".pt":  # a folder named like a model file: "model.pt: no model.pt" said nothing
            raise RunError(f"{run}: is a folder, not a model file (nor a run folder: no {MODEL_FILE} inside)")
        try:  # a training (or calibrate --out) writing the folder now: its model.pt comes at its end
            if OutputFolder.written_by(run) in ("train", "calibrate"):  # (another command's folder never gets one)
                RunLock(run).check_free()
        except RunInUse as exc:
            who = f"PID {exc.pid}" if exc.pid is not None else "another process"
            raise RunError(f"{run}: no {MODEL_FILE} yet: {who} is writing this folder (a training, or a calibrate "
                           "--out); wait for it to finish") from None
        hint = " (training did not finish; resume the training first)" if (run / CHECKPOINT_FILE).exists() else ""
        if not hint:  # a folder that holds runs (a demo's, runs/): the ones inside are named
            try:
                inside = sorted(e.name for e in run.iterdir() if (e / MODEL_FILE).is_file())
            except OSError:
                inside = []
            if inside:
                hint = f" (runs inside it: {', '.join(str(run / n) for n in inside[:3])}{', ...' if len(inside) > 3 else ''})"
        raise RunError(f"{run}: no {MODEL_FILE}{hint}")
    return path


def load_model_state(run: Path | str) -> dict[str, Any]:
    """The finished-model dict of a run folder or model file, checked to be one: a training
    checkpoint (weights from the middle of a stage, with the optimiser's state) is refused, so that
    it never reaches a line as a model (its stage files, the models at the end of each stage, are
    models)."""
    return load_model_file(run)[0]


def load_model_file(run: Path | str) -> tuple[dict[str, Any], str]:
    """:func:`load_model_state`, and the SHA-256 (hex) of the file's bytes it was loaded from (read
    once: a file replaced meanwhile does not give another version's digest)."""
    path = model_file(run)
    state, sha = _load_checkpoint(path)
    pos = state.get("position") if isinstance(state.get("position"), dict) else {}
    # a finished model (it has a calibration) or the end of a stage (epoch 0, step 0) is a model whatever
    # else it carries: earlier versions kept the optimiser's moments in model.pt and stageN.pt too
    if "optimizer_state" in state and "calibration" not in state and (pos.get("epoch") or pos.get("step")):
        where = (f" (stage {pos['stage'] + 1}, step {pos['global_step']})"
                 if isinstance(pos.get("stage"), int) and isinstance(pos.get("global_step"), int) else "")
        raise RunError(f"{path}: a training checkpoint{where}, not a finished model; finish its run with "
                       "'defect-fast train DATA --out RUN --resume' and use RUN/model.pt")
    return state, sha


__all__ = ["RunError", "NonFiniteMaps", "resolve_device", "atomic_save", "load_checkpoint", "model_from_state", "model_file",
           "load_model_state", "load_model_file", "stage_file", "stored_trunk", "CONFIG_FILE", "CHECKPOINT_FILE", "MODEL_FILE",
           "LOG_FILE", "CHECKPOINT_VERSION", "RESUME_KEYS", "STATE_KEYS"]
