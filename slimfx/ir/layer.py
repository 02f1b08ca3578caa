"""Uniform access to a parametrised node's tensors and attributes, whatever form it has.

An ``nn.Conv2d`` call_module node, ``F.conv2d(x, w, b)`` with get_attr weights, and ``aten.conv2d`` all
have a weight, a bias and ``groups``; a pass reads and replaces them through :class:`Layer` so that one
rewrite serves both dialects. Roles are the names in :class:`slimfx.ir.ops.Slots`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from slimfx.ir import ops
from slimfx.ir.program import Program

_TENSOR_ROLES = frozenset({"weight", "bias", "running_mean", "running_var"})


def _owner_and_name(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    owner, _, name = target.rpartition(".")
    found = ops.find_submodule(root, owner) if owner else root
    if found is None:
        raise AttributeError(f"{type(root).__name__} has no submodule {owner!r} (attribute path {target!r})")
    return found, name


def get_attr_value(root: nn.Module, target: str) -> Any:
    """The tensor/module an attribute path names (``"layer1.0.conv.weight"``)."""
    owner, name = _owner_and_name(root, target)
    return getattr(owner, name)


def set_attr_value(root: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at an attribute path, keeping Parameter vs buffer status."""
    owner, name = _owner_and_name(root, target)
    old = getattr(owner, name, None)
    if isinstance(old, nn.Parameter) or (old is None and name in ("weight", "bias")):
        requires_grad = old.requires_grad if isinstance(old, nn.Parameter) else True
        setattr(owner, name, nn.Parameter(value, requires_grad=requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


class Layer:
    """A parametrised node seen through its roles (weight, bias, running stats, groups, eps, ...)."""

    def __init__(self, program: Program, node: fx.Node):
        self.program = program
        self.node = node
        self.kind = program.kind(node)
        self.module: nn.Module | None = (
            ops.find_submodule(program.module, node.target) if node.op == "call_module" else None
        )
        self.slots = ops.slots(node)
        if self.module is None and self.slots is None:
            raise ValueError(f"%{node.name} ({node.op} {node.target}) is not a parametrised layer")

    @property
    def name(self) -> str:
        """A readable name: the module path for module forms, the node name otherwise."""
        return str(self.node.target) if self.module is not None else self.node.name

    def _raw(self, role: str) -> Any:
        assert self.slots is not None
        index = self.slots.args.get(role)
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if role in self.node.kwargs:
            return self.node.kwargs[role]
        return self.slots.defaults.get(role)

    def get(self, role: str) -> Any:
        """The value of a role: a tensor, a Python value, None when absent, or an fx.Node when computed."""
        if self.module is not None:
            if role == "training":
                return self.module.training or getattr(self.module, "running_mean", 0) is None
            return getattr(self.module, role, None)
        raw = self._raw(role)
        if isinstance(raw, fx.Node) and raw.op == "get_attr":
            return get_attr_value(self.program.module, raw.target)
        return raw

    def tensor(self, role: str) -> torch.Tensor | None:
        """The role's tensor, or None when absent or not a constant (computed by the graph)."""
        value = self.get(role)
        return value if isinstance(value, torch.Tensor) else None

    def param_target(self, role: str) -> str | None:
        """The attribute path that holds the role's tensor, or None."""
        if self.module is not None:
            return f"{self.node.target}.{role}" if getattr(self.module, role, None) is not None else None
        raw = self._raw(role)
        return raw.target if isinstance(raw, fx.Node) and raw.op == "get_attr" else None

    def set(self, role: str, value: torch.Tensor) -> None:
        """Replace (or add, e.g. a missing bias) the tensor of a role."""
        if role not in _TENSOR_ROLES:
            raise ValueError(f"role {role!r} is not a tensor role")
        target = self.param_target(role)
        if target is not None:
            set_attr_value(self.program.module, target, value)
            return
        if self.module is not None:
            setattr(self.module, role, nn.Parameter(value))
            return
        assert self.slots is not None
        graph = self.program.graph
        attr = _fresh_attr_name(self.program.module, f"{self.node.name}_{role}")
        self.program.module.register_parameter(attr, nn.Parameter(value))
        with graph.inserting_before(self.node):
            getter = graph.get_attr(attr)
        index = self.slots.args[role]
        if role in self.node.kwargs or index > len(self.node.args):
            kwargs = dict(self.node.kwargs)
            kwargs[role] = getter
            self.node.kwargs = kwargs
        else:
            args = list(self.node.args)
            if index == len(args):
                args.append(getter)
            else:
                args[index] = getter
            self.node.args = tuple(args)

    def is_shared(self) -> bool:
        """True when editing this layer's tensors would also change another node (shared module/param)."""
        uses = attribute_uses(self.program)
        if self.module is not None:
            return uses.get(self.node.target, 0) > 1
        for role in _TENSOR_ROLES:
            raw = self._raw(role) if role in self.slots.args else None
            if isinstance(raw, fx.Node) and raw.op == "get_attr" and uses.get(raw.target, 0) > 1:
                return True
        return False


def attribute_uses(program: Program) -> dict[str, int]:
    """How many nodes use each submodule (call_module) and each attribute (users of its get_attr nodes).

    Cached in ``program.analyses`` and dropped after every pass; within a pass it stays valid for the
    layers the pass has not yet rewritten.
    """
    cached = program.analyses.get("attribute-uses")
    if cached is None:
        cached = {}
        for n in program.graph.nodes:
            if n.op == "call_module":
                cached[n.target] = cached.get(n.target, 0) + 1
            elif n.op == "get_attr":
                cached[n.target] = cached.get(n.target, 0) + len(n.users)
        program.analyses["attribute-uses"] = cached
    return cached


def _fresh_attr_name(root: nn.Module, base: str) -> str:
    name, i = base.replace(".", "_"), 0
    while hasattr(root, name):
        i += 1
        name = f"{base}_{i}"
    return name


# Module forms that have a functional twin over the module's own parameters. Passes that must put a node
# between a layer and its weight (a pruning mask, a weight fake-quant) rewrite the call into this form.
MODULE_TO_FUNCTION: dict[type, tuple[Callable, tuple[str, ...]]] = {
    nn.Linear: (F.linear, ()),
    nn.Conv1d: (F.conv1d, ("stride", "padding", "dilation", "groups")),
    nn.Conv2d: (F.conv2d, ("stride", "padding", "dilation", "groups")),
    nn.Conv3d: (F.conv3d, ("stride", "padding", "dilation", "groups")),
}
FUNCTION_TO_MODULE: dict[Callable, tuple[type, tuple[str, ...]]] = {
    fn: (cls, attrs) for cls, (fn, attrs) in MODULE_TO_FUNCTION.items()
}


def why_no_functional_form(module: nn.Module) -> str | None:
    """Why :func:`to_functional` cannot rewrite a call of ``module``, or None when it can."""
    if type(module) not in MODULE_TO_FUNCTION:
        return f"{type(module).__name__} has no functional form"
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={module.padding_mode!r} has no functional form"
    if isinstance(getattr(module, "padding", 0), str):
        return "string padding has no functional form here"
    return None


def to_functional(program: Program, node: fx.Node) -> fx.Node:
    """Rewrite an ``nn.Linear``/``nn.ConvNd`` call into ``F.linear``/``F.convNd`` over the module's own
    parameters (get_attr nodes) and return the new node. The module stays and keeps owning the parameters.
    Check :func:`why_no_functional_form` first."""
    module = program.module.get_submodule(node.target)
    fn, attrs = MODULE_TO_FUNCTION[type(module)]
    graph = program.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        call = graph.call_function(fn, (node.args[0], weight, bias, *(getattr(module, a) for a in attrs)))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call
