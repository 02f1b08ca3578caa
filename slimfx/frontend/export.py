"""The torch.export frontend: an exported program, unlifted (parameters as get_attr), as an `aten` Program.

This is the path for models torch.fx cannot trace symbolically. The unlifted GraphModule keeps the
parameters as attributes, so the same passes (which read weights through get_attr) apply.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import torch
import torch.nn as nn

from slimfx.errors import TraceError
from slimfx.frontend.fx import user_source_line
from slimfx.ir.copying import copy_module
from slimfx.ir.program import Program


def trace_export(model: nn.Module, example_inputs: tuple, strict: bool = False) -> Program:
    """Export ``model`` with torch.export into a Program of dialect ``aten``.

    The model is deep-copied first. Raises TraceError naming the cause and the source line.
    """
    root = copy_module(model)
    try:
        with _quiet_torch():
            exported = torch.export.export(root, tuple(example_inputs), strict=strict)
        gm = exported.module()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(
            f"torch.export cannot export {type(model).__name__}: {type(exc).__name__}: {first}\n"
            f"  at {user_source_line(exc)}\n"
            "What to do: rewrite data-dependent control flow with torch.cond, or use frontend='fx' "
            "(untraceable submodules are then kept as leaves)."
        ) from exc
    _drop_export_guards(gm)
    program = Program(gm, example_inputs, dialect="aten", training=model.training)
    program.propagate_meta()
    return program


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch.export's own printing of graphs and guard warnings: a failure becomes our TraceError,
    which says what failed and what to do; pages of internal graph dumps only bury that message."""
    shapes = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes.level
    shapes.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        shapes.setLevel(level)


def _drop_export_guards(gm: torch.fx.GraphModule) -> None:
    """Remove the input-guard call torch.export inserts: it has no outputs and no numerics.

    Kept, it would be an UNKNOWN node that every pass must tiptoe around.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            gm.graph.erase_node(node)
            if hasattr(gm, node.target):
                delattr(gm, node.target)
    gm.recompile()
