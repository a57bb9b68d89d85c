"""A PatchCore reference on this dataset's split, with the frozen AlexNet trunk the detector uses.

    python3 experiments/patchcore_reference.py [DATA] [--image-size 256] [--coreset 0.01] [--level-brightness]
        [--out experiments/results/patchcore/alexnet-coreset1.json]

PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) is the
strongest published method in the dataset's README (83.6 pixel / 97.5 image AUROC on its own split
with a WideResNet-50). Its figures come from another split and another backbone; this script runs
the method on this split, with the only ImageNet weights at hand (AlexNet), so that the detector
can be compared with it on equal terms:

- features: AlexNet conv2 (31 x 31 at 256 px, before its max-pool) and conv3 (15 x 15, bilinearly
  upsampled to conv2's grid), each averaged over its 3 x 3 neighbourhood (PatchCore's local
  aggregation), concatenated: 576 values per position;
- memory bank: every position of every training image (train/good, all of them: PatchCore keeps
  none back), reduced to ``--coreset`` of its size by greedy k-centre selection on a random
  128-dimensional projection (the paper's coreset; 1 % is one of its settings);
- map: each position's Euclidean distance to its nearest bank entry, bilinearly upsampled to the
  image and smoothed with a Gaussian of sigma 4 px (as the paper); image score: the map's maximum.

``--level-brightness``: every image reaches the trunk scaled to the training images' mean
brightness, as the detector's ``--level-brightness`` (v7) does, so that the comparison gives
PatchCore the same input.

Metrics as ``defect-fast evaluate`` computes them, on the same resized images and masks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_test_set, load_train_images  # noqa: E402
from defect_fast.maps import blur_matrix  # noqa: E402
from defect_fast.metrics import evaluate  # noqa: E402
from defect_fast.perceptual import PerceptualMap, reference_brightness  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

BATCH = 16


@torch.no_grad()
def patch_features(trunk: PerceptualMap, x: torch.Tensor) -> torch.Tensor:
    """Images [N,3,S,S] in [-1,1] -> locally aggregated conv2 + conv3 features [N, G*G, 576]."""
    _c1, c2, c3 = trunk.features(x)
    g = c2.shape[-2:]
    c2 = F.avg_pool2d(c2, 3, 1, 1, count_include_pad=False)
    c3 = F.interpolate(F.avg_pool2d(c3, 3, 1, 1, count_include_pad=False), size=g, mode="bilinear",
                       align_corners=False)
    return torch.cat([c2, c3], 1).flatten(2).transpose(1, 2).contiguous()


@torch.no_grad()
def greedy_coreset(bank: torch.Tensor, n: int, seed: int = 0, dims: int = 128) -> torch.Tensor:
    """Indices of ``n`` rows of ``bank`` [M, D] chosen by greedy k-centre on a random projection."""
    g = torch.Generator().manual_seed(seed)
    proj = bank @ torch.randn(bank.shape[1], dims, generator=g) / dims ** 0.5
    sq = (proj * proj).sum(1)
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(len(bank), (1,), generator=g))
    dist = torch.empty_like(sq)
    dot = torch.empty_like(sq)
    torch.mv(proj, proj[chosen[0]], out=dot)
    torch.add(sq, dot, alpha=-2, out=dist).add_(sq[chosen[0]])
    for i in range(1, n):
        c = int(dist.argmax())
        chosen[i] = c
        torch.mv(proj, proj[c], out=dot)  # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, no temporaries of the bank's size
        dist = torch.minimum(dist, dot.mul_(-2).add_(sq).add_(sq[c]), out=dist)
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--coreset", type=float, default=0.01, help="fraction of the bank kept (default 0.01)")
    p.add_argument("--level-brightness", action="store_true",
                   help="scale every image to the training images' mean brightness before the trunk")
    p.add_argument("--out", type=Path,
                   default=ROOT / "experiments" / "results" / "patchcore" / "alexnet-coreset1.json")
    args = p.parse_args(argv)
    if not 0 < args.coreset <= 1:
        p.error(f"--coreset must be in (0, 1], got {args.coreset}")
    if args.out.exists():
        p.error(f"--out {args.out} exists; remove it or name another file")
    s = args.image_size
    t0 = time.perf_counter()
    train, _paths = load_train_images(args.data, s)
    test = load_test_set(args.data, s)
    trunk = PerceptualMap(s, layers=3)
    trunk.brightness = reference_brightness(train) if args.level_brightness else None  # features() levels
    bank = torch.cat([patch_features(trunk, c.float() / 127.5 - 1).flatten(0, 1) for c in train.split(BATCH)])
    n = max(1, round(len(bank) * args.coreset))
    t1 = time.perf_counter()
    keep = greedy_coreset(bank, n) if n < len(bank) else torch.arange(len(bank))
    core = bank[keep].contiguous()
    t2 = time.perf_counter()
    maps = []
    for c in test.images.split(BATCH):
        f = patch_features(trunk, c.float() / 127.5 - 1)
        g = int(round(f.shape[1] ** 0.5))
        d = torch.stack([torch.cdist(fi, core).min(1).values for fi in f]).view(-1, 1, g, g)  # nearest bank row
        maps.append(F.interpolate(d, size=(s, s), mode="bilinear", align_corners=False)[:, 0])
    maps = torch.cat(maps)
    a = blur_matrix(s, 4.0).float()
    maps = a @ maps @ a.T
    scores = maps.flatten(1).max(1).values
    t3 = time.perf_counter()
    m = evaluate(maps, test.masks, scores, test.labels, test.classes)
    m.update(model="patchcore-alexnet", image_size=s, bank=len(bank), coreset=n, coreset_fraction=args.coreset,
             brightness=trunk.brightness,
             seconds={"features": round(t1 - t0, 1), "coreset": round(t2 - t1, 1), "test": round(t3 - t2, 1)},
             command="python3 experiments/patchcore_reference.py " + " ".join(sys.argv[1:] if argv is None else argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = write_text(args.out, dump_json_strict(m))
    print(f"{written}: pixel AUROC {m['pixel_auroc']:.4f}, image AUROC {m['image_auroc']:.4f}, "
          f"AUPRO {m['aupro']:.4f} (bank {len(bank)}, coreset {n}; {m['seconds']})")
    return 0


if __name__ == "__main__":
    run_script(main)
