"""prune-channels: structured pruning that physically removes channels; zero-channels: the same selection,
zeroed instead of removed.

Both read the channel groups of :mod:`slimfx.ir.channels`, score every group's units with an importance
(:mod:`slimfx.passes.prune.importance`), choose the units to remove (:func:`plan_channels`: local or global
ranking, a sparsity or a MAC target, ``round_to``, ``ignore``) and then either slice every coupled tensor and
attribute (:func:`remove_channels`: weights, biases, BN statistics, conv ``groups``, GroupNorm
``num_groups``, constants, reshape sizes, module attributes) or zero what the removed units own
(:func:`zero_channels`). Removing units that :func:`zero_channels` already zeroed gives the same outputs.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import fx

from slimfx.ir.attention import decompose_attention
from slimfx.ir.channels import (
    ANALYSIS,
    ChannelGroup,
    GroupCount,
    ParamDim,
    TensorDim,
    build_channel_groups,
    channel_groups,
    reshape_size_slots,
    shape_of,
)
from slimfx.ir.layer import Layer, get_attr_value, set_attr_value
from slimfx.ir.meta import META_KEY, TensorMeta, meta_of
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.passes.analysis import register_analysis
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.prune.importance import IMPORTANCES, make_importance

register_analysis(ANALYSIS)(build_channel_groups)

_MAC_KINDS = (OpKind.CONV, OpKind.LINEAR, OpKind.CONV_TRANSPOSE)


@dataclass
class PruneChannelsOptions:
    """sparsity: fraction of each group's channels removed (of all channels with scope=global).
    target_macs: instead, remove globally ranked channels until conv/linear MACs <= target_macs x original.
    importance: a name in IMPORTANCES (l1, l2, taylor, bn-scale, random). scope: local | global.
    round_to: kept channel counts are rounded to a multiple of this. ignore: fnmatch patterns of layer or
    module names whose groups are left alone. seed: for importance=random.
    """

    sparsity: float = 0.5
    target_macs: float | None = None
    importance: str = "l1"
    scope: str = "local"
    round_to: int = 1
    ignore: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} must be in [0, 1) (the fraction of channels removed)")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise ValueError(f"target_macs={self.target_macs} must be in (0, 1] (a fraction of the original MACs)")
        if self.importance not in IMPORTANCES:
            make_importance(self.importance)  # raises with a did-you-mean
        if self.scope not in ("local", "global"):
            raise ValueError(f"scope={self.scope!r} must be 'local' or 'global'")
        if self.round_to < 1:
            raise ValueError(f"round_to={self.round_to} must be >= 1")


@dataclass
class ChannelPlan:
    """Which units of which groups survive: ``keep[group.id]`` is a bool mask over the group's units."""

    groups: list[ChannelGroup]
    keep: dict[int, torch.Tensor]
    notes: list[str] = field(default_factory=list)

    def removed_units(self) -> int:
        return sum(int((~m).sum()) for m in self.keep.values())

    def total_units(self) -> int:
        return sum(int(m.numel()) for m in self.keep.values())


# ---------------------------------------------------------------------------------------------------------
# Planning


def plan_channels(program: Program, options: PruneChannelsOptions) -> ChannelPlan:
    """Choose the units to remove. Groups that are not prunable or match ``ignore`` keep everything and
    get a note saying why. Every pruned group keeps at least one unit (and at least ``round_to``)."""
    groups = channel_groups(program)
    importance = make_importance(options.importance, options.seed)
    notes, candidates = [], []
    for group in groups:
        if not group.prunable:
            notes.append(f"group {group.name} ({group.size} channels) not pruned: {group.reason}")
            continue
        pattern = _ignored(program, group, options.ignore)
        if pattern is not None:
            notes.append(f"group {group.name} skipped: matches ignore pattern {pattern!r}")
            continue
        candidates.append(group)
    scores = {g.id: importance.score(program, g).double() for g in candidates}
    if options.target_macs is not None:
        keep = _plan_macs(program, candidates, scores, options, notes)
    elif options.scope == "global":
        keep = _plan_global(candidates, scores, options)
    else:
        keep = {g.id: _top(scores[g.id], _kept_count(g.size, options.sparsity, options.round_to)) for g in candidates}
    for g in candidates:
        _keep_every_member_nonempty(g, keep[g.id], scores[g.id])
    return ChannelPlan(groups, keep, notes)


