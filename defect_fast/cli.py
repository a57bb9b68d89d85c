"""Command line: ``defect-fast train | evaluate | predict | export | demo | info``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  defect-fast demo runs/demo                                  synthetic data, train, evaluate, maps
  defect-fast train DATA --model cmaae --out runs/tile        DATA: MVTec-style root or image folder
  defect-fast train DATA --out runs/tile --resume             continue an interrupted run
  defect-fast evaluate runs/tile DATA --json metrics.json
  defect-fast predict runs/tile img1.png folder/ --out maps/
  defect-fast export runs/tile --format torchscript --out tile.ts
"""


def _print_metrics(metrics: dict, out=None) -> None:
    out = out or sys.stdout
    keys = ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max")
    rows = [("all", *(metrics.get(k) for k in keys))]
    for cls, m in sorted(metrics.get("per_class", {}).items()):
        rows.append((cls, *(m.get(k) for k in keys)))
    head = f"{'class':<14}" + "".join(f"{k:>14}" for k in keys)
    print(head, file=out)
    print("-" * len(head), file=out)
    for name, *vals in rows:
        cells = "".join(f"{v:>14.4f}" if isinstance(v, (int, float)) and v == v else f"{'n/a':>14}" for v in vals)
        print(f"{name:<14}{cells}", file=out)


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    if args.resume:
        train(TrainConfig(data=args.data), args.out, resume=True, progress=not args.quiet)
        return 0
    from .models import build_model, parse_options

    kwargs = parse_options(args.model, args.set)
    epochs = args.epochs

    n_stages = len(build_model(args.model, **kwargs).stages)
    if epochs is None:
        epochs = [10] * n_stages
    elif len(epochs) == 1:
        epochs = epochs * n_stages
    cfg = TrainConfig(
        data=str(args.data), model=args.model, model_kwargs=kwargs, image_size=args.image_size, stride=args.stride,
        batch_size=args.batch_size, epochs=epochs, max_steps=args.max_steps, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, anomaly_source=args.anomaly_source, device=args.device,
    )
    if cfg.max_steps is not None and len(cfg.max_steps) == 1:
        cfg.max_steps = cfg.max_steps * n_stages
    train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    return 0


from .evaluate import evaluate_run  # noqa: E402,F401  (kept importable from here)


