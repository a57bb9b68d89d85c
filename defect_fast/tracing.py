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
    or captured parts then. Only the tracing thread's code is: TorchScript's tracer (and an ONNX
    export through it) is seen by ``torch.jit.is_tracing`` on its thread, dynamo's by
    ``torch.compiler.is_dynamo_compiling`` in the code it traces, and torch.export's other
    tracing (and a program's own fake tensors) by the fake tensor mode active on the thread.
    ``torch.onnx.is_in_onnx_export``, ``torch.compiler.is_compiling`` and ``is_exporting`` are
    the process's: while one thread exported or compiled, every Detector of the program took
    itself for traced (its threads option, its checks and its lock skipped)."""
    return torch.jit.is_tracing() or _dynamo_compiling() or _fake_tensors()


def _dynamo_compiling() -> bool:
    is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", None)  # (newer than torch 2.4)
    return bool(is_dynamo_compiling()) if is_dynamo_compiling is not None else torch.compiler.is_compiling()


def _fake_tensors() -> bool:
    """Whether a fake tensor mode (torch.export's, or a program's own) is active on this thread;
    where torch does not say, the process's compiling and exporting flags, as before."""
    get, keys = getattr(torch._C, "_get_dispatch_mode", None), getattr(torch._C, "_TorchDispatchModeKey", None)
    if get is None or keys is None:
        return torch.compiler.is_compiling() or exporting()
    return get(keys.FAKE) is not None


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
