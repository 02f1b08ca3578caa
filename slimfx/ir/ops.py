"""The op table: every node of either dialect maps to one canonical OpKind.

Passes never switch on ``node.target``; they ask :func:`kind` and read the per-kind facts in
:data:`KIND_INFO`. Supporting a new op is one row in one of the tables below (plus a test).
Anything not in a table is ``OpKind.UNKNOWN`` and every pass must leave it (and what it touches) alone.

Parametrised ops also have a *slot map* (which positional argument or module attribute holds the weight,
bias, running stats, ...). :mod:`slimfx.ir.layer` reads it so that a pass edits a conv's weight the same
way whether the conv is an ``nn.Conv2d`` module, ``F.conv2d`` with get_attr weights or ``aten.conv2d``.
"""

from __future__ import annotations

import builtins
import functools
import operator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten


class OpKind(str, Enum):
    """Canonical op kinds shared by the ``torch`` (symbolic_trace) and ``aten`` (torch.export) dialects."""

    INPUT = "input"
    PARAM = "param"
    OUTPUT = "output"
    LINEAR = "linear"
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    BATCH_NORM = "batch_norm"
    LAYER_NORM = "layer_norm"
    GROUP_NORM = "group_norm"
    EMBEDDING = "embedding"
    MATMUL = "matmul"
    ADDMM = "addmm"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    CAT = "cat"
    SPLIT = "split"
    GETITEM = "getitem"
    SLICE = "slice"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    CONTIGUOUS = "contiguous"
    ACTIVATION = "activation"
    SOFTMAX = "softmax"
    POOL = "pool"
    ADAPTIVE_POOL = "adaptive_pool"
    DROPOUT = "dropout"
    MULTIHEAD_ATTENTION = "multihead_attention"
    SDPA = "sdpa"
    REDUCE = "reduce"
    IDENTITY = "identity"
    SHAPE = "shape"
    MASK = "mask"
    FAKE_QUANT = "fake_quant"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class KindInfo:
    """Facts about a kind that passes rely on.

    pure: no side effects, so an unused result may be deleted.
    elementwise: output[i] depends only on input[i] (channels pass through unchanged).
    params: the kind owns learnable tensors (weight/bias/...).
    same_shape: the output has the data input's shape and dtype (meta propagation skips dispatch).
    """

    pure: bool = True
    elementwise: bool = False
    params: bool = False
    same_shape: bool = False


KIND_INFO: dict[OpKind, KindInfo] = {k: KindInfo() for k in OpKind}
KIND_INFO.update(
    {
        OpKind.INPUT: KindInfo(pure=False),
        OpKind.OUTPUT: KindInfo(pure=False),
        OpKind.UNKNOWN: KindInfo(pure=False),
        OpKind.LINEAR: KindInfo(params=True),
        OpKind.CONV: KindInfo(params=True),
        OpKind.CONV_TRANSPOSE: KindInfo(params=True),
        OpKind.BATCH_NORM: KindInfo(params=True, same_shape=True),
        OpKind.LAYER_NORM: KindInfo(params=True, same_shape=True),
        OpKind.GROUP_NORM: KindInfo(params=True, same_shape=True),
        OpKind.EMBEDDING: KindInfo(params=True),
        OpKind.MULTIHEAD_ATTENTION: KindInfo(params=True),
        OpKind.ADD: KindInfo(elementwise=True),
        OpKind.SUB: KindInfo(elementwise=True),
        OpKind.MUL: KindInfo(elementwise=True),
        OpKind.DIV: KindInfo(elementwise=True),
        OpKind.ACTIVATION: KindInfo(elementwise=True, same_shape=True),
        OpKind.DROPOUT: KindInfo(elementwise=True, same_shape=True),
        OpKind.IDENTITY: KindInfo(elementwise=True, same_shape=True),
        OpKind.CONTIGUOUS: KindInfo(elementwise=True, same_shape=True),
        OpKind.MASK: KindInfo(elementwise=True, same_shape=True),  # weight * mask (slimfx.passes.prune.masks)
        OpKind.FAKE_QUANT: KindInfo(elementwise=True, same_shape=True),  # slimfx.passes.quant.fake_quant
    }
)


@dataclass(frozen=True)
class Slots:
    """Where a parametrised op keeps its tensors and attributes.

    ``args`` maps a role ("weight", "bias", "running_mean", "training", "groups", ...) to the positional
    index of the functional/aten form; ``defaults`` gives the value of a role when the call omits it.
    Module forms use the role name as attribute name (nn.Conv2d.weight, .groups, ...).
    """

    args: dict[str, int] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


