"""The end-to-end demo on scikit-learn's digits: train a teacher, distill a smaller student, prune half its
channels (with distillation fine-tuning), quantize to int8 and lower, save the artifact and reload it
bit-for-bit, print accuracy / size / latency per stage and the per-layer table of the int8 stage (against
the pruned float model it was quantized from), and plot both (stages.png, layers.png). Every number is
measured on this machine in this run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

from slimfx.datasets import Split, accuracy, load_digits, train_classifier
from slimfx.errors import SlimfxError
from slimfx.export.artifact import load, save
from slimfx.frontend.layer_report import compare_layers
from slimfx.frontend.layer_report import latency_ms as _latency_ms
from slimfx.frontend.report import plot_layers, plot_stages, render_layers
from slimfx.frontend.trace import trace
from slimfx.ir.modes import set_training
from slimfx.ir.program import Program
from slimfx.passes.distill.trainer import distill
from slimfx.passes.manager import run_pipeline
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.zoo import DigitsCNN, conv_bn_relu


class StudentCNN(nn.Module):
    """A digits CNN with a quarter of DigitsCNN's width: the distillation student."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(1, 8), conv_bn_relu(8, 16), conv_bn_relu(16, 16))
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@dataclass
class Stage:
    """One row of the demo table."""

    stage: str
    accuracy: float
    params: int
    bytes_on_disk: int
    latency_ms: float
    pipeline: str = ""


def _module(model: nn.Module | Program) -> nn.Module:
    return model.module if isinstance(model, Program) else model


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 15, warmup: int = 3) -> float:
    """Median milliseconds of ``model(x)`` without gradients, after ``warmup`` untimed calls."""
    return _latency_ms(model, (x,), repeats=repeats, warmup=warmup)


def _measure(name: str, model: nn.Module | Program, test: Split, out_dir: str, pipeline: str = "") -> Stage:
    module = set_training(_module(model), False)
    path = os.path.join(out_dir, f"{name}.safetensors")
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, path)
    params = sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers() if b.dtype == torch.int8)
    return Stage(name, accuracy(module, test), params, os.path.getsize(path),
                 latency_ms(module, test.x[:256]), pipeline)


@dataclass
class DemoResult:
    """What the demo measured: the stages, the per-layer rows of the int8 stage and the plots written."""

    stages: list[Stage]
    layers: list[dict]
    plots: list[str]


def run_demo(out_dir: str = "slimfx-demo", progress: bool = False) -> DemoResult:
    """Run every stage; write one safetensors file per stage, report.json (the stages), layers.json (the int8
    stage per layer), stages.png and layers.png to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    train, test = load_digits()
    example = (train.x[:8],)
    stages = []

    teacher = train_classifier(DigitsCNN(), train, epochs=6, seed=0)
    stages.append(_measure("teacher", teacher, test, out_dir))

    student = distill(StudentCNN(), teacher, train, epochs=8, lr=1e-2, alpha=0.9, seed=0, progress=progress)
    stages.append(_measure("distilled student", student, test, out_dir))

    # prune + recover in one pipeline: the distill pass trains against program.teacher on program.train_data
    prune_text = "prune-channels{sparsity=0.5,importance=l1},distill{epochs=4,lr=0.003,alpha=0.9,seed=1}"
    program = trace(student, example)
    program.train_data, program.teacher = train, teacher
    pruned = run_pipeline(program, prune_text, progress=progress)
    stages.append(_measure("pruned 50% + KD", pruned, test, out_dir, prune_text))

    # 7-bit activation codes: what fbgemm/oneDNN compute exactly on CPUs without VNNI (8-bit codes saturate
    # there), so the lowered linears and convs run int8 kernels instead of the dense fallback
    quant_text = "fold-bn,quant-insert{weights=int8-per-channel,activations=int7-per-tensor},calibrate,lower-int8"
    set_calibration_data(pruned, [(x,) for x, _ in train.batches(64)][:8])
    quantized = run_pipeline(pruned, quant_text, progress=progress)
    stages.append(_measure("int8 (lowered)", quantized, test, out_dir, prune_text + "," + quant_text))

    artifact = os.path.join(out_dir, "artifact")
    save(quantized, artifact)
    reloaded = load(artifact, StudentCNN)
    with torch.no_grad():
        if not torch.equal(reloaded.module(test.x), quantized.module(test.x)):
            raise SlimfxError(f"the artifact in {artifact} did not reload bit-for-bit")
    stages.append(_measure("reloaded artifact", reloaded.program, test, out_dir, quantized.pipeline_text()))

    layers = [r.as_dict() for r in compare_layers(pruned, quantized, (test.x[:256],))]
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump([asdict(s) for s in stages], f, indent=1)
    with open(os.path.join(out_dir, "layers.json"), "w") as f:
        json.dump(layers, f, indent=1)
    plots = [plot_stages([{"stage": s.stage, "params": s.params, "bytes": s.bytes_on_disk, "accuracy": s.accuracy}
                          for s in stages], os.path.join(out_dir, "stages.png"),
                         "bytes on disk (bars) and digits test accuracy (line) per stage"),
             plot_layers(layers, os.path.join(out_dir, "layers.png"),
                         "int8 stage per layer, SQNR against the pruned float model")]
    return DemoResult(stages, layers, [p for p in plots if p])


def format_table(stages: list[Stage]) -> str:
    """A terminal table of the stages with ratios to the first."""
    base = stages[0]
    lines = [f"{'stage':<24}{'accuracy':>9}{'params':>9}{'bytes':>9}{'x size':>8}{'ms/256':>8}{'x time':>8}"]
    for s in stages:
        lines.append(f"{s.stage:<24}{s.accuracy:>8.2f}%{s.params:>9,}{s.bytes_on_disk:>9,}"
                     f"{s.bytes_on_disk / base.bytes_on_disk:>8.2f}{s.latency_ms:>8.2f}"
                     f"{s.latency_ms / base.latency_ms:>8.2f}")
    return "\n".join(lines)


def main(out_dir: str = "slimfx-demo") -> int:
    start = time.perf_counter()
    result = run_demo(out_dir)
    print(format_table(result.stages))
    print(f"\n{result.stages[-2].stage} per layer, against the pruned float model (test images 0-255):")
    print(render_layers(result.layers))
    print()
    for path in result.plots:
        print(f"wrote {path}")
    print(f"files, report.json and layers.json in {out_dir}/ ({time.perf_counter() - start:.0f} s)")
    return 0
