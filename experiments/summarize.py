"""Markdown tables from experiments/results/magnetic-tile/*.json (pasted into the README).

    python3 experiments/summarize.py
"""
from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).resolve().parent / "results" / "magnetic-tile"

ROWS = {
    "main": [
        ("cmaae", "CMA-AE (CMAM, two stages, MSFR)"),
        ("awae", "AW-SSIM AE (two stages, AW-SSIM + LPIPS, residual)"),
        ("ae-l2", "AE, L2"),
        ("ae-ssim", "AE, SSIM"),
        ("memae", "MemAE"),
    ],
    "cmaae_ablation": [
        ("cmaae", "A: CMAM, two stages, MSFR"),
        ("cmaae-B-mam", "B: memory only (MAM), two stages, MSFR"),
        ("cmaae-C-cat", "C: concatenation instead of gates, two stages, MSFR"),
        ("cmaae-D-one-stage", "D: CMAM, one stage, MSFR"),
        ("cmaae-residual", "E: CMAM, two stages, pixel residual"),
        ("cmaae-sigmoid-gates", "A with sigmoid gates"),
        ("cmaae-gate-encoder", "A gating the encoder code (the text) instead of z_hat (Eq. 9)"),
    ],
    "awae_ablation": [
        ("awae-ssim-l1", "one stage, SSIM + L1"),
        ("awae-lpips-ssim", "one stage, LPIPS + SSIM"),
        ("awae-awssim-one-stage", "one stage, AW-SSIM"),
        ("awae", "two stages, AW-SSIM + LPIPS"),
        ("awae-msfr", "two stages, AW-SSIM + LPIPS, MSFR map instead of residual (same model)"),
    ],
}


def fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def table(rows) -> str:
    lines = ["| run | pixel AUROC | image AUROC | AUPRO (FPR<=0.3) | pixel F1-max | train time | ms/image (eval) |",
             "|---|---|---|---|---|---|---|"]
    for name, label in rows:
        path = RES / f"{name}.json"
        if not path.exists():
            lines.append(f"| {label} | not run | | | | | |")
            continue
        m = json.loads(path.read_text())
        secs = m.get("train_seconds_wall")
        t = f"{secs / 60:.1f} min" if secs else "(same model)"
        lines.append(f"| {label} | {fmt(m['pixel_auroc'])} | {fmt(m['image_auroc'])} | {fmt(m['aupro'])} | "
                     f"{fmt(m['pixel_f1_max'])} | {t} | {m.get('inference_ms_per_image', float('nan')):.0f} |")
    return "\n".join(lines)


def per_class(name: str) -> str:
    m = json.loads((RES / f"{name}.json").read_text())
    classes = sorted(m["per_class"])
    lines = ["| metric | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for key in ("pixel_auroc", "image_auroc", "aupro"):
        lines.append(f"| {key} | " + " | ".join(fmt(m["per_class"][c][key]) for c in classes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for key, rows in ROWS.items():
        print(f"### {key}\n\n{table(rows)}\n")
    if (RES / "cmaae.json").exists():
        print(f"### cmaae per class\n\n{per_class('cmaae')}\n")
