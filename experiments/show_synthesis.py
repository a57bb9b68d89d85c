"""Draws synthetic anomalies on defect-free training images, for both variants and both methods.

    PYTHONPATH=. python experiments/show_synthesis.py [--data ../shared/data/magnetic-tile/train/good]
        [--out /tmp/synthesis_grid.png] [--n 8] [--size 256] [--seed 0] [--masks] [--kind K] [--shape S]
    PYTHONPATH=. python experiments/show_synthesis.py --bench [--size 256] [--device cpu]

Rows (top to bottom): the clean images, then for each of gaaga/paper, adga/paper, gaaga/perlin,
adga/perlin the synthetic images (with ``--masks`` each followed by its label mask). The
"perlin" rows use ``clean_fraction=0`` so every tile shows an anomaly. Each row is labelled at its
left; below each perlin tile the content kind and mask shape are printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from defect_fast.synthesis import KINDS, SHAPES, SynthesisConfig, load_sources, synthesize
from results_file import run_script


def _load(folder: Path, n: int, size: int, seed: int) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png", ".bmp"))
    if not files:
        sys.exit(f"{folder}: no images found")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(files), size=min(n, len(files)), replace=False)
    ims = []
    for i in sorted(pick):
        with Image.open(files[i]) as im:
            g = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32)
        ims.append(torch.from_numpy(g / 127.5 - 1.0))
    return torch.stack(ims).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _tile(x: torch.Tensor) -> np.ndarray:
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def _bench(args) -> None:
    import time

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    clean = torch.rand(64, 1, args.size, args.size, generator=g) - 0.6
    clean = clean.expand(64, 3, -1, -1).contiguous().to(dev)
    sources = load_sources(size=args.size).to(dev)
    print(f"synthesize(): batch 64 x 3 x {args.size} x {args.size}, device {dev}, "
          f"torch threads {torch.get_num_threads()}")
    for method in ("gaaga", "adga"):
        for variant in ("paper", "perlin"):
            cfg = SynthesisConfig(variant=variant)
            synthesize(clean, sources, torch.Generator().manual_seed(0), method, cfg)  # warm-up
            times = []
            for r in range(3):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                synthesize(clean, sources, torch.Generator().manual_seed(r + 1), method, cfg)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best = min(times)
            print(f"  {method:5s} {variant:6s}: {best * 1000:8.1f} ms per batch (best of 3), {64 / best:8.1f} images/s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/magnetic-tile/train/good")
    ap.add_argument("--out", type=Path, default=Path("/tmp/synthesis_grid.png"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--masks", action="store_true", help="add a row with the label mask under each synthetic row")
    ap.add_argument("--kind", choices=KINDS, help="perlin rows: only this content kind")
    ap.add_argument("--shape", choices=SHAPES, help="perlin rows: only this mask shape")
    ap.add_argument("--bench", action="store_true",
                    help="instead of drawing: print images/s of synthesize() for a batch of 64 (--size) images, "
                         "paper vs perlin, both methods, on --device")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.bench:
        _bench(args)
        return
    if not args.data.is_dir():
        sys.exit(f"--data {args.data}: not a folder")
    clean = _load(args.data, args.n, args.size, args.seed)
    sources = load_sources(size=args.size)
    rows: list[tuple[str, list[np.ndarray], list[str]]] = [("clean", [_tile(c) for c in clean], [])]
    for variant in ("paper", "perlin"):
        for method in ("gaaga", "adga"):
            cfg = SynthesisConfig(variant=variant, clean_fraction=0.0)
            if args.kind:
                cfg = dataclasses.replace(cfg, source_mix=tuple(float(k == args.kind) for k in KINDS))
            if args.shape:
                cfg = dataclasses.replace(cfg, shape_mix=tuple(float(k == args.shape) for k in SHAPES))
            out, mask, info = synthesize(clean, sources, torch.Generator().manual_seed(args.seed), method, cfg,
                                         return_info=True)
            notes = []
            if variant == "perlin":
                notes = [f"{KINDS[k]}/{SHAPES[s]} b={b:.2f}" for k, s, b in
                         zip(info["kind"].tolist(), info["shape"].tolist(), info["beta"].tolist())]
            rows.append((f"{method}/{variant}", [_tile(o) for o in out], notes))
            if args.masks:
                rows.append(("mask", [(m[0].numpy() * 255).astype(np.uint8) for m in mask], []))
    s, pad, label, note_h = args.size, 4, 110, 14
    width = label + len(clean) * (s + pad)
    heights = [s + pad + (note_h if notes else 0) for _, _, notes in rows]
    canvas = Image.new("L", (width, sum(heights)), 255)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (name, tiles, notes), hgt in zip(rows, heights):
        draw.text((4, y + s // 2), name, fill=0)
        for j, t in enumerate(tiles):
            canvas.paste(Image.fromarray(t), (label + j * (s + pad), y))
            if notes:
                draw.text((label + j * (s + pad) + 2, y + s + 1), notes[j], fill=0)
        y += hgt
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out} ({canvas.size[0]}x{canvas.size[1]})")


if __name__ == "__main__":
    run_script(main)
