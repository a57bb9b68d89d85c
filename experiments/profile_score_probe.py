"""Probe: does the band profile set the image score of defect-free images, and what does the score
gain without it?

    python3 experiments/profile_score_probe.py RUN [DATA] [--out FILE]   (about 1 min on 2 cores)

The context's band profile (``--context-profile rows``) gives every pixel of a row the row's
value: 256 pixels at 256 px, while the image score is the mean of the map's top 0.1 % (66
pixels). On the test split, for a run with a profile:

1. **Where the top pixels of defect-free maps lie**: per ``test/good`` image, the share of the
   score's top pixels whose row (column) has a profile value of at least ``--level`` (2: two
   defect-free spreads), and how many images have more than half of them there.
2. **The image AUROC with the profile in the score and without** (``ImageContext.profile_in_score``
   switched on the same predictions; the score's defect-free mean and spread stay the run's), in
   all and per class.

The paired runs of ``experiments/magnetic_tile_v2.sh`` (v5 and v6 rows, the same weights) are the
measurement of the change; this probe shows its mechanism. Writes
``experiments/results/profile-score/<run name>.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_test_set  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.metrics import image_auroc  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from results_file import run_script, write_text  # noqa: E402


def share_on_high_lines(maps: torch.Tensor, values: torch.Tensor, k: int, level: float, profile: str) -> np.ndarray:
    """Per map [N,S,S], the share of its k largest pixels that lie on a row (``profile`` "rows")
    or column whose profile value [N,S] is at least ``level``."""
    idx = maps.flatten(1).topk(k, dim=1).indices
    line = idx // maps.shape[-1] if profile == "rows" else idx % maps.shape[-1]
    return (values.gather(1, line) >= level).float().mean(1).numpy()


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--level", type=float, default=2.0, help="a high profile value, in defect-free spreads (default 2)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    det = Detector.load(args.run, device="cpu")
    ctx = det.context
    if ctx is None or ctx.profile == "none":
        raise SystemExit(f"{args.run}: the run has no band profile (--context --context-profile rows|columns)")
    test = load_test_set(args.data, det.image_size)
    seen: list[torch.Tensor] = []
    parts = ctx.map_parts

    def spy(feats, size):
        m, v = parts(feats, size)
        seen.append(v)
        return m, v

    ctx.map_parts = spy
    scores, maps = {}, None
    for in_score in (True, False):
        ctx.profile_in_score, det._graphs = in_score, {}
        seen.clear()
        out = [det(c) for c in test.images.split(16)]
        maps = torch.cat([m for m, _s in out])
        scores[in_score] = torch.cat([s for _m, s in out]).numpy()
    values = torch.cat(seen)
    labels = np.asarray(test.labels)
    classes = np.asarray(test.classes)
    good = labels == 0
    share = share_on_high_lines(maps[torch.from_numpy(good)], values[torch.from_numpy(good)], det.top_k, args.level,
                                ctx.profile)
    result = {
        "run": args.run, "profile": ctx.profile, "level": args.level, "top_pixels": det.top_k,
        "good_images": int(good.sum()),
        "good_images_with_a_line_at_level": int((values[torch.from_numpy(good)].amax(1) >= args.level).sum()),
        "good_share_of_top_pixels_on_such_lines": float(share.mean()),
        "good_images_with_over_half_there": int((share > 0.5).sum()),
        "image_auroc": {"profile_in_score": image_auroc(scores[True], labels),
                        "profile_not_in_score": image_auroc(scores[False], labels)},
        "per_class_image_auroc": {
            c: {"profile_in_score": image_auroc(scores[True][(classes == c) | good], labels[(classes == c) | good]),
                "profile_not_in_score": image_auroc(scores[False][(classes == c) | good], labels[(classes == c) | good])}
            for c in sorted(set(classes[~good]))},
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python3 experiments/profile_score_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out_path = Path(args.out) if args.out else ROOT / "experiments" / "results" / "profile-score" / f"{Path(args.run).name}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path = write_text(out_path, dump_json_strict(result))
    print(f"{result['good_images_with_over_half_there']} of {result['good_images']} defect-free images have over half "
          f"of their top pixels on {ctx.profile} with a profile value >= {args.level:g}; image AUROC with the profile in "
          f"the score {result['image_auroc']['profile_in_score']:.4f}, without {result['image_auroc']['profile_not_in_score']:.4f}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    run_script(main)
