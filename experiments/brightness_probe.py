"""Probe: how much of a defect-free image's score is its brightness?

    python3 experiments/brightness_probe.py RUN [RUN ...] [--data DATA] [--out-dir DIR]   (about 1 min a run)

A run's image score (with ``--context``) is the sum of two terms: the local term (the map's top
values, standardised on the calibration images) and the context score (the whole image's AlexNet
texture statistics against a Gaussian of defect-free ones). For each run, on images that carry no
label beyond "defect-free":

- the run's 60 held-back images (never trained on; they set its thresholds), and
- the ``test/good`` images,

this writes the Spearman rank correlation of each term, and of the score, with the image's mean
brightness (all pixels and channels of the image as read, 0..255). A score that ranks defect-free
images by their lighting ranks a brightly lit good tile above a dark defective one: on magnetic
tile the v6 runs' held-back scores rank-correlated +0.67 with brightness, the context score +0.68.
It needs no defect label, so it can tell what to change without the test images' verdict (the
v7 rows of ``experiments/magnetic_tile_v2.sh`` are that verdict).

Writes ``DIR/<run name>.json`` (default DIR ``experiments/results/brightness``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_test_set, load_train_images  # noqa: E402
from defect_fast.detect import Detector, top_mean  # noqa: E402
from defect_fast.diagnose import rank_correlation  # noqa: E402
from defect_fast.runs import MODEL_FILE, load_model_state  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from results_file import run_script, write_text  # noqa: E402


def score_terms(det: Detector, images: torch.Tensor, batch: int = 16) -> dict[str, np.ndarray]:
    """uint8 images [N,3,H,W] -> {"score", "local", "context"} [N]: the Detector's image score and
    its two terms (local: the combined score with a zero context score; context: the rest)."""
    ctx = det.context
    out: dict[str, list] = {"score": [], "local": [], "context": []}
    with torch.inference_mode():
        for c in images.split(batch):
            if ctx is None:
                scores = det(c)[1]
                local, context = scores, torch.zeros_like(scores)
            else:  # the Detector's pipeline, its two score terms kept apart
                x = det._to_model_input(c)
                raw, feats = det._maps_and_context(x, ctx)
                _maps, scored = det._finish_maps(raw, *ctx.map_parts(feats, det.image_size))
                local = (top_mean(scored, det.top_k) - ctx.score_mean) / ctx.score_std
                context = ctx.score(feats)
                scores = local + context  # ctx.combine_scores
            out["score"].append(scores)
            out["local"].append(local)
            out["context"].append(context)
    return {k: torch.cat(v).float().numpy() for k, v in out.items()}


def correlations(det: Detector, images: torch.Tensor) -> dict:
    """The rank correlations of :func:`score_terms` with the images' mean brightness."""
    bright = images.double().mean(dim=(1, 2, 3)).numpy()
    terms = score_terms(det, images)
    return {"images": int(images.shape[0]), "mean_brightness": round(float(bright.mean()), 2),
            "rank_correlation": {k: round(rank_correlation(v, bright), 4) for k, v in terms.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--data", default=None, help="dataset root (default: the run's training data)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "experiments" / "results" / "brightness")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        state = load_model_state(Path(run) / MODEL_FILE)
        data = str(Path(args.data or state["train_config"]["data"]).resolve())  # runs store absolute paths
        det = Detector.load(run, device="cpu")
        images, paths = load_train_images(data, det.image_size)
        held = set(state["held_back"])
        found = [i for i, q in enumerate(paths) if str(q) in held]
        if len(found) != len(held):
            raise SystemExit(f"{run}: {len(held) - len(found)} of its {len(held)} held-back images are not in {data}")
        held_images = images[found]
        test = load_test_set(data, det.image_size)
        res = {"run": Path(run).name, "data": str(data),
               "level_brightness": {"perceptual": getattr(det.image_map, "brightness", None),
                                    "context": det.context.brightness if det.context is not None else None},
               "held_back": correlations(det, held_images),
               "test_good": correlations(det, test.images[test.labels == 0]),
               "command": "python3 experiments/brightness_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        out = args.out_dir / f"{Path(run).name}.json"
        out = write_text(out, dump_json_strict(res))
        rc = lambda part: ", ".join(f"{k} {v:+.2f}" for k, v in res[part]["rank_correlation"].items())  # noqa: E731
        print(f"{res['run']}: held-back ({res['held_back']['images']}) {rc('held_back')}; "
              f"test/good ({res['test_good']['images']}) {rc('test_good')} -> {out}")
    return 0


if __name__ == "__main__":
    run_script(main)
