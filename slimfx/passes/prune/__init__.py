"""Pruning passes: masks kept in the IR (prune-magnitude, prune-nm, prune-blocks, apply-masks) and schedules."""

from slimfx.passes.prune import blocks, magnitude, masks, nm, schedule

__all__ = ["blocks", "magnitude", "masks", "nm", "schedule"]
