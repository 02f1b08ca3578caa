"""prune-magnitude: unstructured magnitude pruning, with the masks kept in the IR.

Each prunable linear/conv weight gets a bool mask (see :mod:`slimfx.passes.prune.masks`) that zeroes its
k smallest-importance entries: k = round(sparsity * numel) per layer (``scope=local``), or one ranking
over every prunable weight with k = round(sparsity * total) (``scope=global``, so layers end at different
sparsities). Importance is |w| (l1) or w² (l2); for unstructured pruning the two rank entries identically,
the option exists so pipelines name importance the same way for every pruning pass. On a layer that is
already masked the new mask is ANDed with the old one: pruned weights stay pruned, and the layer ends at
the larger of its old sparsity and the requested one. Ties are broken by position, so counts are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.prune.masks import (
    MASKABLE_KINDS,
    check_sparsity,
    prunable_layers,
    prune_entries,
    sparsity_stats,
)


@dataclass
class PruneMagnitudeOptions:
    """sparsity: fraction of weights to zero; scope: per layer (local) or one threshold (global);
    importance: |w| (l1) or w² (l2); ignore: fnmatch patterns of layers to leave dense (module path,
    node name or weight path); include_kinds: which layer kinds to prune (linear, conv)."""

    sparsity: float = 0.5
    scope: Literal["local", "global"] = "local"
    importance: Literal["l1", "l2"] = "l1"
    ignore: list[str] = field(default_factory=list)
    include_kinds: list[str] = field(default_factory=lambda: ["linear", "conv"])

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        unknown = [k for k in self.include_kinds if k not in MASKABLE_KINDS]
        if unknown:
            raise ValueError(
                f"option 'include_kinds' has unsupported kinds {unknown}; use a subset of {sorted(MASKABLE_KINDS)}"
            )


@register_pass
class PruneMagnitude(Pass):
    """Zero the smallest-magnitude weights of linear/conv layers (per layer or global) with masks in the IR."""

    name = "prune-magnitude"
    contract = Contract.CHANGES
    Options = PruneMagnitudeOptions

    def run(self, program: Program) -> PassResult:
        opts = self.options
        kinds = [MASKABLE_KINDS[k] for k in opts.include_kinds]
        candidates, notes = prunable_layers(program, kinds, opts.ignore)
        scores = [c.scores(opts.importance) for c in candidates]
        if opts.scope == "global":
            pruned = global_prune_sets(scores, opts.sparsity)
        else:
            pruned = [smallest(s.flatten(), round(opts.sparsity * s.numel())).reshape(s.shape) for s in scores]
        layers, changed = {}, False
        for candidate, drop in zip(candidates, pruned):
            node, did = prune_entries(program, candidate, drop)
            changed |= did
            layers[candidate.name] = node
        per_layer = sparsity_stats(program, layers)
        total = sum(c.weight.numel() for c in candidates)
        overall = sum(per_layer[c.name] * c.weight.numel() for c in candidates) / total if total else 0.0
        stats = {"layers": len(layers), "sparsity": per_layer, "overall_sparsity": round(overall, 4)}
        return PassResult(changed=changed, stats=stats, notes=notes)


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool tensor marking the ``k`` smallest entries of a 1-D ``scores`` (ties broken by position)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        chosen[torch.argsort(scores, stable=True)[:k]] = True
    return chosen


def global_prune_sets(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One ranking over all layers' scores: bool tensors (one per layer) marking the global k smallest."""
    if not scores:
        return []
    flat = torch.cat([s.flatten() for s in scores])
    chosen = smallest(flat, round(sparsity * flat.numel()))
    return [part.reshape(s.shape) for part, s in zip(chosen.split([s.numel() for s in scores]), scores)]

