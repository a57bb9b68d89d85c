"""Does the tuned inference path change the metrics? Eager float32 vs tuned Detector on one test split.

Evaluates a trained run on the test split of an MVTec-style folder twice, with the eager float32
pipeline (``precision="float32", channels_last=False, batch_size=512, reuse_features=False,
fuse=False``) and with the tuned Detector (its per-device defaults, or the options given), and
writes one JSON with both metric sets, the differences in points (100 x AUROC) and whether each
is below the bar (0.2 point), and what each gives at the run's stored image threshold (false
alarms and misses: the statistics and thresholds were set at the run's own precision, so the
eager float32 figures are those of the model file moved to a machine without bfloat16).

    python experiments/tuned_vs_eager.py RUN DATA [--out FILE] [--device auto] [--precision auto]
        [--channels-last auto|on|off] [--compile] [--images-per-batch 8]

RUN is a run folder (or model.pt); DATA holds test/ and ground_truth/ (e.g. the magnetic-tile
dev split). Exit status 1 when a difference reaches the bar.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import device_info  # noqa: E402  (CPU model, family and flags, or the GPU's name)
from defect_fast.calibration import stored_thresholds  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

EAGER = {"precision": "float32", "channels_last": False, "batch_size": 512, "reuse_features": False, "fuse": False}
BAR_POINTS = 0.2
METRICS = ("pixel_auroc", "image_auroc", "aupro")


def run_detector(det: Detector, test, images_per_batch: int) -> dict:
    """Metrics of ``det`` on ``test`` (a :class:`~defect_fast.data.TestSet`), plus the time per image."""
    from defect_fast.metrics import evaluate

    t0 = time.perf_counter()
    res = det.predict_batched(test.images, images_per_batch)
    seconds = time.perf_counter() - t0
    metrics = evaluate(res["maps"], test.masks, res["scores"], test.labels, test.classes)
    metrics.pop("per_class", None)
    threshold = stored_thresholds(det.calibration)[0]
    if threshold is not None:  # the stored threshold, set at the run's own precision: what the line sees
        good = test.labels == 0
        flagged = res["scores"] > threshold
        metrics["at_stored_threshold"] = {
            "threshold": float(threshold),
            "false_alarms": int((flagged & good).sum()), "good_images": int(good.sum()),
            "misses": int((~flagged & ~good).sum()), "defective_images": int((~good).sum()),
            "good_scores_mean": float(res["scores"][good].mean()) if bool(good.any()) else float("nan")}
    metrics["inference_ms_per_image"] = 1e3 * seconds / max(1, test.images.shape[0])
    metrics["options"] = det.options()
    return metrics, res


def compare(run: Path, data: Path, device: str = "auto", images_per_batch: int = 8, **tuned_options) -> dict:
    """Both evaluations and their differences: {"eager": {...}, "tuned": {...}, "difference_points": {...},
    "max_abs_map_difference", "below_bar": bool}."""
    from defect_fast.data import load_test_set

    eager = Detector.load(run, device=device, **EAGER)
    tuned = Detector.load(run, device=device, **tuned_options)
    test = load_test_set(data, eager.image_size)
    e, e_res = run_detector(eager, test, images_per_batch)
    t, t_res = run_detector(tuned, test, images_per_batch)
    diff = {k: 100.0 * (t[k] - e[k]) for k in METRICS if isinstance(e.get(k), float) and isinstance(t.get(k), float)}
    checked = [diff[k] for k in ("pixel_auroc", "image_auroc") if k in diff and not math.isnan(diff[k])]
    return {
        "run": str(run), "data": str(data), "n_images": int(test.images.shape[0]), "device": str(eager.device),
        "torch": torch.__version__, "info": device_info(str(eager.device)), "eager": e, "tuned": t,
        "difference_points": diff,
        "max_abs_map_difference": float((e_res["maps"] - t_res["maps"]).abs().max()) if test.images.shape[0] else 0.0,
        "max_abs_score_difference": float((e_res["scores"] - t_res["scores"]).abs().max()) if test.images.shape[0] else 0.0,
        "bar_points": BAR_POINTS,
        "below_bar": bool(checked) and all(abs(d) < BAR_POINTS for d in checked),
        "command": "python " + " ".join(sys.argv),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run folder or model.pt")
    ap.add_argument("data", type=Path, help="MVTec-style root with test/ and ground_truth/")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default RUN/tuned_vs_eager.json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="tuned precision: auto, float32, bfloat16, float16")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--compile", action="store_true", help="tuned path through torch.compile")
    ap.add_argument("--images-per-batch", type=int, default=8)
    args = ap.parse_args(argv)
    if not args.run.exists():
        ap.error(f"run: {args.run} does not exist")
    if not (args.data / "test").is_dir():
        ap.error(f"data: {args.data} has no test/ folder")
    cl = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    res = compare(args.run, args.data, args.device, max(1, args.images_per_batch),
                  precision=args.precision, channels_last=cl, compile=args.compile)
    out = args.out or (args.run if args.run.is_dir() else args.run.parent) / "tuned_vs_eager.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out = write_text(out, json.dumps(res, indent=2, default=float) + "\n")
    for k, d in res["difference_points"].items():
        print(f"{k}: eager {res['eager'][k]:.4f} tuned {res['tuned'][k]:.4f} difference {d:+.3f} points")
    for name in ("eager", "tuned"):
        at = res[name].get("at_stored_threshold")
        if at:
            print(f"{name} at the stored threshold {at['threshold']:.4g}: {at['false_alarms']}/{at['good_images']} false "
                  f"alarms, {at['misses']}/{at['defective_images']} misses; mean good-image score {at['good_scores_mean']:.4g}")
    print(f"tuned options {res['tuned']['options']}; max |map difference| {res['max_abs_map_difference']:.3e}; "
          f"below {BAR_POINTS} point: {res['below_bar']}; wrote {out}")
    return 0 if res["below_bar"] else 1


if __name__ == "__main__":
    run_script(main)
