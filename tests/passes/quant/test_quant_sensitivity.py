"""Per-layer sensitivity (output SQNR with one layer quantized) and quant-keep-float."""

import math

import pytest
import torch
import torch.nn as nn

import slimfx
import slimfx.passes.quant  # noqa: F401  (registers the passes)
from slimfx.errors import PassError, PipelineError
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.passes.quant.fake_quant import fake_quant_nodes
from slimfx.passes.quant.sensitivity import layer_sensitivity, quantized_layers, sqnr_db

SPEC = "weights=int8-per-tensor,activations=int8-per-tensor"


class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _program(outlier=True):
    torch.manual_seed(0)
    model = ThreeLayers().eval()
    if outlier:
        with torch.no_grad():
            model.fc2.weight[5, 7] = 60.0  # per-tensor int8: every other fc2 weight rounds to ~0 ...
            model.fc1.weight[7] = 0.0  # ... while the outlier itself reads a dead unit (relu(-1) = 0)
            model.fc1.bias[7] = -1.0
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 16, generator=g) for _ in range(4)]
    return set_calibration_data(slimfx.trace(model, (batches[0],)), batches), batches


def test_the_layer_with_outlier_weights_ranks_first():
    program, batches = _program()
    code = program.module.code
    ranked = layer_sensitivity(program, SPEC, batches)
    assert [name for name, _ in ranked][0] == "fc2"
    assert sorted(name for name, _ in ranked) == ["fc1", "fc2", "fc3"]
    sqnrs = dict(ranked)
    assert sqnrs["fc2"] < 10 and min(sqnrs["fc1"], sqnrs["fc3"]) > 25, ranked
    assert program.module.code == code and not fake_quant_nodes(program.module, program.graph)


def test_measuring_an_already_quantized_program_and_option_forms_agree():
    program, batches = _program()
    quantized = slimfx.run_pipeline(program, f"quant-insert{{{SPEC}}},calibrate{{progress=false}}")
    assert layer_sensitivity(quantized, batches=batches)[0][0] == "fc2"  # frozen qparams used as they are
    late = slimfx.run_pipeline(quantized, "quant-keep-float")
    assert any("before calibrate" in note for note in late.log[-1].notes)
    inserted = slimfx.run_pipeline(program, f"quant-insert{{{SPEC}}}")
    direct = layer_sensitivity(inserted, batches=batches)
    as_dict = layer_sensitivity(program, {"weights": "int8-per-tensor", "activations": "int8-per-tensor"}, batches)
    assert [n for n, _ in direct] == [n for n, _ in as_dict]
    for (_, a), (_, b) in zip(direct, as_dict):
        assert a == pytest.approx(b, rel=1e-9)


def test_quant_keep_float_removes_the_fake_quants_of_the_most_sensitive_layer():
    program, batches = _program()
    all_quantized = slimfx.run_pipeline(program, f"quant-insert{{{SPEC}}},calibrate{{progress=false}}")
    kept = slimfx.run_pipeline(program, f"quant-insert{{{SPEC}}},quant-keep-float{{k=1}},calibrate{{progress=false}}")
    assert kept.log[-2].stats["kept_float"] == ["fc2"]
    labels = [layer.label for layer in quantized_layers(kept)]
    assert labels == ["fc1", "fc3"]
    assert len(fake_quant_nodes(kept.module, kept.graph)) == 4  # fc1, fc3: weight + input each
    with torch.no_grad():
        reference = [program(b) for b in batches]
        before = sqnr_db(reference, [all_quantized(b) for b in batches])
        after = sqnr_db(reference, [kept(b) for b in batches])
    assert after > before + 15, (before, after)


def test_layers_without_error_measure_inf_and_k_larger_than_the_layers_is_noted():
    program, batches = _program(outlier=False)
    y = [torch.randn(3, 4)]
    assert math.isinf(sqnr_db(y, y)) and sqnr_db(y, [2 * y[0]]) == pytest.approx(0.0)
    out = slimfx.run_pipeline(program, f"quant-insert{{{SPEC}}},quant-keep-float{{k=5}}")
    assert not fake_quant_nodes(out.module, out.graph)
    assert any("only 3 layers" in note for note in out.log[-1].notes)


def test_errors_name_the_option_and_the_fix():
    program, batches = _program()
    with pytest.raises(PipelineError, match="'k'"):
        slimfx.run_pipeline(program, "quant-keep-float{k=-1}")
    with pytest.raises(PassError, match="quant-insert"):
        layer_sensitivity(program, None, batches)
    with pytest.raises(PipelineError, match="weights"):
        layer_sensitivity(program, "weights=int9-per-channel", batches)
