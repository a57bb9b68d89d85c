"""Export the whole inference pipeline (``Detector.forward``) as ONNX, TorchScript or torch.export.

The exported graph takes images uint8 [B, 3, S, S] (0..255, RGB, already resized to S) and returns
(maps float32 [B, S, S], scores float32 [B]): patches, reconstruction, anomaly map, stitching,
normalisation, smoothing and score, all inside. Every format refuses other input (ONNX and
torch.export by their input signature; TorchScript files check it first and say what they take,
and carry ``image_size``). The fused ops are traced as their pure-PyTorch
reference (:func:`defect_fast.detect.reference_ops`), so running the file needs only
onnxruntime / LibTorch / torch, not this package. Beside ``FILE`` goes ``FILE.json``: image size,
batch, thresholds, normalisation, model name and options, package version, the training images'
width:height range (TorchScript files carry it too, for the C++ runner's warning), a digest of the
source model file and one of ``FILE`` itself (:func:`read_sidecar` reads the description after
checking it).

``precision="bfloat16"`` (TorchScript files, what the C++ runner loads): the Detector's tuned CPU graph
instead of the float32 one: layer weights stored in bf16, the layers run in bf16 with channels-last
patches, the ops and everything after the model in float32, as the Detector runs with
``precision="bfloat16"`` (maps within rounding of its maps). It ran 2.2 x (CMA-AE) and 2.8 x
(AW-SSIM AE) faster than the float32 file on a 2-core AVX512-BF16 EPYC
(``benchmarks/bench_export.py``, ``export_cpu.json``); on a CPU without AVX512-BF16 or AMX, bf16
is emulated and many times slower, so float32 stays the default. ONNX files
are float32 only (onnxruntime's CPU convolutions have no bf16 kernels), and so are torch.export
files (its tracing of the autocast pipeline fails on torch 2.13).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, List

import PIL
import torch

from . import __version__
from .calibration import CalibrationError, chosen_threshold, stored_thresholds
from .data.io import PROPORTIONS_MARGIN
from .detect import Detector, reference_ops
from .runs import model_file
from .safety import (OutputRefused, UserError, allocation_failed, atomic_open, dump_json_strict, file_sha256,
                     is_same_file, one_line, safe_output_file)

FORMATS = ("onnx", "torchscript", "exported")
PRECISIONS = ("float32", "bfloat16")
ONNX_OPSET = 18  # Col2Im (the stitching fold) needs opset 18


class _CheckedImages(torch.nn.Module):
    """The traced TorchScript pipeline behind a check of its input: a trace keeps only the uint8
    branch of the pipeline's input conversion, so a float tensor would run through it as if it
    held 0..255 and give wrong maps without an error (ONNX and torch.export files refuse it)."""

    __constants__ = ["image_size"]

    def __init__(self, traced: torch.nn.Module, image_size: int, trained_proportions: list[float] | None = None):
        super().__init__()
        self.traced = traced
        self.image_size = image_size
        # the training images' [lowest, highest] width:height ratio and the factor outside it an image
        # is warned of (defect_fast.data.io.outside_proportions), for a program that stretches photos
        # to S x S (the C++ runner warns of them); [] and 0.0 where the model file does not record them
        ratios = [float(r) for r in trained_proportions] if trained_proportions else []
        self.trained_proportions = torch.jit.Attribute(ratios, List[float])
        self.proportions_margin = PROPORTIONS_MARGIN if ratios else 0.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise RuntimeError("defect_fast detector: images must be uint8 (0..255, RGB) [B, 3, S, S]")
        if images.dim() != 4 or images.size(1) != 3 or images.size(2) != self.image_size \
                or images.size(3) != self.image_size:
            raise RuntimeError("defect_fast detector: images must be [B, 3, S, S] with S = " + str(self.image_size)
                               + " (resize them first)")
        if images.size(0) < 1:
            raise RuntimeError("defect_fast detector: images must be [B, 3, S, S] with B >= 1 (got no images)")
        return self.traced(images)


def _maps_sides_pinned(fh: io.BytesIO, size: int) -> io.BytesIO:
    """The ONNX file in ``fh`` with its "maps" output declared [batch, S, S]: a per-position
    normalisation divides the stitched map by an [S, S] tensor, after which the exporter's shape
    inference declared sides of no known size (a program that sizes its buffers from the graph,
    TensorRT among them, could not). The graph is as exported; only the declaration changes."""
    import onnx

    model = onnx.load_from_string(fh.getvalue())
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name == "maps" and len(dims) == 3 and not (dims[1].dim_value and dims[2].dim_value):
            for d in dims[1:]:
                d.Clear()
                d.dim_value = size
            return io.BytesIO(model.SerializeToString())
    return fh


def _digest(path: Path) -> str:
    return "sha256:" + file_sha256(path)


def _for_export(text: str) -> str:
    """A threshold message for an exported file: export takes no --threshold, the program running it does."""
    return text.replace("give --threshold", "set a threshold in the program that runs the file")


def sidecar(det: Detector, fmt: str, batch: int, dynamic_batch: bool, source: Path | None,
            far: float | None = None) -> dict[str, Any]:
    """The JSON description written beside an exported file."""
    cal = det.calibration
    # as predict uses them (with far: as predict --far)
    image_t, pixel_t, threshold_source, image_name, _far = chosen_threshold(cal, None, far)
    n = "N" if dynamic_batch else batch
    # of the bytes the Detector was loaded from, where it was (the file there may be replaced by now)
    loaded = det.loaded_sha256(source) if source else None
    return {
        "format": fmt,
        "model": det.model.name,
        "model_config": det.model.config(),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "source": str(source) if source else None,
        "source_digest": None if not source else f"sha256:{loaded}" if loaded else _digest(source),
        "image_size": det.image_size,
        "precision": det.precision,
        "batch": batch,
        "dynamic_batch": dynamic_batch,
        # "N" where the file takes any number of images (the batch it was traced with is "batch")
        "input": {"name": "images", "dtype": "uint8", "shape": [n, 3, det.image_size, det.image_size],
                  "layout": "NCHW RGB", "range": [0, 255],
                  # what the stored thresholds were set on: a photo of another size brought to the
                  # model's size as the package reads image files (another resize moves the scores)
                  "resize": f"to {det.image_size} x {det.image_size} as defect_fast.data.io.resize_image: PIL "
                            f"Image.resize(BILINEAR) of the 8-bit RGB image (Pillow {PIL.__version__})",
                  "grey": "the one channel repeated to three",
                  # how the package's reader makes 8-bit RGB of a file, before the resize
                  "orientation": "turned upright by its EXIF orientation first (2 to 8; where PIL's "
                                 "Image.getexif finds it), as defect_fast.data.io.upright",
                  "bit_depth": "16-bit grey scaled, 65535 -> 255 (round(v * 255 / 65535)); 16-bit colour by "
                               "the high byte of each value (as PIL decodes it)",
                  "alpha": "dropped, not blended; a palette expanded to its colours"},
        # the training images' [lowest, highest] width:height ratio (None, and no margin: not recorded):
        # every photo is stretched to S x S, so one more than proportions_margin times outside it is
        # stretched otherwise than the model learnt (the package's readers and the C++ runner warn of it)
        "trained_proportions": list(det.trained_proportions) if det.trained_proportions is not None else None,
        "proportions_margin": PROPORTIONS_MARGIN if det.trained_proportions is not None else None,
        "outputs": {"maps": [n, det.image_size, det.image_size], "scores": [n]},
        "map": det.map_kind,
        "patch": det.patch,
        "stride": det.stride,
        "blend": det.blend,
        "smooth_sigma": det.smooth_sigma,
        "top_k": det.top_k,
        "normalization": det.normalization(),
        "context": det.context is not None,  # the image context is in maps and scores (defect_fast/context.py)
        "context_profile": det.context.profile if det.context is not None else "none",
        # whether the image score's top values include the profile (files before v6) or not
        "context_profile_in_score": bool(det.context.profile_in_score) if det.context is not None else None,
        # with a context: the image score is "combined" (map's top values + context score) or "context" alone
        "image_score": det.context.image_score if det.context is not None else None,
        # the mean brightness (0..1) images are scaled to before the AlexNet trunk, or None (as read)
        "brightness": {"perceptual": getattr(det.image_map, "brightness", None),
                       "context": det.context.brightness if det.context is not None else None},
        "thresholds": {"score": image_t, "pixel": pixel_t},
        # a frame the file scores low and a threshold would pass, which the package never passes
        "blank_frames": "an image of one colour throughout at image_size x image_size (every channel constant: a "
                        "covered lens, a failed exposure) is not a part: never pass it by its score (predict flags it "
                        "defective, watch sets it aside unjudged, the C++ runner exits with status 2)",
        # the precision the thresholds' scores were computed in (None: not recorded, files before it);
        # another than "precision" above moves the file's scores by that rounding
        "thresholds_precision": cal.get("precision") if image_t is not None else None,
        "threshold_source": _for_export(threshold_source),
        # the held-back or calibration image whose score "score" is, where the model file names it
        "threshold_image": image_name,
        # the model file's record of its calibration, as stored: with far, its own image threshold is
        # not the one in "thresholds", which the file is to judge by
        "calibration": cal,
    }


class ExportError(UserError, ValueError):
    """Export arguments that cannot work together (named as their command-line options)."""


def _check_arguments(fmt: str, precision: str, batch: int) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "float32" and fmt != "torchscript":
        raise ExportError(f"--precision {precision} exports TorchScript files (--format torchscript); {fmt} "
                          f"files are float32 only")
    if batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    if fmt == "onnx":
        try:
            importlib.import_module("onnx")  # torch's exporter writes the file with it
        except ImportError:
            raise ExportError("--format onnx needs the onnx package, which is not installed: pip install onnx "
                              "(or give --format torchscript or exported)") from None


def export_detector(det: Detector, out: Path | str, fmt: str, batch: int = 1, source: Path | None = None,
                    precision: str = "float32", far: float | None = None, *, overwrite: bool = False) -> Path:
    """Write ``det``'s pipeline to ``out`` in format ``fmt`` (see :data:`FORMATS`) plus ``out.json``
    (its image threshold for false-alarm rate ``far`` when given, set from the stored held-back scores;
    ``file_digest``, the SHA-256 of ``out``, which :func:`read_sidecar` checks).

    The detector is exported on the CPU in ``precision`` (see the module docstring; ``det`` must
    have been built with it); its patch chunking is switched off (one model call per batch) so the
    graph holds no Python loop. An existing ``out`` or ``out.json`` is replaced only with
    ``overwrite``. Both files are complete before either is put in place, the description last: a
    failure leaves the earlier pair (or nothing); only a crash between the two renames can leave a
    new file beside an earlier description, which its ``file_digest`` then gives away. Without
    ``overwrite``, a file another process puts at either name during the export is not replaced:
    the export is refused and leaves none of its own. Returns ``out``.
    """
    _check_arguments(fmt, precision, batch)
    inputs = [source] if source is not None else []
    out = safe_output_file(out, overwrite, inputs=inputs, what="out", flag="overwrite=True")
    safe_output_file(sidecar_path(out), overwrite, inputs=inputs, what="out's description", flag="overwrite=True")
    if det.precision != precision and (det.fuse or precision != "float32"):
        raise ValueError(f"export: the detector runs in {det.precision}; a {precision} export needs one built "
                         f"with precision={precision!r}")
    if det.precision != precision:  # an unfused Detector, exported in float32: said, as a load in another precision is
        warnings.warn(f"export: the file computes in {precision}, this Detector in {det.precision}: its maps and scores "
                      "differ from the Detector's by that rounding, a score near a threshold perhaps to its other side "
                      "(the description's thresholds_precision names the precision its thresholds were measured in)",
                      stacklevel=2)
    s = det.image_size
    try:  # before the detector is touched: a batch this process cannot hold is the argument's error
        example = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        example.new_empty(example.shape, dtype=torch.float32)  # the trace's float copy of it must fit too
    except (MemoryError, RuntimeError) as exc:
        if not allocation_failed(exc):
            raise
        raise ExportError(f"--batch {batch}: the example batch the export traces, {batch} images at {s} x {s}, needs "
                          f"{batch * 3 * s * s * 5 / 2**30:.1f} GiB with its float copy, more than this process can "
                          "allocate; give a "
                          "smaller --batch") from None
    # a copy is traced: the caller's Detector, which a service may be calling meanwhile, keeps its
    # device, settings and modes (they were switched while it was traced). TorchScript and ONNX on
    # the CPU trace one that shares its tensors (a deep copy failed on what a program hangs on its
    # Detector: a lock, a hook); torch.export puts stand-in tensors in the modules it traces for
    # the length of the export, so it, and a Detector on another device, get a deep copy
    if det.device.type == "cpu" and fmt != "exported":
        det = det._twin().eval()
    else:
        try:
            det = copy.deepcopy(det).to("cpu").eval()
        except Exception as exc:  # "cannot pickle '_thread.lock' object", a tensor that is no graph leaf...
            why = "--format exported" if fmt == "exported" else f"an export of a Detector on {det.device}"
            raise ExportError(f"export: {why} traces a deep copy of it, and it holds something that cannot be copied "
                              f"({type(exc).__name__}: {one_line(str(exc))[:200]}); export one loaded from its model "
                              "file") from None
    det.batch_size = 0
    if precision == "float32":  # the portable graph: float32, the default layout
        det.precision, det.channels_last = "float32", False
    dynamic = False
    fh = io.BytesIO()  # the file's bytes, whose digest goes into the description before either is written
    with reference_ops(), torch.no_grad(), warnings.catch_warnings():
        # the tracers' own notes, not the program's: the filters are the process's, and ignoring every
        # warning hid other threads' (a blank frame a camera thread met) while the export ran
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"(torch|onnx|onnxscript)(\.|$)")
        warnings.filterwarnings("ignore", module=r"defect_fast\.export$")  # torch's, told at the calls below
        if fmt == "torchscript":
            traced = torch.jit.trace(det, (example,), check_trace=False)
            torch.jit.save(torch.jit.script(_CheckedImages(traced, s, det.trained_proportions)), fh)
            dynamic = True  # the traced shape arithmetic follows the batch size
        elif fmt == "onnx":
            torch.onnx.export(det, (example,), fh, input_names=["images"], output_names=["maps", "scores"],
                              dynamic_axes={"images": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)
            fh = _maps_sides_pinned(fh, s)
            dynamic = True
        else:
            try:
                # torch.export specialises a size of 1: trace the dynamic graph with at least 2 images
                wide = example if batch > 1 else example.expand(2, -1, -1, -1).clone()
                ep = torch.export.export(det, (wide,), dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
                dynamic = True
            except Exception:  # a graph that specialises on the batch: export it for this batch only
                ep = torch.export.export(det, (example,))
            torch.export.save(ep, fh)
        meta = sidecar(det, fmt, batch, dynamic, source, far)
        meta["precision"] = precision  # what the file computes in (det may run otherwise outside the export)
    del det  # the copy traced, let go before the file's bytes are written
    data = fh.getvalue()
    meta["file_digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
    text = dump_json_strict(meta, indent=2)  # a value JSON cannot hold fails before anything is written
    # each under a temporary name, fsynced, then renamed into place: the file, then its description;
    # without overwrite, neither over a file another process put there during the export (the file
    # placed first is taken back when its description's name is taken)
    placed = earlier = None
    try:
        with atomic_open(sidecar_path(out), "w", encoding="utf-8", replace=overwrite, unlisted=True) as desc:
            desc.write(text)
            desc.flush()
            os.fsync(desc.fileno())
            earlier = _keep_earlier(out) if overwrite else None
            with atomic_open(out, replace=overwrite, unlisted=True) as file:
                file.write(data)
            placed = os.stat(out)
    except (FileExistsError, OutputRefused) as exc:  # a name taken, or reserved by another command, meanwhile
        if placed is not None and is_same_file(out, placed):  # not left without its description: the earlier back
            if earlier is not None:
                os.replace(earlier, out)
                earlier = None
            else:
                os.unlink(out)
        if isinstance(exc, OutputRefused):
            raise
        raise _NameTaken(exc.filename, "overwrite=True") from None
    finally:
        if earlier is not None:
            with contextlib.suppress(OSError):
                os.unlink(earlier)
    return out


def _keep_earlier(out: Path) -> Path | None:
    """A second name (a hard link) for the file at ``out`` that an ``overwrite`` export replaces,
    to put it back if the export is refused after its file took the name; None where there is
    none (or no link can be made)."""
    if not out.is_file() or out.is_symlink():
        return None
    keep = out.with_name(f".{out.name}.{os.getpid()}.earlier")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(keep)
        os.link(out, keep)
    except OSError:
        return None
    return keep


class _NameTaken(ExportError):
    """A file that appeared at one of the export's names during the export (not replaced)."""

    def __init__(self, path: str, flag: str):
        super().__init__(f"{path}: a file appeared there while the detector was exported; not replacing it (pass "
                         f"{flag} to replace it, or choose another name)")
        self.path = path


