"""canonicalize: one form for the module/functional/method variants of every stateless op.

The canonical form is a call_function with the functions below (``F.relu``, ``torch.reshape``,
``operator.add`` ...); parametrised ops (linear, conv, norms, embedding) keep their form, since
:class:`slimfx.ir.layer.Layer` already reads every form. In eval mode dropout and identity are removed.
Each rewrite is one row in a table: ``MODULE_FORMS`` (module type → function + kwargs from the module's
attributes), ``METHOD_FORMS`` and ``FUNCTION_FORMS``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from slimfx.ir.ops import OpKind, data_input, is_inplace
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass

aten = torch.ops.aten

# module type -> (function, kwargs from the module). None means "not rewritable in this configuration".
MODULE_FORMS: dict[type, Callable[[nn.Module], tuple[Callable, dict[str, Any]] | None]] = {
    nn.ReLU: lambda m: (F.relu, {"inplace": True} if m.inplace else {}),
    nn.ReLU6: lambda m: (F.relu6, {"inplace": True} if m.inplace else {}),
    nn.GELU: lambda m: (F.gelu, {} if m.approximate == "none" else {"approximate": m.approximate}),
    nn.SiLU: lambda m: (F.silu, {"inplace": True} if m.inplace else {}),
    nn.Sigmoid: lambda m: (torch.sigmoid, {}),
    nn.Tanh: lambda m: (torch.tanh, {}),
    nn.Hardswish: lambda m: (F.hardswish, {"inplace": True} if m.inplace else {}),
    nn.Hardsigmoid: lambda m: (F.hardsigmoid, {"inplace": True} if m.inplace else {}),
    nn.Softmax: lambda m: None if m.dim is None else (torch.softmax, {"dim": m.dim}),
    nn.Flatten: lambda m: (torch.flatten, {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    nn.MaxPool1d: lambda m: _maxpool(F.max_pool1d, m),
    nn.MaxPool2d: lambda m: _maxpool(F.max_pool2d, m),
    nn.AvgPool1d: lambda m: (F.avg_pool1d, {"kernel_size": m.kernel_size, "stride": m.stride,
                                            "padding": m.padding, "ceil_mode": m.ceil_mode,
                                            "count_include_pad": m.count_include_pad}),
    nn.AvgPool2d: lambda m: (F.avg_pool2d, {"kernel_size": m.kernel_size, "stride": m.stride,
                                            "padding": m.padding, "ceil_mode": m.ceil_mode,
                                            "count_include_pad": m.count_include_pad,
                                            "divisor_override": m.divisor_override}),
    nn.AdaptiveAvgPool1d: lambda m: (F.adaptive_avg_pool1d, {"output_size": m.output_size}),
    nn.AdaptiveAvgPool2d: lambda m: (F.adaptive_avg_pool2d, {"output_size": m.output_size}),
    nn.AdaptiveMaxPool2d: lambda m: None if m.return_indices else (F.adaptive_max_pool2d,
                                                                   {"output_size": m.output_size}),
}


def _maxpool(fn: Callable, m: nn.Module) -> tuple[Callable, dict[str, Any]] | None:
    if m.return_indices:
        return None
    return fn, {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "dilation": m.dilation, "ceil_mode": m.ceil_mode}


@dataclass(frozen=True)
class Form:
    """A canonical target; ``pack_varargs`` packs trailing positional ints into one shape tuple."""

    target: Callable
    pack_varargs: bool = False
    forbid_kwargs: tuple[str, ...] = ()


METHOD_FORMS: dict[str, Form] = {
    "relu": Form(F.relu),
    "sigmoid": Form(torch.sigmoid),
    "tanh": Form(torch.tanh),
    "softmax": Form(torch.softmax),
    "add": Form(operator.add, forbid_kwargs=("alpha",)),
    "sub": Form(operator.sub, forbid_kwargs=("alpha",)),
    "mul": Form(operator.mul),
    "div": Form(operator.truediv, forbid_kwargs=("rounding_mode",)),
    "matmul": Form(torch.matmul),
    "view": Form(torch.reshape, pack_varargs=True),
    "reshape": Form(torch.reshape, pack_varargs=True),
    "flatten": Form(torch.flatten),
    "permute": Form(torch.permute, pack_varargs=True),
    "transpose": Form(torch.transpose),
    "squeeze": Form(torch.squeeze),
    "unsqueeze": Form(torch.unsqueeze),
    "mean": Form(torch.mean),
    "sum": Form(torch.sum),
    "split": Form(torch.split),
    "chunk": Form(torch.chunk),
}

FUNCTION_FORMS: dict[Any, Form] = {
    torch.relu: Form(F.relu),
    F.sigmoid: Form(torch.sigmoid),
    F.tanh: Form(torch.tanh),
    F.softmax: Form(torch.softmax, forbid_kwargs=("_stacklevel", "dtype")),
    torch.add: Form(operator.add, forbid_kwargs=("alpha", "out")),
    torch.sub: Form(operator.sub, forbid_kwargs=("alpha", "out")),
    torch.mul: Form(operator.mul, forbid_kwargs=("out",)),
    torch.div: Form(operator.truediv, forbid_kwargs=("rounding_mode", "out")),
    torch.concat: Form(torch.cat),
    torch.Tensor.view: Form(torch.reshape, pack_varargs=True),
}

_REMOVABLE = (OpKind.IDENTITY, OpKind.DROPOUT)


@dataclass
class CanonicalizeOptions:
    """remove_dropout: drop dropout when the program is in eval mode (it is the identity there)."""

    remove_dropout: bool = True


@register_pass
class Canonicalize(Pass):
    """Rewrite module/method/functional variants of stateless ops into one call_function form; drop identities."""

    name = "canonicalize"
    contract = Contract.EXACT
    Options = CanonicalizeOptions
    tolerance = (0.0, 0.0)

    def run(self, program: Program) -> PassResult:
        rewritten = removed = 0
        for node in list(program.graph.nodes):
            kind = program.kind(node)
            if kind in _REMOVABLE and self._removable(program, node, kind):
                node.replace_all_uses_with(data_input(node))
                program.graph.erase_node(node)
                removed += 1
                continue
            new = self._canonical_call(program, node)
            if new is not None:
                target, args, kwargs = new
                with program.graph.inserting_before(node):
                    replacement = program.graph.call_function(target, args, kwargs)
                replacement.meta = dict(node.meta)
                node.replace_all_uses_with(replacement)
                program.graph.erase_node(node)
                rewritten += 1
        return PassResult(changed=bool(rewritten or removed), stats={"rewritten": rewritten, "removed": removed})

    def _removable(self, program: Program, node: fx.Node, kind: OpKind) -> bool:
        source = data_input(node)
        if not isinstance(source, fx.Node):
            return False
        if any(is_inplace(u, program.module) for u in node.users):
            return False  # a later in-place op would then write into the source instead of a copy
        if node.op == "call_function" and node.target in (aten.clone.default,) and node.kwargs.get("memory_format"):
            return False
        if kind is OpKind.IDENTITY:
            return node.op == "call_module" or len(node.args) == 1
        if not self.options.remove_dropout:
            return False
        if node.op == "call_module":
            return not program.module.get_submodule(node.target).training
        training = node.kwargs.get("training", node.kwargs.get("train"))
        if training is None and len(node.args) >= 3:
            training = node.args[2]
        if training is None:
            training = node.target is F.dropout  # F.dropout defaults to training=True
        return training is False

    def _canonical_call(self, program: Program, node: fx.Node) -> tuple[Callable, tuple, dict] | None:
        if node.op == "call_module":
            sub = program.module.get_submodule(node.target)
            rule = MODULE_FORMS.get(type(sub))
            made = rule(sub) if rule else None
            if made is None or len(node.args) != 1 or node.kwargs:
                return None
            fn, kwargs = made
            return fn, (node.args[0],), kwargs
        if node.op == "call_method":
            form = METHOD_FORMS.get(node.target)
        elif node.op == "call_function":
            try:
                form = FUNCTION_FORMS.get(node.target)
            except TypeError:
                form = None
        else:
            return None
        if form is None or any(k in node.kwargs for k in form.forbid_kwargs):
            return None
        args = tuple(node.args)
        if any(isinstance(a, torch.dtype) for a in args):
            return None  # e.g. x.view(torch.int8) reinterprets bytes; it is not a reshape
        if form.pack_varargs and len(args) >= 2:
            first = args[1]
            one_shape = isinstance(first, (tuple, list, torch.Size)) or (
                isinstance(first, fx.Node) and not _is_int_node(first)
            )
            if not (len(args) == 2 and one_shape):
                args = (args[0], tuple(args[1:]))
        kwargs = dict(node.kwargs)
        if form.target in (operator.add, operator.sub, operator.mul, operator.truediv) and (kwargs or len(args) != 2):
            return None
        return form.target, args, kwargs


def _is_int_node(node: fx.Node) -> bool:
    from slimfx.ir.meta import meta_of

    return isinstance(meta_of(node), int)
