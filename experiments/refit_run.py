"""Recompute what a finished run stores beside its weights (map statistics, thresholds) with the
current :func:`defect_fast.train.finish_run`, on the run's own held-back images; the weights are
not touched, and the perceptual map and context run the AlexNet trunk the run carries (one it
never had, a context added here, reads $DEFECT_FAST_ALEXNET_WEIGHTS). For runs trained before a
change to finish_run.

    python3 experiments/refit_run.py RUN [--fit-on train|held-back] [--map-scales F ...] [--context | --no-context]
        [--context-profile none|rows|columns|auto] [--level-brightness | --no-level-brightness]
        [--image-score combined|context] [--placement cells|centres]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_train_images  # noqa: E402
from defect_fast.runs import MODEL_FILE, atomic_save, load_model_state, model_from_state, stored_trunk  # noqa: E402
from defect_fast.train import TrainConfig, finish_run  # noqa: E402
from results_file import run_script  # noqa: E402


def main(run: str, fit_on: str | None = None, map_scales: list[int] | None = None, context: bool | None = None,
         context_profile: str | None = None, level_brightness: bool | None = None, image_score: str | None = None,
         placement: str | None = None) -> int:
    path = Path(run) / MODEL_FILE
    state = load_model_state(path)
    cfg = TrainConfig.from_json(state["train_config"])
    if fit_on is not None:
        cfg.fit_on = fit_on
    if map_scales is not None:
        cfg.map_scales = list(map_scales)
    if context is not None:
        cfg.context = context
    if context_profile is not None:
        cfg.context_profile = context_profile
    if level_brightness is not None:
        cfg.level_brightness = level_brightness
    if image_score is not None:
        cfg.image_score = image_score
    if placement is not None:
        cfg.placement = placement
    state["train_config"] = cfg.to_json()
    images, paths = load_train_images(cfg.data, cfg.image_size)
    held = set(state["held_back"])
    idx = [i for i, p in enumerate(paths) if str(p) in held]
    if len(idx) != len(held):
        raise SystemExit(f"{run}: {len(held) - len(idx)} held-back image(s) are missing from {cfg.data}")
    train_idx = [i for i, p in enumerate(paths) if str(p) not in held]
    cfg.held_back = [str(paths[i]) for i in idx]  # in the order of their images (names in the calibration)
    # the run's own trunk, as audit runs it; a context the run never had needs more layers than a
    # map's trunk has: those come from $DEFECT_FAST_ALEXNET_WEIGHTS (all of them, for both)
    trunk = stored_trunk(state)
    if cfg.context and not state.get("context"):
        trunk = None
    finished = finish_run(model_from_state(state), cfg, images[idx], "cpu", train_images=images[train_idx],
                          context_images=images[train_idx], trunk=trunk)
    for key in ("normalization", "perceptual", "context"):
        state.pop(key, None)
        if finished[key] is not None:
            state[key] = finished[key]
    state["calibration"], state["detector"] = finished["calibration"], finished["detector"]
    state.pop("tensor_digest", None)
    atomic_save(state, path)
    print(f"{path}: image threshold {state['calibration']['image_threshold']:.4g} from "
          f"{state['calibration']['n_images']} held-back images")
    return 0


def _cli(argv) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--fit-on", choices=("train", "held-back"), default=None,
                    help="images the map statistics are fitted on (default: the run's setting)")
    ap.add_argument("--map-scales", type=int, nargs="+", default=None,
                    help="the perceptual map's pyramid (default: the run's setting)")
    ap.add_argument("--context", action=argparse.BooleanOptionalAction, default=None,
                    help="the image context in maps and scores (default: the run's setting)")
    ap.add_argument("--context-profile", choices=("none", "rows", "columns", "auto"), default=None,
                    help="the context's band profile (default: the run's setting)")
    ap.add_argument("--level-brightness", action=argparse.BooleanOptionalAction, default=None,
                    help="level the images' brightness before the AlexNet trunk (default: the run's setting)")
    ap.add_argument("--image-score", choices=("combined", "context"), default=None,
                    help="with the context, the image score (default: the run's setting)")
    ap.add_argument("--placement", choices=("cells", "centres"), default=None,
                    help="where the map and the context put the trunk's cells (default: the run's setting)")
    args = ap.parse_args(argv)
    return main(args.run, args.fit_on, args.map_scales, args.context, args.context_profile, args.level_brightness,
                args.image_score, args.placement)


if __name__ == "__main__":
    run_script(_cli)
