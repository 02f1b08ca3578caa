"""Post-training int8 quantization on real data: scikit-learn digits, accuracy within 0.5 points of float."""

import pytest
import torch
import torch.nn as nn

import slimfx
import slimfx.passes.quant.insert  # noqa: F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: F401
from slimfx.datasets import accuracy, load_digits, train_classifier
from slimfx.kernels import Int8Linear
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.zoo import DigitsMLP

PTQ = "quant-insert{weights=int8-per-channel,activations=int8-per-tensor},calibrate{batches=12,progress=false}"
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


def _ptq(model, train, pipeline):
    torch.manual_seed(0)
    program = slimfx.trace(model, (train.x[:32],))
    calib = [x for x, _ in train.batches(64, torch.Generator().manual_seed(1))][:12]
    return slimfx.run_pipeline(set_calibration_data(program, calib), pipeline)


@pytest.mark.parametrize("image", [True, False], ids=["cnn", "mlp"])
def test_int8_ptq_keeps_digits_accuracy(image):
    train, test = load_digits(image=image)
    torch.manual_seed(0)
    model = SmallDigitsCNN() if image else DigitsMLP()
    train_classifier(model, train, epochs=3 if image else 15)
    float_acc = accuracy(model, test)
    assert float_acc > 90
    pipeline = PTQ if image else PTQ + ",lower-int8"
    quantized = _ptq(model, train, "fold-bn," + pipeline if image else pipeline)
    quant_acc = accuracy(quantized.module, test)
    assert quant_acc >= float_acc - MARGIN, (float_acc, quant_acc)
    if not image:
        assert sum(isinstance(m, Int8Linear) for m in quantized.module.modules()) == 2
        simulated = _ptq(model, train, PTQ)
        assert accuracy(simulated.module, test) >= float_acc - MARGIN
