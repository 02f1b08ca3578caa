"""Per-kind channel-coupling rules: for each op kind, which dims of a node's inputs, outputs and tensors
move together when channels are removed, and how their indices correspond.

The port and link types live here with the rules that produce them; :mod:`slimfx.ir.channels` builds the
coupling graph and the channel groups from them. Supporting a new op for structured pruning = one rule in
:data:`RULES`. Whatever a rule does not understand must block the group, never guess.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx

from slimfx.ir.layer import Layer, attribute_uses
from slimfx.ir.meta import TensorMeta, meta_of
from slimfx.ir.ops import OpKind, data_input, op_name
from slimfx.ir.program import Program


# Ports are NamedTuples, not dataclasses: the analysis hashes them ~10^4 times per model, and a tuple's hash
# runs in C (a frozen dataclass's __hash__ is Python). Field types keep the three kinds from comparing equal.
class TensorDim(NamedTuple):
    """Dim ``dim`` of node ``node``'s output (for ops returning a tuple: of its primary output)."""

    node: str
    dim: int


class ParamDim(NamedTuple):
    """Dim ``dim`` of the tensor in role ``role`` (weight, bias, running_mean, ...) of layer node ``node``."""

    node: str
    role: str
    dim: int


class GroupCount(NamedTuple):
    """An attribute counting whole groups (``groups`` of a conv, ``num_groups`` of a GroupNorm)."""

    node: str
    role: str


Port = TensorDim | ParamDim | GroupCount


@dataclass(frozen=True)
class Link:
    """Index ``i`` of port ``a`` is removed together with indices ``offset + i*expand .. +expand-1`` of ``b``
    (with ``interleave``: indices ``offset + i + k*size_a`` for k < expand, a strided set).

    identity: offset 0, expand 1; cat input -> output: offset; flatten/heads/groups: expand (``a`` coarse);
    the inner dim of a channel shuffle's split: interleave.
    """

    a: Port
    b: Port
    offset: int = 0
    expand: int = 1
    covers: bool = True  # False when ``a`` maps onto only part of ``b`` (one input of a cat)
    interleave: bool = False

    def pairs(self, size_a: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of ``a``, indices of ``b``) removed together, as two equal-length tensors (read only)."""
        return _pairs(size_a, self.expand, self.offset, self.interleave)


@functools.lru_cache(maxsize=4096)
def _pairs(size_a: int, expand: int, offset: int, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # most links of a model repeat a few (size, expand) combinations: build each index pair once
    fine = torch.arange(size_a * expand)
    coarse = fine % size_a if interleave else torch.arange(size_a).repeat_interleave(expand)
    return coarse, offset + fine


@dataclass
class NodeRule:
    """What one node says about its ports: couplings, blocked ports, ports it accounts for, port sizes.

    A tracked port that a rule neither links nor lists in ``handled`` blocks its group: unknown uses are
    never pruned.
    """

    links: list[Link] = field(default_factory=list)
    blocked: dict[Port, str] = field(default_factory=dict)
    handled: set[Port] = field(default_factory=set)
    sizes: dict[Port, int] = field(default_factory=dict)

    def link(self, a: Port, b: Port, offset: int = 0, expand: int = 1, covers: bool = True,
             interleave: bool = False) -> None:
        self.links.append(Link(a, b, offset, expand, covers, interleave))
        self.handled.update((a, b))

    def block(self, port: Port, reason: str) -> None:
        self.blocked.setdefault(port, reason)
        self.handled.add(port)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The output shape of a node; for ops returning a tuple (aten batch norm, MHA) its first element."""
    if not isinstance(node, fx.Node):
        return None
    meta = meta_of(node)
    if isinstance(meta, tuple) and meta and isinstance(meta[0], TensorMeta):
        meta = meta[0]
    return meta.shape if isinstance(meta, TensorMeta) else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if shape_of(n) is not None]


def _identity_dims(rule: NodeRule, src: fx.Node, node: fx.Node, skip: set[int] = frozenset()) -> None:
    """Couple dim d of ``src`` with dim d of ``node`` (same rank), except dims in ``skip``."""
    for d in range(len(shape_of(src))):
        if d not in skip:
            rule.link(TensorDim(src.name, d), TensorDim(node.name, d))


