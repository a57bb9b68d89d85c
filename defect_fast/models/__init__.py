"""Model registry: ``build_model(name, **kwargs)`` and ``MODELS``."""
from __future__ import annotations

from .base import AnomalyModel

MODELS: dict[str, type[AnomalyModel]] = {}


def register(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    MODELS[cls.name] = cls
    return cls


def _load_all() -> None:
    from .cmaae import model as _cmaae  # noqa: F401
    from .baselines import model as _baselines  # noqa: F401
    from .awae import model as _awae  # noqa: F401


def build_model(name: str, **kwargs) -> AnomalyModel:
    """Instantiate a registered model by name (``cmaae``, ``awae``, ``ae-l2``, ``ae-ssim``, ``memae``)."""
    _load_all()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def model_names() -> list[str]:
    _load_all()
    return sorted(MODELS)


__all__ = ["AnomalyModel", "MODELS", "register", "build_model", "model_names"]
