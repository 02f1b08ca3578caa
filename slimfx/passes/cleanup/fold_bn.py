"""fold-bn: fold an eval-mode BatchNorm into the conv / linear / conv-transpose that feeds it.

W' = W * gamma / sqrt(var + eps) along the output-channel dim, b' = (b - mean) * gamma / sqrt(var + eps) + beta.
Works on both dialects through :class:`slimfx.ir.layer.Layer`. A BN using batch statistics (training
mode) is refused with a PassError; producers with other users, shared modules/parameters, computed
(non-constant) weights, grouped transposed convs and UNKNOWN producers are left alone and reported.
"""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass

import torch
from torch import fx

from slimfx.errors import PassError
from slimfx.ir.layer import Layer
from slimfx.ir.meta import tensor_meta
from slimfx.ir.ops import OpKind, data_input
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass

_PRODUCERS = (OpKind.CONV, OpKind.LINEAR, OpKind.CONV_TRANSPOSE)


@dataclass
class FoldBnOptions:
    """strict: raise on a BatchNorm that cannot be folded instead of leaving it and noting why."""

    strict: bool = False


@register_pass
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding conv/linear (both dialects); refuses training-mode BN."""

    name = "fold-bn"
    contract = Contract.EXACT
    Options = FoldBnOptions
    tolerance = (1e-4, 1e-5)

    def run(self, program: Program) -> PassResult:
        folded, notes = 0, []
        uses = AttrUses(program)
        for bn in program.nodes_of(OpKind.BATCH_NORM):
            bn_layer = Layer(program, bn)
            if bn_layer.get("training"):
                raise PassError(
                    f"fold-bn: BatchNorm %{bn.name} ({bn_layer.name}) is in training mode (it normalises with "
                    "batch statistics, so there is nothing constant to fold). Call model.eval() before "
                    "tracing, or drop fold-bn from the pipeline (QAT keeps BN until lowering)."
                )
            reason = self._why_not(program, bn, bn_layer)
            if reason:
                notes.append(f"kept %{bn.name}: {reason}")
                if self.options.strict:
                    raise PassError(f"fold-bn: cannot fold %{bn.name}: {reason}")
                continue
            producer = data_input(bn)
            _fold(Layer(program, producer), bn_layer)
            remove_folded_norm(program, bn, producer, uses)
            folded += 1
        return PassResult(changed=folded > 0, stats={"folded": folded}, notes=notes)

    @staticmethod
    def _why_not(program: Program, bn: fx.Node, bn_layer: Layer) -> str | None:
        producer = data_input(bn)
        if not isinstance(producer, fx.Node) or program.kind(producer) not in _PRODUCERS:
            kind = program.kind(producer).value if isinstance(producer, fx.Node) else "constant"
            return f"its input is a {kind} op, not a conv/linear"
        if len(producer.users) != 1:
            return f"the output of %{producer.name} is also used elsewhere"
        if any(u.op == "call_function" and u.target is operator.getitem and u.args[1] != 0 for u in bn.users):
            return "a batch-norm statistic output is used"
        layer = Layer(program, producer)
        if layer.is_shared() or bn_layer.is_shared():
            return f"%{producer.name} or %{bn.name} shares its parameters with another node"
        if layer.tensor("weight") is None or (layer.get("bias") is not None and layer.tensor("bias") is None):
            return f"%{producer.name}'s weight or bias is computed by the graph, not a constant"
        for role in ("running_mean", "running_var"):
            if bn_layer.tensor(role) is None:
                return f"%{bn.name} has no constant {role}"
        out_dim = 1 if layer.kind is OpKind.CONV_TRANSPOSE else 0
        if layer.kind is OpKind.CONV_TRANSPOSE and (layer.get("groups") or 1) != 1:
            return "grouped transposed convs are not folded"
        channels = layer.tensor("weight").shape[out_dim]
        if bn_layer.tensor("running_mean").numel() != channels:
            return f"channel counts differ ({channels} vs {bn_layer.tensor('running_mean').numel()})"
        meta = tensor_meta(producer)
        if layer.kind is OpKind.LINEAR and (meta is None or len(meta.shape) != 2):
            return "a BatchNorm after a linear is folded only for [batch, features] activations"
        return None


def remove_folded_norm(program: Program, bn: fx.Node, producer: fx.Node, uses: AttrUses) -> None:
    """Route ``bn``'s users to ``producer`` (its statistics are folded into it), erase the norm and delete
    what it leaves behind (its submodule or tensors) unless something else still uses them."""
    leftovers = [bn.target] if bn.op == "call_module" else _attr_leftovers(bn, uses)
    for user in list(bn.users):  # aten's _native_batch_norm_legit_no_training returns a tuple
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(producer)
            program.graph.erase_node(user)
    bn.replace_all_uses_with(producer)
    if bn.op == "call_module":
        uses.erase(program, bn)
    else:
        program.graph.erase_node(bn)
    _drop_unused(program, leftovers, uses)


class AttrUses:
    """Which module/attribute paths the graph still uses, kept up to date as nodes are erased: a count per
    dotted prefix (``a``, ``a.b``, ``a.b.weight``), so "is ``a.b`` or anything under it used?" is one lookup.
    Built once per fold-bn run (rescanning the graph per folded norm made the pass quadratic: 6 s at 1000
    blocks)."""

    def __init__(self, program: Program):
        self.count: collections.Counter[str] = collections.Counter()
        self.unused_by_owner: dict[str, list[fx.Node]] = collections.defaultdict(list)
        for n in program.graph.nodes:
            if n.op in ("call_module", "get_attr"):
                self._add(str(n.target), 1)
                if n.op == "get_attr" and not n.users:
                    self.unused_by_owner[str(n.target).rpartition(".")[0]].append(n)

    def _add(self, target: str, delta: int) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            self.count[".".join(parts[:i])] += delta

    def used(self, target: str) -> bool:
        return self.count[target] > 0

    def erase(self, program: Program, node: fx.Node) -> None:
        self._add(str(node.target), -1)
        program.graph.erase_node(node)


def _attr_leftovers(bn: fx.Node, uses: AttrUses) -> list[fx.Node]:
    """A functional/aten BatchNorm's get_attr inputs, plus unused get_attrs of the same owner (aten graphs
    keep ``num_batches_tracked`` as a get_attr that nothing reads)."""
    inputs = [a for a in bn.all_input_nodes if a.op == "get_attr"]
    owners = {str(a.target).rpartition(".")[0] for a in inputs} - {""}
    extra = [n for owner in sorted(owners) for n in uses.unused_by_owner.pop(owner, []) if n not in inputs]
    return inputs + extra


def _drop_unused(program: Program, leftovers: list, uses: AttrUses) -> None:
    """Delete what a folded BatchNorm leaves behind (its submodule, or its get_attr nodes and tensors) unless
    something else still uses it: the folded statistics must not stay in the state_dict and the artifact."""
    for item in leftovers:
        if isinstance(item, fx.Node):
            if item.users:
                continue
            target = str(item.target)
            uses.erase(program, item)
        else:
            target = str(item)
        if uses.used(target):  # e.g. forward still reads bn.weight
            continue
        owner, _, name = target.rpartition(".")
        parent = program.module.get_submodule(owner) if owner else program.module
        if hasattr(parent, name):
            delattr(parent, name)


def bn_affine(bn: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as y = x * factor + shift per channel, in float64 (the numbers folding needs)."""
    mean = bn.tensor("running_mean").double()
    var = bn.tensor("running_var").double()
    eps = float(bn.get("eps") if bn.get("eps") is not None else 1e-5)
    gamma, beta = bn.tensor("weight"), bn.tensor("bias")
    gamma = gamma.double() if gamma is not None else torch.ones_like(mean)
    beta = beta.double() if beta is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + eps)
    return factor, beta - mean * factor


def _fold(layer: Layer, bn: Layer) -> None:
    weight = layer.tensor("weight")
    factor, shift = bn_affine(bn)
    bias = layer.tensor("bias")
    bias = bias.double() if bias is not None else torch.zeros_like(factor)
    out_dim = 1 if layer.kind is OpKind.CONV_TRANSPOSE else 0
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    with torch.no_grad():
        layer.set("weight", (weight.double() * factor.reshape(shape)).to(weight.dtype))
        layer.set("bias", (bias * factor + shift).to(weight.dtype))
