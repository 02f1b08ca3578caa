"""Rewrite an ``nn.MultiheadAttention`` call (fx dialect) into explicit q/k/v projections, heads and SDPA.

nn.MultiheadAttention keeps q, k and v in one ``in_proj_weight`` and ties its projection width to its
input width (``embed_dim`` is both), so whole heads cannot be removed from the module itself. Written out as
``q_proj/k_proj/v_proj`` linears, ``unflatten`` into heads, ``F.scaled_dot_product_attention``, a merge of
the heads and ``out_proj``, the graph says exactly which rows belong to which head, and the channel rules for
separate q/k/v projections prune whole heads. The rewrite computes the same function (up to float rounding:
a different attention kernel); what it cannot express (masks, attention weights used, bias_kv, zero_attn,
dropout while training, unbatched inputs) is refused with the reason.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from slimfx.ir.meta import tensor_meta
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program

_MASK_ARGS = ("key_padding_mask", "attn_mask")


def _call_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def why_not_decomposable(program: Program, node: fx.Node) -> str | None:
    """Why the nn.MultiheadAttention called by ``node`` cannot be written out, or None when it can."""
    target = str(node.target)
    mha = program.module.get_submodule(target)
    if not isinstance(mha, nn.MultiheadAttention):
        return "it was already written out"
    for other in program.graph.nodes:
        if other is not node and other.op in ("call_module", "get_attr") and (
                other.target == target or str(other.target).startswith(target + ".")):
            return f"%{other.name} also uses it (the module is called twice, or its tensors are read)"
    args = _call_args(node)
    if mha.bias_k is not None or mha.add_zero_attn:
        return "it uses add_bias_kv or add_zero_attn"
    if mha.training and mha.dropout > 0:
        return "it is in training mode with attention dropout; call model.eval() first"
    if any(args.get(name) is not None for name in _MASK_ARGS) or args.get("is_causal"):
        return "it is called with an attention/padding mask"
    for name in ("query", "key", "value"):
        value = args.get(name)
        meta = tensor_meta(value) if isinstance(value, fx.Node) else None
        if meta is None or len(meta.shape) != 3:
            return f"its {name} is not a batched 3-d tensor with known shape"
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] != 0:
            return f"%{user.name} uses its attention weights (only output 0 can be written out)"
    return None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer.to(weight.device)


class DecomposedAttention(nn.Module):
    """Holds the four projections of a written-out nn.MultiheadAttention (called from the graph, never run
    as a whole)."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj

    def forward(self, *args, **kwargs):  # pragma: no cover - the graph calls the projections directly
        raise RuntimeError("DecomposedAttention is a container; the graph calls its projections")


def _projections(mha: nn.MultiheadAttention) -> DecomposedAttention:
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:]
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b = mha.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
    out = mha.out_proj
    return DecomposedAttention(_linear(wq, bq), _linear(wk, bk), _linear(wv, bv), _linear(out.weight, out.bias))


def decompose_multihead_attention(program: Program, node: fx.Node) -> None:
    """Replace ``node`` (a call of nn.MultiheadAttention) by explicit projections + SDPA, in place.

    The caller checks :func:`why_not_decomposable` first, recompiles and re-propagates metadata after.
    The submodule at the node's target becomes a :class:`DecomposedAttention` with q/k/v/out projections.
    """
    target = str(node.target)
    mha = program.module.get_submodule(target)
    heads, head_dim = mha.num_heads, mha.head_dim
    args = _call_args(node)
    container = _projections(mha)
    owner, _, name = target.rpartition(".")
    setattr(program.module.get_submodule(owner) if owner else program.module, name, container)
    graph = program.graph
    with graph.inserting_before(node):
        def heads_of(x: fx.Node, proj: str) -> fx.Node:
            if not mha.batch_first:
                x = graph.call_method("transpose", (x, 0, 1))
            y = graph.call_module(f"{target}.{proj}", (x,))
            y = graph.call_method("unflatten", (y, -1, (heads, head_dim)))
            return graph.call_method("transpose", (y, 1, 2))

        q = heads_of(args["query"], "q_proj")
        k = heads_of(args["key"], "k_proj")
        v = heads_of(args["value"], "v_proj")
        o = graph.call_function(F.scaled_dot_product_attention, (q, k, v))
        o = graph.call_method("transpose", (o, 1, 2))
        o = graph.call_method("flatten", (o, 2))
        out = graph.call_module(f"{target}.out_proj", (o,))
        if not mha.batch_first:
            out = graph.call_method("transpose", (out, 0, 1))
    for user in list(node.users):
        user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def decompose_attention(program: Program) -> tuple[int, list[str]]:
    """Decompose every nn.MultiheadAttention call of a torch-dialect program that can be; returns
    (how many were, notes naming the ones refused and why). Recompiles and re-propagates meta if it changed."""
    if program.dialect != "torch":
        return 0, []
    done, notes = 0, []
    for node in program.nodes_of(OpKind.MULTIHEAD_ATTENTION):
        why = why_not_decomposable(program, node)
        if why is not None:
            notes.append(f"%{node.name} ({node.target}): nn.MultiheadAttention kept whole: {why}")
            continue
        decompose_multihead_attention(program, node)
        done += 1
    if done:
        program.recompile()
        program.propagate_meta()
    return done, notes