def _keep_every_member_nonempty(group: ChannelGroup, keep: torch.Tensor, scores: torch.Tensor) -> None:
    """A tensor may not lose all its channels (one input of a cat, one producer): keep its best unit."""
    distinct = {id(units): units for units in group.members.values()}  # identity groups share one tensor
    for units in distinct.values():
        if units.numel() and not bool(keep[units].any()):
            candidates = units.unique()
            keep[candidates[torch.argmax(scores[candidates])]] = True


def _ignored(program: Program, group: ChannelGroup, patterns: list[str]) -> str | None:
    if not patterns:
        return None
    nodes = {n.name: n for n in program.graph.nodes}
    names = set()
    for name in group.layers():
        layer = Layer(program, nodes[name])
        names |= {name, layer.name}
        target = layer.param_target("weight")
        if target:
            names.add(target.rpartition(".")[0])
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
    return None


def _round_keep(keep: int, size: int, round_to: int) -> int:
    if round_to > 1:
        keep = max(round_to, math.floor(keep / round_to + 0.5) * round_to)
    return max(1, min(size, keep))


def _kept_count(size: int, sparsity: float, round_to: int) -> int:
    return _round_keep(size - math.floor(sparsity * size + 0.5), size, round_to)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep the ``count`` highest-scoring units (ties: the lower index wins)."""
    order = torch.argsort(-scores, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep


def _global_order(candidates: list[ChannelGroup], scores: dict[int, torch.Tensor]) -> list[tuple[int, int]]:
    """(group id, unit) from least to most important; scores are normalised per group (mean 1) so that
    groups with different weight scales compare."""
    entries = []
    for g in candidates:
        s = scores[g.id]
        s = s / s.mean() if float(s.mean()) > 0 else s
        entries += [(float(v), g.id, u) for u, v in enumerate(s.tolist())]
    entries.sort()
    return [(gid, u) for _, gid, u in entries]


def _remove_prefix(candidates: list[ChannelGroup], order: list[tuple[int, int]], count: int) -> dict[int, torch.Tensor]:
    keep = {g.id: torch.ones(g.size, dtype=torch.bool) for g in candidates}
    left = {g.id: g.size for g in candidates}
    removed = 0
    for gid, unit in order:
        if removed >= count:
            break
        if left[gid] > 1:
            keep[gid][unit] = False
            left[gid] -= 1
            removed += 1
    return keep


def _apply_rounding(candidates: list[ChannelGroup], scores: dict[int, torch.Tensor], keep: dict[int, torch.Tensor],
                    round_to: int) -> dict[int, torch.Tensor]:
    if round_to == 1:
        return keep
    out = {}
    for g in candidates:
        count = _round_keep(int(keep[g.id].sum()), g.size, round_to)
        # units the ranking kept come first, so rounding up re-adds the best removed ones
        ranked = scores[g.id] + keep[g.id].double() * (scores[g.id].abs().max() * 2 + 1)
        out[g.id] = _top(ranked, count)
    return out


def _plan_global(candidates: list[ChannelGroup], scores: dict[int, torch.Tensor],
                 options: PruneChannelsOptions) -> dict[int, torch.Tensor]:
    total = sum(g.size for g in candidates)
    keep = _remove_prefix(candidates, _global_order(candidates, scores), math.floor(options.sparsity * total + 0.5))
    return _apply_rounding(candidates, scores, keep, options.round_to)


def _plan_macs(program: Program, candidates: list[ChannelGroup], scores: dict[int, torch.Tensor],
               options: PruneChannelsOptions, notes: list[str]) -> dict[int, torch.Tensor]:
    counter = MacCounter(program)
    budget = options.target_macs * counter.total({})
    order = _global_order(candidates, scores)
    lo, hi = 0, len(order)
    while lo < hi:  # fewest removals reaching the budget; MACs only fall as more units go
        mid = (lo + hi) // 2
        if counter.total(_kept_counts(candidates, _remove_prefix(candidates, order, mid))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    keep = _apply_rounding(candidates, scores, _remove_prefix(candidates, order, lo), options.round_to)
    reached = counter.total(_kept_counts(candidates, keep))
    if reached > budget:
        notes.append(f"target_macs={options.target_macs} not reached: the prunable groups allow "
                     f"{reached / max(counter.total({}), 1):.3f} of the original MACs")
    return keep


def _kept_counts(groups: list[ChannelGroup], keep: dict[int, torch.Tensor]) -> dict[ParamDim, int]:
    counts: dict[ParamDim, int] = {}
    for g in groups:
        if g.id not in keep:
            continue
        per_tensor: dict[int, int] = {}  # identity groups share one members tensor across ports
        for p, units in g.members.items():
            if isinstance(p, ParamDim) and p.role == "weight":
                if id(units) not in per_tensor:
                    per_tensor[id(units)] = int(keep[g.id][units].sum())
                counts[p] = per_tensor[id(units)]
    return counts


class MacCounter:
    """Multiply-accumulates of the conv/linear layers, as a function of their weights' kept dims."""

    def __init__(self, program: Program):
        self.layers: list[tuple[str, float, tuple[int, ...]]] = []
        for node in program.nodes_of(*_MAC_KINDS):
            layer = Layer(program, node)
            weight, out = layer.tensor("weight"), shape_of(node)
            src = shape_of(node.args[0] if node.args else None)
            if weight is None or out is None:
                continue
            if layer.kind is OpKind.LINEAR:
                positions = math.prod(out) / max(out[-1], 1)
            elif layer.kind is OpKind.CONV:
                positions = math.prod(out) / max(out[len(out) - weight.dim() + 1], 1)
            else:  # transposed conv: every input position scatters the whole weight
                positions = math.prod(src) / max(src[len(src) - weight.dim() + 1], 1) if src else 0
            self.layers.append((node.name, positions, tuple(weight.shape)))

    def total(self, kept: dict[ParamDim, int]) -> float:
        """MACs when weight dim d of layer n keeps ``kept[ParamDim(n, "weight", d)]`` entries (else all)."""
        macs = 0.0
        for name, positions, shape in self.layers:
            size = 1
            for d, s in enumerate(shape):
                size *= kept.get(ParamDim(name, "weight", d), s)
            macs += positions * size
        return macs


