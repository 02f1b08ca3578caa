"""Pruning masks kept in the IR, and apply-masks, which bakes them into the weights.

A masked layer reads its weight through a graph node, not a Python hook::

    %w      = get_attr[fc.weight]
    %w_mask = get_attr[fc.weight_mask]            # a bool buffer next to the weight, in the state_dict
    %masked = call_function[apply_mask](%w, %w_mask)     # OpKind.MASK
    %y      = call_function[F.linear](%x, %masked, %b)

so the mask shows in IR dumps, is saved with the program, survives later passes (they see a weight that
is computed by the graph, and leave it alone, as they do any computed weight) and, during fine-tuning,
keeps pruned weights at zero with zero gradient. Module forms (``nn.Linear``/``nn.Conv{1,2,3}d``
call_module nodes) are rewritten to their functional form (``F.linear``/``F.conv2d`` with the module's
stride/padding/dilation/groups) whose weight argument is the masked node; the module stays as the owner of
its parameters. aten programs (torch.export) keep their ``aten.linear``/``aten.conv2d`` node and only
its weight argument changes. ``apply-masks`` multiplies the masks into the weights, removes the mask
nodes and buffers, and turns the functional forms it created back into module calls, bit-exactly.

Why this design: a mask in the graph is visible to every tool that reads the IR (printer, verify, the
artifact writer) with no side channel, and the only new vocabulary is one op kind, ``OpKind.MASK``.
The mask op is the plain function :func:`apply_mask` registered in the op table when this module is
imported (the IR layer must not import passes); a graph that calls it imports this module anyway.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import fx

from slimfx.ir import ops
from slimfx.ir.layer import (
    FUNCTION_TO_MODULE,
    get_attr_value,
    set_attr_value,
    to_functional,
    why_no_functional_form,
)
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, NoOptions, Pass, PassResult, register_pass

MASK_SUFFIX = "_mask"
"""A weight ``a.b.weight`` gets its mask in the buffer ``a.b.weight_mask``."""


@torch.fx.wrap
def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight * mask``: the masked weight a pruned layer reads (``mask`` is a bool tensor of its shape).

    Without autograd recording (``no_grad`` / ``inference_mode``) the product keeps the weight's
    ``requires_grad`` flag (a leaf, no graph): torch's matmul picks its algorithm by that flag (a 3-D input
    times a weight that requires grad is folded into one 2-D GEMM, else batched), so the masked layer sums in
    the same order as the baked parameter ``apply-masks`` leaves, bit for bit. Under ``inference_mode`` the
    product is made as a normal tensor (an inference tensor's flag does not reach matmul)."""
    masked = weight * mask
    if torch.compiler.is_compiling():  # dynamo / strict export trace it: no flags or mode queries in the graph
        return masked
    if weight.requires_grad and not masked.requires_grad:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                masked = weight * mask
        masked.requires_grad_(True)
    return masked


ops.register_function_kind(apply_mask, OpKind.MASK)

# Module forms a layer can be rewritten from, with the functional form and its extra arguments.
MASKABLE_KINDS = {"linear": OpKind.LINEAR, "conv": OpKind.CONV}
"""Layer kinds the pruning passes can mask, by the name their ``include_kinds`` option uses."""


def check_sparsity(sparsity: float) -> None:
    """ValueError unless 0 <= sparsity < 1 (a mask that prunes everything is never what was meant)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"option 'sparsity' must be in [0, 1), got {sparsity}; e.g. sparsity=0.5 zeroes half")


@dataclass
class Candidate:
    """A layer a pruning pass may mask: its node, its readable name, its dense weight and current mask."""

    node: fx.Node
    name: str
    weight: torch.Tensor
    mask: torch.Tensor | None

    def scores(self, importance: str = "l1") -> torch.Tensor:
        """|w| (l1) or w² (l2) in float32, already-pruned entries at -inf so they rank (are pruned) first."""
        scores = self.weight.detach().float().abs()
        if importance == "l2":
            scores = scores * scores
        if self.mask is not None:
            scores = scores.masked_fill(~self.mask, float("-inf"))
        return scores


def mask_node(node: fx.Node) -> fx.Node | None:
    """The ``apply_mask`` node feeding ``node``'s weight, or None when the layer is not masked."""
    raw = _weight_arg(node)
    if isinstance(raw, fx.Node) and raw.op == "call_function" and raw.target is apply_mask:
        return raw
    return None


def masked_layers(program: Program) -> list[tuple[fx.Node, str]]:
    """Every masked layer as (layer node, attribute path of its mask buffer), in graph order."""
    found = []
    for node in program.graph.nodes:
        masked = mask_node(node) if node.op == "call_function" and ops.slots(node) is not None else None
        if masked is not None and _is_get_attr(masked.args[1]):
            found.append((node, masked.args[1].target))
    return found


def mask_of(program: Program, node: fx.Node) -> torch.Tensor | None:
    """The bool mask of a layer node (True = kept), or None when it is not masked."""
    masked = mask_node(node)
    if masked is None or not _is_get_attr(masked.args[1]):
        return None
    return get_attr_value(program.module, masked.args[1].target)


