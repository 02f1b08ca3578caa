"""compress(): the one call a Python user makes. Traces a copy of the model, runs the pipeline with every
contract checked, fine-tunes by distillation (a ``distill`` pass in the pipeline, or after it), and reports
what each pass did. The user's model and tensors are never mutated.
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


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off: a teacher that cannot drift."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


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
    train_data: labelled data (a Split or an (inputs, labels) tuple) for distillation. It and the teacher
    travel on the program (``program.train_data`` / ``program.teacher``) to the ``distill`` passes of the
    pipeline. ``teacher`` defaults to a frozen copy (eval mode, no gradients) of ``model`` as given, before
    any pass: the uncompressed model the compressed one should imitate. When the pipeline has no
    ``distill`` pass, the result is fine-tuned after the pipeline for ``distill_epochs`` instead (the
    behaviour of earlier versions); a pipeline with a ``distill`` pass is not fine-tuned a second time.
    instrument_options: PassManager options (verify_each, check_numerics, dump_ir_after, progress...).
    The model is never mutated (a test compares its state_dict before and after).
    """
    if not isinstance(model, nn.Module):
        raise SlimfxError(f"compress() needs a torch.nn.Module, got {type(model).__name__}")
    if teacher is not None and train_data is None:
        raise SlimfxError("compress(): teacher= is given but train_data= is not; distillation needs labelled "
                          "data: pass train_data=(inputs, labels) or a slimfx.datasets.Split")
    pipeline = Pipeline.coerce(pipeline)
    inputs = as_input_tuple(example_inputs)
    if train_data is not None and teacher is None:
        teacher = frozen_copy(model)
    program = trace(model, inputs, frontend=frontend)
    batches = _as_batches(calib_data)
    if batches:
        program.calibration_data = batches
    if train_data is not None:
        program.train_data, program.teacher = train_data, teacher
    params_before, bytes_before = program.num_params(), _state_bytes(program.module)
    # the traced program is private (trace copied the model): rewrite it in place, no second copy
    result = run_pipeline(program, pipeline, inplace=True, **instrument_options)
    distilled = None
    if train_data is not None and not any(spec.name == "distill" for spec in pipeline):
        from slimfx.passes.distill.trainer import distill

        result = distill(result, teacher, train_data, epochs=distill_epochs,
                         progress=instrument_options.get("progress", False))
        distilled = distill_epochs
    report = {
        "pipeline": str(pipeline),
        "frontend": program.dialect,
        "params_before": params_before,
        "params_after": result.num_params(),
        "state_bytes_before": bytes_before,
        "state_bytes_after": _state_bytes(result.module),
        "distill_epochs": distilled,
        "passes": [run.as_dict() for run in result.log],
        "leaves": [leaf.qualname for leaf in program.leaves],
    }
    return Compressed(result.module, result, report)
