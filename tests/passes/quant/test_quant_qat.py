"""QAT: straight-through gradients, LSQ scales, BN folded with adjusted scales, int4 QAT on digits."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

import slimfx
import slimfx.passes.quant  # noqa: F401  (registers the passes)
from slimfx.datasets import accuracy, load_digits, train_classifier
from slimfx.errors import PassError
from slimfx.ir.ops import OpKind
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_nodes
from slimfx.passes.quant.qat import QATFakeQuantize
from slimfx.passes.quant.spec import fake_quantize, parse_spec
from slimfx.testing import check_contract
from slimfx.testing import strategies as sst
from slimfx.testing.models import cnns
from slimfx.zoo import DigitsMLP


def _frozen(spec_text, role, scale, zero_point=0, lsq=False):
    spec = parse_spec(spec_text, role)
    fq = FakeQuantize(spec, role=role)
    fq.scale, fq.zero_point = torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32)
    fq.frozen = True
    return QATFakeQuantize.from_fake_quantize(fq, lsq=lsq)


@pytest.mark.parametrize("lsq", [False, True])
def test_ste_gradient_is_one_inside_the_clipping_range_and_zero_outside(lsq):
    fq = _frozen("int8-per-tensor-sym", "activation", 0.1, lsq=lsq)  # range [-12.85, 12.75]
    x = torch.tensor([-20.0, -12.9, -12.8, -1.0, 0.04, 3.33, 12.7, 12.8, 20.0], requires_grad=True)
    y = fq(x)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), torch.tensor([0.1]), torch.zeros(1, dtype=torch.int32),
                                                 fq.spec))
    y.sum().backward()
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]


def test_lsq_scale_gradient_is_the_papers():
    fq = _frozen("int4-per-tensor-sym", "activation", 0.5, lsq=True)
    assert isinstance(fq.scale, nn.Parameter)
    x = torch.tensor([[-9.0, -1.2, 0.3, 2.6, 9.0]])
    fq(x).sum().backward()
    s, qmin, qmax = 0.5, -8, 7
    v = x / s
    inside = (v >= qmin - 0.5) & (v <= qmax + 0.5)
    expected = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), qmin, qmax)).sum()
    g = 1 / math.sqrt(x[0].numel() * qmax)
    torch.testing.assert_close(fq.scale.grad, (expected * g).reshape(1))


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def _conv_bn_program(weights="int8-per-channel", lsq=True):
    torch.manual_seed(0)
    model = ConvBnNet().eval()
    batches = [torch.rand(16, 1, 8, 8) for _ in range(4)]
    program = set_calibration_data(slimfx.trace(model, (batches[0],)), batches)
    pipeline = (f"quant-insert{{weights={weights}}},calibrate{{progress=false}},"
                f"qat-prepare{{lsq={str(lsq).lower()}}}")
    return slimfx.run_pipeline(program, pipeline), batches


def _train_steps(program, batches, steps=3):
    module = program.module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for step in range(steps):
        optimizer.zero_grad()
        out = module(batches[step % len(batches)])
        F.cross_entropy(out, torch.arange(len(out)) % 10).backward()
        optimizer.step()
    return module.eval()


def test_gradients_reach_weights_and_lsq_scales_and_bn_trains():
    program, batches = _conv_bn_program(lsq=True)
    fqs = fake_quant_nodes(program.module, program.graph)
    assert fqs and all(isinstance(m, QATFakeQuantize) and m.lsq for _, m in fqs)
    assert program.nodes_of(OpKind.BATCH_NORM), "QAT keeps BN until lowering"
    module = program.module.train()
    F.cross_entropy(module(batches[0]), torch.arange(16) % 10).backward()
    for name in ("conv.weight", "fc.weight", "bn.weight"):
        grad = module.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for node, fq in fqs:
        assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0, node.name
    mean_before = module.get_buffer("bn.running_mean").clone()
    _train_steps(program, batches)
    assert not torch.equal(mean_before, module.get_buffer("bn.running_mean"))


@pytest.mark.parametrize("weights", ["int8-per-channel", "int4-group8"])
@pytest.mark.parametrize("lsq", [False, True])
def test_qat_fold_bn_keeps_trained_numerics_by_scaling_the_weight_fake_quant(weights, lsq):
    program, batches = _conv_bn_program(weights, lsq)
    _train_steps(program, batches)
    with torch.no_grad():
        before = [program.module(b) for b in batches]
    report = check_contract("qat-fold-bn,qat-freeze", program, extra_inputs=[(b,) for b in batches])
    folded = report.result
    assert not folded.nodes_of(OpKind.BATCH_NORM)
    assert not any(isinstance(m, QATFakeQuantize) for m in folded.module.modules())
    with torch.no_grad():
        for b, expected in zip(batches, before):
            torch.testing.assert_close(folded.module(b), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=10, derandomize=True, deadline=None)
@given(pair=sst.programs_with_cases(cnns(), frontend="any"))
def test_qat_pipeline_is_exact_and_folds_every_bn_on_random_cnns(pair):
    program, case = pair
    report = check_contract("quant-insert,qat-prepare{lsq=true},qat-fold-bn,qat-freeze", program,
                            extra_inputs=[case.fresh_inputs(seed=1)])
    assert report.runs[2].stats["folded"] == len(program.nodes_of(OpKind.BATCH_NORM)), report.runs[2].notes


def test_qat_fold_bn_keeps_bn_after_per_tensor_weights_and_refuses_training_bn():
    program, batches = _conv_bn_program("int8-per-tensor", lsq=False)
    out = slimfx.run_pipeline(program, "qat-fold-bn")
    assert out.nodes_of(OpKind.BATCH_NORM)
    assert any("per-channel" in note for note in out.log[-1].notes)
    program.module.train()
    with pytest.raises(PassError, match="eval"):
        slimfx.run_pipeline(program, "qat-fold-bn")


def test_qat_prepare_and_freeze_are_exact_on_a_quantized_program():
    program, batches = _conv_bn_program(lsq=False)
    check_contract("qat-prepare{lsq=true},qat-freeze", program, extra_inputs=[(b,) for b in batches])


def test_trained_int8_qat_program_lowers_to_int8_kernels_within_the_bound():
    program, batches = _conv_bn_program("int8-per-channel", lsq=True)
    _train_steps(program, batches)
    report = check_contract("qat-fold-bn,qat-freeze,lower-int8", program)
    assert report.contract.value == "bounded"
    assert any(type(m).__name__ == "Int8Linear" for m in report.result.module.modules())


def test_int4_weight_qat_on_digits_is_within_one_point_of_float():
    train, test = load_digits(image=False)
    torch.manual_seed(0)
    model = train_classifier(DigitsMLP(), train, epochs=15)
    float_acc = accuracy(model, test)
    assert float_acc > 90
    calib = [x for x, _ in train.batches(64, torch.Generator().manual_seed(1))][:12]
    program = set_calibration_data(slimfx.trace(model, (train.x[:32],)), calib)
    ptq = slimfx.run_pipeline(program, "quant-insert{weights=int4-per-channel,activations=int8-per-tensor},"
                                       "calibrate{batches=12,progress=false}")
    ptq_acc = accuracy(ptq.module, test)
    qat = slimfx.run_pipeline(ptq, "qat-prepare{lsq=true}")
    train_classifier(qat.module, train, epochs=3, lr=1e-3, seed=1)
    qat_acc = accuracy(qat.module, test)
    assert qat_acc >= float_acc - 1.0, (float_acc, ptq_acc, qat_acc)
    frozen = slimfx.run_pipeline(qat, "qat-freeze")
    assert accuracy(frozen.module, test) == qat_acc
