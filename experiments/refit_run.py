"""Recompute what a finished run stores beside its weights (map statistics, thresholds) with the
current :func:`defect_fast.train.finish_run`, on the run's own held-back images; the weights are
not touched. For runs trained before a change to finish_run.

    python3 experiments/refit_run.py RUN
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_train_images  # noqa: E402
from defect_fast.runs import MODEL_FILE, atomic_save, load_model_state, model_from_state  # noqa: E402
from defect_fast.train import TrainConfig, finish_run  # noqa: E402


def main(run: str) -> int:
    path = Path(run) / MODEL_FILE
    state = load_model_state(path)
    cfg = TrainConfig.from_json(state["train_config"])
    images, paths = load_train_images(cfg.data, cfg.image_size)
    held = set(state["held_back"])
    idx = [i for i, p in enumerate(paths) if str(p) in held]
    if len(idx) != len(held):
        raise SystemExit(f"{run}: {len(held) - len(idx)} held-back image(s) are missing from {cfg.data}")
    finished = finish_run(model_from_state(state), cfg, images[idx], "cpu")
    for key in ("normalization", "perceptual"):
        state.pop(key, None)
        if finished[key] is not None:
            state[key] = finished[key]
    state["calibration"], state["detector"] = finished["calibration"], finished["detector"]
    state.pop("tensor_digest", None)
    atomic_save(state, path)
    print(f"{path}: image threshold {state['calibration']['image_threshold']:.4g} from "
          f"{state['calibration']['n_images']} held-back images")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
