"""The channel-coupling graph that structured pruning reads.

Ports are the things whose indices pruning removes: a dim of a node's output (:class:`TensorDim`), a dim of a
layer's tensor (:class:`ParamDim`: weight rows, BN statistics, ...) and a count of whole groups
(:class:`GroupCount`: a grouped conv's ``groups``, a GroupNorm's ``num_groups``). Per-kind rules
(:data:`RULES`, keyed by :class:`OpKind`) say which ports of a node are coupled and how their indices
correspond (:class:`Link`: identity, an offset for cat/split, an expansion for flatten, heads and groups).
Ports are nodes of a networkx graph; a :class:`ChannelGroup` is a connected component reached from a
layer's output channels. Inside a group, index-level couplings are merged into *units* (union-find): a unit
is a set of indices that must be removed together (a channel, a whole head, a whole conv group).

Contract: every group marked ``prunable`` gives an exactly equal model when its removed units are
already zero (weights and biases of producers, consumers' input slices) and are then physically removed.
Whatever a rule does not understand blocks the group (``prunable=False`` with a ``reason``): UNKNOWN ops,
model inputs and outputs, LayerNorm and softmax over the channels, reductions over the channels, sizes the
graph reads, reshapes that split/merge the channel dim anywhere but its outermost factor (channel shuffle),
nn.MultiheadAttention, shared parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from slimfx.ir.channel_rules import (
    PRODUCER_DIMS,
    RULES,
    GroupCount,
    Link,
    NodeRule,
    ParamDim,
    Port,
    RuleFn,
    TensorDim,
    reshape_size_slots,
    shape_of,
)
from slimfx.ir.layer import Layer
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program

__all__ = [
    "ANALYSIS", "PRODUCER_DIMS", "RULES", "ChannelGroup", "GroupCount", "Link", "NodeRule", "ParamDim", "Port",
    "RuleFn", "TensorDim", "build_channel_groups", "channel_groups", "coupling_graph", "reshape_size_slots", "shape_of",
]

ANALYSIS = "channel-groups"


@dataclass
class ChannelGroup:
    """Channels that must be removed together, as ``size`` units.

    members: for every coupled port, the unit of each of its indices (a LongTensor as long as the port).
    producers / consumers: layer nodes whose output filters / input slices the group removes.
    prunable: False when a rule refused (``reason`` says which node and why).
    """

    id: int
    name: str
    members: dict[Port, torch.Tensor]
    size: int
    producers: list[str]
    consumers: list[str]
    prunable: bool
    reason: str | None = None
    identity: bool = False  # every member is ``arange(size)``: unit i is index i of every port

    def kept_indices(self, port: Port, keep: torch.Tensor) -> torch.Tensor:
        """The indices of ``port`` that survive when units with ``keep[unit]`` True are kept."""
        return torch.nonzero(keep[self.members[port]]).flatten()

    def removed_indices(self, port: Port, keep: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(~keep[self.members[port]]).flatten()

    def layers(self) -> list[str]:
        """Every layer node with a tensor in the group."""
        return sorted({p.node for p in self.members if isinstance(p, (ParamDim, GroupCount))})


# ---------------------------------------------------------------------------------------------------------
# Building the groups


class _Rules:
    """Rules computed once per node; a rule that crashes on an odd node handles nothing (blocks)."""

    def __init__(self, program: Program):
        self.program = program
        self.nodes = {n.name: n for n in program.graph.nodes}
        self._cache: dict[str, NodeRule] = {}
        self._index: dict[str, dict[Port, list[Link]]] = {}
        self.errors: dict[str, str] = {}

    def of(self, name: str) -> NodeRule:
        rule = self._cache.get(name)
        if rule is None:
            node = self.nodes[name]
            fn = RULES.get(self.program.kind(node))
            try:
                rule = fn(self.program, node) if fn is not None else NodeRule()
            except Exception as exc:  # a rule that cannot parse a node must block, never crash the analysis
                rule = NodeRule()
                self.errors[name] = f"{type(exc).__name__}: {exc}"
            index: dict[Port, list[Link]] = {}
            for link in rule.links:
                index.setdefault(link.a, []).append(link)
                index.setdefault(link.b, []).append(link)
            self._cache[name], self._index[name] = rule, index
        return rule

    def links(self, name: str, port: Port) -> list[Link]:
        self.of(name)
        return self._index[name].get(port, [])

    def describe(self, node: fx.Node) -> str:
        kind = self.program.kind(node)
        if node.name in self.errors:
            return f"%{node.name} ({kind.value}) could not be analysed ({self.errors[node.name]})"
        if kind is OpKind.UNKNOWN:
            return f"%{node.name} is an op slimfx does not know ({node.op} {node.target})"
        return f"%{node.name} ({kind.value})"


def _port_size(rules: _Rules, port: Port) -> int | None:
    if isinstance(port, TensorDim):
        size = rules.of(port.node).sizes.get(port)
        if size is not None:
            return size
        shape = shape_of(rules.nodes[port.node])
        return shape[port.dim] if shape is not None and port.dim < len(shape) else None
    return rules.of(port.node).sizes.get(port)


def _visit(rules: _Rules, port: Port) -> tuple[list[tuple[str, Link]], list[str]]:
    """The links touching ``port`` and the reasons it blocks, asking its producer and (tensors) its users."""
    owners = [port.node]
    node = rules.nodes[port.node]
    if isinstance(port, TensorDim):
        owners += [u.name for u in node.users]
    found, reasons = [], []
    for owner in owners:
        rule = rules.of(owner)
        if port in rule.blocked:
            reasons.append(rule.blocked[port])
        elif port not in rule.handled:
            if owner == port.node:
                reasons.append(f"{rules.describe(node)} produces these channels and has no rule for dim "
                               f"{getattr(port, 'dim', '?')}")
            else:
                reasons.append(f"{rules.describe(rules.nodes[owner])} uses dim {getattr(port, 'dim', '?')} of "
                               f"%{port.node} in a way slimfx does not map")
        found += [(owner, link) for link in rules.links(owner, port)]
    return found, reasons


def coupling_graph(program: Program) -> nx.Graph:
    """The full port graph reachable from every layer's output channels (each edge carries ``links``: the
    distinct Links between its two ports, usually one)."""
    return _explore(program)[0]


def _explore(program: Program) -> tuple[nx.Graph, _Rules, dict[Port, list[str]], list[Port]]:
    rules = _Rules(program)
    graph = nx.Graph()
    reasons: dict[Port, list[str]] = {}
    seeds: list[Port] = []
    for node in program.graph.nodes:
        dim = PRODUCER_DIMS.get(program.kind(node))
        if dim is None:
            continue
        seed = ParamDim(node.name, "weight", dim)
        if seed in rules.of(node.name).sizes:
            seeds.append(seed)
    visited: set[Port] = set()
    for seed in seeds:
        if seed in visited:
            continue
        graph.add_node(seed)
        visited.add(seed)
        stack = [seed]
        while stack:
            port = stack.pop()
            links, why = _visit(rules, port)
            if why:
                reasons[port] = why
            for _, link in links:
                # two ports may be linked more than once (torch.cat([y, y]): y's channels at two offsets), so
                # an edge keeps the list of its distinct links (add_edge would keep only the last one)
                edge = graph.get_edge_data(link.a, link.b)
                if edge is None:
                    graph.add_edge(link.a, link.b, links=[link])
                elif link not in edge["links"]:
                    edge["links"].append(link)
                other = link.b if link.a == port else link.a
                if other not in visited:
                    visited.add(other)
                    stack.append(other)
    return graph, rules, reasons, seeds


def build_channel_groups(program: Program) -> list[ChannelGroup]:
    """Every channel group of ``program`` (prunable or not), one per set of coupled layer output channels.

    Needs node metadata (``program.propagate_meta()`` has run). Deterministic: groups are ordered by their
    first producer in graph order; units by that producer's filter order.
    """
    if program.meta_mode == "none":
        program.propagate_meta()
    graph, rules, reasons, seeds = _explore(program)
    groups: list[ChannelGroup] = []
    seen: set[Port] = set()
    for seed in seeds:
        if seed in seen:
            continue
        component = nx.node_connected_component(graph, seed)
        seen |= component
        ports = [seed] + sorted(component - {seed}, key=_port_key)
        groups.append(_make_group(len(groups), program, rules, graph, ports, reasons))
    return groups


def _port_key(port: Port) -> tuple:
    return (type(port).__name__, port.node, str(getattr(port, "role", "")), getattr(port, "dim", -1))


def _make_group(gid: int, program: Program, rules: _Rules, graph: nx.Graph, ports: list[Port],
                reasons: dict[Port, list[str]]) -> ChannelGroup:
    why = [r for p in ports for r in reasons.get(p, [])]
    sizes = {p: _port_size(rules, p) for p in ports}
    missing = [p for p, s in sizes.items() if s is None]
    if missing:
        why.append(f"the size of {missing[0]} is unknown (no shape metadata)")
    edges = [link for _, _, links in graph.edges(ports, data="links") for link in links] if not missing else []
    if not missing and _all_identity(edges, sizes):
        # the common case (a conv's filters, its BN, the next convs' inputs, residual adds): index i of
        # every port is unit i; one shared arange instead of the general unit labelling below
        group = _finish_group(gid, program, rules, ports, dict.fromkeys(ports, torch.arange(sizes[ports[0]])),
                              sizes[ports[0]], why)
        group.identity = True
        return group
    base, total = {}, 0
    for p in ports:
        base[p] = total
        total += sizes[p] or 0
    # channel units = connected components over (port, index) positions; linked positions are merged by
    # vectorised min-label propagation (a Python union-find over every channel was the analysis' hot spot)
    ends_a, ends_b = [], []
    if not missing:
        # every edge incident to the component's ports lies inside it (it is a connected component)
        for link in edges:
            count = sizes[link.a] * link.expand  # b's indices are offset .. offset + count - 1
            if (count and link.offset + count > sizes[link.b]) or (link.covers and count != sizes[link.b]):
                why.append(f"sizes of {link.a} ({sizes[link.a]}) and {link.b} ({sizes[link.b]}) do not match")
                continue
            ia, ib = link.pairs(sizes[link.a])
            ends_a.append(ia.long() + base[link.a])
            ends_b.append(ib.long() + base[link.b])
    labels = _components(total, ends_a, ends_b)
    # a unit's id is its order of first appearance (ports in order): the smallest position is the label
    _, unit_of = torch.unique(labels, return_inverse=True)
    members = {p: unit_of[base[p]:base[p] + (sizes[p] or 0)] for p in ports}
    size = int(unit_of.max()) + 1 if total else 0
    return _finish_group(gid, program, rules, ports, members, size, why)


def _all_identity(edges: list[Link], sizes: dict[Port, int | None]) -> bool:
    """Every link maps index i to index i and every port has the same size (so units are the indices)."""
    first = next(iter(sizes.values()))
    return all(s == first for s in sizes.values()) and all(
        link.offset == 0 and link.expand == 1 and link.covers and not link.interleave for link in edges)


def _finish_group(gid: int, program: Program, rules: _Rules, ports: list[Port], members: dict[Port, torch.Tensor],
                  size: int, why: list[str]) -> ChannelGroup:
    producers, consumers = _roles(program, rules, members)
    if size < 2 and not why:
        why.append(f"only {size} unit: nothing can be removed")
    reason = "; ".join(dict.fromkeys(why)) if why else None
    name = Layer(program, rules.nodes[ports[0].node]).name
    return ChannelGroup(gid, name, members, size, producers, consumers, not why, reason)


def _components(total: int, ends_a: list[torch.Tensor], ends_b: list[torch.Tensor]) -> torch.Tensor:
    """For positions 0..total-1 linked pairwise (ends_a[k][i] with ends_b[k][i]), each position's component
    label: the smallest position in its component."""
    labels = torch.arange(total)
    if not ends_a:
        return labels
    a, b = torch.cat(ends_a), torch.cat(ends_b)
    while True:
        low = torch.minimum(labels[a], labels[b])
        new = labels.clone()
        new.scatter_reduce_(0, a, low, "amin")
        new.scatter_reduce_(0, b, low, "amin")
        new = new[new]  # pointer jumping: follow labels to their own labels
        if torch.equal(new, labels):
            return labels
        labels = new


def _roles(program: Program, rules: _Rules, members: dict[Port, torch.Tensor]) -> tuple[list[str], list[str]]:
    producers, consumers = [], []
    for p in members:
        if not isinstance(p, ParamDim) or p.role != "weight":
            continue
        kind = program.kind(rules.nodes[p.node])
        out_dim = PRODUCER_DIMS.get(kind)
        if out_dim is None:
            continue
        (producers if p.dim == out_dim else consumers).append(p.node)
    for p in members:
        if isinstance(p, GroupCount) and p.role == "groups" and p.node not in consumers:
            consumers.append(p.node)
    return producers, consumers


def channel_groups(program: Program) -> list[ChannelGroup]:
    """The cached analysis ``channel-groups`` (computed on first use; dropped by passes that edit the graph)."""
    cached = program.analyses.get(ANALYSIS)
    if cached is None:
        cached = program.analyses[ANALYSIS] = build_channel_groups(program)
    return cached
