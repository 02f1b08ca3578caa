"""Comparing program outputs: the measure behind numerics contracts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in flatten_tensors(value[k])]
    return []


@dataclass(frozen=True)
class OutputDiff:
    """How far two outputs are apart: the max absolute difference and the reference's max magnitude."""

    max_abs_diff: float
    ref_scale: float
    same_structure: bool

    def within(self, rtol: float, atol: float) -> bool:
        """True when ``max_abs_diff <= atol + rtol * ref_scale`` and the structures match."""
        return self.same_structure and self.max_abs_diff <= atol + rtol * self.ref_scale


def compare_outputs(reference: Any, candidate: Any) -> OutputDiff:
    """Compare two model outputs (tensors or nested tuples of tensors)."""
    refs, cands = flatten_tensors(reference), flatten_tensors(candidate)
    if len(refs) != len(cands) or any(r.shape != c.shape for r, c in zip(refs, cands)):
        return OutputDiff(float("inf"), 0.0, False)
    diff, scale = 0.0, 0.0
    for r, c in zip(refs, cands):
        if r.numel() == 0:
            continue
        r64, c64 = r.detach().double(), c.detach().double()
        bad = ~torch.isfinite(r64)
        if not torch.equal(bad, ~torch.isfinite(c64)):
            return OutputDiff(float("inf"), 0.0, True)
        r64, c64 = r64[~bad], c64[~bad]
        if r64.numel() == 0:
            continue
        diff = max(diff, float((r64 - c64).abs().max()))
        scale = max(scale, float(r64.abs().max()))
    return OutputDiff(diff, scale, True)
