"""defect_fast: unsupervised surface-defect detection with fused C++/CUDA kernels.

Embedding::

    import defect_fast
    det = defect_fast.load("runs/tile", device="cpu")      # a torch.nn.Module
    res = det.predict("part.png")                          # maps, scores, regions, blank
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .detect import Detector


def load(run_or_file, device: str = "auto", **options: Any) -> "Detector":
    """A :class:`Detector` for a run folder or a ``model.pt`` file (see :meth:`Detector.load` for options)."""
    from .detect import Detector

    return Detector.load(run_or_file, device=device, **options)


def __getattr__(name: str):
    if name == "Detector":
        from .detect import Detector

        return Detector
    if name == "ops":  # defect_fast.ops.backend() after a plain `import defect_fast`, as the README writes it
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'defect_fast' has no attribute {name!r}")


__all__ = ["Detector", "load", "__version__"]
