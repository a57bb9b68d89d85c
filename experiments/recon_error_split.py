"""Does a run reproduce the images it was trained on better than the ones it held back?

Mean |x - recon| (on [-1, 1], over pixels and channels) per image, with the run's own Detector
(its stored stride and blending), for the training images and the held-back images of RUN; prints
mean +- standard error of each group and writes them as JSON. This is the measurement behind
``--fit-on train``: where the two agree, the training images can carry the map's statistics.

    python3 experiments/recon_error_split.py RUN [--out FILE]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_train_images  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.runs import MODEL_FILE, load_model_state  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from defect_fast.train import TrainConfig  # noqa: E402
from results_file import run_script, write_text  # noqa: E402


def errors(det: Detector, images: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for c in images.split(16):
            x = det._to_model_input(c)
            out.append((x - det._stitched_recon(x)).abs().mean(dim=(1, 2, 3)))
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    state = load_model_state(args.run / MODEL_FILE)
    cfg = TrainConfig.from_json(state["train_config"])
    images, paths = load_train_images(cfg.data, cfg.image_size)
    held = set(state["held_back"])
    det = Detector.load(args.run, device="cpu", map_kind=None)
    res = {"run": str(args.run)}
    for name, idx in (("train", [i for i, p in enumerate(paths) if str(p) not in held]),
                      ("held_back", [i for i, p in enumerate(paths) if str(p) in held])):
        e = errors(det, images[idx]).double()
        res[name] = {"n": len(idx), "mean_abs_error": float(e.mean()), "standard_error": float(e.std() / math.sqrt(len(idx)))}
        print(f"{name}: {res[name]['mean_abs_error']:.4f} +- {res[name]['standard_error']:.4f} ({len(idx)} images)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = write_text(args.out, dump_json_strict(res))
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    run_script(main)
