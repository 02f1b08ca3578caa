"""quant-insert and calibrate: fake-quant nodes in both dialects, configuration, errors, the scale/2 property."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from torch import fx

import slimfx
import slimfx.passes.quant.insert  # noqa: F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: F401
from slimfx.errors import PassError, PipelineError
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_nodes
from slimfx.passes.quant.spec import clip_range, expand_qparam
from slimfx.testing import check_contract
from slimfx.testing import strategies as sst


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.conv(x).flatten(1))))


def _program(frontend="fx"):
    torch.manual_seed(0)
    return slimfx.trace(Net().eval(), (torch.randn(2, 3, 4, 4),), frontend=frontend)


def _batches(program, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(t.shape, generator=g) for t in program.example_inputs) for _ in range(n)]


def _fq(program):
    return {n.target: m for n, m in fake_quant_nodes(program.module, program.graph)}


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fake_quant_nodes_show_in_the_dump_on_both_dialects(frontend):
    program = _program(frontend)
    out = slimfx.run_pipeline(program, "quant-insert")
    fqs = _fq(out)
    assert sum(m.role == "weight" for m in fqs.values()) == 3
    assert sum(m.role == "activation" for m in fqs.values()) == 3
    assert all(m.frozen for m in fqs.values() if m.role == "weight")
    assert not any(m.frozen for m in fqs.values() if m.role == "activation")
    text = str(out)
    assert "fake_quant" in text and "fq_" in text
    assert "fake_quant" not in str(program)  # the input program is untouched


def test_skip_rules_and_per_layer_overrides():
    program = _program()
    out = slimfx.run_pipeline(program, "quant-insert{skip=[conv],rules=[@linear:weights:int4-group8,"
                                       "fc2:weights:fp8-e4m3,fc2:activations:none,fc1:observer:percentile]}")
    fqs = _fq(out)
    specs = {name: str(m.spec) for name, m in fqs.items()}
    assert specs == {"fq_fc1_weight": "int4-group8", "fq_fc1_input": "int8-per-tensor",
                     "fq_fc2_weight": "fp8-e4m3"}
    assert fqs["fq_fc1_input"].observer.name == "percentile"


def test_inserting_twice_does_not_double_quantize():
    out = slimfx.run_pipeline(_program(), "quant-insert{activations=none},quant-insert{activations=none}")
    assert len(_fq(out)) == 3
    assert any("already fake-quantized" in n for n in out.log[-1].notes)


@pytest.mark.parametrize("pipeline, match", [
    ("quant-insert{weights=int8-per-chanel}", "did you mean 'int8-per-channel'"),
    ("quant-insert{observer=minmx}", "did you mean 'minmax'"),
    ("quant-insert{rules=[fc1:weight:int8-per-tensor]}", "did you mean 'weights'"),
    ("quant-insert{rules=[@lin:weights:int8-per-tensor]}", "did you mean 'linear'"),
    ("quant-insert{rules=[fc1-int8]}", "SELECTOR:ROLE:SCHEME"),
    ("quant-insert{wieghts=none}", "did you mean 'weights'"),
])
def test_bad_options_name_the_option_and_the_fix(pipeline, match):
    with pytest.raises(PipelineError, match=match):
        slimfx.run_pipeline(_program(), pipeline)


def test_calibrate_without_data_says_how_to_give_it():
    with pytest.raises(PassError, match="set_calibration_data"):
        slimfx.run_pipeline(_program(), "quant-insert,calibrate")


def test_calibration_freezes_and_per_token_conv_is_refused():
    program = set_calibration_data(_program(), _batches(_program()))
    out = slimfx.run_pipeline(program, "quant-insert{observer=mse},calibrate{batches=2,progress=false}")
    assert all(m.frozen for m in _fq(out).values())
    assert out.log[-1].stats == {"calibrated": 3, "batches": 2}
    with pytest.raises(PassError, match="per-token"):
        slimfx.run_pipeline(program, "quant-insert{activations=int8-per-token}")


def _record_fake_quant_inputs(program, inputs):
    seen = []

    class Recorder(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            module = self.fetch_attr(target)
            if isinstance(module, FakeQuantize):
                seen.append((module, args[0].detach()))
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        Recorder(program.module).run(*inputs)
    return seen


@settings(max_examples=15)
@given(pair=sst.programs_with_cases(sst.models(), frontend="any"))
def test_after_calibration_every_quantized_tensor_moves_by_at_most_half_a_step(pair):
    program, case = pair
    program = program.clone()
    set_calibration_data(program, [case.fresh_inputs(seed=s) for s in range(4)])
    report = check_contract("quant-insert{weights=int8-per-channel},calibrate{progress=false}", program)
    result = report.result
    for inputs in (case.example_inputs, case.fresh_inputs(seed=9)):
        for module, x in _record_fake_quant_inputs(result, inputs):
            scale, zp = module.qparams(x)
            lo, hi = (expand_qparam(v, x, module.spec) for v in clip_range(scale, zp, module.spec))
            inside = (x >= lo) & (x <= hi)
            err = (module(x) - x).abs()
            bound = module.error_bound(x) * (1 + 1e-5) + 1e-7
            assert (err[inside] <= bound[inside]).all(), module


@pytest.mark.parametrize("scheme", ["int4-group8", "fp8-e4m3", "int8-per-tensor-asym"])
def test_other_weight_schemes_keep_the_half_step_property(scheme):
    out = slimfx.run_pipeline(_program("export"), f"quant-insert{{weights={scheme},activations=none}}")
    for module, w in _record_fake_quant_inputs(out, out.example_inputs):
        assert ((module(w) - w).abs() <= module.error_bound(w) * (1 + 1e-5) + 1e-7).all()
