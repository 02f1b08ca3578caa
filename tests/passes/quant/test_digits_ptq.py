"""Post-training int8 quantization on real data: scikit-learn digits, accuracy within 0.5 points of float,
for the fake-quant simulation and for the lowered int8 model (linears and convs replaced by int8 modules)."""

import functools

import pytest
import torch
import torch.nn as nn

import slimfx
import slimfx.passes.quant.insert  # noqa: F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: F401
from slimfx.datasets import accuracy, load_digits, train_classifier
from slimfx.ir.ops import OpKind
from slimfx.kernels import Int8Conv2d, Int8Linear
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.zoo import DigitsMLP

PTQ = "quant-insert{weights=WEIGHTS,activations=ACTS},calibrate{batches=12,progress=false}"
MARGIN = 0.5  # accuracy points


class SmallDigitsCNN(nn.Module):
    """A smaller DigitsCNN (conv-bn-relu x2, pool, linear) that trains in a few seconds on 2 cores."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@functools.cache
def _trained(image: bool):
    """(model, train split, test split, float accuracy), trained once per module run."""
    train, test = load_digits(image=image)
    torch.manual_seed(0)
    model = SmallDigitsCNN() if image else DigitsMLP()
    train_classifier(model, train, epochs=3 if image else 15)
    return model, train, test, accuracy(model, test)


def _ptq(model, train, pipeline):
    torch.manual_seed(0)
    program = slimfx.trace(model, (train.x[:32],))
    calib = [x for x, _ in train.batches(64, torch.Generator().manual_seed(1))][:12]
    return slimfx.run_pipeline(set_calibration_data(program, calib), pipeline)


# (weights, activations): the default; torch.ao's reduce_range; 7-bit both, what slimfx's AVX2 kernel runs fastest
SCHEMES = [("int8-per-channel", "int8-per-tensor"), ("int8-per-channel", "int7-per-tensor"),
           ("int7-per-channel", "int7-per-tensor")]


@pytest.mark.parametrize("weights,activations", SCHEMES)
@pytest.mark.parametrize("image", [True, False], ids=["cnn", "mlp"])
def test_int8_ptq_keeps_digits_accuracy_simulated_and_lowered(image, weights, activations):
    model, train, test, float_acc = _trained(image)
    assert float_acc > 90
    ptq = ("fold-bn," if image else "") + PTQ.replace("ACTS", activations).replace("WEIGHTS", weights)
    simulated = _ptq(model, train, ptq)
    lowered = _ptq(model, train, ptq + ",lower-int8")
    sim_acc, low_acc = accuracy(simulated.module, test), accuracy(lowered.module, test)
    assert sim_acc >= float_acc - MARGIN and low_acc >= float_acc - MARGIN, (float_acc, sim_acc, low_acc)
    assert abs(low_acc - sim_acc) <= 0.2, (sim_acc, low_acc)  # lowering is within its bound of the simulation

    convs = [m for m in lowered.module.modules() if isinstance(m, Int8Conv2d)]
    linears = [m for m in lowered.module.modules() if isinstance(m, Int8Linear)]
    assert (len(convs), len(linears)) == ((2, 1) if image else (0, 2))
    assert not lowered.nodes_of(OpKind.CONV, OpKind.LINEAR, OpKind.FAKE_QUANT)  # every layer replaced
    bits = 7 if activations.startswith("int7") else 8
    assert {(m.mode, m.act_bits) for m in convs + linears} == {("static_per_tensor", bits)}
    state = lowered.module.state_dict()
    weights = {k: v for k, v in state.items() if k.endswith("weight_int8")}
    assert len(weights) == len(convs) + len(linears) and {v.dtype for v in weights.values()} == {torch.int8}
    assert not any(v.is_floating_point() and v.dim() >= 2 for v in state.values())  # no float weight left