def _broadcast(rule: NodeRule, src: fx.Node, node: fx.Node, out_rank: int | None = None, lead: int = 0) -> None:
    """Right-aligned broadcasting: equal dims couple; a size-1 dim broadcast over the output is blocked."""
    in_shape, out_shape = shape_of(src), shape_of(node)
    rank = len(out_shape) if out_rank is None else out_rank
    for i, size in enumerate(in_shape):
        j = rank - len(in_shape) + i
        port = TensorDim(src.name, i)
        if j < 0:
            rule.block(port, f"%{node.name} broadcasts %{src.name} in an unexpected way")
        elif size == out_shape[j]:
            rule.link(port, TensorDim(node.name, j))
        else:
            rule.block(port, f"%{node.name} broadcasts dim {i} of %{src.name} over other channels")


# ---------------------------------------------------------------------------------------------------------
# Rules, one per kind


def _rule_elementwise(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    out = shape_of(node)
    if out is None:
        return rule
    rule.handled.update(TensorDim(node.name, d) for d in range(len(out)))
    for src in _tensor_args(node):
        _broadcast(rule, src, node)
    return rule


def _layer_or_block(program: Program, node: fx.Node, rule: NodeRule, ports: list[Port]) -> Layer | None:
    """The node's Layer, or None after blocking ``ports`` when its tensors cannot be edited alone."""
    layer = Layer(program, node)
    why = None
    if layer.is_shared():
        why = f"layer {layer.name} (%{node.name}) shares its parameters with another node"
    elif layer.tensor("weight") is None and layer.get("weight") is not None:
        why = f"the weight of %{node.name} is computed by the graph, not a constant"
    else:
        for role in ("bias", "running_mean", "running_var"):
            if isinstance(layer.get(role), fx.Node) and layer.tensor(role) is None:
                why = f"the {role} of %{node.name} is computed by the graph, not a constant"
    if why:
        for p in ports:
            rule.block(p, why)
        return None
    return layer


def _link_param(rule: NodeRule, layer: Layer, role: str, dim: int, port: Port) -> None:
    tensor = layer.tensor(role)
    if tensor is not None:
        param = ParamDim(layer.node.name, role, dim)
        rule.sizes[param] = tensor.shape[dim]
        rule.link(port, param)


def _rule_linear(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    if shape_of(x) is None or out is None:
        return rule
    r = len(out)
    cin, cout = TensorDim(x.name, r - 1), TensorDim(node.name, r - 1)
    for d in range(r - 1):
        rule.link(TensorDim(x.name, d), TensorDim(node.name, d))
    layer = _layer_or_block(program, node, rule, [cin, cout])
    if layer is not None:
        _link_param(rule, layer, "weight", 1, cin)
        _link_param(rule, layer, "weight", 0, cout)
        _link_param(rule, layer, "bias", 0, cout)
    return rule


def _rule_conv(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    layer = Layer(program, node)
    weight = layer.tensor("weight")
    if shape_of(x) is None or out is None or weight is None:
        return rule
    r, spatial = len(out), weight.dim() - 2
    c = r - spatial - 1
    cin, cout = TensorDim(x.name, c), TensorDim(node.name, c)
    for d in range(c):
        rule.link(TensorDim(x.name, d), TensorDim(node.name, d))
    for d in range(c + 1, r):
        rule.block(TensorDim(x.name, d), f"%{node.name} convolves over dim {d}")
        rule.block(TensorDim(node.name, d), f"%{node.name} convolves over dim {d}")
    if _layer_or_block(program, node, rule, [cin, cout]) is None:
        return rule
    transposed = layer.kind is OpKind.CONV_TRANSPOSE
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    groups = int(layer.get("groups") or 1)
    if groups == 1:
        _link_param(rule, layer, "weight", in_dim, cin)
        _link_param(rule, layer, "weight", out_dim, cout)
    else:
        # Grouped (and depthwise) convs: a group's inputs and outputs go together, so whole groups are removed.
        count = GroupCount(node.name, "groups")
        rule.sizes[count] = groups
        rule.link(count, cin, expand=shape_of(x)[c] // groups)
        rule.link(count, cout, expand=out[c] // groups)
        rows = ParamDim(node.name, "weight", 0)
        rule.sizes[rows] = weight.shape[0]
        rule.link(cin if transposed else cout, rows)
    _link_param(rule, layer, "bias", 0, cout)
    return rule


def _rule_batch_norm(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    if shape_of(x) is None or out is None:
        return rule
    c = 1 if len(out) > 1 else 0
    _identity_dims(rule, x, node)
    channel = TensorDim(node.name, c)
    layer = _layer_or_block(program, node, rule, [channel, TensorDim(x.name, c)])
    if layer is not None:
        for role in ("weight", "bias", "running_mean", "running_var"):
            _link_param(rule, layer, role, 0, channel)
    return rule


def _rule_layer_norm(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    if shape_of(x) is None or out is None:
        return rule
    layer = Layer(program, node)
    normalized = layer.get("normalized_shape")
    k = 1 if isinstance(normalized, int) else len(normalized or ())
    r = len(out)
    why = f"%{node.name} (LayerNorm) normalises over these channels: removing some changes the others"
    for d in range(r - k, r):
        rule.block(TensorDim(x.name, d), why)
        rule.block(TensorDim(node.name, d), why)
    _identity_dims(rule, x, node, skip=set(range(r - k, r)))
    return rule


def _rule_group_norm(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    if shape_of(x) is None or out is None:
        return rule
    _identity_dims(rule, x, node)
    channel = TensorDim(node.name, 1)
    layer = _layer_or_block(program, node, rule, [channel, TensorDim(x.name, 1)])
    groups = layer.get("num_groups") if layer is not None else None
    if not isinstance(groups, int):
        rule.block(channel, f"%{node.name} (GroupNorm) has no constant num_groups")
        return rule
    # Statistics are per group: removing whole groups leaves the others' statistics unchanged.
    count = GroupCount(node.name, "num_groups")
    rule.sizes[count] = groups
    rule.link(count, channel, expand=out[1] // groups)
    for role in ("weight", "bias"):
        _link_param(rule, layer, role, 0, channel)
    return rule


def _rule_embedding(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    out = shape_of(node)
    if out is None:
        return rule
    port = TensorDim(node.name, len(out) - 1)
    layer = _layer_or_block(program, node, rule, [port])
    if layer is not None:
        _link_param(rule, layer, "weight", 1, port)
    return rule


def _rule_pool(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    if shape_of(x) is None or out is None or len(shape_of(x)) != len(out):
        return rule
    # batch and channel dims lead; the window slides over the rest
    for d, (a, b) in enumerate(zip(shape_of(x), out)):
        if d < min(2, len(out) - 1) and a == b:
            rule.link(TensorDim(x.name, d), TensorDim(node.name, d))
        else:
            rule.block(TensorDim(x.name, d), f"%{node.name} pools over dim {d}")
    rule.handled.update(TensorDim(node.name, d) for d in range(len(out)))
    return rule


def _rule_reduce(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    if shape_of(x) is None or out is None:
        return rule
    rank = len(shape_of(x))
    dims = _arg(node, 1, "dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        reduced = set(range(rank))
    elif isinstance(dims, int):
        reduced = {_norm_dim(dims, rank)}
    elif isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        reduced = {_norm_dim(d, rank) for d in dims}
    else:
        return rule
    keepdim = bool(_arg(node, 2, "keepdim", False))
    j = 0
    for d in range(rank):
        if d in reduced:
            rule.block(TensorDim(x.name, d), f"%{node.name} reduces over dim {d}: its result depends on every channel")
            j += int(keepdim)
        else:
            rule.link(TensorDim(x.name, d), TensorDim(node.name, j))
            j += 1
    rule.handled.update(TensorDim(node.name, d) for d in range(len(out)))
    return rule


def _rule_softmax(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    dim = _arg(node, 1, "dim")
    if shape_of(x) is None or out is None or not isinstance(dim, int):
        return rule
    dim = _norm_dim(dim, len(out))
    why = f"%{node.name} (softmax) normalises over dim {dim}"
    rule.block(TensorDim(x.name, dim), why)
    rule.block(TensorDim(node.name, dim), why)
    _identity_dims(rule, x, node, skip={dim})
    return rule


def _blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair the non-1 dims of two shapes into minimal runs with equal products (a reshape's dim mapping)."""
    ia = [k for k, s in enumerate(a) if s != 1]
    ib = [k for k, s in enumerate(b) if s != 1]
    blocks, p, q = [], 0, 0
    while p < len(ia) and q < len(ib):
        ins, outs = [ia[p]], [ib[q]]
        pa, pb = a[ia[p]], b[ib[q]]
        p, q = p + 1, q + 1
        while pa != pb:
            if pa < pb and p < len(ia):
                ins.append(ia[p])
                pa *= a[ia[p]]
                p += 1
            elif pb < pa and q < len(ib):
                outs.append(ib[q])
                pb *= b[ib[q]]
                q += 1
            else:
                return None
        blocks.append((ins, outs))
    return blocks if p == len(ia) and q == len(ib) else None


_VIEW_OPS = frozenset({"view", "reshape", "_unsafe_view"})


def reshape_size_slots(program: Program, node: fx.Node) -> tuple[str, list[Any], int] | None:
    """How a reshape encodes its output sizes: ("view", sizes, 0), ("unflatten", sizes, first dim), or None
    when it has no size arguments (flatten, squeeze, unsqueeze). Sizes are ints, -1, or fx.Nodes."""
    if node.op == "call_module":
        sub = program.module.get_submodule(node.target)
        if isinstance(sub, torch.nn.Unflatten):
            rank = len(shape_of(data_input(node)))
            return "unflatten", list(sub.unflattened_size), _norm_dim(sub.dim, rank)
        return None
    name = op_name(node)
    if name in _VIEW_OPS:
        sizes = node.args[1:] if len(node.args) > 1 else node.kwargs.get("shape", node.kwargs.get("size", ()))
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
            sizes = sizes[0]
        return "view", list(sizes), 0
    if name == "unflatten":
        rank = len(shape_of(data_input(node)))
        return "unflatten", list(_arg(node, 2, "sizes")), _norm_dim(_arg(node, 1, "dim"), rank)
    return None


def _rule_reshape(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    a = shape_of(x)
    if a is None or out is None:
        return rule
    outs_all = [TensorDim(node.name, d) for d in range(len(out))]
    ins_all = [TensorDim(x.name, d) for d in range(len(a))]
    blocks = _blocks(a, out)
    slots = reshape_size_slots(program, node)
    if blocks is None:
        for p in ins_all + outs_all:
            rule.block(p, f"%{node.name} reshapes {a} to {out} in a way slimfx does not map")
        return rule
    for p in ins_all + outs_all:  # size-1 dims: only those inside a block get linked below
        rule.block(p, f"%{node.name} moves a size-1 dim")
    for ins, outs in blocks:
        for k in ins[1:]:
            rule.blocked[ins_all[k]] = (f"%{node.name} merges dims {ins} of {a}: only the outermost may be pruned "
                                        "(e.g. a channel shuffle)")
        for k in outs[1:]:
            rule.blocked[outs_all[k]] = (f"%{node.name} splits into dims {outs} of {out}: only the outermost may "
                                         "be pruned (e.g. a channel shuffle)")
        if len(ins) > 1 and len(outs) > 1:
            rule.blocked[ins_all[ins[0]]] = rule.blocked[outs_all[outs[0]]] = (
                f"%{node.name} regroups dims {ins} of {a} into {outs} of {out}")
            continue
        if len(ins) == 1 and len(outs) == 2 and _is_channel_shuffle(program, node, outs):
            # split C into (groups, C/groups), swapped and merged back: a unit is one index of the inner dim,
            # i.e. the input channels {j, j + C/groups, ...}; the merge after the swap then keeps it whole
            inner, outer = outs_all[outs[1]], outs_all[outs[0]]
            rule.blocked.pop(inner, None)
            rule.blocked.pop(ins_all[ins[0]], None)
            rule.blocked[outer] = f"%{node.name} splits a channel shuffle's groups; the group count stays"
            rule.link(inner, ins_all[ins[0]], expand=out[outs[0]], interleave=True)
            continue
        coarse, fine = (outs_all[outs[0]], ins_all[ins[0]]) if len(outs) > 1 else (ins_all[ins[0]], outs_all[outs[0]])
        rule.blocked.pop(coarse, None)
        rule.blocked.pop(fine, None)
        expand = 1
        for k in (outs[1:] if len(outs) > 1 else ins[1:]):
            expand *= (out if len(outs) > 1 else a)[k]
        rule.link(coarse, fine, expand=expand)
        o = outs[0]
        if slots is not None:
            _, sizes, first = slots
            pos = o - first
            if 0 <= pos < len(sizes) and not isinstance(sizes[pos], int):
                rule.blocked[outs_all[o]] = (f"%{node.name} computes the size of dim {o} in the graph; "
                                             "slimfx only rewrites constant sizes")
    return rule


def _only_user_skipping_copies(program: Program, node: fx.Node) -> fx.Node | None:
    """The single user of ``node``, looking through same-shape copies (``.contiguous()``, identity)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if program.kind(user) not in (OpKind.CONTIGUOUS, OpKind.IDENTITY):
            return user
        node = user
    return None


def _is_channel_shuffle(program: Program, split: fx.Node, outs: list[int]) -> bool:
    """``split`` splits one dim into ``outs`` (two adjacent dims), its only user swaps exactly those two dims
    and the swap's only user merges them back: a ShuffleNet channel shuffle."""
    swap = _only_user_skipping_copies(program, split)
    shape = shape_of(split)
    if swap is None or program.kind(swap) is not OpKind.PERMUTE or shape is None or outs[1] != outs[0] + 1:
        return False
    perm = _permutation(swap, len(shape))
    expected = list(range(len(shape)))
    expected[outs[0]], expected[outs[1]] = outs[1], outs[0]
    if perm != expected:
        return False
    merge = _only_user_skipping_copies(program, swap)
    if merge is None or program.kind(merge) is not OpKind.RESHAPE:
        return False
    before, after = shape_of(swap), shape_of(merge)
    blocks = _blocks(before, after) if before is not None and after is not None else None
    return blocks is not None and any(ins == outs and len(o) == 1 for ins, o in blocks)


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    name = op_name(node)
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 1 else node.kwargs.get("dims", ())
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [_norm_dim(d, rank) for d in dims] if all(isinstance(d, int) for d in dims) else None
    if name in ("transpose", "swapaxes", "swapdims", "t"):
        d0, d1 = (0, 1) if name == "t" else (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return None
        perm = list(range(rank))
        if rank >= 2 or name != "t":
            d0, d1 = _norm_dim(d0, rank), _norm_dim(d1, rank)
            perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    return None


def _rule_permute(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    if shape_of(x) is None or out is None:
        return rule
    perm = _permutation(node, len(out))
    if perm is None or sorted(perm) != list(range(len(out))):
        return rule
    for j, d in enumerate(perm):
        rule.link(TensorDim(x.name, d), TensorDim(node.name, j))
    return rule


def _rule_cat(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    out = shape_of(node)
    inputs = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    if out is None or not isinstance(dim, int) or not all(shape_of(t) is not None for t in inputs):
        return rule
    dim = _norm_dim(dim, len(out))
    offset = 0
    for t in inputs:
        shape = shape_of(t)
        if len(shape) != len(out):  # legacy cat of empty 1-d tensors
            return NodeRule()
        rule.link(TensorDim(t.name, dim), TensorDim(node.name, dim), offset=offset, covers=False)
        _identity_dims(rule, t, node, skip={dim})
        offset += shape[dim]
    return rule


def _rule_split(program: Program, node: fx.Node) -> NodeRule:
    # Ports of a split are the dims of its input, shared by every piece; getitem maps a piece onto them.
    rule = NodeRule()
    x = data_input(node)
    shape = shape_of(x)
    unbind = op_name(node) == "unbind"
    dim = _arg(node, 1, "dim", 0) if unbind else _arg(node, 2, "dim", 0)
    if shape is None or not isinstance(dim, int):
        return rule
    dim = _norm_dim(dim, len(shape))
    for d in range(len(shape)):
        port = TensorDim(x.name, d)
        if d == dim:
            rule.block(port, f"%{node.name} splits the channels; slimfx does not rewrite split sizes")
        else:
            rule.link(port, TensorDim(node.name, d))
            rule.sizes[TensorDim(node.name, d)] = shape[d]
    return rule


def _split_piece_dims(split: fx.Node, rank_in: int) -> dict[int, int]:
    """Piece dim -> split input dim."""
    unbind = op_name(split) == "unbind"
    dim = _arg(split, 1, "dim", 0) if unbind else _arg(split, 2, "dim", 0)
    dim = _norm_dim(dim, rank_in)
    if not unbind:
        return {d: d for d in range(rank_in)}
    return {(d if d < dim else d - 1): d for d in range(rank_in) if d != dim}


def _rule_getitem(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    src, index = node.args[0], node.args[1]
    out = shape_of(node)
    if not isinstance(src, fx.Node) or out is None:
        return rule
    src_kind = program.kind(src)
    if src_kind is OpKind.SPLIT:
        rank_in = len(shape_of(data_input(src)))
        for piece_dim, d in _split_piece_dims(src, rank_in).items():
            rule.link(TensorDim(src.name, d), TensorDim(node.name, piece_dim))
        return rule
    if isinstance(meta_of(src), tuple):  # aten batch norm / MultiheadAttention: element 0 is the output
        if index == 0:
            _identity_dims(rule, src, node)
        elif not node.users:
            rule.handled.update(TensorDim(src.name, d) for d in range(len(shape_of(src))))
        return rule
    return _rule_tensor_index(rule, src, node, index)


def _rule_tensor_index(rule: NodeRule, src: fx.Node, node: fx.Node, index: Any) -> NodeRule:
    """x[..., :, 0, None]: full slices keep a dim, ints drop it, None adds one; anything else blocks."""
    items = list(index) if isinstance(index, tuple) else [index]
    rank = len(shape_of(src))
    if sum(i is Ellipsis for i in items) > 1:
        return rule
    if Ellipsis in items:
        k = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + [slice(None)] * (rank - used) + items[k + 1:]
    d = j = 0
    for item in items:
        if item is None:
            j += 1
        elif isinstance(item, int):
            rule.block(TensorDim(src.name, d), f"%{node.name} selects one index of dim {d}")
            d += 1
        elif item == slice(None):
            rule.link(TensorDim(src.name, d), TensorDim(node.name, j))
            d, j = d + 1, j + 1
        else:
            rule.block(TensorDim(src.name, d), f"%{node.name} indexes dim {d} with {item!r}")
            d, j = d + 1, j + 1
    for k in range(d, rank):
        rule.link(TensorDim(src.name, k), TensorDim(node.name, j + k - d))
    return rule


def _rule_slice(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x, out = data_input(node), shape_of(node)
    shape = shape_of(x)
    dim = _arg(node, 1, "dim", 0)
    if shape is None or out is None or not isinstance(dim, int):
        return rule
    dim = _norm_dim(dim, len(shape))
    if op_name(node) == "select":
        rule.block(TensorDim(x.name, dim), f"%{node.name} selects one index of dim {dim}")
        for d in range(len(shape)):
            if d != dim:
                rule.link(TensorDim(x.name, d), TensorDim(node.name, d if d < dim else d - 1))
        return rule
    if shape[dim] != out[dim]:
        rule.block(TensorDim(x.name, dim), f"%{node.name} slices dim {dim}")
        rule.block(TensorDim(node.name, dim), f"%{node.name} slices dim {dim}")
        _identity_dims(rule, x, node, skip={dim})
    else:
        _identity_dims(rule, x, node)
    return rule


def _rule_matmul(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    out = shape_of(node)
    a, b = node.args[0], node.args[1]
    sa, sb = shape_of(a), shape_of(b)
    if out is None or sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return rule
    r = len(out)
    rule.link(TensorDim(a.name, len(sa) - 1), TensorDim(b.name, len(sb) - 2))  # contracted together
    rule.link(TensorDim(a.name, len(sa) - 2), TensorDim(node.name, r - 2))
    rule.link(TensorDim(b.name, len(sb) - 1), TensorDim(node.name, r - 1))
    for src, shape in ((a, sa), (b, sb)):
        _batch_dims(rule, src, shape, node, out, r - 2)
    return rule


def _batch_dims(rule: NodeRule, src: fx.Node, shape: tuple[int, ...], node: fx.Node, out: tuple[int, ...],
                out_batch: int) -> None:
    for i in range(len(shape) - 2):
        j = out_batch - (len(shape) - 2) + i
        port = TensorDim(src.name, i)
        if j >= 0 and shape[i] == out[j]:
            rule.link(port, TensorDim(node.name, j))
        else:
            rule.block(port, f"%{node.name} broadcasts dim {i} of %{src.name}")


def _rule_addmm(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    bias, a, b = node.args[0], node.args[1], node.args[2]
    out = shape_of(node)
    if out is None or shape_of(a) is None or shape_of(b) is None or len(out) != 2:
        return rule
    rule.link(TensorDim(a.name, 1), TensorDim(b.name, 0))
    rule.link(TensorDim(a.name, 0), TensorDim(node.name, 0))
    rule.link(TensorDim(b.name, 1), TensorDim(node.name, 1))
    if shape_of(bias) is not None:
        _broadcast(rule, bias, node)
    return rule


def _rule_sdpa(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    q, k, v = node.args[:3]
    out = shape_of(node)
    if out is None or any(shape_of(t) is None or len(shape_of(t)) < 2 for t in (q, k, v)):
        return rule
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        for t in (q, k, v):
            for d in range(len(shape_of(t))):
                rule.block(TensorDim(t.name, d), f"%{node.name} takes an attention mask; heads are not pruned")
        return rule
    r = len(out)
    why = f"%{node.name}: the attention scale depends on the q/k head dim"
    rule.block(TensorDim(q.name, len(shape_of(q)) - 1), why)
    rule.block(TensorDim(k.name, len(shape_of(k)) - 1), why)
    rule.link(TensorDim(q.name, len(shape_of(q)) - 2), TensorDim(node.name, r - 2))
    rule.link(TensorDim(k.name, len(shape_of(k)) - 2), TensorDim(v.name, len(shape_of(v)) - 2))
    rule.link(TensorDim(v.name, len(shape_of(v)) - 1), TensorDim(node.name, r - 1))
    for t in (q, k, v):
        _batch_dims(rule, t, shape_of(t), node, out, r - 2)
    return rule


def _rule_multihead_attention(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    from slimfx.ir.attention import why_not_decomposable

    reason = why_not_decomposable(program, node) if program.dialect == "torch" else "export dialect"
    why = (f"%{node.name} is an nn.MultiheadAttention, whose embed_dim is both its input width and its heads' "
           f"width; prune-channels writes it out as q/k/v projections to prune whole heads, but not this one: "
           f"{reason}" if reason else f"%{node.name} is an nn.MultiheadAttention kept whole; run "
           "decompose-attention (prune-channels does) to prune its heads")
    for t in _tensor_args(node):
        for d in range(len(shape_of(t))):
            rule.block(TensorDim(t.name, d), why)
    out = shape_of(node)
    for d in range(len(out or ())):
        rule.block(TensorDim(node.name, d), why)
    return rule


def _rule_param(program: Program, node: fx.Node) -> NodeRule:
    # A constant used as data (learned positions, a matmul operand): pruning slices the attribute itself.
    rule = NodeRule()
    shape = shape_of(node)
    if shape is None:
        return rule
    shared = attribute_uses(program).get(node.target, 0) > 1
    for d in range(len(shape)):
        port = TensorDim(node.name, d)
        if shared:
            rule.block(port, f"attribute {node.target} is used by several nodes")
        else:
            rule.handled.add(port)
    return rule


def _rule_input(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    for d in range(len(shape_of(node) or ())):
        rule.block(TensorDim(node.name, d), f"channels of the model input %{node.name} are never removed")
    return rule


def _rule_output(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    for t in _tensor_args(node):
        for d in range(len(shape_of(t))):
            rule.block(TensorDim(t.name, d), f"%{t.name} reaches the model output; output channels are never removed")
    return rule


def _rule_shape(program: Program, node: fx.Node) -> NodeRule:
    rule = NodeRule()
    x = node.args[0] if node.args else None
    shape = shape_of(x)
    if shape is None:
        return rule
    name = op_name(node)
    if name == "getattr":
        attr = node.args[1]
        if attr in ("dtype", "device", "ndim", "is_cuda"):
            read = set()
        elif attr == "shape":
            read = _dims_read_from_tuple(node, len(shape))
        else:
            return rule
    elif name == "dim":
        read = set()
    else:  # size / sym_size
        dim = _arg(node, 1, "dim")
        read = {_norm_dim(dim, len(shape))} if isinstance(dim, int) else _dims_read_from_tuple(node, len(shape))
    for d in range(len(shape)):
        port = TensorDim(x.name, d)
        if d in read:
            rule.block(port, f"%{node.name} reads the size of dim {d} of %{x.name}")
        else:
            rule.handled.add(port)
    return rule


def _dims_read_from_tuple(node: fx.Node, rank: int) -> set[int]:
    read: set[int] = set()
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            read.add(_norm_dim(user.args[1], rank))
        else:
            return set(range(rank))
    return read


RuleFn = Callable[[Program, fx.Node], NodeRule]

RULES: dict[OpKind, RuleFn] = {
    OpKind.INPUT: _rule_input,
    OpKind.OUTPUT: _rule_output,
    OpKind.PARAM: _rule_param,
    OpKind.LINEAR: _rule_linear,
    OpKind.CONV: _rule_conv,
    OpKind.CONV_TRANSPOSE: _rule_conv,
    OpKind.BATCH_NORM: _rule_batch_norm,
    OpKind.LAYER_NORM: _rule_layer_norm,
    OpKind.GROUP_NORM: _rule_group_norm,
    OpKind.EMBEDDING: _rule_embedding,
    OpKind.MATMUL: _rule_matmul,
    OpKind.ADDMM: _rule_addmm,
    OpKind.ADD: _rule_elementwise,
    OpKind.SUB: _rule_elementwise,
    OpKind.MUL: _rule_elementwise,
    OpKind.DIV: _rule_elementwise,
    OpKind.ACTIVATION: _rule_elementwise,
    OpKind.DROPOUT: _rule_elementwise,
    OpKind.IDENTITY: _rule_elementwise,
    OpKind.CONTIGUOUS: _rule_elementwise,
    OpKind.CAT: _rule_cat,
    OpKind.SPLIT: _rule_split,
    OpKind.GETITEM: _rule_getitem,
    OpKind.SLICE: _rule_slice,
    OpKind.RESHAPE: _rule_reshape,
    OpKind.PERMUTE: _rule_permute,
    OpKind.SOFTMAX: _rule_softmax,
    OpKind.POOL: _rule_pool,
    OpKind.ADAPTIVE_POOL: _rule_pool,
    OpKind.REDUCE: _rule_reduce,
    OpKind.SDPA: _rule_sdpa,
    OpKind.MULTIHEAD_ATTENTION: _rule_multihead_attention,
    OpKind.SHAPE: _rule_shape,
}
"""Per-kind coupling rules. A kind without a rule (UNKNOWN) handles no port, so it blocks every group
that reaches it."""

# Layers whose output channels seed a group: kind -> weight dim that holds the output channels.
PRODUCER_DIMS: dict[OpKind, int] = {OpKind.CONV: 0, OpKind.LINEAR: 0, OpKind.CONV_TRANSPOSE: 1, OpKind.EMBEDDING: 1}
