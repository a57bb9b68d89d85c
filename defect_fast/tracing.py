"""Whether the code runs for real or is being traced (TorchScript tracing, ONNX export, torch.compile,
torch.export), and a cache of constant tensors that keeps only real ones."""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch


def exporting() -> bool:
    """True inside torch.export (and its ONNX path). torch.compiler.is_exporting is newer than the
    oldest torch this package accepts; there, torch.export traces through dynamo, which
    :func:`tracing` already sees as compiling."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


def tracing() -> bool:
    """True while the calling code is traced or exported rather than run: no caches, no compiled
    or captured parts then. An ONNX export traces the model with TorchScript's tracer, which
    ``torch.jit.is_tracing`` sees on the exporting thread alone; ``torch.onnx.is_in_onnx_export``
    is the process's, and another thread's export made every Detector in the program skip its
    ``threads`` option and its checks."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()


def constant_cache(maxsize: int) -> Callable:
    """Decorator: a function of hashable arguments that makes a constant tensor (a filter's taps,
    an interpolation matrix on a device) is called once per arguments, its tensor kept and shared
    (read only). Unlike ``functools.lru_cache`` it keeps no tensor made while the code is traced or
    exported: torch.export makes fake tensors, and a fake tensor kept for later real calls gave them
    uninitialised memory. Beyond ``maxsize`` kept tensors, all are let go."""
    def wrap(make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        kept: dict[tuple, torch.Tensor] = {}
        lock = threading.Lock()

        @functools.wraps(make)
        def get(*args):
            if tracing():
                return make(*args)
            t = kept.get(args)
            if t is None:
                t = make(*args)
                if type(t) is torch.Tensor:  # not a subclass: FakeTensor, functional wrappers
                    with lock:
                        if len(kept) >= maxsize:
                            kept.clear()
                        kept[args] = t
            return t

        get.cache_clear = kept.clear
        return get
    return wrap


__all__ = ["tracing", "constant_cache"]