# ---------------------------------------------------------------------------------------------------------
# Applying a plan


@torch.no_grad()
def zero_channels(program: Program, plan: ChannelPlan) -> None:
    """Zero everything the plan's removed units own: producers' filters and biases, consumers' input slices,
    BN gamma/beta/running_mean (running_var stays positive) and constants. Shapes are unchanged."""
    nodes = {n.name: n for n in program.graph.nodes}
    for group in plan.groups:
        mask = plan.keep.get(group.id)
        if mask is None or bool(mask.all()):
            continue
        for port in group.members:
            idx = group.removed_indices(port, mask)
            if isinstance(port, ParamDim) and port.role != "running_var":
                layer = Layer(program, nodes[port.node])
                layer.set(port.role, layer.tensor(port.role).clone().index_fill_(port.dim, idx, 0))
            elif isinstance(port, TensorDim) and program.kind(nodes[port.node]) is OpKind.PARAM:
                target = nodes[port.node].target
                value = get_attr_value(program.module, target)
                set_attr_value(program.module, target, value.detach().clone().index_fill_(port.dim, idx, 0))
    program.analyses.clear()


@torch.no_grad()
def remove_channels(program: Program, plan: ChannelPlan) -> dict[str, list[int]]:
    """Physically remove the plan's dropped units; returns {layer name: [kept, total] output channels}."""
    nodes = {n.name: n for n in program.graph.nodes}
    reshapes: dict[str, dict[int, int]] = {}
    touched: dict[str, None] = {}
    layers: dict[str, Layer] = {}  # a Layer per node, built once (a group touches each layer several times)
    before = {name: _out_channels(program, nodes[name]) for g in plan.groups if g.id in plan.keep
              for name in g.producers}
    new_sizes: dict[str, dict[int, int]] = {}  # node -> {dim: size} of every output that loses channels
    for group in plan.groups:
        mask = plan.keep.get(group.id)
        if mask is None or bool(mask.all()):
            continue
        kept: dict[int, torch.Tensor] = {}  # per members tensor (identity groups share one across ports)
        for port, units in group.members.items():
            idx = kept.get(id(units))
            if idx is None:
                idx = kept[id(units)] = group.kept_indices(port, mask)
            node = nodes[port.node]
            if isinstance(port, TensorDim):
                new_sizes.setdefault(port.node, {})[port.dim] = int(idx.numel())
            if isinstance(port, ParamDim):
                layer = layers.get(port.node) or layers.setdefault(port.node, Layer(program, node))
                # index_select returns a new tensor: nothing shares storage with the unpruned one
                layer.set(port.role, layer.tensor(port.role).index_select(port.dim, idx))
                touched[port.node] = None
            elif isinstance(port, GroupCount):
                _set_group_count(program, node, port.role, int(idx.numel()))
                touched[port.node] = None
            elif program.kind(node) is OpKind.PARAM:
                value = get_attr_value(program.module, node.target)
                set_attr_value(program.module, node.target, value.detach().index_select(port.dim, idx))
            elif program.kind(node) is OpKind.RESHAPE:
                reshapes.setdefault(port.node, {})[port.dim] = int(idx.numel())
    for name, sizes in reshapes.items():
        _rewrite_reshape(program, nodes[name], sizes)
    for name in touched:
        _sync_module(program, nodes[name])
    program.analyses.clear()
    program.recompile()
    if not _resize_meta(program, new_sizes):
        program.propagate_meta()
    return {Layer(program, nodes[n]).name: [_out_channels(program, nodes[n]), total] for n, total in before.items()}


