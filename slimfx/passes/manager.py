"""PassManager: parse a pipeline, run its passes, verify between them, and instrument the run.

Instruments: per-pass timing, IR dumps before/after named passes, node/parameter statistics, and a
numerics check of each pass against the previous program on the example inputs, judged by the pass's
contract (a broken contract raises ContractError naming the pass). The input program is never mutated.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from slimfx.errors import ContractError, PassError, SlimfxError, TraceError
from slimfx.ir.numerics import compare_outputs
from slimfx.ir.program import PassRecord, Program
from slimfx.ir.verify import verify
from slimfx.passes.analysis import META, invalidate
from slimfx.passes.base import Contract, Pass, PassResult
from slimfx.passes.pipeline import Pipeline


@dataclass
class PassRun:
    """The record of one pass execution."""

    name: str
    text: str
    contract: str
    seconds: float
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    bound: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _selected(names: Iterable[str] | str | bool | None) -> set[str] | bool:
    if names is True or names == "all":
        return True
    if not names:
        return set()
    if isinstance(names, str):
        return {n.strip() for n in names.split(",") if n.strip()}
    return set(names)


class PassManager:
    """Runs a pipeline over a Program.

    verify_each: run verify() after every pass (default on). Off, a pass that keeps the shape metadata up to
        date itself (``preserves`` meta, e.g. prune-channels) is not re-run on fake tensors afterwards: a pass
        that broke the program is then noticed when the program runs (check_numerics, or the caller).
    check_numerics: compare each pass's outputs with the previous program's on the example inputs and
        enforce the pass's contract (default on).
    dump_ir_before / dump_ir_after: pass names (or "all") whose IR is written before/after the pass, to
        ``dump_to`` (a text stream, default stderr, or a directory where one file per dump is written).
    progress: show a tqdm progress bar over the passes.
    """

    def __init__(
        self,
        pipeline: Pipeline | str | Iterable[Any],
        *,
        verify_each: bool = True,
        check_numerics: bool = True,
        dump_ir_before: Iterable[str] | str | bool | None = None,
        dump_ir_after: Iterable[str] | str | bool | None = None,
        dump_to: TextIO | str | Path | None = None,
        progress: bool = False,
    ):
        self.pipeline = Pipeline.coerce(pipeline)
        self.passes: list[Pass] = self.pipeline.passes()
        self.verify_each = verify_each
        self.check_numerics = check_numerics
        self.dump_before = _selected(dump_ir_before)
        self.dump_after = _selected(dump_ir_after)
        self.dump_to = dump_to
        self.progress = progress
        self.runs: list[PassRun] = []
        self._dump_count = 0

    def run(self, program: Program, *, inplace: bool = False) -> Program:
        """Run every pass on a clone of ``program`` and return the clone.

        inplace=True rewrites ``program`` itself and returns it: for a caller that owns a private program
        (compress() traced its own copy of the user's model), it saves copying the model once more.
        """
        if not inplace:
            program = program.clone()
        if program.meta_mode == "none":
            program.propagate_meta()
        reference = program(*program.example_inputs) if self.check_numerics else None
        self.runs = []
        passes = tqdm(self.passes, desc="slimfx", unit="pass") if self.progress else self.passes
        for p in passes:
            reference = self._run_one(p, program, reference)
        program.log.extend(self.runs)
        return program

    def _run_one(self, p: Pass, program: Program, reference: Any) -> Any:
        text = p.text()
        if self._wants(self.dump_before, p.name):
            self._dump(program, f"before {text}")
        nodes_before, params_before = len(program.graph.nodes), program.num_params()
        start = time.perf_counter()
        try:
            result = p.run(program) or PassResult()
        except SlimfxError:
            raise
        except Exception as exc:
            raise PassError(f"pass {p.name!r} failed: {type(exc).__name__}: {exc}") from exc
        try:
            program.recompile()
            invalidate(program, p.preserves)  # re-propagates shapes: the rewritten program must still run
        except Exception as exc:
            raise PassError(f"pass {p.name!r} left a program that no longer compiles or runs on the example "
                            f"inputs (a bug in the pass; please report it with the model): {exc}") from exc
        seconds = time.perf_counter() - start
        if self.verify_each:
            # when meta was just re-propagated, comparing it with another propagation proves nothing
            try:
                verify(program, after=p.name, check_meta=META in p.preserves or "*" in p.preserves)
            except TraceError as exc:  # the fresh propagation could not run it: the pass broke it, not the inputs
                raise PassError(f"pass {p.name!r} left a program that no longer runs on the example inputs (a bug in "
                                f"the pass; please report it with the model): {exc}") from exc
        program.provenance.append(PassRecord(p.name, p.options_dict(), text))
        run = PassRun(
            name=p.name, text=text, contract=p.contract.value, seconds=seconds,
            nodes_before=nodes_before, nodes_after=len(program.graph.nodes),
            params_before=params_before, params_after=program.num_params(),
            changed=result.changed, stats=dict(result.stats), notes=list(result.notes), bound=result.bound,
        )
        self.runs.append(run)
        if self._wants(self.dump_after, p.name):
            self._dump(program, f"after {text}")
        if reference is None:
            return None
        outputs = program(*program.example_inputs)
        diff = compare_outputs(*p.comparable_outputs(reference, outputs))
        run.max_abs_diff = diff.max_abs_diff
        _enforce_contract(p, diff, result)
        return outputs

    @staticmethod
    def _wants(selection: set[str] | bool, name: str) -> bool:
        return selection is True or (isinstance(selection, set) and name in selection)

    def _dump(self, program: Program, title: str) -> None:
        text = f"// ----- IR {title} -----\n{program}\n"
        target = self.dump_to
        if target is None:
            sys.stderr.write(text)
        elif isinstance(target, (str, Path)):
            folder = Path(target)
            folder.mkdir(parents=True, exist_ok=True)
            self._dump_count += 1
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in title)[:80]
            (folder / f"{self._dump_count:03d}-{safe}.txt").write_text(text)
        else:
            target.write(text)


def _enforce_contract(p: Pass, diff: Any, result: PassResult) -> None:
    if not diff.same_structure:
        raise ContractError(f"pass {p.name!r} changed the structure of the program's outputs")
    if p.contract is Contract.EXACT:
        rtol, atol = p.tolerance
        if not diff.within(rtol, atol):
            raise ContractError(
                f"pass {p.name!r} promises exact numerics but changed the outputs by {diff.max_abs_diff:.3g} "
                f"(allowed {atol:.1e} + {rtol:.1e} x {diff.ref_scale:.3g})"
            )
    elif p.contract is Contract.BOUNDED:
        if result.bound is None:
            raise ContractError(f"pass {p.name!r} has a bounded contract but returned no bound")
        # float32 rounding of the outputs themselves is not the pass's error: allow a few ulps of scale
        if diff.max_abs_diff > result.bound * (1 + 1e-5) + 1e-6 * diff.ref_scale:
            raise ContractError(
                f"pass {p.name!r} exceeded its stated error bound: {diff.max_abs_diff:.3g} > {result.bound:.3g}"
            )


def run_pipeline(program: Program, pipeline: Pipeline | str | Iterable[Any], *, inplace: bool = False,
                 **instrument_options: Any) -> Program:
    """Run ``pipeline`` over a copy of ``program`` and return it; ``program`` is never mutated
    (unless ``inplace=True``: then the program itself is rewritten and returned, see PassManager.run).

    ``instrument_options`` are PassManager's keyword options (verify_each, check_numerics,
    dump_ir_before, dump_ir_after, dump_to, progress). The per-pass records are in ``result.log``.
    """
    return PassManager(pipeline, **instrument_options).run(program, inplace=inplace)
