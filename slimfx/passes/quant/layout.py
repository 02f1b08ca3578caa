"""Keep the activations between lowered int8 convs channels-last (run by ``lower-int8``).

oneDNN's int8 convolution computes in channels-last (NHWC). Fed NCHW, :class:`~slimfx.kernels.Int8Conv2d`
transposes its input codes in and its output back (it returns its input's memory format, like ``F.conv2d``):
two layout passes per conv, 0.34 ms of the demo CNN's 1.74 ms. This rewrite converts the input of each int8
conv to channels-last (once per tensor; a no-op when it already is, and 3-D inputs pass unchanged), sets the
convs to return channels-last, and lets the tensor flow only through ops whose values cannot depend on the
layout: the int8 convs themselves, piecewise-linear activations (relu, relu6, hardtanh, leaky_relu; in place
too), max pooling, elementwise ``+ - * /``, ``cat``, dropout / identity, and size queries (``.shape``,
``.size()``, ``.dim()``) — each with a single 4-D tensor output. Every other consumer (``view``, ``flatten``,
GELU, average pooling, unknown ops) and every program output gets an NCHW-contiguous copy made just before it,
so it sees the values and the layout an NCHW input gives it (an output that was channels-last because the
caller fed channels-last comes back NCHW-contiguous).

Exactness: the rewritten ops give the same values in either layout (transcendental activations, averaging
and normalisation can differ in the last bit between their vectorised and scalar loops, so they are not
among them). What can change is the conv kernel the dispatcher picks for the new layout (each is within
``lower-int8``'s stated bound of the simulation). Programs with other in-place ops, or with an in-place
activation on a tensor that also feeds an NCHW copy, are left alone (a copy would not see a later in-place
write, nor an aliasing view a later write to its base); that is noted. ``aten`` programs from torch.export get
the same rewrite, with ``aten.clone(memory_format=contiguous_format)`` as the NCHW copy.
"""

from __future__ import annotations

import torch
from torch import fx

from slimfx.ir.meta import tensor_meta
from slimfx.ir.ops import OpKind, is_inplace, target_name
from slimfx.ir.program import Program
from slimfx.kernels import Int8Conv2d

_EXACT_KINDS = {OpKind.ADD, OpKind.SUB, OpKind.MUL, OpKind.DIV, OpKind.CAT, OpKind.DROPOUT, OpKind.IDENTITY}
#: Activations and pooling whose values cannot depend on the layout (no transcendental or summed terms), as
#: :func:`slimfx.ir.ops.target_name` names functions, methods and (lowercased) module classes.
_EXACT_NAMES = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "leakyrelu",
                "max_pool2d", "maxpool2d", "adaptive_max_pool2d", "adaptivemaxpool2d"}
_SIZE_QUERIES = {"size", "dim", "shape", "dtype", "device", "ndim"}


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory format when it is 4-D (a no-op if it already is), else ``x`` unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


torch.fx.wrap("to_channels_last")  # a leaf if a lowered program is ever traced again


def _is_int8_conv(program: Program, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(program.module.get_submodule(node.target), Int8Conv2d)


def _is_size_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SIZE_QUERIES
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SIZE_QUERIES


def _keeps_values_in_any_layout(program: Program, node: fx.Node) -> bool:
    """An op that may read a channels-last tensor: the same values as from NCHW, one 4-D tensor out."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    exact = program.kind(node) in _EXACT_KINDS or target_name(node, program.module) in _EXACT_NAMES
    if not exact or node.kwargs.get("return_indices"):
        return False
    meta = tensor_meta(node)
    return meta is not None and len(meta.shape) == 4


def _plan(program: Program) -> tuple[set[fx.Node], list[fx.Node], list[tuple[fx.Node, fx.Node]]]:
    """The tensors that will be channels-last, the int8 convs (in graph order) and the (consumer, tensor) pairs
    that need an NCHW copy."""
    channels_last: set[fx.Node] = set()
    convs: list[fx.Node] = []
    copies: list[tuple[fx.Node, fx.Node]] = []
    for node in program.graph.nodes:
        if _is_int8_conv(program, node):
            convs.append(node)
            channels_last.add(node)
            continue
        inputs = [a for a in node.all_input_nodes if a in channels_last]
        if not inputs or (node.op != "output" and _is_size_query(node)):
            continue
        if node.op != "output" and _keeps_values_in_any_layout(program, node):
            channels_last.add(node)
            continue
        copies += [(node, x) for x in inputs]
    return channels_last, convs, copies


def _unsafe_in_place(program: Program, copies: list[tuple[fx.Node, fx.Node]]) -> str | None:
    """Why the rewrite could change values through an in-place op, or None. In-place relu-like activations on a
    channels-last tensor are fine unless that tensor also feeds an NCHW copy (which would not see the write,
    nor would an aliasing view of the copy); any other in-place op is refused."""
    copied = {x for _, x in copies}
    for node in program.graph.nodes:
        if node.op == "output" or not is_inplace(node, program.module):
            continue
        if not _keeps_values_in_any_layout(program, node):
            return f"%{node.name} is an in-place {target_name(node, program.module)}"
        if any(a in copied for a in node.all_input_nodes):
            return f"%{node.name} writes in place to a tensor that is also read in NCHW"
    return None


def keep_int8_convs_channels_last(program: Program) -> tuple[int, str | None]:
    """Rewrite ``program`` in place as the module docstring says. Returns (conversions inserted, note)."""
    channels_last, convs, copies = _plan(program)
    why = _unsafe_in_place(program, copies)
    if why:
        return 0, f"int8 conv activations keep their layout: {why}"
    graph = program.graph
    converted: dict[fx.Node, fx.Node] = {}  # input tensor -> its channels-last copy, shared by its int8 convs
    inserted = 0
    for node in convs:
        x = node.args[0]
        if isinstance(x, fx.Node) and x not in channels_last:
            if x not in converted:
                with graph.inserting_after(x):
                    converted[x] = graph.call_function(to_channels_last, (x,))
                converted[x].meta = dict(x.meta)
                inserted += 1
            node.replace_input_with(x, converted[x])
        # channels-last out even when the input is also NCHW-contiguous (C = 1 or H = W = 1), where the
        # module would otherwise follow F.conv2d and return NCHW (3-D inputs keep F.conv2d's rule)
        program.module.get_submodule(node.target).output_memory_format = torch.channels_last
    for node, x in copies:  # an NCHW-contiguous copy made right before each consumer that needs one
        with graph.inserting_before(node):
            if program.dialect == "aten":  # aten has no contiguous(): a clone to the contiguous format
                to_nchw = graph.call_function(torch.ops.aten.clone.default, (x,),
                                              {"memory_format": torch.contiguous_format})
            else:
                to_nchw = graph.call_method("contiguous", (x,))
        to_nchw.meta = dict(x.meta)
        node.replace_input_with(x, to_nchw)
        inserted += 1
    if inserted:
        graph.lint()
        program.recompile()
    return inserted, None