def _resize_meta(program: Program, new_sizes: dict[str, dict[int, int]]) -> bool:
    """Write the pruned sizes into the shape metadata instead of re-propagating the whole graph.

    Sound because of how groups are built: every tensor dim whose size a removal changes is a port of the
    group (a use the rules do not map blocks the group), so its node is in ``new_sizes``; get_attr nodes
    are re-described from the tensors they now read. Returns False, leaving the caller to re-propagate,
    when a changed value is not a single tensor (an op returning a tuple, a size query of a resized tensor)
    or the shapes came from a real run (they may depend on the values, e.g. ``x[x > 0]``).
    The PassManager's verification (on by default) compares the result with a fresh propagation.
    """
    if program.meta_mode != "fake":
        return False  # shapes from a real run may depend on values (boolean masks, nonzero), which pruning changes
    changed: set[str] = set()
    for node in program.graph.nodes:
        meta = meta_of(node)
        if node.name in new_sizes:
            if not isinstance(meta, TensorMeta):
                return False
            shape = list(meta.shape)
            for dim, size in new_sizes[node.name].items():
                shape[dim] = size
            node.meta[META_KEY] = TensorMeta(tuple(shape), meta.dtype)
            changed.add(node.name)
        elif node.op == "get_attr":
            value = get_attr_value(program.module, node.target)
            if isinstance(value, torch.Tensor):
                node.meta[META_KEY] = TensorMeta(tuple(value.shape), value.dtype)
                if meta is None or node.meta[META_KEY] != meta:
                    changed.add(node.name)
        elif not isinstance(meta, TensorMeta) and any(a.name in changed for a in node.all_input_nodes):
            return False
    return True


def _out_channels(program: Program, node: fx.Node) -> int:
    layer = Layer(program, node)
    weight = layer.tensor("weight")
    if layer.kind is OpKind.CONV_TRANSPOSE:
        return weight.shape[1] * int(layer.get("groups") or 1)
    return weight.shape[1] if layer.kind is OpKind.EMBEDDING else weight.shape[0]


