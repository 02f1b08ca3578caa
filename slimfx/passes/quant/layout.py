"""Keep the activations between lowered int8 convs channels-last (run by ``lower-int8``; exact).

oneDNN's int8 convolution computes in channels-last (NHWC). Fed NCHW, :class:`~slimfx.kernels.Int8Conv2d`
transposes its input codes in and its output back (it returns its input's memory format, like ``F.conv2d``):
two layout passes per conv, measured 19.3 ms vs 14.2 ms from channels-last for a 16x64x56x56 3x3 conv, and
0.34 ms of the demo CNN's 1.74 ms. This rewrite converts the input of each chain of int8 convs to channels-last
once (``x.contiguous(memory_format=torch.channels_last)``, a no-op when it already is), lets the tensor flow
through the ops that accept any layout (activations, pooling, normalisation, elementwise arithmetic, cat,
flatten / reshape, size queries, other int8 convs), and makes it contiguous (``.contiguous()``, NCHW, one copy per
tensor) for anything else — ``view``, unknown ops, the program's outputs — so such consumers get the layout an
NCHW input gives them (an output that was channels-last because the caller fed channels-last comes back
NCHW-contiguous). A memory format never changes a tensor's values, so the program computes exactly what it did.
The modules also return channels-last when their input is ambiguous (C = 1 or H = W = 1), where ``F.conv2d``'s
rule would pick NCHW (:attr:`~slimfx.kernels.Int8Conv2d.output_memory_format`).

Torch dialect only (``aten`` programs from torch.export keep their layout; noted).
"""

from __future__ import annotations

import torch
from torch import fx

from slimfx.ir.meta import tensor_meta
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.kernels import Int8Conv2d

#: Ops that take a channels-last tensor as well as an NCHW one and keep its layout in their output.
_PRESERVING = {OpKind.ACTIVATION, OpKind.POOL, OpKind.ADAPTIVE_POOL, OpKind.BATCH_NORM, OpKind.ADD, OpKind.SUB,
               OpKind.MUL, OpKind.DIV, OpKind.DROPOUT, OpKind.IDENTITY, OpKind.CAT}
#: Reshapes that copy when they must (``view`` would raise on a channels-last tensor).
_COPYING_RESHAPES = {"flatten", "reshape"}


def _is_int8_conv(program: Program, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(program.module.get_submodule(node.target), Int8Conv2d)


def _accepts_any_layout(program: Program, node: fx.Node) -> bool:
    if _is_int8_conv(program, node) or program.kind(node) in _PRESERVING or program.kind(node) is OpKind.SHAPE:
        return True
    if program.kind(node) is OpKind.RESHAPE:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name in _COPYING_RESHAPES
    return False


def _four_d(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and len(meta.shape) == 4


def keep_int8_convs_channels_last(program: Program) -> tuple[int, str | None]:
    """Rewrite ``program`` in place as the module docstring says. Returns (conversions inserted, note)."""
    if program.dialect != "torch":
        return 0, "int8 conv activations keep their layout in the aten dialect (channels-last is torch-only here)"
    graph = program.graph
    channels_last: set[fx.Node] = set()
    nchw: dict[fx.Node, fx.Node] = {}  # one contiguous copy per tensor, shared by its layout-sensitive users
    inserted = 0
    for node in list(graph.nodes):
        if _is_int8_conv(program, node):
            x = node.args[0]
            if not (isinstance(x, fx.Node) and _four_d(x)):
                continue  # an unbatched [C, H, W] input keeps F.conv2d's layout rule
            if x not in channels_last:
                with graph.inserting_before(node):
                    to_nhwc = graph.call_method("contiguous", (x,), {"memory_format": torch.channels_last})
                to_nhwc.meta = dict(x.meta)
                node.replace_input_with(x, to_nhwc)
                inserted += 1
            # channels-last out even when the input is also NCHW-contiguous (C = 1 or H = W = 1), where the
            # module would otherwise follow F.conv2d and return NCHW
            program.module.get_submodule(node.target).output_memory_format = torch.channels_last
            channels_last.add(node)
            continue
        inputs = [a for a in node.all_input_nodes if a in channels_last]
        if not inputs:
            continue
        if node.op != "output" and _accepts_any_layout(program, node):
            if program.kind(node) in _PRESERVING and _four_d(node):
                channels_last.add(node)
            continue
        for x in inputs:  # back to NCHW-contiguous for this consumer (and x's other sensitive consumers)
            if x not in nchw:
                with graph.inserting_after(x):
                    nchw[x] = graph.call_method("contiguous", (x,))
                nchw[x].meta = dict(x.meta)
                inserted += 1
            node.replace_input_with(x, nchw[x])
    if inserted:
        graph.lint()
        program.recompile()
    return inserted, None
