"""Run folders: layout, atomic saves, loading checkpoints and models, and the checks on them.

Run folder layout (written by :func:`defect_fast.train.train`):
    config.json       what was asked for (model, data, schedule)
    checkpoint.pt     latest state for --resume (model, optimiser, position), written atomically
    stage1.pt ...     the model at the end of each stage
    model.pt          the finished model (with calibration statistics), read by evaluate/predict/export
    log.jsonl         one line per logged step
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .models import AnomalyModel, build_model

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
LOG_FILE = "log.jsonl"
CHECKPOINT_VERSION = 1


class RunError(RuntimeError):
    """A run folder cannot be used as asked (exists, incompatible, incomplete)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; anything else as ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def stage_file(stage: int) -> str:
    """File name of the model at the end of ``stage`` (1-based)."""
    return f"stage{stage}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint or model file (weights_only) with a clear error on damage."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except Exception as exc:  # truncated or foreign file
        raise RunError(f"{path}: not a readable defect_fast checkpoint ({type(exc).__name__}: {exc})") from None


def model_from_state(state: dict[str, Any]) -> AnomalyModel:
    """The model saved in a checkpoint/model dict (weights loaded, mode unchanged)."""
    model = build_model(state["model_name"], **state["model_config"])
    model.load_state_dict(state["model_state"])
    return model


def model_file(run: Path | str) -> Path:
    """``RUN/model.pt`` for a run folder, or the file itself; RunError when a folder has none."""
    run = Path(run)
    if not run.is_dir():
        return run
    path = run / MODEL_FILE
    if not path.exists():
        hint = " (training did not finish: continue it with --resume)" if (run / CHECKPOINT_FILE).exists() else ""
        raise RunError(f"{run}: no {MODEL_FILE}{hint}")
    return path


def load_model_state(run: Path | str) -> dict[str, Any]:
    """The finished-model dict of a run folder or model file, checked to be one."""
    path = model_file(run)
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model_name" not in state or "image_size" not in state:
        raise RunError(f"{path}: not a defect_fast model file")
    return state


def prepare_run_folder(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty existing folder unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"{out}: folder exists and is not empty; pass --overwrite to replace it or --resume to continue it")
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


__all__ = ["RunError", "resolve_device", "atomic_save", "load_checkpoint", "model_from_state", "model_file",
           "load_model_state", "prepare_run_folder", "stage_file", "CONFIG_FILE", "CHECKPOINT_FILE", "MODEL_FILE",
           "LOG_FILE", "CHECKPOINT_VERSION"]