def _json_safe(obj):
    """NaN (a metric undefined for one class) becomes null, so the file is strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def cmd_evaluate(args) -> int:
    metrics = evaluate_run(args.run, args.data, args.map, args.device, args.stride, args.smooth, blend=args.blend)
    _print_metrics(metrics)
    print(f"\n{metrics['n_images']} images, map={metrics['map']}, {metrics['inference_ms_per_image']:.1f} ms/image")
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(metrics), indent=2))
    return 0


def _collect_images(items: list[str]) -> list[Path]:
    from .data import DataError, list_images

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise DataError(f"{p}: folder holds no images")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return paths


def _output_stems(paths: list[Path]) -> list[str]:
    """File stems for outputs, unique: clashing names get their folder (and if need be a number) in front."""
    stems = [p.stem for p in paths]
    clashes = {s for s in stems if stems.count(s) > 1}
    stems = [f"{p.parent.name}_{p.stem}" if p.stem in clashes else p.stem for p in paths]
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out


def cmd_predict(args) -> int:
    import torch

    from .data import read_image
    from .detect import Detector
    from .runs import prepare_run_folder
    from .visualize import save_map, save_overlay

    det = Detector.load(args.run, device=args.device, map_kind=args.map, stride=args.stride, smooth_sigma=args.smooth,
                        blend=getattr(args, "blend", "none"))
    paths = _collect_images(args.images)
    images = torch.stack([read_image(p, det.image_size) for p in paths])  # errors name the file before any output
    out = Path(args.out)
    prepare_run_folder(out, args.overwrite)
    res = det.predict_batched(images)
    cal = det.calibration
    scale = cal.get("pixel_q999") or float(res["maps"].max()) or 1.0
    threshold = args.threshold if args.threshold is not None else cal.get("score_max")
    (out / "maps").mkdir()
    (out / "overlays").mkdir()
    report = {"run": str(args.run), "map": det.map_kind, "threshold": threshold, "images": []}
    for path, stem, img, m, s in zip(paths, _output_stems(paths), images, res["maps"], res["scores"]):
        save_map(m, out / "maps" / f"{stem}_map.png", scale=2 * scale)
        save_overlay(img, m, out / "overlays" / f"{stem}_overlay.png", scale=2 * scale)
        entry = {"image": str(path), "score": float(s)}
        if threshold is not None:
            entry["defective"] = bool(float(s) > threshold)
        report["images"].append(entry)
    (out / "scores.json").write_text(json.dumps(report, indent=2))
    print(f"wrote maps, overlays and scores for {len(paths)} image(s) to {out}")
    return 0


def cmd_demo(args) -> int:
    from .data.synthetic import make_synthetic_dataset
    from .models import build_model, model_class
    from .runs import prepare_run_folder
    from .train import TrainConfig, train

    out = Path(args.out)
    prepare_run_folder(out, args.overwrite)
    data = out / "data"
    make_synthetic_dataset(data, size=args.image_size, seed=args.seed)
    print(f"synthetic dataset written to {data}")
    options = dict(model_class(args.model).demo_options)
    n_stages = len(build_model(args.model, **options).stages)
    cfg = TrainConfig(data=str(data), model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                      epochs=[args.epochs] * n_stages, seed=args.seed, device=args.device, model_kwargs=options)
    train(cfg, out / "run", progress=not args.quiet)
    metrics = evaluate_run(out / "run", data, device=args.device)
    _print_metrics(metrics)
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2))
    test_dir = data / "test"
    samples = [p for cls in sorted(test_dir.iterdir()) if cls.name != "good" for p in sorted(cls.iterdir())[:2]]
    ns = argparse.Namespace(run=out / "run", images=[str(p) for p in samples], out=out / "maps", overwrite=False,
                            device=args.device, map=None, stride=None, threshold=None, smooth=0.0)
    cmd_predict(ns)
    return 0


def cmd_info(args) -> int:
    import torch

    from . import __version__, ops

    info = {"defect_fast": __version__, "torch": torch.__version__, "backend_cpu": ops.backend("cpu"),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["backend_cuda"] = ops.backend("cuda")
    try:
        from .ops import _native

        module, reason = _native.load()
        info["native"] = module.build_info() if module is not None and hasattr(module, "build_info") else reason
    except Exception as exc:  # pragma: no cover - informational
        info["native"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_export(args) -> int:
    from .export import export

    path = export(args.run, args.out, args.format, batch=args.batch, map_kind=args.map, stride=args.stride,
                  smooth_sigma=args.smooth, blend=args.blend, overwrite=args.overwrite)
    print(f"wrote {path} and {path.with_name(path.name + '.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .detect import BLENDS
    from .export import FORMATS
    from .models import map_names, model_names

    p = argparse.ArgumentParser(prog="defect-fast", description="Unsupervised surface-defect detection: "
                                "train on defect-free images, map and score defects.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on defect-free images",
                       description="Train on DATA/train/good (MVTec layout) or on a plain folder of defect-free images.")
    t.add_argument("data", help="MVTec-style root (uses train/good) or a folder of defect-free images")
    t.add_argument("--out", required=True, help="run folder (refused if it exists and is not empty, unless --overwrite/--resume)")
    t.add_argument("--model", default="cmaae", choices=model_names(), help="model (default: cmaae)")
    t.add_argument("--image-size", type=int, default=512, help="images are resized to SxS (default 512)")
    t.add_argument("--stride", type=int, default=None, help="patch stride in training (default: patch size)")
    t.add_argument("--batch-size", type=int, default=512, help="patches per step (default 512)")
    t.add_argument("--epochs", type=int, nargs="+", default=None, help="epochs per stage (one value = every stage; default 10)")
    t.add_argument("--max-steps", type=int, nargs="+", default=None, help="cap on steps per stage")
    t.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4, beta1 0.5)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    t.add_argument("--anomaly-source", default=None, help="folder of natural photos for synthetic anomalies "
                   "(default: the sample photos shipped with scikit-learn)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="model option, e.g. --set fusion=mam "
                   "--set gate_activation=sigmoid (repeatable; values parsed as JSON)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="pixel/image AUROC, AUPRO and F1 on a test split")
    e.add_argument("run", help="run folder (or model.pt)")
    e.add_argument("data", help="MVTec-style root with test/ and ground_truth/")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.add_argument("--map", choices=map_names(), default=None, help="anomaly map (default: the model's)")
    e.add_argument("--stride", type=int, default=None, help="patch stride at inference (default: patch size)")
    e.add_argument("--smooth", type=float, default=0.0, help="Gaussian blur of the maps, in pixels (default 0: none)")
    e.add_argument("--blend", choices=BLENDS, default="none", help="weights of overlapping patches (with --stride < patch)")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="anomaly maps, overlays and scores for images")
    r.add_argument("run", help="run folder (or model.pt)")
    r.add_argument("images", nargs="+", help="image files or folders")
    r.add_argument("--out", required=True, help="output folder (refused if it exists and is not empty, unless --overwrite)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--map", choices=map_names(), default=None)
    r.add_argument("--stride", type=int, default=None)
    r.add_argument("--threshold", type=float, default=None,
                   help="image score above which an image is flagged (default: the largest score on the calibration images)")
    r.add_argument("--smooth", type=float, default=0.0, help="Gaussian blur of the maps, in pixels (default 0: none)")
    r.add_argument("--blend", choices=BLENDS, default="none", help="weights of overlapping patches (with --stride < patch)")
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="write the whole inference pipeline as ONNX, TorchScript or torch.export file",
                       description="Export resize, patches, model, map, stitching, smoothing and score for a fixed "
                       "image size and batch (dynamic batch where the format allows), plus FILE.json with thresholds.")
    x.add_argument("run", help="run folder (or model.pt)")
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument("--out", required=True, help="output file (FILE.json is written beside it)")
    x.add_argument("--batch", type=int, default=1, help="images per call in the traced graph (default 1)")
    x.add_argument("--map", choices=map_names(), default=None)
    x.add_argument("--stride", type=int, default=None)
    x.add_argument("--smooth", type=float, default=0.0)
    x.add_argument("--blend", choices=BLENDS, default="none")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="make a small synthetic defect set, train briefly, evaluate and write maps")
    d.add_argument("out", nargs="?", default="defect-fast-demo", help="output folder (default ./defect-fast-demo)")
    d.add_argument("--model", default="cmaae", choices=model_names())
    d.add_argument("--image-size", type=int, default=128)
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="versions and which kernels run")
    i.set_defaults(func=cmd_info)

    from . import watch as watch_cmd
    watch_cmd.add_parser(sub)
    from . import report as report_cmd
    report_cmd.add_parser(sub)
    from . import diagnose as diagnose_cmd
    diagnose_cmd.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .runs import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, RunError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"defect-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
