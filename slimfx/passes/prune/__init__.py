"""Pruning passes: structured channel removal (prune-channels, zero-channels) and masks kept in the IR
(prune-magnitude, prune-nm, prune-blocks, apply-masks), importance criteria and schedules."""

from slimfx.passes.prune import blocks, channels, importance, magnitude, masks, nm, schedule

__all__ = ["blocks", "channels", "importance", "magnitude", "masks", "nm", "schedule"]
