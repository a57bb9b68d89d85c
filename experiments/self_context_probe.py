"""Probe (negative result): a self-referential context map for "uneven" bands.

Hypothesis, from the pictures of uneven tiles (experiments/README.md, "Third round"): the band is ground
differently from the rest of its own tile, so a map of how unlike the rest of its own image each
position is should rank band pixels above the rest of the image, where the context map ranks them
at about 67 (within-image AUROC, mean over the uneven images with a non-empty mask). The map: per
AlexNet layer conv3-5, s(p) = r(p)^T Q r(p) with r(p) = f(p) minus the image's own per-channel
median over positions and Q the Ledoit-Wolf precision of r pooled over the training images'
positions, standardised per position on the held-back images, averaged over layers, upsampled.

Rows (model-free, as ``experiments/model_free.py`` scores them; the first and fourth reproduce
its ``model-free-context`` and ``model-free-blur-perceptual-v3-context`` rows): the context, the
self map, both, and each added to the blur-perceptual map. Result: the self map ranks uneven
band pixels *worse* within their image (57.0) and lowers every combination it joins
(blur-perceptual + context 80.47 -> 78.60 pixel AUROC); it is not used.

    DEFECT_FAST_ALEXNET_WEIGHTS=../shared/weights/alexnet-features-imagenet.pth \
        python3 experiments/self_context_probe.py [DATA]   (about 3 min on 2 cores)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))

import model_free as mf  # noqa: E402
from defect_fast.calibration import split_holdback  # noqa: E402
from defect_fast.context import ImageContext  # noqa: E402
from defect_fast.data import load_test_set, load_train_images  # noqa: E402
from defect_fast.metrics import evaluate  # noqa: E402
from defect_fast.perceptual import PerceptualMap  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

SIZE = 256


def residual(f: torch.Tensor) -> torch.Tensor:
    """Features [N,C,G,G] minus each image's own per-channel median over positions."""
    return f - f.flatten(2).median(dim=2).values[:, :, None, None]


def self_maps(feats_train, feats_held, feats_test) -> tuple[torch.Tensor, torch.Tensor]:
    """(test, held-back) self maps [N,S,S]: per layer the standardised s(p), mean over layers."""
    test_maps, held_maps = [], []
    for ftr, fhe, fte in zip(feats_train, feats_held, feats_test):
        r = residual(ftr).permute(0, 2, 3, 1).reshape(-1, ftr.shape[1]).double().numpy()
        precision = torch.from_numpy(LedoitWolf(assume_centered=True).fit(r[::3]).precision_).float()

        def s(f):
            rr = residual(f).permute(0, 2, 3, 1)
            return ((rr @ precision) * rr).sum(-1)

        s_held = s(fhe)
        mu, sd = s_held.mean(0), s_held.std(0).clamp_min(1e-6)
        for z, acc in (((s(fte) - mu) / sd, test_maps), ((s_held - mu) / sd, held_maps)):
            acc.append(F.interpolate(z.unsqueeze(1), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0])
    return sum(test_maps) / len(test_maps), sum(held_maps) / len(held_maps)


def within_uneven(maps: torch.Tensor, test) -> float:
    """Mean over uneven images with a non-empty mask of the AUROC of their own pixels."""
    aucs = []
    for i, c in enumerate(test.classes):
        m = test.masks[i].flatten().numpy().astype(bool)
        if c == "uneven" and 0 < m.sum() < m.size:
            aucs.append(roc_auc_score(m, maps[i].flatten().numpy()))
    return float(np.mean(aucs))


@torch.no_grad()
def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"),
                    help="MVTec-style root (default ../shared/data/magnetic-tile)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "self-context" / "probe.json",
                    help="results JSON (an existing file is kept: the results then go beside it)")
    args = ap.parse_args()
    data = args.data
    t0 = time.perf_counter()
    train, paths = load_train_images(data, SIZE)
    test = load_test_set(data, SIZE)
    index = {str(p): i for i, p in enumerate(paths)}
    tr_paths, held_paths = split_holdback([str(p) for p in paths], 0.1, seed=0)  # the split train() makes
    x_tr = train[[index[p] for p in tr_paths]].float() / 127.5 - 1
    x_he = train[sorted(index[p] for p in held_paths)].float() / 127.5 - 1
    x_te = test.images.float() / 127.5 - 1
    ctx = ImageContext(SIZE)
    ctx.fit(lambda: x_tr.split(32))
    feats = [[ctx.features(c) for c in x.split(32)] for x in (x_tr, x_he, x_te)]
    per_layer = [[torch.cat([f[j] for f in fs]) for j in range(len(ctx.layers))] for fs in feats]
    self_te, self_he = self_maps(*per_layer)
    ctx_he, ctx_te = (torch.cat([ctx.map(f, SIZE) for f in fs]) for fs in feats[1:])
    score_te = torch.cat([ctx.score(f) for f in feats[2]])
    pm = PerceptualMap(SIZE, scales=(1, 2))
    pm.fit((c, mf.blur(c)) for c in x_tr.split(16))
    b_te, b_he = (torch.cat([pm(c, mf.blur(c)) for c in x.split(16)]) for x in (x_te, x_he))
    b_te, b_he = (b_te - b_he.mean()) / b_he.std(), (b_he - b_he.mean()) / b_he.std()

    out = {"command": "python3 experiments/self_context_probe.py " + " ".join(sys.argv[1:])}
    for name, te, he, extra in (("context", ctx_te, ctx_he, score_te), ("self", self_te, self_he, 0),
                                ("context+self", ctx_te + self_te, ctx_he + self_he, score_te),
                                ("blur-perceptual+context", b_te + ctx_te, b_he + ctx_he, score_te),
                                ("blur-perceptual+context+self", b_te + ctx_te + self_te, b_he + ctx_he + self_he, score_te)):
        te, he = mf.gaussian(te, 4.0), mf.gaussian(he, 4.0)  # smoothed and scored as model_free.py's context rows
        top_te, top_he = mf.scores_of(te), mf.scores_of(he)
        m = evaluate(te, test.masks, (top_te - top_he.mean()) / top_he.std() + extra, test.labels, test.classes)
        row = {k: round(100 * m[k], 2) for k in ("pixel_auroc", "image_auroc", "aupro")}
        row["uneven_within_image_auroc"] = round(100 * within_uneven(te, test), 2)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    dest = write_text(args.out, json.dumps(out, indent=1) + "\n")
    print("wrote", dest)
    return 0


if __name__ == "__main__":
    run_script(lambda _argv: main())