_CONV_SLOTS = Slots(
    {"weight": 1, "bias": 2, "stride": 3, "padding": 4, "dilation": 5, "groups": 6},
    {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
)
_CONV_T_SLOTS = Slots(
    {"weight": 1, "bias": 2, "stride": 3, "padding": 4, "output_padding": 5, "groups": 6, "dilation": 7},
    {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
)
_LINEAR_SLOTS = Slots({"weight": 1, "bias": 2}, {"bias": None})
_F_BN_SLOTS = Slots(
    {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4, "training": 5, "momentum": 6, "eps": 7},
    {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
)
_ATEN_BN_SLOTS = Slots(
    {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4, "training": 5, "momentum": 6, "eps": 7},
    {},
)
_ATEN_BN_NO_TRAIN_SLOTS = Slots(
    {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4, "momentum": 5, "eps": 6},
    {"training": False},
)
_LN_SLOTS = Slots({"normalized_shape": 1, "weight": 2, "bias": 3, "eps": 4}, {"weight": None, "bias": None})
_GN_SLOTS = Slots({"num_groups": 1, "weight": 2, "bias": 3, "eps": 4}, {"weight": None, "bias": None})
_F_EMB_SLOTS = Slots({"weight": 1}, {})
_ATEN_EMB_SLOTS = Slots({"weight": 0}, {})


# call_module: exact types only. A user subclass may override forward, so it is UNKNOWN (conservative).
MODULE_KINDS: dict[type, OpKind] = {
    nn.Linear: OpKind.LINEAR,
    nn.Conv1d: OpKind.CONV,
    nn.Conv2d: OpKind.CONV,
    nn.Conv3d: OpKind.CONV,
    nn.ConvTranspose1d: OpKind.CONV_TRANSPOSE,
    nn.ConvTranspose2d: OpKind.CONV_TRANSPOSE,
    nn.BatchNorm1d: OpKind.BATCH_NORM,
    nn.BatchNorm2d: OpKind.BATCH_NORM,
    nn.BatchNorm3d: OpKind.BATCH_NORM,
    nn.LayerNorm: OpKind.LAYER_NORM,
    nn.GroupNorm: OpKind.GROUP_NORM,
    nn.Embedding: OpKind.EMBEDDING,
    nn.ReLU: OpKind.ACTIVATION,
    nn.ReLU6: OpKind.ACTIVATION,
    nn.GELU: OpKind.ACTIVATION,
    nn.SiLU: OpKind.ACTIVATION,
    nn.Sigmoid: OpKind.ACTIVATION,
    nn.Tanh: OpKind.ACTIVATION,
    nn.Hardswish: OpKind.ACTIVATION,
    nn.Hardsigmoid: OpKind.ACTIVATION,
    nn.Softmax: OpKind.SOFTMAX,
    nn.MaxPool1d: OpKind.POOL,
    nn.MaxPool2d: OpKind.POOL,
    nn.AvgPool1d: OpKind.POOL,
    nn.AvgPool2d: OpKind.POOL,
    nn.AdaptiveAvgPool1d: OpKind.ADAPTIVE_POOL,
    nn.AdaptiveAvgPool2d: OpKind.ADAPTIVE_POOL,
    nn.AdaptiveMaxPool2d: OpKind.ADAPTIVE_POOL,
    nn.Dropout: OpKind.DROPOUT,
    nn.Dropout1d: OpKind.DROPOUT,
    nn.Dropout2d: OpKind.DROPOUT,
    nn.MultiheadAttention: OpKind.MULTIHEAD_ATTENTION,
    nn.Identity: OpKind.IDENTITY,
    nn.Flatten: OpKind.RESHAPE,
    nn.Unflatten: OpKind.RESHAPE,
}

_TORCH_FUNCTION_KINDS: dict[Any, OpKind] = {
    F.linear: OpKind.LINEAR,
    F.conv1d: OpKind.CONV,
    F.conv2d: OpKind.CONV,
    F.conv3d: OpKind.CONV,
    F.conv_transpose1d: OpKind.CONV_TRANSPOSE,
    F.conv_transpose2d: OpKind.CONV_TRANSPOSE,
    F.batch_norm: OpKind.BATCH_NORM,
    F.layer_norm: OpKind.LAYER_NORM,
    F.group_norm: OpKind.GROUP_NORM,
    F.embedding: OpKind.EMBEDDING,
    torch.matmul: OpKind.MATMUL,
    torch.bmm: OpKind.MATMUL,
    torch.mm: OpKind.MATMUL,
    operator.matmul: OpKind.MATMUL,
    torch.addmm: OpKind.ADDMM,
    operator.add: OpKind.ADD,
    torch.add: OpKind.ADD,
    operator.sub: OpKind.SUB,
    torch.sub: OpKind.SUB,
    operator.mul: OpKind.MUL,
    torch.mul: OpKind.MUL,
    operator.truediv: OpKind.DIV,
    torch.div: OpKind.DIV,
    torch.cat: OpKind.CAT,
    torch.concat: OpKind.CAT,
    torch.split: OpKind.SPLIT,
    torch.chunk: OpKind.SPLIT,
    torch.unbind: OpKind.SPLIT,
    operator.getitem: OpKind.GETITEM,
    torch.reshape: OpKind.RESHAPE,
    torch.flatten: OpKind.RESHAPE,
    torch.squeeze: OpKind.RESHAPE,
    torch.unsqueeze: OpKind.RESHAPE,
    torch.unflatten: OpKind.RESHAPE,
    torch.Tensor.view: OpKind.RESHAPE,
    torch.permute: OpKind.PERMUTE,
    torch.transpose: OpKind.PERMUTE,
    torch.Tensor.contiguous: OpKind.CONTIGUOUS,
    F.relu: OpKind.ACTIVATION,
    torch.relu: OpKind.ACTIVATION,
    F.relu6: OpKind.ACTIVATION,
    F.gelu: OpKind.ACTIVATION,
    F.silu: OpKind.ACTIVATION,
    F.sigmoid: OpKind.ACTIVATION,
    torch.sigmoid: OpKind.ACTIVATION,
    F.tanh: OpKind.ACTIVATION,
    torch.tanh: OpKind.ACTIVATION,
    F.hardswish: OpKind.ACTIVATION,
    F.hardsigmoid: OpKind.ACTIVATION,
    F.softmax: OpKind.SOFTMAX,
    torch.softmax: OpKind.SOFTMAX,
    F.max_pool1d: OpKind.POOL,
    F.max_pool2d: OpKind.POOL,
    F.avg_pool1d: OpKind.POOL,
    F.avg_pool2d: OpKind.POOL,
    F.adaptive_avg_pool1d: OpKind.ADAPTIVE_POOL,
    F.adaptive_avg_pool2d: OpKind.ADAPTIVE_POOL,
    F.adaptive_max_pool2d: OpKind.ADAPTIVE_POOL,
    F.dropout: OpKind.DROPOUT,
    F.scaled_dot_product_attention: OpKind.SDPA,
    torch.mean: OpKind.REDUCE,
    torch.sum: OpKind.REDUCE,
    builtins.getattr: OpKind.SHAPE,
}

# aten overload packets: every overload of a packet has the same kind.
_ATEN_PACKET_KINDS: dict[Any, OpKind] = {
    aten.linear: OpKind.LINEAR,
    aten.conv1d: OpKind.CONV,
    aten.conv2d: OpKind.CONV,
    aten.conv3d: OpKind.CONV,
    aten.conv_transpose1d: OpKind.CONV_TRANSPOSE,
    aten.conv_transpose2d: OpKind.CONV_TRANSPOSE,
    aten.batch_norm: OpKind.BATCH_NORM,
    aten._native_batch_norm_legit_no_training: OpKind.BATCH_NORM,
    aten.layer_norm: OpKind.LAYER_NORM,
    aten.group_norm: OpKind.GROUP_NORM,
    aten.embedding: OpKind.EMBEDDING,
    aten.matmul: OpKind.MATMUL,
    aten.mm: OpKind.MATMUL,
    aten.bmm: OpKind.MATMUL,
    aten.addmm: OpKind.ADDMM,
    aten.add: OpKind.ADD,
    aten.sub: OpKind.SUB,
    aten.mul: OpKind.MUL,
    aten.div: OpKind.DIV,
    aten.cat: OpKind.CAT,
    aten.concat: OpKind.CAT,
    aten.split: OpKind.SPLIT,
    aten.split_with_sizes: OpKind.SPLIT,
    aten.chunk: OpKind.SPLIT,
    aten.unbind: OpKind.SPLIT,
    aten.slice: OpKind.SLICE,
    aten.select: OpKind.SLICE,
    aten.view: OpKind.RESHAPE,
    aten._unsafe_view: OpKind.RESHAPE,
    aten.reshape: OpKind.RESHAPE,
    aten.flatten: OpKind.RESHAPE,
    aten.unflatten: OpKind.RESHAPE,
    aten.squeeze: OpKind.RESHAPE,
    aten.unsqueeze: OpKind.RESHAPE,
    aten.permute: OpKind.PERMUTE,
    aten.transpose: OpKind.PERMUTE,
    aten.t: OpKind.PERMUTE,
    aten.contiguous: OpKind.CONTIGUOUS,
    aten.relu: OpKind.ACTIVATION,
    aten.hardtanh: OpKind.ACTIVATION,
    aten.relu6: OpKind.ACTIVATION,  # F.relu6 exports as aten.relu6 (nn.ReLU6 as aten.hardtanh)
    aten.gelu: OpKind.ACTIVATION,
    aten.silu: OpKind.ACTIVATION,
    aten.sigmoid: OpKind.ACTIVATION,
    aten.tanh: OpKind.ACTIVATION,
    aten.hardswish: OpKind.ACTIVATION,
    aten.hardsigmoid: OpKind.ACTIVATION,
    aten.softmax: OpKind.SOFTMAX,
    aten._softmax: OpKind.SOFTMAX,
    aten.max_pool1d: OpKind.POOL,
    aten.max_pool2d: OpKind.POOL,
    aten.avg_pool1d: OpKind.POOL,
    aten.avg_pool2d: OpKind.POOL,
    aten.adaptive_avg_pool1d: OpKind.ADAPTIVE_POOL,
    aten.adaptive_avg_pool2d: OpKind.ADAPTIVE_POOL,
    aten.adaptive_max_pool2d: OpKind.ADAPTIVE_POOL,
    aten.dropout: OpKind.DROPOUT,
    aten.scaled_dot_product_attention: OpKind.SDPA,
    aten.mean: OpKind.REDUCE,
    aten.sum: OpKind.REDUCE,
    aten.clone: OpKind.IDENTITY,
    aten.alias: OpKind.IDENTITY,
    aten.detach: OpKind.IDENTITY,
    aten.sym_size: OpKind.SHAPE,
}

METHOD_KINDS: dict[str, OpKind] = {
    "add": OpKind.ADD,
    "sub": OpKind.SUB,
    "mul": OpKind.MUL,
    "div": OpKind.DIV,
    "matmul": OpKind.MATMUL,
    "bmm": OpKind.MATMUL,
    "mm": OpKind.MATMUL,
    "split": OpKind.SPLIT,
    "chunk": OpKind.SPLIT,
    "unbind": OpKind.SPLIT,
    "view": OpKind.RESHAPE,
    "reshape": OpKind.RESHAPE,
    "flatten": OpKind.RESHAPE,
    "squeeze": OpKind.RESHAPE,
    "unsqueeze": OpKind.RESHAPE,
    "unflatten": OpKind.RESHAPE,
    "permute": OpKind.PERMUTE,
    "transpose": OpKind.PERMUTE,
    "contiguous": OpKind.CONTIGUOUS,
    "relu": OpKind.ACTIVATION,
    "sigmoid": OpKind.ACTIVATION,
    "tanh": OpKind.ACTIVATION,
    "softmax": OpKind.SOFTMAX,
    "mean": OpKind.REDUCE,
    "sum": OpKind.REDUCE,
    "size": OpKind.SHAPE,
    "dim": OpKind.SHAPE,
}

# Functional/aten slot maps; module forms use attribute names.
FUNCTION_SLOTS: dict[Any, Slots] = {
    F.linear: _LINEAR_SLOTS,
    aten.linear: _LINEAR_SLOTS,
    F.conv1d: _CONV_SLOTS,
    F.conv2d: _CONV_SLOTS,
    F.conv3d: _CONV_SLOTS,
    aten.conv1d: _CONV_SLOTS,
    aten.conv2d: _CONV_SLOTS,
    aten.conv3d: _CONV_SLOTS,
    F.conv_transpose1d: _CONV_T_SLOTS,
    F.conv_transpose2d: _CONV_T_SLOTS,
    aten.conv_transpose1d: _CONV_T_SLOTS,
    aten.conv_transpose2d: _CONV_T_SLOTS,
    F.batch_norm: _F_BN_SLOTS,
    aten.batch_norm: _ATEN_BN_SLOTS,
    aten._native_batch_norm_legit_no_training: _ATEN_BN_NO_TRAIN_SLOTS,
    F.layer_norm: _LN_SLOTS,
    aten.layer_norm: _LN_SLOTS,
    F.group_norm: _GN_SLOTS,
    aten.group_norm: _GN_SLOTS,
    F.embedding: _F_EMB_SLOTS,
    aten.embedding: _ATEN_EMB_SLOTS,
}

# The positional index of the data input of each functional/aten op (0 for almost all).
_DATA_ARG: dict[Any, int] = {aten.embedding: 1}

_INPLACE_METHODS = frozenset(
    name for name in dir(torch.Tensor) if name.endswith("_") and not name.startswith("_")
)


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


def target_key(target: Any) -> Any:
    """The key under which a call_function target is found in the tables (aten overloads → packet)."""
    return _packet(target) if isinstance(target, torch._ops.OpOverload) else target


def kind(node: fx.Node, module: nn.Module | None = None) -> OpKind:
    """The canonical kind of ``node``. ``module`` (the owning GraphModule) is needed for call_module."""
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "get_attr":
        return OpKind.PARAM
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op == "call_function":
        key = target_key(node.target)
        found = _ATEN_PACKET_KINDS.get(key)
        if found is not None:
            return found
        try:
            return _TORCH_FUNCTION_KINDS.get(key, OpKind.UNKNOWN)
        except TypeError:  # unhashable target
            return OpKind.UNKNOWN
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, OpKind.UNKNOWN)
    if node.op == "call_module":
        if module is None:
            raise ValueError(f"kind({node.name}): call_module nodes need the owning module")
        sub = find_submodule(module, node.target)
        return OpKind.UNKNOWN if sub is None else MODULE_KINDS.get(type(sub), OpKind.UNKNOWN)
    return OpKind.UNKNOWN


def find_submodule(root: nn.Module, target: str) -> nn.Module | None:
    """``root.get_submodule(target)`` or None, walking ``_modules`` directly: kind() runs for every node in
    every analysis, and get_submodule's checks made it a hot spot."""
    module = root
    for part in _path(target):
        module = module._modules.get(part)  # every value of _modules is a Module or None
        if module is None:
            return None
    return module


@functools.lru_cache(maxsize=65536)
def _path(target: str) -> tuple[str, ...]:
    return tuple(target.split("."))


def register_function_kind(fn: Any, op_kind: OpKind) -> None:
    """Add a row for a call_function target defined outside this module (e.g. the pruning mask op).

    Lets a pass family own its op without this module importing it (which would be an import cycle).
    """
    _TORCH_FUNCTION_KINDS[fn] = op_kind


def register_module_kind(module_type: type, op_kind: OpKind) -> None:
    """Add a row for an nn.Module type defined outside this module (e.g. FakeQuantize)."""
    MODULE_KINDS[module_type] = op_kind


def slots(node: fx.Node) -> Slots | None:
    """The slot map of a functional/aten parametrised node, or None (module forms and other ops)."""
    if node.op != "call_function":
        return None
    try:
        return FUNCTION_SLOTS.get(target_key(node.target))
    except TypeError:
        return None


def data_input(node: fx.Node) -> Any:
    """The data (activation) input of a node: its first argument for almost every op."""
    index = 0
    if node.op == "call_function":
        try:
            index = _DATA_ARG.get(target_key(node.target), 0)
        except TypeError:
            index = 0
    return node.args[index] if len(node.args) > index else None


def op_name(node: fx.Node) -> str:
    """The bare name of a node's op ("view", "transpose", "unflatten", ...): the method name, the aten op's
    name (``relu_``) or the function's ``__name__``."""
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def target_name(node: fx.Node, module: nn.Module) -> str:
    """:func:`op_name`, or for a module call its lowercased class name (``relu``, ``maxpool2d``)."""
    if node.op == "call_module":
        return type(module.get_submodule(node.target)).__name__.lower()
    return op_name(node)


def is_inplace(node: fx.Node, module: nn.Module | None = None) -> bool:
    """True when the node mutates one of its inputs (inplace=True, ``x.add_()``, ``nn.ReLU(inplace=True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method" and node.target in _INPLACE_METHODS:
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if isinstance(node.target, torch._ops.OpOverload):
            name = node.target._schema.name.split("::")[-1]
            return name.endswith("_") or any(
                a.alias_info is not None and a.alias_info.is_write for a in node.target._schema.arguments
            )
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_module" and module is not None:
        try:
            return bool(getattr(module.get_submodule(node.target), "inplace", False))
        except AttributeError:
            return False
    return False


def is_pure(node: fx.Node, module: nn.Module | None = None) -> bool:
    """True when deleting an unused ``node`` cannot change the program (known, side-effect-free op)."""
    if not KIND_INFO[kind(node, module)].pure:
        return False
    return not is_inplace(node, module)
