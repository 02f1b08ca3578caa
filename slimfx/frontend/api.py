"""compress(): the one call a Python user makes. Traces a copy of the model, runs the pipeline with every
contract checked, optionally fine-tunes the result by distillation, and reports what each pass did.
The user's model and tensors are never mutated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from slimfx.errors import SlimfxError
from slimfx.frontend.trace import as_input_tuple, trace
from slimfx.ir.program import Program
from slimfx.passes.manager import run_pipeline
from slimfx.passes.pipeline import Pipeline


@dataclass
class Compressed:
    """What compress() returns: the runnable module, its Program, and a JSON-ready report."""

    module: nn.Module
    program: Program
    report: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *inputs: Any) -> Any:
        with torch.no_grad():
            return self.module(*inputs)


def _as_batches(data: Any) -> list[tuple]:
    if data is None:
        return []
    if isinstance(data, torch.Tensor):
        raise SlimfxError("calib_data must be an iterable of input batches (a list of tensors or tuples), "
                          "not one tensor; e.g. calib_data=[x[i:i + 64] for i in range(0, len(x), 64)]")
    return [b if isinstance(b, tuple) else (b,) for b in data]


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def compress(
    model: nn.Module,
    pipeline: Pipeline | str | Iterable[Any],
    example_inputs: Any,
    calib_data: Iterable[Any] | None = None,
    train_data: Any = None,
    teacher: nn.Module | None = None,
    frontend: str = "auto",
    distill_epochs: int = 3,
    **instrument_options: Any,
) -> Compressed:
    """Compress ``model`` with ``pipeline`` (text, Pipeline or pass objects) and return a Compressed.

    calib_data: input batches for passes that need data (calibrate, taylor importance, smooth-quant).
    train_data + teacher: after the pipeline, fine-tune the result for ``distill_epochs`` by distillation
    from ``teacher`` (e.g. the original model) on ``train_data`` (a Split or an (inputs, labels) tuple).
    instrument_options: PassManager options (verify_each, check_numerics, dump_ir_after, progress...).
    The model is never mutated (a test compares its state_dict before and after).
    """
    if not isinstance(model, nn.Module):
        raise SlimfxError(f"compress() needs a torch.nn.Module, got {type(model).__name__}")
    if (train_data is None) != (teacher is None):
        raise SlimfxError("compress(): distillation fine-tuning needs both train_data= and teacher= "
                          "(pass teacher=model to recover from the uncompressed model)")
    pipeline = Pipeline.coerce(pipeline)
    inputs = as_input_tuple(example_inputs)
    program = trace(model, inputs, frontend=frontend)
    batches = _as_batches(calib_data)
    if batches:
        program.calibration_data = batches
    result = run_pipeline(program, pipeline, **instrument_options)
    distilled = None
    if teacher is not None:
        from slimfx.passes.distill.trainer import distill

        result = distill(result, copy.deepcopy(teacher), train_data, epochs=distill_epochs,
                         progress=instrument_options.get("progress", False))
        distilled = distill_epochs
    report = {
        "pipeline": str(pipeline),
        "frontend": program.dialect,
        "params_before": program.num_params(),
        "params_after": result.num_params(),
        "state_bytes_before": _state_bytes(program.module),
        "state_bytes_after": _state_bytes(result.module),
        "distill_epochs": distilled,
        "passes": [run.as_dict() for run in result.log],
        "leaves": [leaf.qualname for leaf in program.leaves],
    }
    return Compressed(result.module, result, report)
