"""distill: fine-tune the program's own weights against a teacher, as one pass of a pipeline.

This is what makes "prune, then recover" and "QAT student distilled from its float teacher" one pipeline::

    prune-channels{sparsity=0.5},distill{epochs=10}
    quant-insert,calibrate,qat-prepare,distill{epochs=5},qat-freeze,lower-int8

The data and the teacher are not options (a pipeline is text): they travel on the program as
``program.train_data`` (a ``Split`` or an ``(inputs, labels)`` tuple) and ``program.teacher`` (an
``nn.Module`` or a Program, only ever run in eval mode without gradients). ``compress(..., train_data=...)``
sets both (the teacher defaults to a frozen copy of the uncompressed model); ``slimfx run --train digits``
does it from the command line; a caller of ``run_pipeline`` sets the two fields itself.

The graph is not edited: :func:`~slimfx.passes.distill.trainer.distill` trains a copy of the program and
its trained state (parameters and buffers: BatchNorm statistics, QAT scales) is loaded back into the
program's own module, so mask nodes (pruned weights get zero gradient and stay zero), fake-quant nodes and
physically pruned shapes all survive unchanged. Frozen fake-quant nodes that ``qat-prepare`` did not make
trainable are refused: their rounding has zero gradient, so nothing before them would learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slimfx.errors import PassError
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.distill.trainer import AMP_MODES, autocast_dtype, distill, labelled_tensors
from slimfx.passes.quant.fake_quant import fake_quant_nodes
from slimfx.passes.quant.qat import QATFakeQuantize


@dataclass
class DistillOptions:
    """epochs, lr (Adam), batch_size; temperature and alpha of the soft-label term (alpha * T^2 KL +
    (1 - alpha) * CE); features: none (logits only) or auto (pair the stages of student and teacher, with
    learnable adapters) weighted by feature_weight; schedule: constant | cosine lr; seed: data order and
    adapter init; amp: auto (fp16 on CUDA, off on CPU) | off | bf16 | fp16; progress: show a tqdm bar.
    """

    epochs: int = 3
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.9
    batch_size: int = 64
    features: Literal["none", "auto"] = "none"
    feature_weight: float = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    seed: int = 0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"option 'lr' must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise ValueError(f"option 'temperature' must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"option 'alpha' (weight of the soft-label term) must be in [0, 1], got {self.alpha}")
        if self.feature_weight < 0:
            raise ValueError(f"option 'feature_weight' must be >= 0, got {self.feature_weight}")
        for name, choices in (("features", ("none", "auto")), ("schedule", ("constant", "cosine")), ("amp", AMP_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"option {name!r} must be one of {'|'.join(choices)}, got {getattr(self, name)!r}")


_NO_DATA = (
    "distill: the program carries no training data. Use compress(model, pipeline, example_inputs, "
    "train_data=(inputs, labels)) (a slimfx.datasets.Split works too), `slimfx run MODEL --recipe R --train digits`, "
    "or, when running passes yourself, set program.train_data = (inputs, labels) before run_pipeline"
)
_NO_TEACHER = (
    "distill: the program has training data but no teacher. Use compress(..., train_data=..., teacher=model) "
    "(compress defaults the teacher to the uncompressed model), `slimfx run MODEL --train digits "
    "--teacher MODEL_REF`, or, when running passes yourself, set program.teacher = the float/dense model"
)


def untrainable_fake_quant(program: Program) -> list[str]:
    """Names of fake-quant nodes that quantize but pass no gradient (not prepared by qat-prepare)."""
    return [node.name for node, fq in fake_quant_nodes(program.module, program.graph)
            if not isinstance(fq, QATFakeQuantize) and (fq.frozen or fq.spec.dynamic)]


@register_pass
class Distill(Pass):
    """Fine-tune the program against program.teacher on program.train_data (knowledge distillation)."""

    name = "distill"
    contract = Contract.CHANGES
    Options = DistillOptions
    values_only = True  # trains the weights in place; slimfx.load rebuilds the structure without it

    def run(self, program: Program) -> PassResult:
        o = self.options
        if program.train_data is None:
            raise PassError(_NO_DATA)
        if program.teacher is None:
            raise PassError(_NO_TEACHER)
        inputs, labels = labelled_tensors(program.train_data, "program.train_data")
        example = program.example_inputs
        if len(example) != 1 or not isinstance(example[0], torch.Tensor):
            raise PassError(f"distill: trains programs with one tensor input; this one takes {len(example)} inputs")
        if tuple(inputs.shape[1:]) != tuple(example[0].shape[1:]):
            raise PassError(f"distill: program.train_data inputs are {list(inputs.shape)} but the program takes "
                            f"{list(example[0].shape)} (batch first): give training inputs shaped like the "
                            "example inputs")
        frozen = untrainable_fake_quant(program)
        if frozen:
            shown = ", ".join(f"%{n}" for n in frozen[:4]) + (", ..." if len(frozen) > 4 else "")
            raise PassError(
                f"distill: {len(frozen)} fake-quant node(s) ({shown}) are not trainable: their rounding has zero "
                "gradient, so the weights before them would not learn. Put qat-prepare before distill "
                "(quant-insert,calibrate,qat-prepare,distill,qat-freeze) or distill before quant-insert"
            )
        history: list[dict[str, float]] = []
        trained = distill(
            program, program.teacher, program.train_data, epochs=o.epochs, lr=o.lr, temperature=o.temperature,
            alpha=o.alpha, feature_pairs=None if o.features == "none" else o.features, seed=o.seed,
            batch_size=o.batch_size, progress=o.progress, feature_weight=o.feature_weight, schedule=o.schedule,
            history=history, amp=o.amp,
        )
        # the trainer trained a copy (taps and adapters never touch this graph; its train/eval mode is left
        # as it was, which torch.export's modules insist on): take the trained state back
        program.module.load_state_dict(trained.module.state_dict())
        first = next(program.module.parameters(), None)
        dtype = autocast_dtype(o.amp, first.device if first is not None else torch.device("cpu"))
        return PassResult(stats={
            "epochs": len(history),
            "loss_first": history[0]["loss"],
            "loss_final": history[-1]["loss"],
            "examples": len(labels),
            "amp": {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
        })
