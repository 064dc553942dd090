"""Training methods on one engine (docs/methods.md). ``method.name`` selects one from ``METHODS``:
every method class defined by a module of this package (found when the package is imported, so a
new method is one new module here and no line elsewhere), and any that ``register`` adds from
outside (a variant in a test, a user's own file). A method's settings are its own section
(``Method.settings_type``), which the config asks this registry for (``config.load_config``).

This package does not import ``scbch_dist.config`` at run time (the config imports the registry)."""

from __future__ import annotations

import importlib
import pkgutil

from scbch_dist.errors import ConfigError
from scbch_dist.methods.base import (Bank, EpochContext, Method, Refresh, Step, TrainingSet, check_values,
                                     global_batch_of, refresh_from_neighbours, noise_detection_stats)
from scbch_dist.methods.nacd import NACD, NACDSettings
from scbch_dist.methods.rshnl import RSHNL, RSHNLSettings
from scbch_dist.methods.scbch import SCBCH, SCBCHSettings

METHODS: dict[str, type[Method]] = {}

__all__ = ["Bank", "EpochContext", "METHODS", "Method", "NACD", "NACDSettings", "RSHNL", "RSHNLSettings", "Refresh",
           "SCBCH", "SCBCHSettings", "Step", "TrainingSet", "check_values", "get_method", "global_batch_of",
           "refresh_from_neighbours", "register", "noise_detection_stats"]


def register(method: type[Method]) -> type[Method]:
    """Make ``method`` selectable as ``method.name: <its name>`` (usable as a class decorator). Its
    name is also the key of its settings section: a Python identifier (``my_method``, not ``my-method``)."""
    if not method.name:
        raise ValueError(f"{method.__name__} has no name")
    if method.settings_type is not None and not method.name.isidentifier():
        raise ValueError(f"{method.__name__}.name={method.name!r} keys its settings section: it must be an "
                         "identifier (letters, digits, _)")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a ConfigError naming method.name and the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def _register_package_methods() -> None:
    """Registers every named Method subclass that a module of this package defines (not ones it
    merely imports), in module order; ``base`` holds the interface only."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj.__module__ == module.__name__ and obj.name:
                register(obj)


_register_package_methods()
