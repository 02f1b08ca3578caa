"""check_contract: assert that a pass (or pipeline) keeps its declared numerics contract on a program."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from slimfx.errors import ContractError
from slimfx.ir.numerics import compare_outputs
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass
from slimfx.passes.manager import PassRun, run_pipeline
from slimfx.passes.pipeline import Pipeline


@dataclass
class ContractReport:
    """What check_contract measured."""

    pipeline: str
    contract: Contract
    max_abs_diff: float
    runs: list[PassRun]
    result: Program


def _as_pipeline(pass_or_pipeline: Any) -> Pipeline:
    if inspect.isclass(pass_or_pipeline) and issubclass(pass_or_pipeline, Pass):
        return Pipeline([pass_or_pipeline.name])
    if isinstance(pass_or_pipeline, Pass):
        return Pipeline([pass_or_pipeline.spec()])
    return Pipeline.coerce(pass_or_pipeline)


def _weakest(contracts: Iterable[Contract]) -> Contract:
    order = [Contract.EXACT, Contract.BOUNDED, Contract.CHANGES]
    return max(contracts, key=order.index, default=Contract.EXACT)


def _snapshot(program: Program) -> tuple[str, dict[str, torch.Tensor]]:
    return program.module.code, {k: v.detach().clone() for k, v in program.module.state_dict().items()}


def check_contract(
    pass_or_pipeline: Any, program: Program, extra_inputs: Iterable[tuple] = ()
) -> ContractReport:
    """Run the pass/pipeline on ``program`` and raise ContractError unless every promise holds.

    Checked: verify() after every pass; each pass's contract against the previous program on the example
    inputs (exact within the pass's tolerance, bounded within the bound it states, changes: output shapes
    kept); for all-exact pipelines, the end-to-end outputs on each of ``extra_inputs`` too; and that
    the input program was not mutated.
    """
    pipeline = _as_pipeline(pass_or_pipeline)
    passes = pipeline.passes()
    code_before, state_before = _snapshot(program)
    result = run_pipeline(program, pipeline, verify_each=True, check_numerics=True)
    code_after, state_after = _snapshot(program)
    if code_before != code_after or state_before.keys() != state_after.keys() or any(
        not torch.equal(state_before[k], state_after[k]) for k in state_before
    ):
        raise ContractError(f"pipeline {pipeline} mutated its input program")
    contract = _weakest(p.contract for p in passes)
    worst = max((r.max_abs_diff or 0.0 for r in result.log[-len(passes):]), default=0.0)
    if contract is Contract.EXACT:
        rtol = max((p.tolerance[0] for p in passes), default=0.0) * max(len(passes), 1)
        atol = max((p.tolerance[1] for p in passes), default=0.0) * max(len(passes), 1)
        for inputs in extra_inputs:
            diff = compare_outputs(program(*inputs), result(*inputs))
            if not diff.within(rtol, atol):
                raise ContractError(
                    f"pipeline {pipeline} is exact but changed outputs on other inputs by {diff.max_abs_diff:.3g}"
                )
            worst = max(worst, diff.max_abs_diff)
    return ContractReport(str(pipeline), contract, worst, result.log[-len(passes):], result)
