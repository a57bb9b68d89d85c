"""Inference: full images -> anomaly maps, image scores and defect regions, as one ``nn.Module``.

:class:`Detector` holds the model and the whole pipeline on one device: resize to the training
size, cut into patches (stride = patch: tiles; smaller: overlapping), reconstruct, map each patch
with the model's rule (``AnomalyModel.anomaly_maps``), stitch with blending weights, normalise by
stored per-position statistics (identity until :meth:`Detector.fit_normalization` fills them),
optionally smooth, and score. :meth:`Detector.forward` is a pure tensor function, so the same
module is what ``defect-fast export`` traces.

Optional smoothing (``smooth_sigma`` > 0, off by default as in both papers): a Gaussian blur of
the stitched map, the usual post-processing of anomaly maps (sigma 4 at 256 px in anomalib).

Image score rule: the mean of the largest 0.1 % of the map's values (at least one pixel). It
follows the strongest defect evidence, like the map maximum, but a single noisy pixel cannot set
it on its own. With an image context (``context``, :mod:`defect_fast.context`) the map is the
anomaly map plus the context map and the score that map's score plus the context score, each
term standardised by its defect-free mean and spread; the context's band profile is in the map
but not in the map the score's top values come from (its module docstring says why).

Speed options (constructor keywords; "auto" picks per device, from measurements in
``benchmarks/bench_inference.py``):

- ``precision``: "auto" = bfloat16 on CUDA (float16 where the GPU has no bfloat16) and on CPUs
  whose /proc/cpuinfo flags include ``avx512_bf16`` or ``amx_bf16``; float32 elsewhere. The model
  runs under ``torch.autocast``; the fused ops run in float32 inside it, maps are float32. On a
  2-core AVX512-BF16 EPYC: CMA-AE x2.9-3.4 and the AW-SSIM AE x3.1-3.6 faster than the eager
  float32 pipeline at batch 1, metrics within 0.03 point (benchmarks/README.md).
- ``channels_last``: "auto" = on (on a 2-core AVX2 EPYC: AW-SSIM AE about x1.5 faster per image,
  CMA-AE no slower; also the layout oneDNN and cuDNN prefer for reduced-precision convolutions).
  Patches are cut straight into that layout (one copy).
- ``fuse``: "auto" = on: the Detector runs an inference copy of the model
  (:func:`defect_fast.fuse.fuse_for_inference`: batch norms folded into the convolutions,
  convolutions with a single output position as matrix products; weights channels-last when
  ``channels_last`` is on, and stored in the ``precision`` dtype when that is not float32, so
  autocast does not cast them on every call). The model handed in is left as it is. On a 2-core AVX2 EPYC,
  CMA-AE at batch 1: 441 -> 265 ms per 512x512 image (``benchmarks/inference_variants.py``).
- ``batch_size`` (patches per model call): "auto" = about 64 64x64 patches' worth of pixels on a
  CPU (the activations stay in cache: 512 patches per call made batch 8 slower per image than
  batch 1), 4096 on CUDA.
- ``compile``: wrap the per-chunk model call in ``torch.compile`` (off by default; never needed).
- ``cuda_graphs``: capture :meth:`forward` in a CUDA graph per input shape and replay it (CUDA
  only; off by default).
- ``cudnn_benchmark``: "auto" = on with CUDA: cuDNN times its algorithms once per input shape and
  keeps the fastest, for the duration of each call (its heuristics can pick slow kernels for
  transposed convolutions). Not yet measured on a GPU: the GPU suite times the tuned inference
  with it (step ``inference``) and without it (``inference_heur``, ``bench_inference.py
  --cudnn-benchmark off``, a process of its own: cuDNN keeps the first plan it finds for a shape).
- ``threads``: intra-op CPU threads while :meth:`predict_batched` runs (None: torch's setting).
  On a CPU shared with other busy processes one thread can be several times faster than two
  (threads waiting on each other at every op); see the benchmark notes.

With ``precision="float32", channels_last=False`` maps equal the plain pipeline's up to float32
summation order.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import numbers
import os
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.patches import grid_shape, overlap_add
from .maps import blend_window, blur_matrix, resize_map, top_mean
from .models import AnomalyModel
from .precision import cpu_flags, cpu_has_bf16, cudnn_benchmark, default_precision  # noqa: F401  (re-exported)
from .calibration import calibrate as calibrate_thresholds, colour_scale, defect_regions, stored_thresholds
from .runs import RunError, load_model_file, model_file, model_from_state, resolve_device
from .safety import UserError, one_line
from .tracing import tracing

TOP_FRACTION = 0.001
BLENDS = ("none", "hann")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_CHUNK_PIXELS = 64 * 64 * 64  # patch pixels per model call on a CPU ("auto" batch_size)
CUDA_CHUNK_PIXELS = 4096 * 64 * 64


def default_batch_size(device: torch.device | str, patch: int) -> int:
    """``batch_size="auto"``: patches per model call for ``patch`` x ``patch`` patches on ``device``."""
    pixels = CUDA_CHUNK_PIXELS if torch.device(device).type == "cuda" else CPU_CHUNK_PIXELS
    return max(1, pixels // (patch * patch))


#: Held through a :func:`cpu_threads` block: the count it sets is the process's.
_THREADS_LOCK = threading.RLock()
#: The process the first Detector was made in: a process forked from it inherits its OpenMP
#: thread pool in a state no thread of the child can join (the child's first parallel op waits
#: for ever; torch's GNU OpenMP, with or without defect_fast).
_MADE_IN: list[int] = []


def _check_not_forked(threads: int | None) -> None:
    """Refuse to run in a process forked from one that made a Detector, where the first parallel
    op would hang for ever (multiprocessing's "fork" start method, Linux's default before Python
    3.14): a clear error instead. One thread runs no OpenMP team, and is allowed."""
    pid = os.getpid()
    if not _MADE_IN:
        _MADE_IN.append(pid)
    elif _MADE_IN[0] != pid and (threads if isinstance(threads, int) and threads > 0 else torch.get_num_threads()) > 1:
        own = isinstance(threads, int) and threads > 1  # the Detector's own count wins over the process's
        raise RuntimeError(
            "Detector: this process was forked from one that had made a Detector, and torch's OpenMP threads "
            "do not survive a fork (its first parallel op would wait for ever): start workers with the 'spawn' "
            "or 'forkserver' method (multiprocessing.get_context('spawn')), or "
            + (f"make the Detector with threads=1 (it has threads={threads}) for forked workers"
               if own else "call torch.set_num_threads(1) in each forked worker before it uses the Detector"))


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, the previous count restored after (None: no change).

    The count is the process's (the one a new thread starts with) as well as the calling
    thread's, so blocks run one at a time: two Detectors with their own ``threads`` called at
    once from two threads each gave back the count it had seen, one the other had set among
    them, and the process kept it (new threads started with 1 or 3 of the program's 2)."""
    if n is None:
        yield
        return
    with _THREADS_LOCK:
        old = torch.get_num_threads()
        if n != old:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if n != old:
                torch.set_num_threads(old)


#: Held while a CUDA graph is captured or replayed (its input and output buffers are shared).
_GRAPH_LOCK = threading.Lock()
#: Held while a Detector's workspace dict is read and changed (a few dict operations per chunk).
_WORKSPACE_LOCK = threading.Lock()


#: Held while the set of Detectors sharing their tensors (:meth:`Detector.__copy__`) is made or read.
_SHARING_LOCK = threading.Lock()


class _FitLock:
    """One Detector's calls and fits: calls run together, a fit runs alone. A fit waits for the
    calls in progress and holds new ones until it ends (a call from another thread that read the
    context, the map or the normalisation a fit was replacing mixed the old with the new: a wrong
    score, or an AttributeError). Reentrant: a fit's own calls, and a call's nested ones, pass."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._calls: dict[int, int] = {}  # thread -> nesting depth of its calls
        self._fitter: int | None = None  # the thread whose fit runs
        self._depth = 0  # nesting depth of its fits
        self._waiting = 0  # fits waiting: new calls wait behind them (a steady stream of calls never let one in)

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            counted = self._fitter != me
            if counted:
                if me not in self._calls:
                    while self._fitter is not None or self._waiting:
                        self._cond.wait()
                self._calls[me] = self._calls.get(me, 0) + 1
        try:
            yield
        finally:
            if counted:
                with self._cond:
                    self._calls[me] -= 1
                    if not self._calls[me]:
                        del self._calls[me]
                        self._cond.notify_all()

    @contextlib.contextmanager
    def fit(self, what: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._fitter != me:
                if me in self._calls:
                    raise RuntimeError(f"Detector.{what}: called inside a call of the same Detector on this thread, "
                                       "it would wait for itself; call it once the call has returned")
                self._waiting += 1
                try:
                    while self._fitter is not None or self._calls:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._fitter = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._fitter = None
                    self._cond.notify_all()


#: Each Detector's :class:`_FitLock` (made at its first call; a copy has its own).
_FIT_LOCKS: "weakref.WeakKeyDictionary[nn.Module, _FitLock]" = weakref.WeakKeyDictionary()
_FIT_LOCKS_LOCK = threading.Lock()


def _fit_lock(detector: nn.Module) -> _FitLock:
    with _FIT_LOCKS_LOCK:
        lock = _FIT_LOCKS.get(detector)
        if lock is None:
            lock = _FIT_LOCKS[detector] = _FitLock()
        return lock


def _locks_anew_in_child() -> None:
    """A forked child's locks, made anew: a lock another thread of the parent held at the fork is
    held for ever in the child, where no thread releases it (a worker's Detector with threads=1
    waited on _THREADS_LOCK while a parent thread was inside a call)."""
    global _THREADS_LOCK, _GRAPH_LOCK, _WORKSPACE_LOCK, _SHARING_LOCK, _FIT_LOCKS, _FIT_LOCKS_LOCK
    _THREADS_LOCK, _GRAPH_LOCK, _WORKSPACE_LOCK = threading.RLock(), threading.Lock(), threading.Lock()
    _SHARING_LOCK = threading.Lock()
    _FIT_LOCKS, _FIT_LOCKS_LOCK = weakref.WeakKeyDictionary(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_locks_anew_in_child)
#: CUDA graphs a Detector keeps (one per input shape; each holds its own memory pool): a new shape
#: beyond these lets the least recently used one go, so that GPU memory does not grow with every
#: batch size a caller passes.
MAX_GRAPHS = 8

#: Workspace buffers (one per chunk shape, dtype, device and calling thread) kept between calls;
#: beyond these the least recently used one goes.
MAX_WORKSPACE = 8

#: Bytes the workspace buffers of a Detector may hold together: the least recently used go to make
#: room, and a larger buffer is its call's own (one forward of 600 images held 64 MB for the life
#: of a service whose later calls were of one image).
MAX_WORKSPACE_BYTES = 256 * 2**20


def _recently_used(cache: dict, key: Any, room: int) -> Any:
    """``cache[key]``, moved last (the most recently used), or None when it is not there, after
    the least recently used entries went until fewer than ``room`` are left: the caller adds the
    new entry (last)."""
    entry = cache.pop(key, None)
    if entry is not None:
        cache[key] = entry
        return entry
    while len(cache) >= room:
        del cache[next(iter(cache))]
    return None


def _check_default_dtype() -> None:
    """The Detector builds and computes in float32; a calling program's
    ``torch.set_default_dtype(torch.float64)`` made it fail deep inside with dtype mismatches."""
    dtype = torch.get_default_dtype()
    if dtype != torch.float32:
        raise RuntimeError(f"Detector: torch's default dtype is {dtype} (torch.set_default_dtype); the Detector is "
                           "built and computes in torch.float32: set that default around its construction and calls")


def _own_precision(method):
    """Runs a Detector ``method`` with a caller's autocast switched off on the Detector's device: the
    Detector computes (and fits its statistics) in its ``precision`` option (its own autocast,
    inside), the arithmetic its statistics and thresholds were set with, whatever autocast the
    calling program has open."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        _check_default_dtype()
        kind = self.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return method(self, *args, **kwargs)
        return method(self, *args, **kwargs)
    return run


#: The calibration's numbers a command judges by, or reads a rate from: each a finite number where
#: it is there (a NaN threshold flagged nothing, ``score > nan`` being false for every part).
_CALIBRATION_NUMBERS = ("image_threshold", "pixel_threshold", "score_max", "pixel_q999", "far", "far_expected",
                        "pixel_far", "score_mean", "score_std")


