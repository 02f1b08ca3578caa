"""lower-int8: Int8Linear replaces fake-quantized linears within the bound the pass computes."""

import math

import pytest
import torch
from hypothesis import given, settings

import slimfx
import slimfx.passes.quant.insert  # noqa: F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: F401
from slimfx.kernels import Int8Linear
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.testing import check_contract
from slimfx.testing import strategies as sst
from slimfx.zoo import DigitsMLP

PIPELINES = [
    "quant-insert,calibrate{progress=false},lower-int8",
    "quant-insert{activations=int8-per-token},lower-int8",
    "quant-insert{activations=none},lower-int8",
]


def _int8_modules(program):
    return [m for m in program.module.modules() if isinstance(m, Int8Linear)]


@pytest.mark.parametrize("pipeline", PIPELINES)
@settings(max_examples=6)
@given(pair=sst.programs_with_cases(sst.mlps(), frontend="any"))
def test_lowered_random_mlps_stay_within_the_stated_bound(pipeline, pair):
    program, case = pair
    program = program.clone()
    set_calibration_data(program, [case.fresh_inputs(seed=s) for s in range(3)])
    report = check_contract(pipeline, program)  # the manager checks the lowered outputs against the bound
    run = report.runs[-1]
    lowered = _int8_modules(report.result)
    assert run.stats.get("lowered", 0) == len(lowered)
    assert run.bound is not None and run.max_abs_diff <= run.bound * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_digits_mlp_lowers_every_linear_with_a_finite_bound(frontend):
    torch.manual_seed(0)
    model = DigitsMLP().eval()
    x = torch.rand(16, 64)
    program = set_calibration_data(slimfx.trace(model, (x,), frontend=frontend),
                                   [torch.rand(16, 64) for _ in range(4)])
    out = slimfx.run_pipeline(program, PIPELINES[0])
    run = out.log[-1]
    assert len(_int8_modules(out)) == 2 and {m.mode for m in _int8_modules(out)} == {"static_per_tensor"}
    assert math.isfinite(run.bound) and run.max_abs_diff <= run.bound
    assert "fake_quant" not in str(out) and out.num_params() == 0  # float weights are gone
    assert out.module(x).shape == (16, 10)


def test_layers_that_cannot_be_lowered_stay_and_are_noted():
    torch.manual_seed(0)
    program = slimfx.trace(DigitsMLP().eval(), (torch.rand(4, 64),))
    out = slimfx.run_pipeline(program, "quant-insert{weights=int4-group32},lower-int8")
    assert not _int8_modules(out)
    assert any("int8-per-channel-sym" in n for n in out.log[-1].notes)
    out = slimfx.run_pipeline(program, "quant-insert,lower-int8")  # activations not calibrated
    assert not _int8_modules(out) and any("calibrate" in n for n in out.log[-1].notes)
