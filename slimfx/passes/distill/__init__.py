"""Distillation: taps that expose intermediate features (distill-taps / strip-taps), adapters that map
student features onto teacher shapes, the losses, and the distill() trainer."""

from slimfx.passes.distill import adapters, losses, taps, trainer
from slimfx.passes.distill.taps import pair_stages
from slimfx.passes.distill.trainer import distill

__all__ = ["adapters", "distill", "losses", "pair_stages", "taps", "trainer"]
