"""Which reduced precision a device computes natively: what ``precision="auto"`` picks for
inference (:class:`defect_fast.detect.Detector`) and for training (``defect-fast train --precision auto``);
which memory layout a tensor has, for the tuned paths that follow it; and the scoped cuDNN
algorithm search of the tuned CUDA paths."""
from __future__ import annotations

import contextlib
import platform
import threading
from pathlib import Path

import torch

#: The reduced-precision float dtypes (what autocast runs in; what the fused ops widen to float32).
LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def default_precision(device: torch.device | str) -> str:
    """``precision="auto"``: "bfloat16" on CUDA GPUs that compute it (compute capability 8 and up;
    float16 on older ones, where bfloat16 is only emulated) and on bf16-capable CPUs, else "float32"."""
    device = torch.device(device)
    if device.type == "cuda":
        # this device's own capability: torch.cuda.is_bf16_supported() asks the current device and
        # counts emulation (a V100 or T4 says yes)
        return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
    return "bfloat16" if device.type == "cpu" and cpu_has_bf16() else "float32"


def is_channels_last(t: torch.Tensor) -> bool:
    """True when ``t`` is laid out channels-last and not also in the default layout (a 4-D tensor
    with more than one channel and more than one position)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def cudnn_benchmark(on: bool = True, *, value: bool = True):
    """``torch.backends.cudnn.benchmark`` set to ``value`` inside the block, as it was after it;
    ``on=False`` leaves the setting alone.

    With it, cuDNN times its algorithms for each new convolution shape once and keeps the fastest,
    instead of choosing by heuristics, which can pick a slow kernel for transposed convolutions
    (pytorch/pytorch#41382, #51933). The tuned CUDA paths run fixed shapes (inference of one image
    size; training batches), so the search is paid once per shape. Only the one flag is touched
    (``torch.backends.cudnn.flags`` would also reset ``deterministic`` and ``allow_tf32``).

    ``value=False`` is for CUDA graph capture: cuDNN keeps the plan it found for a shape whatever
    the flag, so the plans timed in the warm-up calls are used, and a shape met first inside the
    capture gets a heuristic plan instead of a timing run, which a capturing stream cannot do."""
    if not on:
        yield
        return
    # The flag is the process's, and one Detector may be called from several threads: blocks that
    # overlap (A enters, B enters, A leaves, B leaves) keep the flag of the latest still open, and
    # the setting before the first comes back when the last leaves (each block restoring what it
    # saw left it on after such an overlap, or off inside B).
    token = object()
    with _cudnn_lock:
        if not _cudnn_open:
            _cudnn_saved[0] = torch.backends.cudnn.benchmark
        _cudnn_open.append((token, value))
        torch.backends.cudnn.benchmark = value
    try:
        yield
    finally:
        with _cudnn_lock:
            _cudnn_open[:] = [entry for entry in _cudnn_open if entry[0] is not token]
            torch.backends.cudnn.benchmark = _cudnn_open[-1][1] if _cudnn_open else _cudnn_saved[0]


_cudnn_lock = threading.Lock()
_cudnn_open: list[tuple[object, bool]] = []  # the blocks inside cudnn_benchmark, oldest first, and their values
_cudnn_saved = [False]  # the setting before the first of them


__all__ = ["LOW_PRECISION", "cpu_flags", "cpu_has_bf16", "cpu_model", "cudnn_benchmark", "default_precision", "is_channels_last"]