def read_sidecar(path: Path | str) -> dict[str, Any]:
    """The description of the exported file ``path`` (read from ``path.json``), after checking that
    it describes this file: its ``file_digest`` must be the file's SHA-256. Raises
    :class:`ExportError`, one line naming the file, for a missing, unreadable or mismatched
    description (a file replaced without its description, or the reverse); descriptions written
    before the digest was recorded are refused as unverifiable."""
    path = Path(path)
    desc = sidecar_path(path)
    try:
        meta = json.loads(desc.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{desc}: no description beside {path.name} (export writes FILE.json with FILE)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{desc}: cannot be read as a description ({one_line(str(exc))})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("file_digest"), str):
        raise ExportError(f"{desc}: records no file_digest, so it cannot be checked against {path.name}; "
                          f"export the file again")
    try:
        digest = _digest(path)
    except OSError as exc:
        raise ExportError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if digest != meta["file_digest"]:
        raise ExportError(f"{desc}: describes another file than {path.name} (its file_digest differs from the "
                          f"file's); export them again together")
    return meta


def sidecar_path(out: Path | str) -> Path:
    """``FILE.json``, the description written beside an exported ``FILE``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def export(run: Path | str, out: Path | str, fmt: str, *, batch: int = 1, overwrite: bool = False,
           map_kind: str | None = None, stride: int | None = None, smooth_sigma: float | None = None,
           blend: str | None = None, precision: str = "float32", far: float | None = None) -> Path:
    """``defect-fast export``: the run's detector (options as in :class:`Detector`) to ``out``; with
    ``far``, the sidecar's image threshold is the one for that false-alarm rate."""
    # the file and its sidecar: never inside the run, never replaced without --overwrite (before the model is read)
    out = safe_output_file(out, overwrite, inputs=[run], what="--out")
    safe_output_file(sidecar_path(out), overwrite, inputs=[run], what="--out's description")
    _check_arguments(fmt, precision, batch)
    det = Detector.load(run, device="cpu", map_kind=map_kind, stride=stride, smooth_sigma=smooth_sigma, blend=blend,
                        precision=precision)
    if far is not None:
        try:
            stored_thresholds(det.calibration, far)  # a rate the run cannot give fails before the export
        except CalibrationError as exc:
            raise CalibrationError(_for_export(str(exc))) from None
    try:
        return export_detector(det, out, fmt, batch=batch, source=model_file(run), precision=precision, far=far,
                               overwrite=overwrite)
    except _NameTaken as exc:  # said as the command's option
        raise _NameTaken(exc.path, "--overwrite") from None


__all__ = ["FORMATS", "PRECISIONS", "ExportError", "export", "export_detector", "read_sidecar", "sidecar", "sidecar_path"]