def _checked_calibration(calibration: Any, where: Any) -> dict | None:
    """A model file's calibration, refused (RunError, one line) where a threshold or a rate is not a
    finite number, the held-back scores are not a list of them, or a text it shows is not text."""
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        raise RunError(f"{where}: its calibration is a {type(calibration).__name__}, not a table of thresholds (a "
                       "damaged model file, or one written by hand?)")

    def number(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    bad = [k for k in _CALIBRATION_NUMBERS if calibration.get(k) is not None and not number(calibration[k])]
    scores = calibration.get("held_back_scores")
    if scores is not None and not (isinstance(scores, list) and all(number(v) for v in scores)):
        bad.append("held_back_scores")
    highest = calibration.get("highest_scores")  # [name, score] pairs (older files' rates under --far read them)
    if highest is not None and not (isinstance(highest, list) and all(
            isinstance(h, (list, tuple)) and len(h) == 2 and isinstance(h[0], str) and number(h[1]) for h in highest)):
        bad.append("highest_scores")
    n = calibration.get("n_images")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        bad.append("n_images")
    bad += [k for k in ("note", "threshold_image", "source", "images") if calibration.get(k) is not None
            and not isinstance(calibration[k], str)]
    if bad:
        shown = one_line(repr(calibration[bad[0]]))[:60]
        kind = {"note": "text", "threshold_image": "text", "source": "text", "images": "text",
                "n_images": "a whole number", "highest_scores": "a list of [image, finite score] pairs"}
        raise RunError(f"{where}: its calibration's {bad[0]} ({shown}) is not {kind.get(bad[0], 'a finite number')} "
                       "(a damaged model file, or one written by hand?); set its thresholds again with "
                       "'defect-fast calibrate'")
    return calibration


def _entry_point(method):
    """A public Detector method that runs the model or its statistics: refused where it would hang
    (:func:`_check_not_forked`), and run whole with the Detector's ``threads`` (the checks and
    resizing of the images before the model too: a forked worker's Detector with ``threads=1``
    hung in them, or in ``forward``, which took none). Called as traced or exported, as it is."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if tracing():
            return method(self, *args, **kwargs)
        _check_not_forked(self.threads)
        with _fit_lock(self).call(), cpu_threads(self.threads):
            return method(self, *args, **kwargs)
    return run


def _whole(method):
    """A public Detector method that reads what a fit replaces without running the model (save):
    it waits for a fit in progress, as a call does (a save in the middle of fit_normalization wrote
    the new normalisation beside the thresholds it was about to set aside)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with _fit_lock(self).call():
            return method(self, *args, **kwargs)
    return run


def _without_caches(state: dict[str, Any]) -> dict[str, Any]:
    """A Detector's ``__dict__`` (a copy of it) as a copy or a pickle takes it: its caches empty (a
    ``Detector.compile()`` too: its compiled call ran the original Detector), and in no set of
    Detectors sharing their tensors (a deep copy shares nothing)."""
    state["_workspace"], state["_graphs"], state["_compiled"], state["_sharing"] = {}, {}, None, None
    state["_compiled_call_impl"] = None
    return state


def _alone(detector: nn.Module, what: str) -> contextlib.AbstractContextManager:
    """Run a change of what calls read alone on ``detector`` (:class:`_FitLock`), as it is when
    traced or exported."""
    return contextlib.nullcontext() if tracing() else _fit_lock(detector).fit(what)


def _fit(method):
    """A public Detector method that changes what calls read (the normalisation, the map, the
    context, the thresholds): it runs alone on its Detector (:class:`_FitLock`). Outermost, above
    :func:`_entry_point`."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with _alone(self, method.__name__):
            return method(self, *args, **kwargs)
    return run


def _plain_tensors(method):
    """Runs a fit with a caller's inference mode switched off (its grad mode kept): the statistics
    it keeps are then plain tensors. Fitted inside ``torch.inference_mode()`` they were inference
    tensors, which a later ``load_state_dict`` could not write into (its own snapshot included)
    and an unfused Detector's ``forward`` with gradients on could not use."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return method(self, *args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():  # (no grad inside inference mode either)
            return method(self, *args, **kwargs)
    return run


class SettingError(UserError, ValueError):
    """An inference setting the loaded model cannot take (a stride that does not tile the image,
    ...): one line at the command line, a ValueError for callers."""


def _retold(exc: Exception, message: str) -> Exception:
    """``exc``'s kind of exception with ``message`` (a ValueError or TypeError where that kind
    cannot be made from a message alone)."""
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 - an exception class of other arguments
        return (TypeError if isinstance(exc, TypeError) else ValueError)(message)


def _check_pixels(images: torch.Tensor, where: str) -> None:
    """Refuse what the pipeline would silently misread: dtypes other than uint8 and float, and
    float values that are not finite or lie outside [-1, 1] (a [0, 255] image passed as float)."""
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise TypeError(f"{where}: images must be uint8 (0..255) or float in [-1, 1], got {images.dtype}; "
                        "scale other types to uint8 first, rounded as a 16-bit file is read (16-bit: "
                        "round(x * 255 / 65535) for data of the full 16-bit range, round(x * 255 / (2**bits - 1)) "
                        "for a 10-, 12- or 14-bit camera's)")
    lo, hi = (float(v) for v in torch.aminmax(images.float()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: the images hold NaN or infinite values")
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{where}: float images must lie in [-1, 1], these span {lo:.4g}..{hi:.4g}; pass uint8 "
                         "0..255 images, or map [0, 1] ones with x * 2 - 1")
    if lo >= 0.0:  # torchvision's to_tensor gives [0, 1]: read as [-1, 1], every pixel is lighter, without a word
        from .data.io import DataWarning, _callers_level

        # one text (no values): the warning registry keeps one entry, however many calls
        warnings.warn(f"{where}: float images are read as [-1, 1] and these lie in [0, 1], as no image of dark "
                      "pixels does: if they are [0, 1] images (torchvision's to_tensor), map them with x * 2 - 1 "
                      "(images of light pixels only are read as given)", DataWarning, stacklevel=_callers_level())


def _integer(name: str, value: Any, minimum: int, or_else: str = "") -> int:
    """``value`` as an int, refused in one line unless it is an integer >= ``minimum`` (not a bool,
    not a float: 2.7 was taken as 2 and True as 1); ``or_else`` names what else the argument
    takes, in the message ("'auto' or ")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be {or_else}an integer >= {minimum}, got {value!r}")
    return int(value)


def _real(name: str, value: Any) -> float:
    """``value`` as a float, refused in one line unless it is a finite real number (numpy's and a
    0-d tensor's included; a string or a bool is not)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _flag(name: str, value: Any, auto: bool | None = None) -> bool:
    """``value`` as a bool, refused unless True or False (bool("no") is True); with ``auto``,
    "auto" is allowed too and gives it."""
    if auto is not None and isinstance(value, str) and value == "auto":
        return auto
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True or False" if auto is None else "True, False or 'auto'"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return bool(value)


def _statistic(name: str, value: Any, size: int, positive: bool = False) -> torch.Tensor:
    """A per-position normalisation statistic as a float32 tensor: a number or [size, size],
    finite (and > 0 for a std), refused in one line otherwise (a std of 0 made every score inf, a
    negative one flipped them, a [64, 64] one met a [128, 128] map only at the first call)."""
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if t.dim() != 0 and tuple(t.shape) != (size, size):
        raise ValueError(f"{name} must be a number or [{size}, {size}] (the image size), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or (positive and not bool((t > 0).all())):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''} everywhere")
    return t


#: How to get a Detector with another value of each setting fixed at construction.
_REBUILD = {
    "image_size": "build another: Detector(model, image_size=...) (a run's model file holds the size it was trained at)",
    "stride": "build another: Detector(model, ..., stride=...) or Detector.load(run, stride=...)",
    "blend": "build another: Detector(model, ..., blend=...) or Detector.load(run, blend=...)",
    "smooth_sigma": "build another: Detector(model, ..., smooth_sigma=...) or Detector.load(run, smooth_sigma=...)",
    "patch": "it is the model's patch size",
    "grid": "it follows image_size and stride",
    "top_k": "it follows image_size and top_fraction: build another with Detector(model, ..., top_fraction=...) or "
             "Detector.load(run, top_fraction=...)",
    "fuse": "build another: Detector(model, ..., fuse=...) or Detector.load(run, fuse=...)",
}


#: :meth:`Detector.fit_normalization` floors each position's std at this share of the std's
#: root-mean-square over the positions (a z-score of 10 for a change of a typical std there).
NORM_STD_FLOOR = 0.1


def _fixed(name: str, why: str = "its patch grid, blending window, blur and score follow it") -> property:
    """A setting the Detector's grid, blending window, blur or top-k follow (or its model's layers):
    set when it is built, refused in one line afterwards (set later, it met buffers built for the
    old value deep in torch)."""
    key = "_" + name

    def get(self):
        return self.__dict__[key]

    def put(self, value):
        if key in self.__dict__:
            raise AttributeError(f"Detector.{name} is fixed when the Detector is built ({why}); {_REBUILD[name]}")
        self.__dict__[key] = value

    return property(get, put, doc=f"``{name}`` as built (read only).")


def _model_source(model: AnomalyModel) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(name, config, a CPU copy of the weights) of ``model``: what a model file stores of it."""
    return model.name, model.config(), {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _file_path(path: Path | str) -> Path:
    """A file's path as the file it names: its folder with links and ".." resolved, its own name
    kept (a link there is the file at that name, whatever it points to)."""
    p = Path(path)
    return Path(os.path.realpath(p.parent)) / p.name


def _top_count(pixels: int, top_fraction: float) -> int:
    """How many of a map's ``pixels`` values its image score averages (at least one)."""
    return max(1, int(round(pixels * top_fraction)))


def _non_blank(images: torch.Tensor, shown: Sequence[str], what: str, at_least: int,
               keep_all: bool = False) -> torch.Tensor | bool | None:
    """Which of ``images`` a fit or a calibration takes: None, all of them (no blank frame, one
    colour throughout); a bool mask leaving the blank frames out, said in a
    :class:`~defect_fast.data.io.BlankFramesWarning` that names up to three of them by ``shown``.
    Where fewer than ``at_least`` others are left: False (the caller refuses), or with
    ``keep_all`` None, all of them, said in the warning (a fit takes what it needs at least, as a
    training's fits do)."""
    from .data.io import BlankFramesWarning, _callers_level, blank_images, warn_data

    blank = blank_images(images)
    if not bool(blank.any()):
        return None
    left = blank.nonzero().flatten().tolist()
    named = f"({', '.join(shown[i] for i in left[:3])}{', ...' if len(left) > 3 else ''})"
    if int((~blank).sum()) < at_least:
        if not keep_all:
            return False
        warn_data(f"{what}: {len(left)} of the {len(shown)} images are blank frames, one colour throughout {named}, "
                  f"kept as fewer than {at_least} others are left: its statistics rest on them; give more photographs "
                  "of defect-free parts", stacklevel=_callers_level(), category=BlankFramesWarning)
        return None
    warn_data(f"{what}: {len(left)} blank frame(s), one colour throughout, are left out: a camera fault, which watch "
              f"sets aside and never judges {named}", stacklevel=_callers_level(), category=BlankFramesWarning)
    return ~blank


def _fit_on(images: torch.Tensor, what: str, at_least: int, label: str = "image") -> torch.Tensor:
    """``images`` but for blank frames, which a fit leaves out as a training's fits do
    (:func:`_non_blank` with ``keep_all``: all of them where fewer than ``at_least`` others are left)."""
    keep = _non_blank(images, [f"{label} {i}" for i in range(images.shape[0])], what, at_least, keep_all=True)
    return images if keep is None else images[keep]


def image_scores(maps: torch.Tensor, top_fraction: float = TOP_FRACTION) -> torch.Tensor:
    """maps [N, H, W] -> [N]: mean of the top ``top_fraction`` of each map's values."""
    return top_mean(maps, _top_count(maps.shape[-1] * maps.shape[-2], top_fraction))


def reference_ops():
    """Run the fused ops as their pure-PyTorch reference inside the block (for tracing/export), in
    the calling thread only (:func:`defect_fast.ops.reference_only`)."""
    from .ops import reference_only

    return reference_only()


def find_regions(m: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Connected components (8-connected) of ``m`` [H, W] > threshold.

    Returns one dict per region, largest peak first: {"box": (x0, y0, x1, y1) (x1, y1 exclusive),
    "area": pixels, "peak": the largest map value inside}. The regions of
    :func:`defect_fast.calibration.defect_regions` (whose boxes are inclusive), all of them.
    """
    return [{"box": (r["x0"], r["y0"], r["x1"] + 1, r["y1"] + 1), "area": r["area"], "peak": r["peak"]}
            for r in defect_regions(m, threshold, max_regions=None)]


#: What a model file records of the run behind its weights: its settings and images (digests, names,
#: the images it held back, the pixel keys of those it trained on, fitted its map on and set its
#: thresholds on), its objective and precision. A Detector loaded from it keeps them, and
#: :meth:`Detector.save` writes them again (as :meth:`Detector._record_fit` and
#: :meth:`Detector.calibrate` leave them).
RUN_RECORD = ("train_config", "held_back", "image_keys", "data_digest", "data_count", "data_files", "sources_digest",
              "objective", "train_precision", "train_seconds", "compute")
#: Calibration keys that hold thresholds or name what set them (older model files: score_max, pixel_q999).
THRESHOLD_KEYS = ("image_threshold", "pixel_threshold", "score_max", "pixel_q999", "threshold_image", "highest_scores",
                  "held_back_scores", "score_brightness_rank_correlation")
#: Those of them that are of the image score, not of the map (another top_fraction leaves the map as it is).
SCORE_KEYS = ("image_threshold", "score_max", "threshold_image", "highest_scores", "held_back_scores",
              "score_brightness_rank_correlation")


def _changed_settings(stored: dict, model: AnomalyModel, map_kind: str | None, stride: int | None,
                      smooth_sigma: float | None, blend: str | None) -> list[str]:
    """The inference settings asked for that differ from a run's stored ones, as "name was -> now"
    (none when the model file stores no settings)."""
    if not stored:
        return []
    was = {"map": model.check_map(stored.get("map_kind")), "stride": stored.get("stride") or model.patch_size,
           "smooth": float(stored.get("smooth_sigma") or 0.0), "blend": stored.get("blend") or "none"}
    now = {"map": None if map_kind is None else model.check_map(map_kind),
           "stride": None if stride is None else (stride or model.patch_size),
           "smooth": None if smooth_sigma is None else float(smooth_sigma), "blend": blend}
    changed = [k for k in was if now[k] is not None and now[k] != was[k]]
    if changed == ["blend"] and was["stride"] >= model.patch_size:  # tiles: no overlap for a window to blend
        changed = []
    return [f"{k} {was[k]} -> {now[k]}" for k in changed]


class Detector(nn.Module):
    """A trained model plus the rules that turn its reconstructions into defect maps and scores.

    Args:
        model: a trained :class:`~defect_fast.models.AnomalyModel`.
        image_size: side S of the square images the model was trained on (inputs are resized to it).
        map_kind: a key of ``model.anomaly_maps``; ``None`` uses the model's default.
        stride: patch stride at inference; ``None`` = patch size (tiles, no overlap).
        device: where the whole pipeline runs ("auto": cuda when visible).
        batch_size: patches per model call inside :meth:`forward` (0: all at once; "auto": see
            :func:`default_batch_size`).
        calibration: statistics of defect-free maps from :meth:`calibrate` (optional).
        smooth_sigma: Gaussian blur (pixels) of the full-image map; 0 = none.
        blend: "none" (overlaps averaged) or "hann" (sin^2 window weights, seam-free overlaps).
        top_fraction: the image score is the mean of this fraction of the largest map values.
        precision: "auto" (:func:`default_precision`), "float32", "bfloat16" or "float16" (the
            model runs under ``torch.autocast``, the perceptual map's and the context's frozen
            trunk in that dtype; maps, scores and statistics stay float32).
        channels_last: feed the model channels-last patches (True, False or "auto" = True).
        fuse: run an inference copy of the model with BN folded and single-position
            convolutions as matrix products (True, False or "auto" = True); see above.
        reuse_features: the MSFR map takes the encoder features of the patches from the forward
            pass (``out["features"]``) instead of running the encoder on them again (same map).
        compile: run the per-chunk model call through ``torch.compile`` (first call compiles).
        cuda_graphs: replay :meth:`forward` from a CUDA graph captured once per input shape
            (CUDA devices only; outputs are copies, safe to keep; the graphs of the
            :data:`MAX_GRAPHS` shapes used last are kept).
        cudnn_benchmark: let cuDNN time its convolution algorithms for each new input shape and
            keep the fastest, while :meth:`forward` runs on a CUDA device
            (:func:`~defect_fast.precision.cudnn_benchmark`; the global setting is restored after
            each call). True, False or "auto" = True on CUDA; nothing changes on a CPU. The first
            call of a shape takes longer (a CUDA graph captures after it).
        threads: ``torch.set_num_threads`` while :meth:`predict_batched` runs (restored after;
            the count is the process's, so such calls run one at a time in a process); None
            leaves torch's setting, and calls from several threads run at once.
        norm_mean, norm_std: map normalisation (map - mean) / std, scalars or [S, S]; default 0 and 1.
        perceptual: a fitted :class:`~defect_fast.perceptual.PerceptualMap`, needed when
            ``map_kind`` is "perceptual" (one of ``model.image_maps``): the map is then computed on
            the whole image and its stitched reconstruction instead of patch by patch.
        context: a fitted :class:`~defect_fast.context.ImageContext` (:meth:`fit_context`): maps
            and scores then add the context's map and score. With the perceptual map, the trunk
            layers both run on the image (conv1 and conv2 of the same AlexNet) are computed once.

    ``trained_proportions``: the training images' [lowest, highest] width-to-height ratio, which
    a run's model file records (None: not known); :meth:`predict` warns of images far outside it,
    once a Detector (:meth:`check_proportions` warns at every call, for the callers that read many).

    ``model_sha256`` and ``model_path``: the SHA-256 (hex) of the model file's bytes a :meth:`load`
    built it from, and that file's path (None: not loaded from a file, or saved or given other
    weights since). :meth:`loaded_sha256` gives it for the model's version, as watch, report and
    export record it.
    """

    #: see the class's docstring
    trained_proportions: list[float] | None = None
    model_sha256: str | None = None
    model_path: Path | None = None

    def __init__(self, model: AnomalyModel, image_size: int, map_kind: str | None = None, stride: int | None = None,
                 device: torch.device | str = "cpu", batch_size: int | str = "auto", calibration: dict[str, Any] | None = None,
                 smooth_sigma: float = 0.0, *, blend: str = "none", top_fraction: float = TOP_FRACTION,
                 precision: str = "auto", channels_last: bool | str = "auto", compile: bool = False,
                 cuda_graphs: bool = False, threads: int | None = None, reuse_features: bool = True, fuse: bool | str = "auto",
                 cudnn_benchmark: bool | str = "auto",
                 norm_mean: torch.Tensor | float | None = None, norm_std: torch.Tensor | float | None = None,
                 perceptual: nn.Module | None = None, context: nn.Module | None = None):
        super().__init__()
        _check_not_forked(threads)
        _check_default_dtype()
        fuse = _flag("fuse", fuse, auto=True)
        image_size = _integer("image_size", image_size, 1)
        if stride is not None:
            stride = _integer("stride", stride, 1)
        smooth_sigma, top_fraction = _real("smooth_sigma", smooth_sigma), _real("top_fraction", top_fraction)
        compile, cuda_graphs = _flag("compile", compile), _flag("cuda_graphs", cuda_graphs)
        reuse_features = _flag("reuse_features", reuse_features)
        channels_last = _flag("channels_last", channels_last, auto=True)
        device = resolve_device(device)
        cudnn_benchmark = _flag("cudnn_benchmark", cudnn_benchmark, auto=device.type == "cuda")
        if precision == "auto":
            precision = default_precision(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto' or one of {tuple(PRECISIONS)}, got {precision!r}")
        if fuse:
            from .fuse import fuse_for_inference

            # what save() writes: the model as given (the fused copy has other layers and dtypes)
            self.__dict__["_source"] = _model_source(model)
            # weights stored in the autocast dtype once (the same rounding autocast applies per call)
            model = fuse_for_inference(model, None if precision == "float32" else PRECISIONS[precision])
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
        self.fuse = fuse
        self.model = model.eval()
        self.image_size = int(image_size)
        self.patch = model.patch_size
        self.stride = stride or self.patch
        self.__dict__["_map_kind"] = model.check_map(map_kind)
        for name, part in (("perceptual", perceptual), ("context", context)):
            # statistics per position of another image size: a wrong map (perceptual) or a failure deep in torch
            if part is not None and getattr(part, "image_size", self.image_size) != self.image_size:
                raise ValueError(f"{name} is built for {part.image_size}-px images, this Detector's image_size "
                                 f"is {self.image_size}; fit it at that size")
        self.image_map = perceptual if self.map_kind in model.image_maps else None
        self.context = context
        if self.map_kind in model.image_maps and perceptual is None:
            raise ValueError(f"map {self.map_kind!r} needs the statistics fitted at the end of training; "
                             f"this model file has none (train with --map {self.map_kind})")
        if self.image_size < self.patch:  # before the grid, whose message names the images (any size is resized)
            raise ValueError(f"image_size {self.image_size} is smaller than the model's patch size {self.patch}: "
                             f"use image_size >= {self.patch}")
        if self.stride > self.patch:  # before the grid, whose hint would name sizes this refuses
            raise ValueError(f"stride {self.stride} > patch {self.patch} leaves pixels uncovered")
        self.grid = grid_shape(self.image_size, self.patch, self.stride)
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        if batch_size == "auto":
            batch_size = default_batch_size(device, self.patch)
        batch_size = _integer("batch_size", batch_size, 0, "'auto' or ")
        if threads is not None:
            threads = _integer("threads", threads, 1, "None or ")
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
        if not (math.isfinite(smooth_sigma) and 0 <= smooth_sigma <= image_size):
            raise ValueError(f"smooth_sigma must be a number from 0 to the image size {image_size} (a wider blur "
                             f"flattens the map), got {smooth_sigma}")
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.blend, self.channels_last = blend, channels_last
        self.__dict__["_precision_name"] = precision
        self.batch_size = int(batch_size)
        self.torch_compile, self.cuda_graphs, self.threads = compile, cuda_graphs, threads
        self.reuse_features = reuse_features
        self.cudnn_benchmark = cudnn_benchmark
        self._compiled = None
        self._workspace: dict[tuple, torch.Tensor] = {}
        self._graphs: dict[tuple, tuple] = {}
        self.calibration = dict(calibration or {})
        self.smooth_sigma = float(smooth_sigma)
        self.top_k = _top_count(self.image_size**2, top_fraction)
        s = self.image_size
        window = blend_window(self.patch, blend)
        self.register_buffer("window", window, persistent=False)
        ones = window.reshape(1, 1, self.patch, self.patch).expand(self.grid[0] * self.grid[1], 1, -1, -1)
        # a copy: F.fold may hand back a view into a larger storage, which an export would write whole
        self.register_buffer("count", overlap_add(ones, self.grid, self.patch, self.stride)[:, 0].clone(),
                             persistent=False)
        blur = blur_matrix(s, self.smooth_sigma).float() if self.smooth_sigma > 0 else torch.empty(0)
        self.register_buffer("blur", blur, persistent=False)
        self.register_buffer("norm_mean", _statistic("norm_mean", 0.0 if norm_mean is None else norm_mean, s))
        self.register_buffer("norm_std", _statistic("norm_std", 1.0 if norm_std is None else norm_std, s, positive=True))
        self.to(device)
        self._shared_stem(self.context)  # decided here, outside any trace

    def train(self, mode: bool = True) -> "Detector":
        """Sets :attr:`training`, and puts its parts in eval mode whatever ``mode``: a Detector
        infers. ``det.train()``, or one from a module that holds the detector, switched an unfused
        model's batch norms to each batch's statistics, and taught them these, so that every later
        map changed, after ``eval()`` too; a part set to train mode by hand is put back too."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for part in self.children():
            part.train(False)
        return self

    def __getstate__(self) -> dict[str, Any]:
        """What a pickle or a copy takes: the caches left out (buffers of the threads that called
        it, CUDA graphs, a compiled pipeline), which the copy builds again when it runs; they made a
        pickle half again as large as the model file. Taken whole: it waits for a fit in progress,
        and its tables (of parts, buffers, settings) are copies, which a fit begun afterwards leaves
        as they were (a copy taken in the middle of fit_normalization had the new normalisation
        beside the thresholds set on the old)."""
        with _fit_lock(self).call():
            return _without_caches({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
                                    for k, v in self.__dict__.items()})

    def __deepcopy__(self, memo: dict) -> "Detector":
        """``copy.deepcopy``, made whole while no fit runs (it waits for one, as a pickle does), of
        the Detector's own tables: what it shares with other objects copied with it stays shared in
        the copy, as a deep copy of any object keeps it."""
        with _fit_lock(self).call():
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__setstate__(copy.deepcopy(_without_caches(dict(self.__dict__)), memo))
        return new

    def __copy__(self) -> "Detector":
        """``copy.copy``: the same weights and statistics (tensors and parts shared), with settings,
        thresholds and tables of parts, buffers and hooks of its own, so that a fit, a ``map_kind``
        or a calibration of either leaves the other as it was (a module's copy shared those tables:
        a fit on the copy changed the original's maps, which kept its old thresholds). Its caches
        start empty. While both live, neither moves to another device nor loads other weights
        (each would change the tensors they share under the other's thresholds, or leave the other
        half moved): ``copy.deepcopy`` gives a Detector of its own for that."""
        new = self._twin()
        with _SHARING_LOCK:  # two threads' first copies made two sets: the original then moved under one
            sharing = self.__dict__.get("_sharing")
            if sharing is None:
                sharing = self.__dict__["_sharing"] = weakref.WeakSet([self])
            sharing.add(new)
            new.__dict__["_sharing"] = sharing
        return new

    def _twin(self) -> "Detector":
        """:meth:`__copy__` without joining the Detectors that share its tensors: for a use that
        neither moves it nor loads weights into it (``export`` traces one with other settings)."""
        twin = self.__class__.__new__(self.__class__)
        twin.__dict__.update(self.__getstate__())
        return twin

    def _shares_tensors(self, what: str) -> None:
        """Refuse ``what`` (a move, a load of other weights) while a shallow copy of this Detector,
        or the one it was copied from, lives: they share their tensors (:meth:`__copy__`)."""
        sharing = self.__dict__.get("_sharing")

        def others() -> bool:
            with _SHARING_LOCK:  # (a set that another thread's copy grows while it is read raised)
                return sharing is not None and any(other is not self for other in list(sharing))

        if others():
            import gc

            gc.collect()  # a copy let go whose own references hold it (a compiled pipeline) leaves the set
        if others():
            raise RuntimeError(f"Detector: {what} is refused while a shallow copy of it (copy.copy), or the Detector "
                               "it was copied from, lives: they share their weights and statistics; copy.deepcopy "
                               "gives a Detector of its own")

    def to_empty(self, *, device, recurse: bool = True):
        self._shares_tensors("to_empty")  # (on its own device it fills the tensors the other reads)
        return super().to_empty(device=device, recurse=recurse)

    def _apply(self, fn, *args, **kwargs):
        with _alone(self, "to"):  # a call in progress on another thread met tensors half moved
            return self._apply_alone(fn, *args, **kwargs)

    def _apply_alone(self, fn, *args, **kwargs):
        # a module that holds the Detector cast (host.half(), host.to(torch.float64)) reaches this
        # without Detector.to: every later call then failed deep inside, or ran its statistics and
        # thresholds in a precision they were not set in
        for dtype in {t.dtype for t in itertools.chain(self.parameters(), self.buffers()) if t.is_floating_point()}:
            if fn(torch.zeros((), dtype=dtype)).dtype != dtype:
                raise TypeError(f"Detector: a cast of its {dtype} tensors (a module that holds it cast?): the "
                                f"precision of a Detector is its precision option (one of {tuple(PRECISIONS)}; it "
                                f"runs in {self.precision}); cast the other parts alone, or build it with "
                                "precision=...")
        if fn(torch.zeros((), device=self.device)).device != self.device:  # (a cast alone keeps the device)
            self._shares_tensors("a move to another device")
        self._workspace, self._graphs = {}, {}  # buffers of the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    # The dtype of the weights is the ``precision`` option's: a cast of the module (``.half()``,
    # ``.to(torch.float16)``) failed deep inside the first convolution, or ran the statistics,
    # windows and blur in a precision they were not fitted in.
    def _refuse_cast(self, how: str):
        raise TypeError(f"Detector.{how}: the precision of a Detector is its precision option (one of "
                        f"{tuple(PRECISIONS)}; it runs in {self.precision}): build one with precision=...")

    def to(self, *args, **kwargs):
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        # (float32 on a float32 Detector changes nothing: to(tensor) follows a tensor's device)
        if dtype is not None and not (dtype == torch.float32 and self.precision == "float32"):
            self._refuse_cast("to(dtype)")
        return super().to(*args, **kwargs)

    def type(self, dst_type):
        self._refuse_cast("type()")

    def half(self):
        self._refuse_cast("half()")

    def bfloat16(self):
        self._refuse_cast("bfloat16()")

    def float(self):
        return self.to(torch.float32)  # a no-op on a float32 Detector, refused on the others

    def double(self):
        self._refuse_cast("double()")

    image_size = _fixed("image_size")
    patch = _fixed("patch")
    stride = _fixed("stride")
    grid = _fixed("grid")
    blend = _fixed("blend")
    smooth_sigma = _fixed("smooth_sigma")
    top_k = _fixed("top_k")
    fuse = _fixed("fuse", "its model's layers were folded for it, or not: the precision and save() follow it")

    @property
    def map_kind(self) -> str:
        """The map the pipeline computes. Set to another map of the model, the stored thresholds
        (set on the old map's values) are set aside and a normalisation (fitted on the old map's
        values) is removed, as :meth:`load` drops it; once a perceptual map or an image context is
        fitted (on the maps of this kind), it is fixed."""
        return self.__dict__["_map_kind"]

    @map_kind.setter
    def map_kind(self, value: str) -> None:
        with _alone(self, "map_kind"):  # waits for the calls in progress, as a fit does
            self._set_map_kind(value)

    def _set_map_kind(self, value: str) -> None:
        kind = self.model.check_map(value)
        if kind == self.map_kind:
            return
        if kind in self.model.image_maps and self.image_map is None:  # as the constructor refuses it
            raise ValueError(f"map {kind!r} needs the statistics fitted at the end of training; this Detector has "
                             f"none: Detector.load(run) of a run trained with --map {kind}")
        if self.image_map is not None or self.context is not None:
            raise AttributeError(f"Detector.map_kind is fixed once a perceptual map or an image context is fitted "
                                 f"(on {self.map_kind!r} maps); build another: Detector.load(run, map_kind={kind!r})")
        before = self.map_kind
        self.__dict__["_map_kind"] = kind
        self._graphs = {}
        # a normalisation's statistics are of the old map's values (the residual's mean 0.34 came out at 197)
        self._drop_normalization()
        # named by the map they were set on: a map changed back reads as the map named otherwise
        self._set_aside_thresholds(f"calibrated with other inference settings (on the {before!r} map; map_kind changed "
                                   f"to {kind!r}, which a change back does not undo)")

    @property
    def precision(self) -> str:
        """The dtype the pipeline computes in ("float32", "bfloat16", "float16"). A fused model
        holds its weights in it, so it is fixed there; an unfused one may be given another."""
        return self.__dict__["_precision_name"]

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {value!r}")
        if value != self.precision and self.fuse:
            raise AttributeError(f"Detector.precision is fixed for a fused model (its weights are stored in "
                                 f"{self.precision}); build another with precision={value!r}")
        with _alone(self, "precision"):  # waits for the calls in progress, as a fit does
            self.__dict__["_precision_name"] = value
            self._workspace, self._graphs, self._compiled = {}, {}, None

    def options(self) -> dict[str, Any]:
        """The speed options in force (after "auto" was resolved), JSON-ready."""
        return {"precision": self.precision, "channels_last": self.channels_last, "batch_size": self.batch_size,
                "compile": self.torch_compile, "cuda_graphs": self.cuda_graphs, "threads": self.threads,
                "reuse_features": self.reuse_features, "fuse": self.fuse, "cudnn_benchmark": self.cudnn_benchmark}

    @property
    def device(self) -> torch.device:
        return self.window.device

    def image_threshold(self) -> float:
        """The stored pass/fail threshold of image scores (a score above it fails), the one the
        command line and ``watch`` use. :class:`SettingError` (a ValueError) saying why when there
        is none: set aside by other inference settings or a refit (:meth:`calibrate` sets new ones),
        or a model file without one. A method, not a property: torch's tracing looks at every
        attribute of a module and lets only an AttributeError pass."""
        from .calibration import stored_thresholds

        threshold, _pixel, note = stored_thresholds(self.calibration)
        if threshold is None:
            why = self.calibration.get("inapplicable")
            raise SettingError(f"no image threshold: the stored ones were {why}; calibrate(normal_images) sets new "
                               "ones" if why else f"no image threshold: {note}")
        return float(threshold)

    @classmethod
    def load(cls, run: Path | str, device: str | torch.device = "auto", map_kind: str | None = None,
             stride: int | None = None, smooth_sigma: float | None = None, **options) -> "Detector":
        """The finished model of a run folder (``RUN/model.pt``) or a model file, as a Detector.

        ``options`` are the keyword-only constructor options (blend, precision, ...). The run's
        stored inference settings (``state["detector"]``: map, stride, blend, smoothing) are the
        defaults of the arguments left at None; when one given differs from them, the stored
        thresholds (calibrated on the stored settings' maps and scores) are left out and
        ``calibration["inapplicable"]`` says why (:func:`~defect_fast.calibration.stored_thresholds`
        then gives none); another ``top_fraction`` (a score of another number of top values) sets
        aside the image-score thresholds only, and the map's pixel threshold and colour scale stay;
        stored normalisation statistics
        (``state["normalization"]``), perceptual-map statistics (``state["perceptual"]``) and the image
        context (``state["context"]``) are restored, none of them with another ``map_kind`` than
        the stored one (each was measured on the stored kind's maps). With another ``map_kind``, the AlexNet trunk
        of the perceptual map and the context left out is kept: a later :meth:`fit_perceptual` or
        :meth:`fit_context` runs it, as on the stored kind, with no weights file.
        """
        path = model_file(run)  # once: the file may be gone once read (an output folder cleared)
        state, sha = load_model_file(path)
        det = cls.from_state(state, device, map_kind, stride, smooth_sigma, where=run, **options)
        det.loaded_from(path, sha)
        return det

    def loaded_from(self, path: Path | str, sha256: str) -> None:
        """Record that this Detector was built from the model file ``path`` whose bytes, as read,
        have the SHA-256 ``sha256`` (:meth:`load` does; for a Detector built by :meth:`from_state`
        of :func:`~defect_fast.runs.load_model_file`'s dict)."""
        self.model_path, self.model_sha256 = _file_path(path), sha256

    def loaded_sha256(self, path: Path | str) -> str | None:
        """The SHA-256 of the bytes this Detector was loaded from, when ``path`` names the file it
        was loaded from (the file there may have been replaced since); None otherwise, and once it
        was saved or given other weights: the caller reads the file."""
        if self.model_sha256 is None or self.model_path is None:
            return None
        return self.model_sha256 if _file_path(path) == self.model_path else None

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "auto", map_kind: str | None = None,
                   stride: int | None = None, smooth_sigma: float | None = None, *, where: Path | str = "model file",
                   **options) -> "Detector":
        """:meth:`load` of a model-file dict already in memory (as
        :func:`~defect_fast.runs.load_model_state` returns it); ``where`` names it in errors.

        The caller's random numbers are left as they were: building the model draws initial weights,
        which the stored ones then replace (a program's seeded draws after a load came out otherwise).
        torch's generator is the process's, so its state is put back for every thread: another
        thread that draws random numbers while a Detector loads draws some of them again."""
        with torch.random.fork_rng(devices=[]):
            return cls._from_state(state, device, map_kind, stride, smooth_sigma, where=where, **options)

    @classmethod
    def _from_state(cls, state: dict[str, Any], device: str | torch.device, map_kind: str | None, stride: int | None,
                    smooth_sigma: float | None, *, where: Path | str, **options) -> "Detector":
        def stored_part(part: str, build: Callable[[], Any]) -> Any:
            """A part of the file as stored; one line naming the file when it does not load."""
            try:
                return build()
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise RunError(f"{where}: the stored {part} does not load ({type(exc).__name__}: {exc}); "
                               "written by another version of defect_fast?") from None

        from .data.io import _callers_level, warn_data

        fixed = sorted(set(options) & {"image_size", "model", "calibration", "norm_mean", "norm_std", "perceptual",
                                       "context"})
        if fixed:  # the constructor's, which the file gives: "got multiple values for keyword argument" said less
            raise SettingError(f"{where}: {', '.join(fixed)} cannot be given to load: the model file fixes "
                               f"{'it' if len(fixed) == 1 else 'them'} (the images are resized to its image size)")
        for part in ("detector", "normalization", "calibration", "perceptual", "context"):
            if state.get(part) is not None and not isinstance(state[part], dict):
                raise RunError(f"{where}: the stored {part} is a {type(state[part]).__name__}, not a dict; "
                               "written by another version of defect_fast?")
        stored = dict(state.get("detector") or {})
        norm = state.get("normalization") or {}
        perceptual = None
        if state.get("perceptual"):
            from .perceptual import PerceptualMap

            perceptual = stored_part("perceptual map", lambda: PerceptualMap.from_state(state["perceptual"]))
        model = model_from_state(state, where)
        context = None
        # the context's standardisation of the map, and a per-position normalisation, were measured
        # on the stored map kind's maps only (another kind's are on another scale)
        stored_kind = stored_part("map kind", lambda: model.check_map(stored.get("map_kind")))
        same_kind = model.check_map(map_kind or stored_kind) == stored_kind
        if state.get("context"):
            from .context import ImageContext

            if same_kind:
                context = stored_part("image context", lambda: ImageContext.from_state(state["context"]))
            else:  # left out: read for its trunk only, which one that does not load does not give
                with contextlib.suppress(KeyError, TypeError, ValueError, RuntimeError):
                    context = ImageContext.from_state(state["context"])
        # another map kind leaves out the stored context and perceptual map; their trunk is kept
        set_aside = [] if same_kind else [m for m in (perceptual, context) if m is not None]
        if not same_kind:
            norm, context = {}, None
        calibration = _checked_calibration(state.get("calibration"), where)
        changed = _changed_settings(stored, model, map_kind, stride, smooth_sigma, options.get("blend"))
        # the score averages another number of top values (a file stores the default's: save refuses another)
        top = options.get("top_fraction")
        pixels = state["image_size"] ** 2 if isinstance(state.get("image_size"), int) else None
        other_score = isinstance(top, numbers.Real) and 0 < top <= 1 and pixels is not None \
            and _top_count(pixels, top) != _top_count(pixels, TOP_FRACTION)
        if (changed or other_score) and calibration:
            # thresholds hold only for the map and score they were calibrated on: none rather than a wrong one
            # (another score alone: the pixel threshold and the colour scale, of the map, stay)
            calibration = {k: v for k, v in calibration.items() if k not in (THRESHOLD_KEYS if changed else SCORE_KEYS)}
            calibration["inapplicable"] = ("calibrated with other inference settings ("
                                           + ", ".join(changed + ([f"top_fraction {TOP_FRACTION} -> {top}"] if other_score else []))
                                           + ")")
        fitted = [name for name, part in (("perceptual map", perceptual), ("image context", context),
                                          ("per-position normalisation", norm.get("std"))) if part is not None]
        if changed and same_kind and fitted:
            # their statistics were measured on maps made at the run's settings: other settings give
            # maps they do not standardise (evaluate --stride 64 --blend none: the map term at +18.7 +- 14.3)
            parts = fitted[0] if len(fitted) == 1 else f"{', '.join(fitted[:-1])} and {fitted[-1]}"
            # (kept in no warning registry, as its text names the file: a service loading many would grow it)
            warn_data(f"{where}: the {parts} of the run {'was' if len(fitted) == 1 else 'were'} fitted at its "
                      "inference settings, not "
                      f"at {', '.join(changed)}: maps and scores are not in units of their defect-free spread "
                      "as trained (and the stored thresholds are set aside)", stacklevel=_callers_level(),
                      category=UserWarning)
        map_kind = map_kind or stored.get("map_kind")
        stride = stride if stride is not None else stored.get("stride")
        smooth_sigma = smooth_sigma if smooth_sigma is not None else stored.get("smooth_sigma", 0.0)
        if options.get("blend") is None:
            options["blend"] = stored.get("blend", "none")
        if isinstance(stride, int) and 0 < stride <= model.patch_size:  # the grid of the file's size: strides only
            try:
                grid_shape(state["image_size"], model.patch_size, stride, size_fixed=True)
            except (ValueError, TypeError) as exc:
                raise SettingError(f"{where}: {exc}") from None
        try:
            detector = cls(model, image_size=state["image_size"], map_kind=map_kind, stride=stride,
                           device=resolve_device(device), calibration=calibration, smooth_sigma=smooth_sigma,
                           norm_mean=norm.get("mean"), norm_std=norm.get("std"), perceptual=perceptual,
                           context=context, **options)
        except ValueError as exc:  # an inference setting this model cannot take: the user's, said in one line
            raise SettingError(f"{where}: {exc}") from None
        measured = (calibration or {}).get("precision")
        if measured and measured != detector.precision and "inapplicable" not in calibration:
            # the thresholds hold at the scores of their precision: bf16 rounding moved an image context's
            # scores by 5 %, enough to flag the held-back image whose score the threshold is
            warn_data(f"{where}: its thresholds were measured in {measured}; this Detector computes in "
                      f"{detector.precision}, whose scores differ by that rounding, so images near a threshold "
                      f"may be judged otherwise; 'defect-fast calibrate RUN IMAGES --precision {detector.precision} "
                      "--out NEW_RUN' measures them in it (IMAGES: defect-free images the run has not seen; "
                      "--with-held-back adds those it held back)", stacklevel=_callers_level(), category=UserWarning)
        shape = state.get("trained_proportions")
        if shape is not None:
            if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(
                    type(r) in (int, float) and math.isfinite(r) and r > 0 for r in shape) and shape[0] <= shape[1]):
                raise RunError(f"{where}: its trained_proportions ({one_line(repr(shape))[:80]}) are not a [lowest, "
                               "highest] pair of width-to-height ratios (a damaged file, or one a later defect_fast "
                               "wrote?)")
            detector.trained_proportions = [float(r) for r in shape]
        if set_aside:  # a later fit_perceptual or fit_context runs the run's own trunk (no weights file)
            longest = max(set_aside, key=lambda m: len(m.convs))
            detector._spare_trunk = {k: w.to(detector.device) for k, w in
                                     longest.trunk_weights(len(longest.convs)).items()}
        # what the file records of the run behind the weights, which save() writes again: calibrate
        # refuses the images they were trained on, evaluate names them in a test set, audit refits
        detector.__dict__["_run_record"] = copy.deepcopy({k: state[k] for k in RUN_RECORD if state.get(k) is not None})
        return detector

    # -- the traced pipeline -------------------------------------------------------------------
    def _to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] (0..255) or float [N,3,H,W] ([-1, 1]) -> float [N,3,S,S] in [-1, 1]."""
        x = images.to(torch.float32).div(127.5).sub(1.0) if images.dtype == torch.uint8 else images.to(torch.float32)
        s = self.image_size
        if x.shape[-2] != s or x.shape[-1] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def _precision(self, device_type: str):
        """The autocast context of the ``precision`` option (a no-op for float32)."""
        # no weight-cast cache: each chunk casts each weight once anyway, and a CUDA graph must not keep it
        return torch.autocast(device_type, dtype=PRECISIONS[self.precision], cache_enabled=False) \
            if self.precision != "float32" else contextlib.nullcontext()

    def _trunk_options(self) -> dict[str, Any]:
        """How the perceptual map's and the context's frozen trunk run: in the ``precision``
        option's dtype, channels-last with the ``channels_last`` option (their outputs go on in float32)."""
        return {"dtype": None if self.precision == "float32" else PRECISIONS[self.precision],
                "channels_last": self.channels_last}

    def _shared_stem(self, ctx: nn.Module) -> int:
        """How many leading trunk layers the perceptual map computes on the image that the context
        ``ctx`` can take from it (the same weights; the perceptual map's full-size level): 0 when none."""
        pm = self.image_map
        if pm is None or ctx is None or 1 not in pm.scales:
            return 0
        # the answer holds for these two objects (held, so a new one at a freed one's address is not
        # taken for it) at these brightness levels (which shares_stem compares too); one tuple, so a
        # thread never reads a new key with an old count
        levels = (getattr(pm, "brightness", None), getattr(ctx, "brightness", None))
        cached = getattr(self, "_stem", None)
        if cached is None or cached[0] is not pm or cached[1] is not ctx or cached[2] != levels:
            if tracing():  # comparing weights is not traceable; the unshared path gives the same maps
                return 0
            cached = self._stem = (pm, ctx, levels, ctx.shares_stem(pm))
        return cached[3]

    def _patch_maps(self, p: torch.Tensor) -> torch.Tensor:
        """Patches [B,3,P,P] -> maps [B,1,P,P] (float32)."""
        if self.channels_last:
            p = p.contiguous(memory_format=torch.channels_last)
        with self._precision(p.device.type):
            out = self.model(p)
            m = self.model.anomaly_map(p, out["recon"], self.map_kind, out.get("features") if self.reuse_features else None)
        return m.float()

    def _chunk_maps(self, p: torch.Tensor) -> torch.Tensor:
        """:meth:`_patch_maps`, through ``torch.compile`` when the ``compile`` option is on."""
        if not self.torch_compile or tracing():
            return self._patch_maps(p)
        if self._compiled is None:
            self._compiled = torch.compile(self._patch_maps, dynamic=False)
        return self._compiled(p)

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A workspace tensor reused by later calls with the same shape (a fresh one while tracing,
        and while a CUDA graph is captured: the graph's own, from its memory pool; a workspace
        buffer would be written by every replay, from any thread, also after the workspace let it
        go and its memory went to other tensors)."""
        if tracing() or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
            return like.new_empty(shape)
        # per thread: two threads calling one Detector must not fill each other's buffer
        key = (name, shape, like.dtype, like.device, torch.is_inference_mode_enabled(), threading.get_ident())
        with _WORKSPACE_LOCK:  # threads share the dict: two evicting the same oldest key raised KeyError
            buf = _recently_used(self._workspace, key, MAX_WORKSPACE)  # shapes change: a few are kept
            if buf is None:
                buf = like.new_empty(shape)
                if type(buf) is torch.Tensor and buf.nbytes <= MAX_WORKSPACE_BYTES:  # (never a fake tensor)
                    while sum(b.nbytes for b in self._workspace.values()) + buf.nbytes > MAX_WORKSPACE_BYTES:
                        del self._workspace[next(iter(self._workspace))]
                    self._workspace[key] = buf
        return buf

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N,3,S,S] -> patches [N*gh*gw,3,P,P], row-major per image, cut in one copy
        (channels-last strides when that option is on)."""
        n, p = x.shape[0], self.patch
        gh, gw = self.grid
        view = x.unfold(2, p, self.stride).unfold(3, p, self.stride)  # [N,3,gh,gw,P,P], no copy
        if self.channels_last:
            return view.permute(0, 2, 3, 4, 5, 1).reshape(n * gh * gw, p, p, 3).permute(0, 3, 1, 2)
        return view.permute(0, 2, 3, 1, 4, 5).reshape(n * gh * gw, 3, p, p)

    def _chunk_bounds(self, total: int) -> list[tuple[int, int]]:
        """(start, stop) of the patches each model call takes of ``total``: ``batch_size`` at a time
        (0: all in one call). A call spans images: oneDNN rounds by a call's shape, so in bf16 an
        image's maps move slightly with the images called with it (a score by up to 0.0035 in a
        128-px ``--preset photos`` run); a call per image would hold them still, but cost small
        images up to 6.5 times their time (64-px tiles), and batch 1 is what the line service runs."""
        if not 0 < self.batch_size < total:
            return [(0, total)]
        return [(a, min(total, a + self.batch_size)) for a in range(0, total, self.batch_size)]

    @_entry_point
    @_own_precision
    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Stitched maps before normalisation and smoothing: images [N,3,H,W] -> [N,S,S]."""
        x = self._to_model_input(images)
        if self.image_map is not None:
            return self._image_map(x)
        n, s, p = x.shape[0], self.image_size, self.patch
        gh, gw = self.grid
        patches = self._patches(x)
        total = patches.shape[0]
        pooled = False  # maps in a workspace buffer
        bounds = self._chunk_bounds(total)
        if len(bounds) > 1:
            first = self._chunk_maps(patches[: bounds[0][1]])
            # a chunk that carries autograd history (an unfused model's weights, called outside
            # no_grad) goes to a tensor of this call: copied into the workspace, the history of
            # every call stayed attached to it (33 MB a call at 128 px)
            pooled = not first.requires_grad and not tracing()
            maps = self._buffer("maps", (total, 1, p, p), x) if pooled else x.new_empty((total, 1, p, p))
            maps[: bounds[0][1]] = first
            for start, stop in bounds[1:]:
                maps[start:stop] = self._chunk_maps(patches[start:stop])
        else:
            maps = self._chunk_maps(patches)
        if self.blend != "none":
            maps = maps * self.window
        if self.stride == p and self.blend == "none":  # tiles: stitching is one permuting copy
            out = maps.reshape(n, gh, gw, p, p).permute(0, 1, 3, 2, 4).reshape(n, s, s)
            return out.clone() if pooled and out.data_ptr() == maps.data_ptr() else out  # never a view of the workspace
        return overlap_add(maps, self.grid, p, self.stride)[:, 0] / self.count

    def _image_map(self, x: torch.Tensor, x_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The perceptual map of model-range images [N,3,S,S] and their stitched reconstructions;
        ``x_features``: the trunk's features of ``x`` when already computed."""
        return self.image_map(x, self._stitched_recon(x), x_features=x_features, **self._trunk_options())

    def _stitched_recon(self, x: torch.Tensor) -> torch.Tensor:
        """Model-range images [N,3,S,S] -> reconstructions [N,3,S,S], overlaps blended with the window."""
        p = self.patch
        patches = self._patches(x)
        recon = torch.cat([self._recon(patches[a:b]) for a, b in self._chunk_bounds(patches.shape[0])]) * self.window
        return overlap_add(recon, self.grid, p, self.stride) / self.count

    def _recon(self, p: torch.Tensor) -> torch.Tensor:
        """Patches [B,3,P,P] -> reconstructions [B,3,P,P] (float32, contiguous)."""
        with self._precision(p.device.type):
            return self.model(p)["recon"].float().contiguous()

    @_fit
    @_entry_point
    @_plain_tensors
    @_own_precision
    def fit_perceptual(self, normal_images: torch.Tensor, images_per_batch: int = 8, layers: int = 2,
                       prior: float = 0.01, scales: tuple[int, ...] | list[int] = (1,),
                       level_brightness: bool | float = False, placement: str = "cells",
                       trunk: dict[str, torch.Tensor] | None = None) -> int:
        """Build and fit the perceptual map on defect-free images (uint8 [N,3,H,W]) and switch to it.
        Blank frames among them are left out (a warning names them) where 2 others remain.
        ``level_brightness``: every image (and its reconstruction) reaches the trunk scaled to the
        mean brightness of ``normal_images`` (True) or to the level given, in [0, 1] (a float;
        :mod:`defect_fast.perceptual`, "Brightness"). ``placement``: where the trunk's cells go on
        the image (:data:`defect_fast.perceptual.PLACEMENTS`).

        The stored thresholds, set on the maps this replaces, are set aside (``calibration
        ["inapplicable"]`` says why; :meth:`calibrate` sets new ones); an image context, whose
        standardisation was measured on those maps, is removed (fit it again: :meth:`fit_context`),
        and so is a per-position normalisation of them (:meth:`fit_normalization` again).

        ``trunk``: AlexNet ``features.*`` weights; None: the trunk this detector holds already,
        when it holds one (a loaded run's), else the ImageNet trunk found as
        :func:`~defect_fast.losses.lpips.load_alexnet_trunk` finds it (``$DEFECT_FAST_ALEXNET_WEIGHTS``,
        torch's hub cache, torchvision's download). The same goes for :meth:`fit_context`.

        Returns the number of images its statistics rest on.
        """
        from .perceptual import PerceptualMap, brightness_level, checked_placement

        normal_images = self._at_model_size(self._checked_batch(normal_images, "fit_perceptual"))  # as predict_batched
        normal_images = _fit_on(normal_images, "fit_perceptual", 2)  # (one black frame: statistics of nothing)
        # scales as given: PerceptualMap checks them (tuple(2) here was a bare TypeError)
        pm = PerceptualMap(self.image_size, layers=layers, prior=prior, scales=scales,
                           trunk=trunk if trunk is not None else self._held_trunk(layers)).to(self.device)
        pm.placement = checked_placement(placement)  # before the fit: the statistics are on its grid
        pm.brightness = brightness_level(level_brightness, normal_images)
        with torch.no_grad():
            pairs = ((x, self._stitched_recon(x)) for x in
                     (self._to_model_input(c.to(self.device)) for c in normal_images.split(max(1, images_per_batch))))
            n = pm.fit(pairs, **self._trunk_options())
        self._stash_trunk()  # the context goes below: a later fit_context runs its trunk
        self.image_map = pm
        self._graphs = {}  # captured graphs ran the map this replaced
        self.__dict__["_map_kind"] = self.model.image_maps[0]
        # what was measured on the map this replaces: the thresholds, an image context's
        # standardisation of it (fit_context again) and a per-position normalisation of it
        # (fit_normalization again)
        self.context = None
        self._drop_normalization()
        self._set_aside_thresholds("calibrated before fit_perceptual changed the maps (calibrate again)")
        self._record_fit(normal_images)
        return n

    def _held_trunk(self, depth: Any) -> dict[str, torch.Tensor] | None:
        """AlexNet's first ``depth`` conv layers from a trunk this detector holds already (its
        perceptual map's or its image context's, which its model file carries, or one an earlier
        fit replaced), so that a map or a context fitted again runs the same trunk and needs no
        weights file; None when none holds that many (the new module then loads them:
        ``$DEFECT_FAST_ALEXNET_WEIGHTS``), or for a ``depth`` that is not a whole number (the
        module's own check says so)."""
        if not isinstance(depth, numbers.Integral) or isinstance(depth, bool):
            return None
        for module in (self.image_map, self.context):
            trunk = module.trunk_weights(int(depth)) if module is not None else None
            if trunk is not None:
                return trunk
        spare = getattr(self, "_spare_trunk", None) or {}
        if len(spare) < 2 * int(depth):
            return None
        # a spare whose first layers are not those a held module runs is another trunk (a fit given
        # one replaced it): not mixed in, where the map and the context share their first layers
        for module in (self.image_map, self.context):
            if module is not None and any(not torch.equal(w, spare[k].to(w.device))
                                          for k, w in module.trunk_weights(len(module.convs)).items()):
                return None
        return dict(list(spare.items())[:2 * int(depth)])

    def _stash_trunk(self) -> None:
        """Keep the longest trunk of the map and the context (for :meth:`_held_trunk`; of two as
        long, the context's, the later fitted) before a fit replaces or drops either:
        fit_perceptual drops the context, which fit_context then fits again on the same trunk."""
        for module in (self.image_map, self.context):
            if module is not None and 2 * len(module.convs) >= len(getattr(self, "_spare_trunk", None) or {}):
                self._spare_trunk = module.trunk_weights(len(module.convs))

    def _record_fit(self, *batches: torch.Tensor) -> None:
        """What :meth:`save` writes of the run after a fit in Python changed its maps: the fit's
        images among those the map has seen (``image_keys["fitted"]``, their pixel keys as files
        read at the model's size give them; float images, whose pixels are no file's, are not
        among them), which also tells audit that the maps are no longer the run's (it refuses the
        file), and no images known to set thresholds (``"calibrated"`` None: set aside) until
        :meth:`calibrate`."""
        from .data.io import image_keys

        fitted = dict.fromkeys(((self.__dict__.get("_run_record") or {}).get("image_keys") or {}).get("fitted") or [])
        for batch in batches:
            if batch.dtype == torch.uint8:  # each once: a service's hourly refit on the same images grew it every hour
                fitted.update(dict.fromkeys(k.hex() for k in image_keys(batch.cpu())))
        self._record_image_keys(fitted=list(fitted), calibrated=None)

    def _record_image_keys(self, **keys: list[str] | None) -> None:
        """``keys`` set in the run record's ``image_keys``, in new dicts: a shallow copy of this
        Detector keeps its own record."""
        record = dict(self.__dict__.get("_run_record") or {})
        record["image_keys"] = {**(record.get("image_keys") or {}), **keys}
        self.__dict__["_run_record"] = record

    def _set_aside_thresholds(self, why: str) -> None:
        """Drop the stored thresholds (set on maps or scores a fit has just changed), saying why:
        :func:`~defect_fast.calibration.stored_thresholds` then gives none, and nothing is flagged
        on a scale it was not set on."""
        if any(k in self.calibration for k in THRESHOLD_KEYS):
            self.calibration = {k: v for k, v in self.calibration.items() if k not in THRESHOLD_KEYS}
            self.calibration["inapplicable"] = why

    @_fit
    @_entry_point
    @_plain_tensors
    @torch.no_grad()
    @_own_precision
    def fit_context(self, normal_images: torch.Tensor, calibration_images: torch.Tensor, images_per_batch: int = 8,
                    profile: str = "none", level_brightness: bool | float = False, image_score: str = "combined",
                    placement: str = "cells", trunk: dict[str, torch.Tensor] | None = None) -> int:
        """Build an image context (:mod:`defect_fast.context`) and switch maps and scores to the combination.
        Blank frames among the images are left out (a warning names them) where 10 normal and 2
        calibration images remain.

        Args:
            normal_images: uint8 [N,3,H,W] defect-free images the context's Gaussians are fitted on
                (N >= 10; the model need not have been trained without them).
            calibration_images: uint8 [M,3,H,W] defect-free images (M >= 2) none of this Detector's
                statistics were fitted on: the defect-free mean and spread of its own map and of
                the combined score come from them.
            profile: the context's band profile, "none", "rows" or "columns"
                (:class:`~defect_fast.context.ImageContext`), or "auto": across the streaks of
                ``normal_images`` (:func:`~defect_fast.context.profile_across_streaks`, which
                raises ValueError when they share no direction); ``self.context.profile_basis``
                says which and why.
            level_brightness: every image reaches the context's trunk scaled to the mean
                brightness of ``normal_images`` (True) or to the level given, in [0, 1] (a float;
                :mod:`defect_fast.perceptual`, "Brightness").
            image_score: "combined" (the map's top values plus the context score) or "context"
                (the context score alone; :mod:`defect_fast.context`, "Image score").
            placement: where the trunk's cells go on the image (:data:`defect_fast.perceptual.PLACEMENTS`).
            trunk: AlexNet ``features.*`` weights (None: as :meth:`fit_perceptual` says).
        Returns:
            the number of images the context rests on.
        """
        return self._fit_context(normal_images, calibration_images, images_per_batch, profile, level_brightness,
                                 image_score, placement, trunk)[0]

    @torch.no_grad()
    @_own_precision
    def _fit_context(self, normal_images: torch.Tensor, calibration_images: torch.Tensor,
                     images_per_batch: int = 8, profile: str = "none", level_brightness: bool | float = False,
                     image_score: str = "combined", placement: str = "cells",
                     trunk: dict[str, torch.Tensor] | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """:meth:`fit_context`, and what :meth:`predict_batched` gives for the calibration images
        afterwards ({"maps": [M,S,S], "scores": [M]} on the CPU; of those not left out as blank
        frames), from the maps the fit computes anyway."""
        from .context import (LAYERS, MIN_IMAGES, PROFILES, ImageContext, checked_image_score, profile_across_streaks,
                              trunk_depth)
        from .perceptual import brightness_level

        checked_image_score(image_score)  # before the fit
        # at the model's size as predict_batched brings them there (uint8: as image files are resized)
        normal_images = self._at_model_size(self._checked_batch(normal_images, "fit_context"))
        calibration_images = self._at_model_size(self._checked_batch(calibration_images, "fit_context"))
        normal_images = _fit_on(normal_images, "fit_context", MIN_IMAGES, "normal image")
        calibration_images = _fit_on(calibration_images, "fit_context", 2, "calibration image")
        if calibration_images.shape[0] < 2:  # said before the fit, not after it
            raise ValueError(f"fit_context: calibration_images must hold at least 2 images (their spread sets the "
                             f"map's and the score's scale), got {calibration_images.shape[0]}")
        basis = None
        if profile == "auto":
            profile, basis = profile_across_streaks(normal_images)
        if trunk is None and profile in PROFILES:
            trunk = self._held_trunk(trunk_depth(LAYERS, profile))
        ctx = ImageContext(self.image_size, trunk=trunk, profile=profile, placement=placement).to(self.device)
        ctx.profile_basis = basis
        ctx.image_score = image_score
        ctx.brightness = brightness_level(level_brightness, normal_images)
        n = ctx.fit(lambda: (self._to_model_input(c.to(self.device)) for c in normal_images.split(32)),
                    **self._trunk_options())
        raw, feats = [], []
        for c in calibration_images.split(max(1, images_per_batch)):
            x = self._to_model_input(c.to(self.device))  # resized once for both
            r, f = self._maps_and_context(x, ctx)  # as inference computes them (trunk precision)
            raw.append(r)
            feats.append(f)
        # the map term's statistics are those of the normalised maps that finish() combines
        ctx.set_detector_stats(base_maps=torch.cat([(r - self.norm_mean) / self.norm_std for r in raw]))
        finished = [self.finish(r, *ctx.map_parts(f, self.image_size), ctx) for r, f in zip(raw, feats)]
        ctx.set_detector_stats(scores=torch.cat([sc for _m, sc in finished]))
        self._stash_trunk()
        self.context = ctx
        self._graphs = {}  # captured graphs ran without this context
        self._set_aside_thresholds("calibrated before fit_context changed the maps and scores (calibrate again)")
        self._record_fit(normal_images, calibration_images)
        scores = torch.cat([ctx.combine_scores(sc, f) for (_m, sc), f in zip(finished, feats)])
        return n, {"maps": torch.cat([m for m, _sc in finished]).cpu(), "scores": scores.cpu()}

    @_entry_point
    @_own_precision
    def finish(self, raw: torch.Tensor, context_map: torch.Tensor | None = None, profile: torch.Tensor | None = None,
               context: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps [N,S,S] -> (normalised, smoothed maps [N,S,S], scores [N]); with a context map,
        the maps are ``context.combine_maps`` of the normalised maps and it, and with the
        context's profile values [N,S] (``context.map_parts``) the maps add them, spread across
        the image and smoothed, while the scores take their top values from the maps without
        them (unless ``context.profile_in_score``, files from before that choice)."""
        maps, scored = self._finish_maps(raw, context_map, profile, context)
        return maps, top_mean(scored, self.top_k)

    def _finish_maps(self, raw: torch.Tensor, context_map: torch.Tensor | None = None,
                     profile: torch.Tensor | None = None, context: nn.Module | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`finish`'s maps: (the maps [N,S,S], the maps the scores take their top values
        from: the maps without the profile, or the maps themselves)."""
        ctx = context or self.context
        maps = (raw - self.norm_mean) / self.norm_std
        if context_map is not None:
            maps = ctx.combine_maps(maps, context_map)
        if self.smooth_sigma > 0:
            maps = self.blur @ maps @ self.blur.T
        if profile is None:
            return maps, maps
        # spread across the image and smoothed as the maps are: blur @ (v 1^T) @ blur^T = (blur v) 1^T,
        # since the blur's rows sum to 1 (edges replicated), so only the values along the image are blurred
        full = maps + ctx.spread(profile @ self.blur.T if self.smooth_sigma > 0 else profile, self.image_size)
        return full, (full if ctx.profile_in_score else maps)

    @_entry_point
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images uint8 [N,3,H,W] (0..255) or float [N,3,H,W] in [-1,1], on this module's device
        -> (maps [N,S,S] float32, larger = more anomalous; scores [N]).

        Images of another size than S are resized by the pipeline's own antialiased bilinear on
        float pixels (the traced and exported graph); :meth:`predict` and :meth:`predict_batched`
        resize uint8 images as image files are resized instead, which is what the stored thresholds
        were set on: give this method images at S x S (or float images) to score as they do."""
        if not tracing() and (not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3
                              or images.shape[0] == 0):
            # (only the shape and the dtype: the values are checked by predict and predict_batched, not on
            # this hot path)
            shown = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Detector: expected a tensor of images [N, 3, H, W] with N >= 1, got {shown}")
        if not tracing() and images.dtype != torch.uint8 and not images.is_floating_point():  # int64 read as floats
            raise TypeError(f"Detector: expected uint8 (0..255) or float ([-1, 1]) images, got {images.dtype}")
        on_gpu = images.is_cuda and not tracing()
        with cudnn_benchmark(self.cudnn_benchmark and on_gpu):
            if self.cuda_graphs and on_gpu and not torch.is_grad_enabled():
                return self._graph_forward(images)
            return self._pipeline(images)

    def _pipeline(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores, _scored = self._pipeline_parts(images)
        return maps, scores

    @_own_precision
    def _pipeline_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maps, scores, the maps the scores take their top values from; :meth:`_finish_maps`)."""
        if self.context is None:
            maps, scored = self._finish_maps(self.raw_maps(images))
            return maps, top_mean(scored, self.top_k), scored
        x = self._to_model_input(images)  # resized once for the map and the context
        raw, feats = self._maps_and_context(x, self.context)
        maps, scored = self._finish_maps(raw, *self.context.map_parts(feats, self.image_size))
        return maps, self.context.combine_scores(top_mean(scored, self.top_k), feats), scored

    def _maps_and_context(self, x: torch.Tensor, ctx: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Model-range images [N,3,S,S] -> (:meth:`raw_maps`, ``ctx.features``), the trunk layers
        the perceptual map and the context share computed once."""
        opts = self._trunk_options()
        shared = self._shared_stem(ctx)
        if shared:
            stem = self.image_map.features(x, **opts)
            feats = ctx.features(x, stem=stem[:shared], **opts)
            return self._image_map(x, x_features=stem), feats
        return self.raw_maps(x), ctx.features(x, **opts)

    def _graph_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` replayed from a CUDA graph captured for this input shape and dtype (one
        thread at a time: a graph reads and writes fixed buffers), on the images' GPU made the
        current one: capture makes its stream, and replay launches, on the current GPU, which for a
        Detector on ``cuda:1`` is not the caller's ``cuda:0``."""
        with _GRAPH_LOCK, torch.cuda.device(images.device):
            return self._graph_replay(images)

    def _graph_replay(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # inference mode too: a graph captured under it holds inference tensors a no_grad call cannot write
        key = (tuple(images.shape), images.dtype, images.device, torch.is_inference_mode_enabled())
        entry = _recently_used(self._graphs, key, MAX_GRAPHS)  # shapes change: each graph holds its own memory pool
        if entry is None:
            static_in = images.clone()
            stream = torch.cuda.Stream(images.device)
            stream.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph (kernel choice, workspace)
                for _ in range(2):
                    self._pipeline(static_in)
            torch.cuda.current_stream(images.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # no algorithm timing inside the capture: the warm-up's plans, or heuristic ones
            with torch.cuda.graph(graph), cudnn_benchmark(self.cudnn_benchmark, value=False):
                static_out = self._pipeline(static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, (maps, scores) = entry
        static_in.copy_(images)
        graph.replay()
        return maps.clone(), scores.clone()

    # -- convenience on top ----------------------------------------------------------------------
    @_entry_point
    @torch.inference_mode()
    def predict_batched(self, images: torch.Tensor, images_per_batch: int = 8, *,
                        score_maps: bool = False) -> dict[str, torch.Tensor]:
        """Maps and scores of a batch [N,3,H,W] (uint8 or float in [-1, 1]), a few images per call.

        Each call's results are written into one output tensor (no list, no concatenation); on a
        GPU they are copied to the host without waiting, and the host waits once at the end.
        On a CPU a call takes at most the images whose patches fill one model chunk
        (``batch_size``; at least one image), whatever ``images_per_batch`` asks: the whole
        pipeline of a few images stays in cache, where 64 512x512 images at once (200 MB of
        float32 input alone) streamed from memory and made batch 64 10 % slower per image than
        batch 1 for CMA-AE.
        ``score_maps=True`` adds the maps the scores take their top values from (with the image
        context's band profile, the maps without it; else the maps themselves: see
        :attr:`scores_from_other_maps`), computed in the same pass without CUDA graphs: what
        ``diagnose`` marks as the pixels behind a score.
        Returns {"maps": [N, S, S] on the CPU, "scores": [N]} (+ "score_maps": [N, S, S]).
        """
        images_per_batch = _integer("images_per_batch", images_per_batch, 1)
        return self._predict_batched(self._at_model_size(self._checked_batch(images, "predict_batched")),
                                     images_per_batch, score_maps)

    @property
    def scores_from_other_maps(self) -> bool:
        """Whether the image scores take their top values from maps other than those returned: with
        an image context whose band profile is in the maps and not in the scores. Else
        ``predict_batched(score_maps=True)``'s "score_maps" is a copy of "maps"."""
        ctx = self.context
        return ctx is not None and ctx.profile != "none" and not ctx.profile_in_score

    def _at_model_size(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N,3,H,W] of another size than the model's, resized as image files are
        (:func:`~defect_fast.data.io.resize_image`: PIL's bilinear on 8-bit pixels), so that a batch
        scores as its files, PIL images and arrays do through :meth:`predict`; other batches as given
        (float images: the pipeline's own antialiased bilinear, as :meth:`forward` resizes)."""
        s = self.image_size
        if images.dtype != torch.uint8 or tuple(images.shape[-2:]) == (s, s):
            return images
        from .data.io import resize_image

        return torch.stack([resize_image(img, s) for img in images])

    def images_per_call(self, images_per_batch: int) -> int:
        """Images each pipeline call of :meth:`predict_batched` takes when asked for
        ``images_per_batch``: on a GPU all of them; on a CPU no more than ``batch_size`` patches
        hold (one 512-px image's 64 CMA-AE patches by default: larger calls were slower there, so a
        batch of 64 makes the calls 64 single images make)."""
        step = max(1, images_per_batch)
        if self.device.type != "cuda" and self.batch_size > 0:
            step = min(step, max(1, self.batch_size // (self.grid[0] * self.grid[1])))
        return step

    def _predict_batched(self, images: torch.Tensor, images_per_batch: int,
                         score_maps: bool = False) -> dict[str, torch.Tensor]:
        n, s = images.shape[0], self.image_size
        on_gpu = self.device.type == "cuda"
        with torch.inference_mode(False):  # plain tensors: the caller may change them in place
            out = {"maps": torch.empty(n, s, s, pin_memory=on_gpu), "scores": torch.empty(n, pin_memory=on_gpu)}
            if score_maps:
                out["score_maps"] = torch.empty(n, s, s, pin_memory=on_gpu)
        step = self.images_per_call(images_per_batch)
        for start in range(0, n, step):  # (in the Detector's threads: its callers are entry points)
            chunk = images[start:start + step].to(self.device, non_blocking=on_gpu)
            parts = self._pipeline_parts(chunk) if score_maps else self(chunk)
            for key, part in zip(("maps", "scores", "score_maps"), parts):
                out[key][start:start + step].copy_(part, non_blocking=on_gpu)
        if on_gpu:
            torch.cuda.synchronize(self.device)
        return out

    @_entry_point
    @torch.no_grad()
    @_own_precision
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Stitched reconstructions: images [N,3,H,W] -> [N,3,S,S] in [-1, 1] (overlaps averaged)."""
        from .data.patches import extract_patches, stitch_patches

        x = self._to_model_input(self._at_model_size(self._checked_batch(images, "reconstruct")).to(self.device))
        patches = extract_patches(x, self.patch, self.stride)
        recon = torch.cat([self._recon(patches[a:b]) for a, b in self._chunk_bounds(patches.shape[0])])
        return stitch_patches(recon, self.image_size, self.patch, self.stride).cpu()

    @staticmethod
    def _checked_batch(images: Any, where: str) -> torch.Tensor:
        """``images`` if it is a batch [N, 3, H, W] (N >= 1) of uint8 or float images, else a
        TypeError/ValueError naming ``where``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{where}: expected a tensor [N, 3, H, W], got {type(images).__name__} "
                            "(predict() takes paths, PIL images and numpy arrays)")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{where}: expected images [N, 3, H, W], got {tuple(images.shape)}")
        if images.shape[0] == 0 or images.shape[-1] == 0 or images.shape[-2] == 0:
            raise ValueError(f"{where}: no images (shape {tuple(images.shape)})")
        _check_pixels(images, where)
        return images

    @staticmethod
    def _as_images(x: Any, size: int) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Any accepted input -> (list of [3,S',S'] tensors for the model, original (H, W) of each)."""
        from PIL import Image

        from .data.io import (DataError, _load_image, _reason, _to_8bit, few_levels_top, load_as_stored, undecoded,
                              unfinished_image, upright, warn_few_levels)

        if isinstance(x, (str, os.PathLike)):
            few: list = []
            img, (w, h) = _load_image(x, size, 3, None, few)  # a bad file: DataError naming it
            warn_few_levels(few, 1, "predict")
            return [img], [(h, w)]
        if isinstance(x, Image.Image):
            # turned upright by its EXIF orientation and 16-bit and float modes scaled, as files are
            if x.width == 0 or x.height == 0:
                raise DataError(f"PIL image: image has zero size ({x.width}x{x.height})")
            mode = x.mode
            pending = undecoded(x)
            # a lazily opened file whose `with Image.open(...)` block ended before its pixels were
            # read: PIL's own assert said nothing
            if getattr(x, "fp", True) is None and pending:
                raise DataError("PIL image: its file was closed before its pixels were read (a `with Image.open(...)` "
                                "block ended): call .load() inside the block, or pass the path")
            try:  # a lazily opened file decodes here: its damage is the image's, as a path's is
                # decoded as stored, its orientation tag kept for upright below (PIL turns a TIFF as it
                # loads it, a grey or 16-bit one sideways into scrambled pixels, and drops the tag)
                decoding = getattr(x, "fp", None) is not None and pending
                load_as_stored(x)
                # an image of a file not written to its end (a zero-filled rest: its missing part reads
                # as black pixels) is refused as the file's path is; only when this call decoded it (an
                # image decoded before holds its pixels: its file may have been written over since)
                source = getattr(x, "filename", "") or ""
                if decoding and isinstance(source, str) and source and os.path.isfile(source):
                    try:
                        unfinished = unfinished_image(source)
                    except OSError:
                        unfinished = None
                    if unfinished is not None:
                        raise DataError(f"PIL image of {source}: {unfinished}")
                top = few_levels_top(x)
                if top is not None:
                    warn_few_levels([(Path("PIL image"), top)], 1, "predict")
                x = np.asarray(_to_8bit(upright(x), 3, Path("PIL image")))
            except DataError:
                raise
            except OSError as exc:
                raise DataError(f"PIL image: corrupt or truncated image ({_reason(exc)})") from None
            except (ValueError, TypeError) as exc:  # a mode PIL does not convert ("La")
                raise DataError(f"PIL image: cannot convert its {mode} pixels ({_reason(exc)})") from None
        if isinstance(x, np.ndarray):
            if x.dtype != np.uint8:  # float arrays are most often [0, 1], which [-1, 1] would misread
                how = ("np.rint(x * (255 / 65535)).astype(np.uint8) for data of the full 16-bit range, as a 16-bit "
                       "file is read, np.rint(x * (255 / (2**bits - 1))) for a 10-, 12- or 14-bit camera's"
                       if x.dtype.kind in "ui" else
                       "(x * 255).round().astype(np.uint8) for [0, 1]")
                raise TypeError(f"numpy images must be uint8 (0..255), got {x.dtype}; scale them to uint8 "
                                f"(e.g. {how}), or pass float images in [-1, 1] as a torch tensor")
            arr = x  # its size is checked as the tensor it becomes
            if arr.size == 0:
                raise ValueError(f"numpy images of shape {arr.shape} have no pixels")
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            # as a file's alpha is said (a 4th channel of 0 throughout is no alpha: RGBX padding, as buffers have)
            if arr.ndim in (3, 4) and arr.shape[-1] == 4:
                alpha = arr[..., 3].reshape(arr.shape[0] if arr.ndim == 4 else 1, -1)  # an image a row
                cut = alpha[(alpha.max(axis=1) > 0) & (alpha.min(axis=1) < 255)]  # each image: padding, or alpha
                if cut.size:
                    from .data.io import _callers_level, warn_data

                    warn_data(f"numpy images: their 4th channel, alpha, has transparent pixels ({len(cut)} of "
                              f"{alpha.shape[0]}, {float((cut < 255).mean()):.1%} of their pixels), read as the colour "
                              "stored under them: alpha is dropped", stacklevel=_callers_level())
            if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
                return Detector._as_images(torch.from_numpy(np.array(arr[..., :3])).permute(2, 0, 1).expand(3, -1, -1), size)
            if arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
                return Detector._as_images(torch.from_numpy(np.array(arr[..., :3])).permute(0, 3, 1, 2).expand(-1, 3, -1, -1), size)
            raise ValueError(f"numpy images must be [H, W], [H, W, C] or [N, H, W, C], got shape {arr.shape}")
        if isinstance(x, torch.Tensor):
            given = tuple(x.shape)  # named in the messages as passed
            if x.dim() == 2:
                x = x.expand(3, -1, -1)
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] not in (1, 3):
                raise ValueError(f"tensor images must be [H, W], [C, H, W] or [N, C, H, W] with C = 1 or 3, got {given}")
            if x.numel() == 0:
                raise ValueError(f"tensor images of shape {given} have no pixels")
            x = x.expand(-1, 3, -1, -1)
            _check_pixels(x, "predict")
            return list(x), [tuple(x.shape[-2:])] * x.shape[0]
        if isinstance(x, (list, tuple)):
            if not x:
                raise ValueError("predict: an empty list of images")
            imgs, sizes = [], []
            for k, item in enumerate(x):
                try:
                    i, s = Detector._as_images(item, size)
                except (TypeError, ValueError) as exc:
                    if isinstance(item, (str, os.PathLike)) or len(x) == 1:  # a file's error names the file
                        raise
                    # which of a batch of camera frames it was: the message alone did not say
                    raise _retold(exc, f"list item {k} (of {len(x)}): {exc}") from None
                imgs += i
                sizes += s
            return imgs, sizes
        raise TypeError(f"cannot read an image from {type(x).__name__}; pass a path, PIL image, numpy array or tensor")

    def check_proportions(self, sizes: Sequence[tuple[int, int]], names: Sequence[object],
                          where: str | os.PathLike, total: int | None = None) -> bool:
        """One warning (:class:`~defect_fast.data.DataWarning`) naming the images of (width, height)
        ``sizes`` far outside the proportions the model was trained on
        (:func:`~defect_fast.data.io.outside_proportions`; nothing when they are not known).
        Returns whether it warned."""
        from .data.io import _callers_level, outside_proportions, warn_data

        note = outside_proportions(sizes, names, self.trained_proportions, where, total)
        if note:
            warn_data(note, stacklevel=_callers_level())
        return note is not None

    @_entry_point
    @torch.no_grad()
    def predict(self, x: Any, *, pixel_threshold: float | None = None, images_per_batch: int = 8) -> dict[str, Any]:
        """Maps, scores and defect regions for one image or many, of any size.

        Args:
            x: a path, PIL image, numpy array ([H,W], [H,W,C] or [N,H,W,C], uint8 0..255),
                tensor (uint8 0..255 or float in [-1,1]; [H,W], [C,H,W] or [N,C,H,W], C = 1 or 3), or a
                list of these. A stack of grey frames is [N,1,H,W] (or a list): [3,H,W] is one colour
                image, whatever its three planes hold.
            pixel_threshold: map value above which a pixel is defective (for regions); default
                the stored pixel threshold (:func:`~defect_fast.calibration.stored_thresholds`, as
                the command line and ``watch`` use it; none known: no regions).
            images_per_batch: images per pipeline call, at most (on a CPU, at most the images
                whose patches fill one model chunk: :meth:`predict_batched`).
        Returns:
            {"maps": [N, H, W] float tensor when every input has the same size, else a list of [H_i, W_i]
             (each map at its input's own size); "scores": [N]; "regions": N lists of
             {"box": (x0, y0, x1, y1), "area", "peak"} (see :func:`find_regions`); "blank": N bools,
             True for an image of one colour throughout (every channel constant: a covered lens, a
             failed exposure), whose score says nothing of a part; such images are also named in a
             :class:`~defect_fast.data.DataWarning`}.
        Raises :class:`~defect_fast.runs.NonFiniteMaps` (a RuntimeError) naming the first image
        by its position when a map or score is NaN or infinite, as the command line refuses them.
        """
        if pixel_threshold is not None:  # numpy's and 0-d tensors too (np.float32 was refused)
            pixel_threshold = _real("pixel_threshold", pixel_threshold)
        images_per_batch = _integer("images_per_batch", images_per_batch, 1)
        from .data.io import blank_images, resize_image, warn_blank

        imgs, sizes = self._as_images(x, self.image_size)
        if not self.__dict__.get("_proportions_said"):  # once a Detector: a per-frame loop is not one warning a frame
            # images at the model's size are taken as brought to it already, as predict_batched takes them
            shown = [(i, (w, h)) for i, (h, w) in enumerate(sizes) if (h, w) != (self.image_size, self.image_size)]
            if self.check_proportions([wh for _i, wh in shown], [f"image {i}" for i, _wh in shown],
                                      "predict (said once a Detector)", total=len(sizes)):
                self.__dict__["_proportions_said"] = True
        s = self.image_size
        # uint8 pixels of another size: the resize image files get (arrays and PIL images of a file
        # score as the file does); float tensors: the pipeline's own (antialiased bilinear)
        batch = [img if tuple(img.shape[-2:]) == (s, s) else
                 resize_image(img, s) if img.dtype == torch.uint8 else self._to_model_input(img.unsqueeze(0))[0]
                 for img in imgs]
        # a frame of one colour (a covered lens, a failed exposure) scores low and would pass: marked
        # and said, as predict marks it in scores.json and watch sets it aside; 8-bit pixels judged at
        # the model's size, as a file is read (a photo is blank or not as its file, array or PIL image
        # alike), float ones as given (their resize leaves a constant frame a spread of about 4e-7)
        blank = [bool(blank_images((img if img.is_floating_point() else b).unsqueeze(0))[0]) for img, b in zip(imgs, batch)]
        warn_blank(blank, [f"image {i}" for i in range(len(batch))], "predict")
        del imgs  # the full-size copies of arrays and PIL images: only their model-size ones are needed now
        floats = any(b.is_floating_point() for b in batch)
        batch = [self._to_model_input(b.unsqueeze(0))[0] if (floats and not b.is_floating_point()) else b for b in batch]
        if len({b.device for b in batch}) > 1:  # GPU tensors beside files or resized ones (read on the CPU)
            batch = [b.to(self.device) for b in batch]
        with torch.inference_mode():  # each input was checked by _as_images
            res = self._predict_batched(torch.stack(batch), images_per_batch)
        from .evaluate import check_finite

        check_finite(res, None, None, self.precision, "images")  # NaN > threshold is False: such a part would pass
        threshold = pixel_threshold if pixel_threshold is not None else stored_thresholds(self.calibration)[1]
        maps: list[torch.Tensor] = []
        regions = []
        same = len(set(sizes)) == 1
        with torch.inference_mode(False):  # plain tensors, also for a caller inside inference mode: it may change them
            for i, (m, hw) in enumerate(zip(res["maps"], sizes)):
                m = resize_map(m, hw)
                if same:  # written into the one result: a list of the maps, then their stack, held two copies
                    if i == 0:
                        out = m.new_empty((len(sizes), *m.shape))
                    out[i] = m
                    m = out[i]
                else:
                    maps.append(m)
                regions.append(find_regions(m.numpy(), threshold) if threshold is not None else [])
            return {"maps": out if same else maps, "scores": res["scores"], "regions": regions, "blank": blank}

    @_fit
    @_entry_point
    @torch.no_grad()
    def calibrate(self, normal_images: torch.Tensor, far: float | None = None,
                  names: list[str] | None = None) -> dict[str, Any]:
        """Thresholds from defect-free images the model was not trained on, by the rule training
        uses for its held-back images (:func:`defect_fast.calibration.calibrate`: the image
        threshold for a false-alarm rate ``far``, by default the rate of the thresholds they
        replace (a run's ``--far``, as ``defect-fast calibrate`` keeps it), else 0.01, and a
        pixel threshold), plus
        ``pixel_q999`` (the 99.9th percentile of their map values, the maps' colour scale:
        :func:`~defect_fast.calibration.colour_scale`, estimated from a sample of a large set).
        ``names`` (one per image) name the image whose score the threshold is and the highest.
        Blank frames (one colour throughout) are left out, as ``defect-fast calibrate`` leaves them
        out (a warning names them); images the run trained on or fitted its map on, as its model
        file records them, are named in a warning (the command refuses them); a warning also says
        when a model file does not record them.
        Replaces :attr:`calibration` and returns it.
        """
        from .calibration import DEFAULT_FAR
        from .data.io import DataError, _callers_level, image_keys, warn_data
        from .evaluate import check_finite

        # checked once, as calibrate's (through predict_batched, its warnings came twice)
        given = self._at_model_size(self._checked_batch(normal_images, "calibrate"))
        if names is not None and len(names) != given.shape[0]:
            raise ValueError(f"calibrate: {len(names)} names for {given.shape[0]} images")
        shown = [str(n) for n in names] if names is not None else [f"image {i}" for i in range(given.shape[0])]
        # as defect-fast calibrate: a black frame's score set the threshold 9x higher
        keep = _non_blank(given, shown, "calibrate", at_least=1)
        if keep is False:
            raise DataError(f"calibrate: every one of the {given.shape[0]} images is a blank frame, one colour "
                            "throughout (a failed exposure, a covered lens?); give photographs of defect-free parts")
        if keep is not None:
            given, shown = given[keep], [n for n, k in zip(shown, keep.tolist()) if k]
            names = None if names is None else [n for n, k in zip(names, keep.tolist()) if k]
        # the images the thresholds will rest on, as defect-fast calibrate records them (None: float pixels,
        # not as a file reads, are not known)
        keys = image_keys(given.cpu()) if given.dtype == torch.uint8 else None
        seen = self._seen_keys() if keys is not None else None
        if seen:
            known = [i for i, k in enumerate(keys) if k in seen]
            if known:  # defect-fast calibrate refuses them; here, said
                warn_data(f"calibrate: {len(known)} of the images {'is one' if len(known) == 1 else 'are ones'} the "
                          f"run trained on or fitted its map on ({', '.join(shown[i] for i in known[:3])}"
                          f"{', ...' if len(known) > 3 else ''}): thresholds set on them are optimistic (false alarms "
                          "on new parts); give defect-free images the run has not seen", stacklevel=_callers_level())
        elif seen is None and keys is not None and self.model_path is not None:  # as the command, said
            warn_data(f"calibrate: could not check that the images were not trained on: {self.model_path} does not "
                      "record the images its model trained on (written before that record, or saved from a model trained "
                      "elsewhere); 'defect-fast calibrate' checks a run against its training folder", stacklevel=_callers_level())
        res = self._predict_batched(given, 8, False)
        check_finite(res, names, None, self.precision, "defect-free images")
        if far is None:  # the rate asked before (it stays when a fit sets the thresholds aside)
            far = (self.calibration or {}).get("far") or DEFAULT_FAR
        cal = calibrate_thresholds(res["scores"], res["maps"], far, names=names, images="calibration")
        cal["pixel_q999"] = colour_scale(res["maps"])
        cal["precision"] = self.precision  # what the scores were computed in (load warns of another)
        # which of the run's held-back images its map was fitted on, as defect-fast calibrate keeps it: a
        # later calibrate names them among the images seen (:meth:`_seen_keys`)
        if (self.calibration or {}).get("map_fitted_on") is not None:
            cal["map_fitted_on"] = self.calibration["map_fitted_on"]
        self.calibration = cal
        self._record_image_keys(calibrated=None if keys is None else [k.hex() for k in keys])
        return cal

    def _seen_keys(self) -> set[bytes] | None:
        """Pixel keys of the images the run behind this Detector trained on or fitted its map on,
        as its model file records them (None where it does not: a Detector of a model in memory,
        or of a file written before the record)."""
        from .recalibrate import recorded_keys

        record = self.__dict__.get("_run_record") or {}
        recorded = recorded_keys({**record, "calibration": self.calibration}) if record else None
        return set(recorded["seen"]) if recorded is not None and recorded["seen"] is not None else None

    @_fit
    @_entry_point
    @_plain_tensors
    @torch.no_grad()
    def fit_normalization(self, normal_images: torch.Tensor, images_per_batch: int = 8, min_std: float = 1e-6) -> dict[str, torch.Tensor]:
        """Per-position mean and std of raw maps over defect-free images, stored in ``norm_mean``/``norm_std``.

        Args:
            normal_images: uint8 [N,3,H,W] (or float in [-1, 1]), N >= 2 defect-free images; blank
                frames among them are left out (a warning names them) where 2 others remain.
            min_std: absolute floor of the std. The std is also floored at
                :data:`NORM_STD_FLOOR` of its root-mean-square over the positions: a region the
                same in every image (a background, a fixture, a clipped highlight) has a std of
                about 0, and a change of one grey level there (exposure drift) gave z-scores of
                1e3 that flagged every image. (The perceptual map's variances have a floor of
                the same kind: ``prior``.)
        Returns:
            {"mean": [S, S], "std": [S, S]} (CPU), the values now in the buffers; the maps of
            :meth:`forward` become (raw - mean) / std. The stored thresholds are set aside and an
            image context, whose standardisation was measured on the maps before, is removed
            (:meth:`calibrate` and :meth:`fit_context` again), as :meth:`fit_perceptual` does.
        """
        # 0, or a value float32 rounds to 0: a position that never varies divides 0 by 0 (NaN scores)
        if not _real("min_std", min_std) >= torch.finfo(torch.float32).tiny:
            raise ValueError(f"min_std must be > 0 (at least {torch.finfo(torch.float32).tiny:.3g}, float32's "
                             f"smallest normal number), got {min_std!r}")
        images_per_batch = _integer("images_per_batch", images_per_batch, 1)
        normal_images = self._at_model_size(self._checked_batch(normal_images, "fit_normalization"))
        # as training leaves them out of its fits: one black frame made the std 15 times wider
        normal_images = _fit_on(normal_images, "fit_normalization", 2)
        if normal_images.shape[0] < 2:
            raise ValueError(f"fit_normalization needs at least 2 images, got {normal_images.shape[0]}")
        with torch.no_grad():
            raw = torch.cat([self.raw_maps(c.to(self.device)) for c in normal_images.split(images_per_batch)])
        from .evaluate import check_finite

        check_finite({"maps": raw}, None, None, self.precision, "images given to fit_normalization")
        mean = raw.mean(dim=0)
        std = raw.std(dim=0)
        if not bool((std > 0).any()):  # min_std alone: every later map (raw - mean) * 1e6, below the mean hugely negative
            from .data.io import DataError

            raise DataError(f"the per-position normalisation cannot be fitted on {raw.shape[0]} images whose maps are "
                            "identical (the same image again?); give different defect-free images")
        std = std.clamp(min=max(min_std, NORM_STD_FLOOR * float(std.double().pow(2).mean().sqrt())))
        self.norm_mean = mean
        self.norm_std = std
        self._graphs = {}  # captured graphs read the buffers this replaced
        self._stash_trunk()
        self.context = None  # its standardisation of the maps was measured on the maps before
        self._set_aside_thresholds("calibrated before fit_normalization changed the maps (calibrate again)")
        self._record_fit(normal_images)
        return {"mean": mean.cpu().clone(), "std": std.cpu().clone()}  # copies: on a CPU, .cpu() is the buffer

    @_whole
    def save(self, path: Path | str, *, overwrite: bool = False) -> Path:
        """A model file of this Detector as it stands, which :meth:`load` reads back: the model's
        weights, the inference settings (map, stride, blend, smoothing), the thresholds
        (:attr:`calibration`, e.g. of :meth:`calibrate`), the statistics of :meth:`fit_normalization`,
        and the perceptual map and image context when fitted, and :data:`RUN_RECORD`, the record
        of the run behind the weights that the loaded file held (none after :meth:`load_state_dict`
        of other weights; after :meth:`calibrate`, the pixel keys of its uint8 images as the ones its
        thresholds rest on); with a tensor digest, as training writes them. Runtime options
        (precision, fuse, device, batch size, compile, CUDA graphs) are given again to
        :meth:`load` (in bfloat16 a fused and an unfused model round
        differently: the maps are the same only with the same options). An existing file is
        replaced only with ``overwrite`` (nor one another process writes there while this one is
        written), and never one an output folder of another command lists (a run's own
        ``model.pt``). Returns the path.

        Raises:
            ValueError: the Detector scores by another ``top_fraction`` than the default, which
                model files do not record (its thresholds would not hold after :meth:`load`).
            OutputRefused: ``path`` exists and ``overwrite`` is not given, is a folder, a link or a
                device, or is a file another command's output folder lists.
        """
        from .runs import CHECKPOINT_VERSION
        from .safety import OutputRefused, safe_output_file, save_with_digest

        if self.top_k != _top_count(self.image_size**2, TOP_FRACTION):
            raise ValueError(f"Detector.save: model files do not record top_fraction; this Detector scores by the "
                             f"top {self.top_k} map values, not the default {TOP_FRACTION:g} of them")
        path = safe_output_file(path, overwrite, what="Detector.save:", flag="overwrite=True")
        if self.fuse and self.__dict__.get("_source") is None:
            raise ValueError("Detector.save: this fused Detector was given other weights by load_state_dict, and "
                             "does not know the weights they were fused from: save the Detector the weights came "
                             "from, or load them into one built with fuse=False")
        name, config, weights = self.__dict__["_source"] if self.fuse else _model_source(self.model)
        state: dict[str, Any] = {
            "version": CHECKPOINT_VERSION, "model_name": name, "model_config": config, "model_state": weights,
            "image_size": self.image_size, "calibration": dict(self.calibration),
            "detector": {"map_kind": self.map_kind, "stride": self.stride, "blend": self.blend,
                         "smooth_sigma": float(self.smooth_sigma)}}
        if self.trained_proportions is not None:
            state["trained_proportions"] = list(self.trained_proportions)
        if self.normalization()["kind"] != "identity":
            state["normalization"] = {"mean": self.norm_mean.detach().cpu(), "std": self.norm_std.detach().cpu()}
        if self.image_map is not None:
            state["perceptual"] = self.image_map.state()
        if self.context is not None:
            state["context"] = self.context.state()
        state.update(copy.deepcopy(self.__dict__.get("_run_record") or {}))
        self.model_sha256 = self.model_path = None  # saved over its source, it no longer names the file's bytes
        try:  # a file that appeared at ``path`` since the check is not replaced without ``overwrite``
            return save_with_digest(state, path, replace=overwrite, unlisted=True)
        except FileExistsError:
            raise OutputRefused(f"Detector.save: {path}: a file appeared there while the model was written; not "
                                "replacing it (pass overwrite=True to replace it)") from None
        except OutputRefused as exc:  # reserved by another command meanwhile
            raise OutputRefused(f"Detector.save: {exc}") from None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        with _alone(self, "load_state_dict"):  # waits for the calls in progress, as a fit does
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """:meth:`load_state_dict` (also of a module holding this Detector): weights other than the
        ones it holds set its thresholds aside, as a fit that changes the scores does (another
        Detector's weights were judged by this one's thresholds, set on other scores), and a fused
        Detector then cannot :meth:`save` (it does not know the weights they were fused from). Its
        own weights loaded back (a snapshot of its state_dict) keep them. :meth:`save` and
        :meth:`load` carry weights, settings and thresholds together."""
        changed = False
        for name, held in self.state_dict().items():  # before any is copied (children load after this)
            given = state_dict.get(prefix + name)
            if not isinstance(given, torch.Tensor):  # left out (strict=False), or not a tensor (torch refuses it)
                continue
            if held.dim() == 0 and tuple(given.shape) == (1,):  # torch takes its one value for a 0-d one
                given = given[0]
            if given.shape != held.shape:  # torch refuses it and copies nothing for it
                continue
            if not torch.equal(given.detach().to(held.device, held.dtype), held.detach()):
                changed = True
                break
        if changed:
            self._shares_tensors("loading other weights")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if changed:
            self._set_aside_thresholds("set on the weights load_state_dict replaced (calibrate again, or save and "
                                       "load the Detector whose weights these are: its file carries its thresholds)")
            self.trained_proportions = None  # those of the images other weights were trained on: not known
            self.model_sha256 = self.model_path = None  # nor which file they are
            self.__dict__["_run_record"] = {}  # nor which images they were, or how they were trained
            if self.fuse:
                self.__dict__["_source"] = None

    def _drop_normalization(self) -> None:
        """Back to the identity normalisation (its statistics were of maps that changed)."""
        self.norm_mean, self.norm_std = (torch.tensor(v, device=self.norm_mean.device) for v in (0.0, 1.0))

    def normalization(self) -> dict[str, Any]:
        """The normalisation in force, JSON-ready ("identity", or the shape of the stored statistics)."""
        if self.norm_mean.dim() == 0 and float(self.norm_mean) == 0.0 and float(self.norm_std) == 1.0:
            return {"kind": "identity"}
        return {"kind": "per-position" if self.norm_mean.dim() else "scalar", "shape": list(self.norm_mean.shape)}


__all__ = ["Detector", "SettingError", "image_scores", "find_regions", "reference_ops", "TOP_FRACTION", "BLENDS"]
