"""The torch.fx frontend: symbolic_trace, with untraceable submodules kept as leaves.

When a submodule cannot be traced (data-dependent control flow, unsupported Python), tracing is retried
with that submodule as an opaque leaf, and the Program records which one and why, instead of failing the
whole model. When the top-level forward itself cannot be traced, a TraceError names the module, the
source line, and what to do.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from slimfx.errors import TraceError
from slimfx.ir.copying import copy_module
from slimfx.ir.program import LeafRecord, Program

_TORCH_DIR = os.path.dirname(torch.__file__)


class _LeafFallbackTracer(fx.Tracer):
    """A Tracer that treats named submodules as leaves and remembers where a failure happened."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self._stack: list[str] = []
        self.failed_path: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self._stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:  # the innermost module sees the exception first
                self.failed_path = list(self._stack)
            raise
        finally:
            self._stack.pop()


def user_source_line(exc: BaseException) -> str:
    """'file:line: code' of the deepest traceback frame outside torch (the user's code that failed)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if "/slimfx/frontend/" not in f.filename]
    if not frames:
        return "(no source line outside torch)"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def trace_fx(
    model: nn.Module, example_inputs: tuple, leaf_modules: Iterable[str] = (), max_leaves: int | None = None
) -> Program:
    """Trace ``model`` with torch.fx into a Program of dialect ``torch``.

    The model is deep-copied first, so passes never touch the caller's module. ``leaf_modules`` are
    qualified submodule names kept opaque from the start. Raises TraceError when the top-level forward
    cannot be traced.
    """
    root = copy_module(model)
    leaves = set(leaf_modules)
    records = [LeafRecord(q, "marked as a leaf by the caller") for q in sorted(leaves)]
    budget = max_leaves if max_leaves is not None else sum(1 for _ in root.modules())
    while True:
        tracer = _LeafFallbackTracer(leaves)
        try:
            graph = tracer.trace(root)
            break
        except Exception as exc:
            failed = tracer.failed_path[-1] if tracer.failed_path else ""
            if not failed or failed in leaves or len(leaves) >= budget:
                raise _top_level_error(model, exc) from exc
            leaves.add(failed)
            kind = type(root.get_submodule(failed)).__name__
            records.append(LeafRecord(failed, f"{kind} could not be traced ({_reason(exc)}) at "
                                              f"{user_source_line(exc)}; kept as an opaque leaf"))
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    program = Program(gm, example_inputs, dialect="torch", leaves=records, training=model.training)
    program.propagate_meta()
    return program


def _top_level_error(model: nn.Module, exc: BaseException) -> TraceError:
    name = type(model).__name__
    return TraceError(
        f"torch.fx cannot trace {name}.forward: {_reason(exc)}\n"
        f"  at {user_source_line(exc)}\n"
        "What to do: move the untraceable code (data-dependent `if`/loops on tensor values, unsupported "
        "Python) into a submodule - slimfx then keeps that submodule as an opaque leaf automatically - or "
        f"pass leaf_modules=[...] naming it, or use frontend='export' (torch.export), e.g. "
        f"slimfx.trace(model, inputs, frontend='export')."
    )
