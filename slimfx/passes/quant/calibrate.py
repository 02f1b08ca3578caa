"""calibrate: run calibration batches through a fake-quant program, then freeze its activation qparams.

The batches come from :func:`set_calibration_data` (``program.calibration_data``, shared by the pass
manager's copy of the program, never copied) or ``program.analyses["calibration-data"]``
when a pass is run directly on a program. A batch is a tensor (one input) or a tuple of the program's
inputs. Under torch.distributed, each rank calibrates on its own shard and the observers are synced
(all-reduced) before freezing, so every rank freezes the same qparams. Contract ``changes``: the
activations start being quantized. Afterwards every quantized tensor moves by at most ``scale / 2`` per
element inside its clipping range (see :meth:`FakeQuantize.error_bound`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from slimfx.errors import PassError
from slimfx.ir.modes import set_training
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.quant.fake_quant import fake_quant_nodes

CALIBRATION_KEY = "calibration-data"


def set_calibration_data(program: Program, batches: Iterable[Any]) -> Program:
    """Attach calibration batches to ``program`` (its copies share them) and return it.

    This records data, not an edit of the model: the program's graph and parameters are unchanged.
    """
    program.calibration_data = list(batches)
    return program


def calibration_data(program: Program) -> list[Any] | None:
    """The calibration batches attached to ``program`` (or put in its analyses), or None."""
    found = program.calibration_data
    if found is None:
        found = program.analyses.get(CALIBRATION_KEY)
    return None if found is None else list(found)


@dataclass
class CalibrateOptions:
    """batches: how many calibration batches to run (0 = all given); progress: show a tqdm bar."""

    batches: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batches < 0:
            raise ValueError(f"option 'batches' must be >= 0 (0 = all), got {self.batches}")


@register_pass
class Calibrate(Pass):
    """Run calibration batches through the fake-quant observers, sync them across ranks, freeze qparams."""

    name = "calibrate"
    contract = Contract.CHANGES
    Options = CalibrateOptions

    def run(self, program: Program) -> PassResult:
        batches = calibration_data(program)
        if not batches:
            raise PassError(
                "calibrate: no calibration data. Attach batches first: "
                "slimfx.passes.quant.calibrate.set_calibration_data(program, batches) "
                f"(or program.analyses[{CALIBRATION_KEY!r}] = batches when running the pass directly)"
            )
        if self.options.batches:
            batches = batches[: self.options.batches]
        pending = [(n, m) for n, m in fake_quant_nodes(program.module, program.graph)
                   if not m.spec.dynamic and not m.frozen]
        if not pending:
            return PassResult(changed=False, notes=["nothing to calibrate: no uncalibrated fake-quant nodes "
                                                    "(run quant-insert first)"])
        for _, module in pending:
            module.observing = True
        was_training = program.module.training
        set_training(program.module, False)
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not self.options.progress):
                    program.module(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
        finally:
            for _, module in pending:
                module.observing = False
            set_training(program.module, was_training)
        unseen = [n.name for n, m in pending if not m.observer.observed]
        if unseen:
            raise PassError(f"calibrate: fake-quant nodes {', '.join(unseen)} saw no data in "
                            f"{len(batches)} batches (is that part of the model reachable from the inputs?)")
        for _, module in pending:
            module.observer.sync()
            module.freeze()
        return PassResult(stats={"calibrated": len(pending), "batches": len(batches)})
