"""prune-blocks: zero whole (bh, bw) blocks of linear weights, in the layout the BSR kernels skip.

A linear weight ``W [out, in]`` is cut into ``(bh, bw)`` blocks exactly as :mod:`slimfx.kernels.bsr` does
(rows = output features, ``bh`` rows by ``bw`` columns); the k = round(sparsity * blocks) blocks with the
smallest L2 norm are masked, so ``dense_to_bsr(masked_weight, block)`` stores 1 - sparsity of the blocks
and :class:`slimfx.kernels.modules.BlockSparseLinear` computes the masked layer while skipping the rest.
Layers whose shape is not divisible by the block are left dense with a note. On an already-masked layer
the new mask is ANDed with the old one, and blocks the old mask emptied are counted as pruned first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.prune.magnitude import smallest
from slimfx.passes.prune.masks import check_sparsity, prunable_layers, prune_entries, sparsity_stats


@dataclass
class PruneBlocksOptions:
    """block: [bh, bw] rows x columns of a block (as the BSR kernels use); sparsity: fraction of blocks to
    zero; ignore: fnmatch patterns of layers to leave dense (module path, node name or weight path)."""

    block: list[int] = field(default_factory=lambda: [32, 32])
    sparsity: float = 0.5
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.block) != 2 or any(b <= 0 for b in self.block):
            raise ValueError(
                f"option 'block' must be two positive sizes [bh, bw], got {self.block}; e.g. block=[32,32]"
            )
        check_sparsity(self.sparsity)


@register_pass
class PruneBlocks(Pass):
    """Zero the lowest-L2-norm (bh, bw) blocks of linear weights (BSR layout), with masks in the IR."""

    name = "prune-blocks"
    contract = Contract.CHANGES
    Options = PruneBlocksOptions

    def run(self, program: Program) -> PassResult:
        bh, bw = self.options.block
        candidates, notes = prunable_layers(program, (OpKind.LINEAR,), self.options.ignore)
        layers, changed = {}, False
        for candidate in candidates:
            rows, cols = candidate.weight.shape
            if rows % bh or cols % bw:
                notes.append(
                    f"kept {candidate.name}: its shape [{rows}, {cols}] is not divisible by block [{bh}, {bw}]"
                )
                continue
            drop = block_prune_set(candidate.weight, candidate.mask, (bh, bw), self.options.sparsity)
            node, did = prune_entries(program, candidate, drop)
            changed |= did
            layers[candidate.name] = node
        return PassResult(
            changed=changed, stats={"layers": len(layers), "sparsity": sparsity_stats(program, layers)}, notes=notes
        )


def block_norms(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The L2 norm of each (bh, bw) block of a ``[N, K]`` weight: a ``[N/bh, K/bw]`` float32 tensor."""
    (rows, cols), (bh, bw) = weight.shape, block
    blocks = weight.detach().float().reshape(rows // bh, bh, cols // bw, bw)
    return blocks.pow(2).sum(dim=(1, 3)).sqrt()


def block_prune_set(
    weight: torch.Tensor, mask: torch.Tensor | None, block: tuple[int, int], sparsity: float
) -> torch.Tensor:
    """Bool ``[N, K]`` marking the round(sparsity * blocks) lowest-norm blocks of ``weight * mask``."""
    effective = weight if mask is None else weight.detach() * mask
    norms = block_norms(effective, block)
    if mask is not None:  # blocks the old mask emptied rank first, whatever the dense weight holds
        emptied = ~mask.reshape(norms.shape[0], block[0], norms.shape[1], block[1]).any(dim=3).any(dim=1)
        norms = norms.masked_fill(emptied, float("-inf"))
    chosen = smallest(norms.flatten(), round(sparsity * norms.numel())).reshape(norms.shape)
    return chosen.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