def dense_weight(program: Program, node: fx.Node) -> torch.Tensor | None:
    """The layer's weight parameter before masking, or None when it is not a constant of the program."""
    if node.op == "call_module":
        weight = getattr(program.module.get_submodule(node.target), "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None
    raw = _weight_arg(node)
    masked = mask_node(node)
    if masked is not None:
        raw = masked.args[0]
    if _is_get_attr(raw):
        value = get_attr_value(program.module, raw.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def set_mask(program: Program, node: fx.Node, mask: torch.Tensor) -> fx.Node:
    """Make ``node`` read ``weight * mask`` (replacing any mask it has) and return the layer node.

    A module-form layer is rewritten to its functional form first, so the returned node may be new.
    ``mask`` is stored as a bool buffer next to the weight. The caller combines old and new masks.
    """
    mask = mask.to(torch.bool)
    if node.op == "call_module":
        node = to_functional(program, node)
    existing = mask_node(node)
    if existing is not None:
        set_attr_value(program.module, existing.args[1].target, mask)
        return node
    weight_node = _weight_arg(node)
    owner_path, _, name = weight_node.target.rpartition(".")
    owner = program.module.get_submodule(owner_path) if owner_path else program.module
    buffer = _fresh_name(owner, name + MASK_SUFFIX)
    owner.register_buffer(buffer, mask)
    graph = program.graph
    with graph.inserting_before(node):
        mask_getter = graph.get_attr(f"{owner_path}.{buffer}" if owner_path else buffer)
        masked = graph.call_function(apply_mask, (weight_node, mask_getter))
    _set_weight_arg(node, masked)
    program.analyses.pop("attribute-uses", None)
    return node


def prune_entries(program: Program, candidate: Candidate, drop: torch.Tensor) -> tuple[fx.Node, bool]:
    """Mask the entries marked in ``drop``, ANDed with the layer's old mask; returns (layer node, changed).

    A layer whose mask would not change (or would keep everything) is left as it is.
    """
    keep = ~drop.to(torch.bool)
    if candidate.mask is not None:
        keep &= candidate.mask
        if torch.equal(keep, candidate.mask):
            return candidate.node, False
    elif bool(keep.all()):
        return candidate.node, False
    return set_mask(program, candidate.node, keep), True


def prunable_layers(
    program: Program, kinds: Iterable[OpKind], ignore: Iterable[str] = ()
) -> tuple[list[Candidate], list[str]]:
    """The layers a pruning pass may mask, and a note for each layer of those kinds it must leave alone.

    Left alone: layers named in ``ignore`` (fnmatch patterns on the module path, the node name or the
    weight's attribute path), layers whose weight is shared with another node (tied weights, a module
    called twice, a parameter read elsewhere), weights computed by the graph, non-float weights, and
    convs with a padding mode the functional form cannot express.
    """
    wanted = set(kinds)
    patterns = list(ignore)
    uses = _tensor_uses(program)
    candidates, notes = [], []
    for node in list(program.graph.nodes):
        if program.kind(node) not in wanted:
            continue
        names = _names(node)
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns):
            continue
        name = names[-1]
        reason = _why_not(program, node, uses)
        if reason:
            notes.append(f"kept {name}: {reason}")
            continue
        candidates.append(Candidate(node, name, dense_weight(program, node), mask_of(program, node)))
    return candidates, notes


def _why_not(program: Program, node: fx.Node, uses: dict[int, int]) -> str | None:
    if node.op == "call_module":
        module = program.module.get_submodule(node.target)
        reason = why_no_functional_form(module)
        if reason:
            return f"{reason} to mask"
        if len(node.args) != 1 or node.kwargs:
            return "called with extra arguments"
    elif ops.slots(node) is None:
        return "not a parametrised call"
    else:
        raw = _weight_arg(node)
        masked = mask_node(node)
        if masked is not None:
            if len(masked.users) != 1 or not (_is_get_attr(masked.args[0]) and _is_get_attr(masked.args[1])):
                return "its masked weight is shared or not built from constants"
        elif not _is_get_attr(raw):
            return "its weight is computed by the graph, not a constant"
    weight = dense_weight(program, node)
    if weight is None:
        return "its weight is not a constant tensor"
    if not weight.dtype.is_floating_point:
        return f"its weight is {weight.dtype}, not a float"
    if uses.get(id(weight), 0) > 1:
        return "its weight is shared with another node"
    return None


def _names(node: fx.Node) -> list[str]:
    """Names ``ignore`` patterns match: the module path or node name, then the weight's attribute path."""
    if node.op == "call_module":
        return [str(node.target), f"{node.target}.weight"]
    raw = _weight_arg(node)
    masked = mask_node(node)
    if masked is not None:
        raw = masked.args[0]
    names = [node.name]
    if _is_get_attr(raw):
        names += [raw.target.rpartition(".")[0] or raw.target, raw.target]
    return names


def _tensor_uses(program: Program) -> dict[int, int]:
    """How many nodes read each tensor (by identity, so tied weights under two names count together)."""
    counts: dict[int, int] = {}
    for node in program.graph.nodes:
        if node.op == "get_attr":
            value = get_attr_value(program.module, node.target)
            if isinstance(value, torch.Tensor):
                counts[id(value)] = counts.get(id(value), 0) + len(node.users)
        elif node.op == "call_module":
            module = program.module.get_submodule(node.target)
            for t in {id(t) for t in (*module.parameters(), *module.buffers())}:
                counts[t] = counts.get(t, 0) + 1
    return counts


def _is_get_attr(value: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _weight_arg(node: fx.Node) -> object:
    slots = ops.slots(node)
    if slots is None or "weight" not in slots.args:
        return None
    index = slots.args["weight"]
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get("weight")


def _set_weight_arg(node: fx.Node, value: fx.Node) -> None:
    index = ops.slots(node).args["weight"]
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs["weight"] = value
        node.kwargs = kwargs


def _fresh_name(owner: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _to_module_form(program: Program, node: fx.Node) -> bool:
    """Turn ``F.linear(x, m.weight, m.bias)`` (as :func:`slimfx.ir.layer.to_functional` wrote it) back into ``m(x)``."""
    try:
        entry = FUNCTION_TO_MODULE.get(node.target)
    except TypeError:
        return False
    if entry is None or node.kwargs:
        return False
    cls, attrs = entry
    weight = node.args[1] if len(node.args) > 1 else None
    if not _is_get_attr(weight) or not weight.target.endswith(".weight") or len(weight.users) != 1:
        return False
    path = weight.target[: -len(".weight")]
    try:
        module = program.module.get_submodule(path)
    except AttributeError:
        return False
    if type(module) is not cls or getattr(module, "padding_mode", "zeros") != "zeros":
        return False
    if any(n.op == "call_module" and n.target == path for n in program.graph.nodes):
        return False
    bias = node.args[2] if len(node.args) > 2 else None
    if module.bias is None:
        if bias is not None:
            return False
    elif not (_is_get_attr(bias) and bias.target == f"{path}.bias" and len(bias.users) == 1):
        return False
    if len(node.args) != 3 + len(attrs) or list(node.args[3:]) != [getattr(module, a) for a in attrs]:
        return False
    graph = program.graph
    with graph.inserting_before(node):
        call = graph.call_module(path, (node.args[0],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for getter in (weight, bias):
        if getter is not None and not getter.users:
            graph.erase_node(getter)
    return True


def bake_masks(program: Program) -> tuple[int, list[str]]:
    """Multiply every mask into its weight and remove the mask nodes; returns (baked, notes).

    A weight read elsewhere too gets a new parameter for the masked copy, so other readers keep the
    dense weight; in either case the layer computes exactly what it computed with the mask node.
    """
    graph, root = program.graph, program.module
    uses = _tensor_uses(program)
    baked, notes, unmasked = 0, [], []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not apply_mask:
            continue
        weight_node, mask_getter = node.args
        if not (_is_get_attr(weight_node) and _is_get_attr(mask_getter)):
            notes.append(f"kept %{node.name}: its weight or mask is computed by the graph")
            continue
        weight = get_attr_value(root, weight_node.target)
        with torch.no_grad():
            value = apply_mask(weight.detach(), get_attr_value(root, mask_getter.target))
        if uses.get(id(weight), 0) == 1:
            set_attr_value(root, weight_node.target, value)
            replacement = weight_node
        else:
            owner_path, _, name = weight_node.target.rpartition(".")
            owner = root.get_submodule(owner_path) if owner_path else root
            fresh = _fresh_name(owner, f"{name}_masked")
            owner.register_parameter(fresh, nn.Parameter(value, requires_grad=weight.requires_grad))
            with graph.inserting_before(node):
                replacement = graph.get_attr(f"{owner_path}.{fresh}" if owner_path else fresh)
        unmasked.extend(node.users)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        if not mask_getter.users:
            graph.erase_node(mask_getter)
            if not any(n.op == "get_attr" and n.target == mask_getter.target for n in graph.nodes):
                owner_path, _, name = mask_getter.target.rpartition(".")
                owner = root.get_submodule(owner_path) if owner_path else root
                owner._buffers.pop(name, None)
        baked += 1
    for node in unmasked:
        if node.graph is graph:
            _to_module_form(program, node)
    program.analyses.pop("attribute-uses", None)
    return baked, notes


@register_pass
class ApplyMasks(Pass):
    """Bake pruning masks into the weights (w = w * mask) and drop the mask nodes and buffers (exact)."""

    name = "apply-masks"
    contract = Contract.EXACT
    Options = NoOptions
    tolerance = (0.0, 0.0)

    def run(self, program: Program) -> PassResult:
        baked, notes = bake_masks(program)
        return PassResult(changed=baked > 0, stats={"baked": baked}, notes=notes)


def sparsity_stats(program: Program, names: dict[str, fx.Node]) -> dict[str, float]:
    """The fraction of zeros of each named layer's effective (masked) weight, rounded to 1e-4."""
    out = {}
    for name, node in names.items():
        weight, mask = dense_weight(program, node), mask_of(program, node)
        effective = weight if mask is None else weight * mask
        out[name] = round(float((effective == 0).sum()) / max(effective.numel(), 1), 4)
    return out
