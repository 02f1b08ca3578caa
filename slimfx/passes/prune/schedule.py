"""Gradual pruning: the cubic sparsity schedule of Zhu & Gupta (2017) and a prune / fine-tune loop.

Zhu & Gupta, "To prune, or not to prune" (arXiv:1710.01878), raise sparsity from s_i to s_f over n
pruning steps Δt apart, starting at step t0::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * Δt)) ** 3      for t in {t0, t0 + Δt, ..., t0 + n Δt}

pruning fast while many redundant weights remain and slowly near the end. Between pruning steps the
sparsity holds; before t0 it is s_i and after t0 + n Δt it is s_f. :func:`gradual_prune` runs a pruning
pipeline at each pruning step with that sparsity and lets the caller fine-tune in between. Since masks
are in the IR and are ANDed on re-pruning, weights pruned early stay pruned, and fine-tuning a masked
program leaves them at zero (their gradient through ``weight * mask`` is zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from slimfx.ir.program import Program
from slimfx.passes.manager import run_pipeline


def _check(initial: float, final: float, begin_step: int, end_step: int, frequency: int) -> None:
    if not (0.0 <= initial < 1.0 and 0.0 <= final < 1.0):
        raise ValueError(f"sparsities must be in [0, 1), got initial={initial}, final={final}")
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must be after begin_step ({begin_step})")
    if frequency < 1:
        raise ValueError(f"frequency must be a positive number of steps, got {frequency}")


def cubic_sparsity(
    step: int, initial: float = 0.0, final: float = 0.5, begin_step: int = 0, end_step: int = 100, frequency: int = 1
) -> float:
    """The sparsity at ``step`` under the cubic schedule (constant between pruning steps, see module doc).

    n = (end_step - begin_step) / frequency need not be an integer: the last pruning step before
    ``end_step`` uses the formula, and ``end_step`` and later give ``final``.
    """
    _check(initial, final, begin_step, end_step, frequency)
    if step <= begin_step:
        return float(initial)
    if step >= end_step:
        return float(final)
    last_pruning_step = begin_step + math.floor((step - begin_step) / frequency) * frequency
    progress = (last_pruning_step - begin_step) / (end_step - begin_step)
    # s_f + (s_i - s_f)(1 - p)^3 rearranged so that p = 0 gives s_i exactly (no rounding below it)
    return float(initial + (final - initial) * (1.0 - (1.0 - progress) ** 3))


def pruning_steps(begin_step: int, end_step: int, frequency: int) -> list[int]:
    """The steps at which the schedule prunes: t0, t0 + Δt, ... before end_step, and end_step itself."""
    steps = list(range(begin_step, end_step, frequency))
    return [*steps, end_step]


def gradual_prune(
    program: Program,
    pipeline_template: str,
    train_step_fn: Callable[[Program, int], Any] | None,
    steps: int,
    initial: float = 0.0,
    final: float = 0.5,
    begin_step: int = 0,
    end_step: int | None = None,
    frequency: int = 1,
    **run_options: Any,
) -> Program:
    """Prune gradually: at each pruning step run ``pipeline_template`` with ``{s}`` replaced by the
    scheduled sparsity (e.g. ``"prune-magnitude{sparsity={s}}"``), and call ``train_step_fn(program, step)``
    after every step to fine-tune. Returns the final program; ``program`` itself is not mutated.

    ``train_step_fn`` gets the current program each time (a pruning step returns a new copy, so an
    optimizer must be built over ``program.module.parameters()`` of the program it is given); it may be
    None to prune only. ``end_step`` defaults to ``steps - 1``. ``run_options`` go to :func:`run_pipeline`.
    """
    if "{s}" not in pipeline_template:
        raise ValueError(f"pipeline_template needs a '{{s}}' placeholder for the sparsity, got {pipeline_template!r}")
    end_step = steps - 1 if end_step is None else end_step
    _check(initial, final, begin_step, end_step, frequency)
    prune_at = set(pruning_steps(begin_step, end_step, frequency))
    current, applied = program.clone(), None
    for step in range(steps):
        sparsity = cubic_sparsity(step, initial, final, begin_step, end_step, frequency)
        if step in prune_at and sparsity > 0 and sparsity != applied:
            current = run_pipeline(current, pipeline_template.replace("{s}", f"{sparsity:.6g}"), **run_options)
            applied = sparsity
        if train_step_fn is not None:
            train_step_fn(current, step)
    return current
