"""Resolve a MODEL reference from the command line: `pkg.module:factory`, `path/file.py:factory`, or a zoo name.

A factory returns an ``nn.Module`` or ``(nn.Module, example_inputs)``.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimfx.errors import SlimfxError


def load_model(ref: str) -> tuple[nn.Module, tuple | None]:
    """The model (and its example inputs when the factory provides them) that ``ref`` names."""
    if ":" not in ref:
        from slimfx.zoo import get_model

        module, inputs = get_model(ref)
        return module, inputs
    location, _, factory_name = ref.rpartition(":")
    if location.endswith(".py") or "/" in location:
        path = Path(location)
        if not path.is_file():
            raise SlimfxError(f"model file {location!r} does not exist (MODEL is path/to/file.py:factory)")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module_obj = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module_obj)
        except Exception as exc:
            raise SlimfxError(f"importing {location!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module_obj = importlib.import_module(location)
        except ImportError as exc:
            raise SlimfxError(f"cannot import module {location!r} for MODEL {ref!r}: {exc}") from exc
    factory = getattr(module_obj, factory_name, None)
    if factory is None or not callable(factory):
        raise SlimfxError(f"{location!r} has no callable {factory_name!r} (MODEL is module:factory)")
    made: Any = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        inputs = made[1]
        return made[0], inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(made, nn.Module):
        return made, None
    raise SlimfxError(f"factory {ref!r} returned {type(made).__name__}; return an nn.Module or (module, inputs)")