def _set_group_count(program: Program, node: fx.Node, role: str, value: int) -> None:
    layer = Layer(program, node)
    if layer.module is not None:
        if isinstance(layer.module, nn.GroupNorm):
            per_group = layer.module.num_channels // layer.module.num_groups
            layer.module.num_channels = per_group * value
        setattr(layer.module, role, value)
        return
    index = layer.slots.args[role]
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, role: value}


def _rewrite_reshape(program: Program, node: fx.Node, new_sizes: dict[int, int]) -> None:
    """Write the new sizes of a reshape's output dims into its size arguments (ints; -1 stays -1)."""
    slots = reshape_size_slots(program, node)
    if slots is None:
        return
    form, sizes, first = slots
    for dim, size in new_sizes.items():
        pos = dim - first
        if 0 <= pos < len(sizes) and sizes[pos] != -1:
            sizes[pos] = size
    if node.op == "call_module":
        program.module.get_submodule(node.target).unflattened_size = tuple(sizes)
        return
    if form == "unflatten":
        if len(node.args) > 2:
            node.args = (*node.args[:2], type(node.args[2])(sizes), *node.args[3:])
        else:
            node.kwargs = {**node.kwargs, "sizes": tuple(sizes)}
        return
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        node.args = (node.args[0], type(node.args[1])(sizes))
    elif len(node.args) > 1:
        node.args = (node.args[0], *sizes)
    else:
        key = "shape" if "shape" in node.kwargs else "size"
        node.kwargs = {**node.kwargs, key: tuple(sizes)}


def _sync_module(program: Program, node: fx.Node) -> None:
    """Make a module's size attributes agree with its (sliced) tensors."""
    module = program.module.get_submodule(node.target) if node.op == "call_module" else None
    if module is None:
        return
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        stats = module.running_mean if module.running_mean is not None else weight
        if stats is not None:
            module.num_features = stats.numel()
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.numel()
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]


# ---------------------------------------------------------------------------------------------------------
# Passes


def _stats(program: Program, plan: ChannelPlan) -> dict:
    total = plan.total_units()
    return {
        "groups": len(plan.groups),
        "pruned_groups": sum(1 for m in plan.keep.values() if not bool(m.all())),
        "units_removed": plan.removed_units(),
        "units_total": total,
        "sparsity": plan.removed_units() / total if total else 0.0,
    }


@register_pass
class PruneChannels(Pass):
    """Structured pruning: physically remove the least important channels of every prunable channel group."""

    name = "prune-channels"
    contract = Contract.CHANGES
    Options = PruneChannelsOptions
    preserves = frozenset({"meta"})  # remove_channels writes the new sizes into the metadata itself

    def run(self, program: Program) -> PassResult:
        decomposed, attention_notes = decompose_attention(program)  # nn.MultiheadAttention -> prunable heads
        counter = MacCounter(program)
        macs_before = counter.total({})
        plan = plan_channels(program, self.options)
        plan.notes[:0] = attention_notes
        kept = _kept_counts([g for g in plan.groups if g.id in plan.keep], plan.keep)
        stats = _stats(program, plan)
        stats["macs_before"], stats["macs_after"] = macs_before, counter.total(kept)
        stats["layers"] = remove_channels(program, plan)
        stats["attention_decomposed"] = decomposed
        return PassResult(changed=plan.removed_units() > 0 or decomposed > 0, stats=stats, notes=plan.notes)


@register_pass
class ZeroChannels(Pass):
    """Zero (not remove) the channels prune-channels would remove with the same options (masks, for tests)."""

    name = "zero-channels"
    contract = Contract.CHANGES
    Options = PruneChannelsOptions
    preserves = frozenset({"meta"})  # values change, shapes do not (decompose_attention re-propagates itself)

    def run(self, program: Program) -> PassResult:
        decomposed, attention_notes = decompose_attention(program)  # the same program prune-channels plans on
        plan = plan_channels(program, self.options)
        zero_channels(program, plan)
        return PassResult(changed=plan.removed_units() > 0 or decomposed > 0, stats=_stats(program, plan),
                          notes=attention_notes + plan.notes)


__all__ = [
    "ChannelPlan", "MacCounter", "PruneChannels", "PruneChannelsOptions", "ZeroChannels", "plan_channels",
    "remove_channels", "zero_channels",
]
