"""prune-nm: N:M semi-structured sparsity along the reduction dim, with the masks kept in the IR.

In every group of m consecutive weights along the reduction (input) dim, the n largest |w| are kept.
A linear weight ``[out, in]`` is grouped along ``in``; a conv weight ``[out, in/groups, *kernel]`` along
its flattened dims 1.. (in_channels * kh * kw), the dim a conv lowered to a GEMM reduces over. 2:4 is
the pattern sparse tensor cores (``torch.sparse.to_sparse_semi_structured``) accelerate. Layers whose
reduction size is not a multiple of m are left dense with a note. On an already-masked layer the new
mask is ANDed with the old one, so a group never keeps more than n weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.prune.masks import prunable_layers, prune_entries, sparsity_stats


@dataclass
class PruneNMOptions:
    """n, m: keep n of every m consecutive input weights (2:4 by default); ignore: fnmatch patterns of
    layers to leave dense (module path, node name or weight path)."""

    n: int = 2
    m: int = 4
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1:
            raise ValueError(f"options 'n' and 'm' must be positive, got n={self.n}, m={self.m}; e.g. n=2,m=4")
        if self.n > self.m:
            raise ValueError(f"option 'n' ({self.n}) must not exceed 'm' ({self.m}): keep n of every m weights")


@register_pass
class PruneNM(Pass):
    """N:M sparsity (2:4 by default) along the reduction dim of linear/conv weights, with masks in the IR."""

    name = "prune-nm"
    contract = Contract.CHANGES
    Options = PruneNMOptions

    def run(self, program: Program) -> PassResult:
        n, m = self.options.n, self.options.m
        candidates, notes = prunable_layers(program, (OpKind.LINEAR, OpKind.CONV), self.options.ignore)
        layers, changed = {}, False
        for candidate in candidates:
            reduction = candidate.weight[0].numel() if candidate.weight.dim() > 1 else 0
            if reduction == 0 or reduction % m:
                notes.append(f"kept {candidate.name}: its reduction size {reduction} is not a multiple of m={m}")
                continue
            keep = nm_keep(candidate.scores(), n, m)
            node, did = prune_entries(program, candidate, ~keep)
            changed |= did
            layers[candidate.name] = node
        return PassResult(
            changed=changed, stats={"layers": len(layers), "sparsity": sparsity_stats(program, layers)}, notes=notes
        )


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool tensor of ``scores``' shape keeping the n largest of every m consecutive entries of dims 1..."""
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)
