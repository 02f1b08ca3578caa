"""slimfx.trace: one entry point over the two frontends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from slimfx.errors import TraceError, did_you_mean
from slimfx.frontend.export import trace_export
from slimfx.frontend.fx import trace_fx
from slimfx.ir.program import Program

FRONTENDS = ("auto", "fx", "export")


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalise example inputs: a tensor becomes a 1-tuple; lists become tuples."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def trace(
    model: nn.Module, example_inputs: Any, frontend: str = "auto", leaf_modules: Iterable[str] = ()
) -> Program:
    """Turn ``model`` into a Program. The model and the inputs are never mutated.

    frontend: "fx" (symbolic_trace with leaf fallback; dialect ``torch``), "export" (torch.export;
    dialect ``aten``), or "auto" (fx, then export when fx cannot trace the top level).
    """
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}{did_you_mean(frontend, FRONTENDS)}; "
                         f"choose one of {', '.join(FRONTENDS)}")
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    if frontend == "fx":
        return trace_fx(model, inputs, leaf_modules)
    if frontend == "export":
        return trace_export(model, inputs)
    try:
        return trace_fx(model, inputs, leaf_modules)
    except TraceError as fx_error:
        if getattr(fx_error, "bad_inputs", False):
            raise
        try:
            return trace_export(model, inputs)
        except TraceError as export_error:
            raise TraceError(f"both frontends failed.\n[fx] {fx_error}\n[export] {export_error}") from None
