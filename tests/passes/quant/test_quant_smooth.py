"""smooth-quant: exact on random MLPs / attention models, the SmoothQuant scales, LN folding, outliers tamed."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
import slimfx.passes.quant  # noqa: F401  (registers the passes)
from slimfx.errors import PipelineError
from slimfx.ir.ops import OpKind
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.passes.quant.smooth import smoothing_scales
from slimfx.testing import check_contract
from slimfx.testing import strategies as sst
from slimfx.testing.models import attention_models, mlps


@settings(max_examples=25, derandomize=True, deadline=None)
@given(pair=sst.programs_with_cases(st.one_of(mlps(), attention_models()), frontend="any"),
       alpha=st.sampled_from([0.0, 0.5, 0.85]))
def test_smooth_quant_is_exact_on_random_mlps_and_attention_models(pair, alpha):
    program, case = pair
    check_contract(f"smooth-quant{{alpha={alpha}}}", program, extra_inputs=[case.fresh_inputs(seed=1)])


class LnMlp(nn.Module):
    """LayerNorm feeding two linears (like q/k), then another linear reading a residual sum."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(x)
        y = self.a(h) + self.b(h)
        return self.out(y), y


def _outlier_batches(n=4, channel=3, magnitude=40.0):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        x = torch.randn(16, 8, generator=g)
        x[:, channel] *= magnitude
        batches.append(x)
    return batches


def _ln_program():
    torch.manual_seed(0)
    model = LnMlp().eval()
    with torch.no_grad():
        model.norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        model.norm.weight[3] = 30.0  # an outlier channel after the norm, as in LLMs
        model.norm.bias.uniform_(-0.5, 0.5)
    batches = _outlier_batches()
    return set_calibration_data(slimfx.trace(model, (batches[0],)), batches), batches


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_scales_follow_the_formula_and_fold_into_the_layernorm(frontend):
    program, batches = _ln_program()
    if frontend == "export":
        program = set_calibration_data(slimfx.trace(program.module, (batches[0],), frontend="export"), batches)
    report = check_contract("smooth-quant{alpha=0.5}", program, extra_inputs=[(b,) for b in batches])
    out = report.result
    assert report.runs[0].stats["folded_into_norm"] == 1 and report.runs[0].stats["scale_nodes"] == 1
    assert len(out.nodes_of(OpKind.LAYER_NORM)) == 1
    if frontend == "export":
        return
    # expected s from the float program's LN output and the stacked weight columns of a and b
    with torch.no_grad():
        model = LnMlp().eval()
        model.load_state_dict(program.module.state_dict(), strict=False)
        x_max = torch.stack([model.norm(b).abs().amax(0) for b in batches]).amax(0)
        w_max = torch.cat([model.a.weight, model.b.weight]).abs().amax(0)
    s = smoothing_scales(x_max, w_max, 0.5).float()
    state = out.module.state_dict()
    torch.testing.assert_close(state["a.weight"], model.a.weight * s, rtol=1e-6, atol=0)
    torch.testing.assert_close(state["norm.weight"], model.norm.weight / s, rtol=1e-6, atol=0)
    # the activation's channels are balanced: max|X_j / s_j| = sqrt(max|X_j| * max|W_j|)
    smoothed_max = x_max / s
    torch.testing.assert_close(smoothed_max, (x_max * w_max).sqrt(), rtol=1e-5, atol=1e-6)


def test_smoothing_reduces_int8_per_tensor_activation_error():
    program, batches = _ln_program()
    quant = "quant-insert{weights=int8-per-channel,activations=int8-per-tensor},calibrate{progress=false}"
    plain = slimfx.run_pipeline(program, quant)
    smoothed = slimfx.run_pipeline(program, "smooth-quant{alpha=0.5}," + quant)

    def error(p):
        return sum(float((program(b)[0] - p(b)[0]).pow(2).sum()) for b in batches)

    assert error(smoothed) < 0.5 * error(plain), (error(smoothed), error(plain))


def test_without_calibration_data_the_example_inputs_are_used_and_noted():
    program, batches = _ln_program()
    program.calibration_data = None
    out = slimfx.run_pipeline(program, "smooth-quant")
    assert any("example inputs" in note for note in out.log[-1].notes)


def test_after_quant_insert_it_leaves_fake_quantized_linears_alone():
    program, _ = _ln_program()
    out = slimfx.run_pipeline(program, "quant-insert,smooth-quant")
    assert not out.log[-1].changed
    assert any("before quant-insert" in note for note in out.log[-1].notes)


def test_alpha_out_of_range_is_an_error_naming_the_option():
    program, _ = _ln_program()
    with pytest.raises(PipelineError, match="alpha"):
        slimfx.run_pipeline(program, "smooth-quant{alpha=1.5}")
