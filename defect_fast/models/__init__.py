"""Model registry: ``build_model(name, **kwargs)``, ``MODELS`` and the checks of model options.

Each method is a folder here (model.py, anomaly_map.py, optionally loss.py) whose model class is
decorated with :func:`register`; everything the trainer, detector and CLI need (stages, synthesis,
anomaly maps, options, demo settings) is read from that class.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from .base import AnomalyModel, MapFn

MODELS: dict[str, type[AnomalyModel]] = {}


def register(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    MODELS[cls.name] = cls
    return cls


def _load_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}.model")


def model_class(name: str) -> type[AnomalyModel]:
    """The registered class ``name``; ValueError naming the registered models otherwise."""
    _load_all()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, **kwargs) -> AnomalyModel:
    """Instantiate a registered model by name with options checked against its ``Config``."""
    cls = model_class(name)
    return cls(**check_options(name, kwargs))


def model_names() -> list[str]:
    _load_all()
    return sorted(MODELS)


def map_names() -> list[str]:
    """Every anomaly-map name some registered model provides."""
    _load_all()
    return sorted({k for cls in MODELS.values() for k in (*cls.anomaly_maps, *cls.image_maps)})


_UNIONS = (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in _UNIONS:
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if args:
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value has type ``tp`` (int is accepted for float; bool is not an int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in _UNIONS:
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp) if isinstance(tp, type) else True


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check model options against ``MODELS[name].Config``; returns them unchanged.

    Raises:
        ValueError: one line naming an unknown key (with the valid keys) or a value of the wrong type.
    """
    cls = model_class(name)
    if not dataclasses.is_dataclass(cls.Config):
        return dict(options)
    hints = typing.get_type_hints(cls.Config)
    valid = [f.name for f in dataclasses.fields(cls.Config)]
    for key, value in options.items():
        if key not in hints:
            raise ValueError(f"model {name!r} has no option {key!r}; valid options: {', '.join(valid)}")
        if not _fits(value, hints[key]):
            raise ValueError(f"model {name!r} option {key!r} must be {_type_name(hints[key])}, got {value!r}; "
                             f"valid options: {', '.join(valid)}")
    return dict(options)


def parse_options(name: str, pairs: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (``--set``; values parsed as JSON, else taken as text) -> checked options."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"expects key=value, got {pair!r}")  # the caller names --set
        key, text = pair.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key.strip().replace("-", "_")] = value
    return check_options(name, out)


__all__ = ["AnomalyModel", "MapFn", "MODELS", "register", "build_model", "model_class", "model_names", "map_names",
           "check_options", "parse_options"]
