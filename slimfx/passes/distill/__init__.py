"""Distillation: taps that expose intermediate features (distill-taps / strip-taps), adapters that map
student features onto teacher shapes, the losses, the distill() trainer, and the distill pass that runs it
inside a pipeline."""

from slimfx.passes.distill import adapters, distill_pass, losses, taps, trainer
from slimfx.passes.distill.taps import pair_stages
from slimfx.passes.distill.trainer import distill

__all__ = ["adapters", "distill", "distill_pass", "losses", "pair_stages", "taps", "trainer"]
