"""lower-int8: Int8Linear / Int8Conv2d replace fake-quantized layers within the bound the pass computes."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import slimfx
import slimfx.passes.quant.insert  # noqa: F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: F401
from slimfx.ir.layer import Layer
from slimfx.ir.ops import OpKind
from slimfx.kernels import Int8Conv2d, Int8Linear, cpu_kernels
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.passes.quant.spec import fake_quantize, parse_spec
from slimfx.testing import check_contract
from slimfx.testing import strategies as sst
from slimfx.zoo import DigitsMLP, get_model

PIPELINES = [
    "quant-insert,calibrate{progress=false},lower-int8",
    "quant-insert{activations=int7-per-tensor},calibrate{progress=false},lower-int8",
    "quant-insert{activations=int8-per-token},lower-int8",
    "quant-insert{activations=none},lower-int8",
    "quant-insert{activations=none},lower-int8{activations=dynamic-per-tensor}",
    "quant-insert{weights=int7-per-channel,activations=none},lower-int8{activations=dynamic-per-tensor-u8}",
    # 7-bit codes x 7-bit weights: what slimfx's own AVX2 kernel runs
    "quant-insert{weights=int7-per-channel,activations=int7-per-tensor},calibrate{progress=false},lower-int8",
    "quant-insert{weights=int7-per-channel,activations=none},lower-int8{activations=dynamic-per-tensor}",
]
CNN_PIPELINES = [
    "quant-insert,calibrate{progress=false},lower-int8",
    "quant-insert{activations=int7-per-tensor},calibrate{progress=false},lower-int8",
    "quant-insert{activations=none},lower-int8",
]
_U = 2.0**-24


pytestmark = pytest.mark.usefixtures("private_kernel_cache")  # tests/conftest.py


def _modules(program, cls=Int8Linear):
    return [m for m in program.module.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("pipeline", PIPELINES)
@settings(max_examples=6, deadline=None)
@given(pair=sst.programs_with_cases(sst.mlps(), frontend="any"))
def test_lowered_random_mlps_stay_within_the_stated_bound(pipeline, pair):
    program, case = pair
    program = program.clone()
    set_calibration_data(program, [case.fresh_inputs(seed=s) for s in range(3)])
    report = check_contract(pipeline, program)  # the manager checks the lowered outputs against the bound
    run = report.runs[-1]
    lowered = _modules(report.result)
    assert run.stats.get("lowered", 0) == len(lowered)
    assert run.bound is not None and run.max_abs_diff <= run.bound * (1 + 1e-5) + 1e-6


def _conv_nodes(program):
    return [n for n in program.nodes_of(OpKind.CONV)]


@pytest.mark.parametrize("pipeline", CNN_PIPELINES)
@settings(max_examples=8, deadline=None)
@given(pair=sst.programs_with_cases(sst.cnns(max_blocks=3, max_channels=16), frontend="any"))
def test_lowered_random_cnns_stay_within_the_stated_bound(pipeline, pair):
    program, case = pair
    program = program.clone()
    set_calibration_data(program, [case.fresh_inputs(seed=s) for s in range(3)])
    convs = _conv_nodes(program)
    two_d = sum(Layer(program, n).get("weight").dim() == 4 for n in convs)
    report = check_contract(pipeline, program, extra_inputs=[case.fresh_inputs(seed=7)])
    run = report.runs[-1]
    assert run.bound is not None and run.max_abs_diff <= run.bound * (1 + 1e-5) + 1e-6
    assert run.stats.get("conv", 0) == len(_modules(report.result, Int8Conv2d)) == two_d, run.notes
    assert len(_conv_nodes(report.result)) == len(convs) - two_d  # only 1-d convs stay (noted)
    assert all("1-d conv" in note for note in run.notes if note.startswith("kept"))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), lead=st.lists(st.integers(1, 4), max_size=2), k=st.integers(1, 64), n=st.integers(1, 33),
       bias=st.booleans(), kernel=st.sampled_from(["dense", "fbgemm", "onednn", "int_mm", "avx2", "auto"]),
       schemes=st.sampled_from([("int7-per-tensor", "int8-per-channel"), ("int8-per-tensor", "int7-per-channel"),
                                ("int7-per-tensor", "int7-per-channel")]),
       scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_int8_linear_on_unsaturated_schemes_equals_the_fake_quant_simulation(data, lead, k, n, bias, kernel,
                                                                             schemes, scale, seed):
    """7-bit activation codes with 8-bit weights, or 8-bit codes with 7-bit weights: the schemes whose int16
    pair sums cannot saturate on AVX2. Integer accumulation exact, epilogue within a few fp32 ulps: for
    K <= 64 the tolerance is under a quarter of one activation step times any nonzero weight, so a single
    wrongly quantized or saturated code fails the test (fbgemm quantizes the fp32 input itself). 7-bit codes
    with 7-bit weights are also what slimfx's ``avx2`` kernel runs."""
    if kernel == "avx2":
        assume(schemes == ("int7-per-tensor", "int7-per-channel")
               and cpu_kernels.INT8_CANDIDATES["avx2"].is_available())
    g = torch.Generator().manual_seed(seed)
    a_spec, w_spec = parse_spec(schemes[0], "activation"), parse_spec(schemes[1], "weight")
    zero_point = data.draw(st.integers(a_spec.qmin, a_spec.qmax), label="zero_point")
    s = torch.tensor(scale, dtype=torch.float32)
    zp = torch.tensor(zero_point, dtype=torch.int32)
    # codes across the whole range and past both ends, on the grid, at ties (x.5) and in between
    codes = torch.randint(a_spec.qmin - 3, a_spec.qmax + 4, (*lead, k), generator=g).float()
    frac = torch.tensor([-0.5, 0.0, 0.5, 0.25, -0.37])[torch.randint(0, 5, codes.shape, generator=g)]
    x = (codes - zero_point + frac) * s
    x.view(-1)[: min(2, x.numel())] = torch.tensor([(a_spec.qmax - zero_point) * scale,
                                                    (a_spec.qmin - zero_point) * scale])[: min(2, x.numel())]
    w = torch.randn(n, k, generator=g) * data.draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w_scale = (w.abs().amax(dim=1) / w_spec.qmax).clamp_min(1e-8)
    w_hat = fake_quantize(w, w_scale, torch.zeros(n, dtype=torch.int32), w_spec)
    b = torch.randn(n, generator=g) if bias else None
    x_hat = fake_quantize(x, s, zp, a_spec)
    simulated = F.linear(x_hat, w_hat, b)

    module = Int8Linear(k, n, bias, "static_per_tensor", act_scale=s, act_zero_point=zero_point - a_spec.qmin,
                        act_bits=a_spec.bits, kernel=None if kernel == "auto" else kernel)
    module.weight_int8.copy_(torch.round(w / w_scale[:, None]).to(torch.int8))
    module.weight_scale.copy_(w_scale)
    if bias:
        module.bias.copy_(b)
    y = module(x)
    exact = x_hat.double() @ w_hat.double().t() + (b.double() if bias else 0.0)
    room = 4 * _U * (x_hat.double().abs() @ w_hat.double().abs().t() + (b.double().abs() if bias else 0.0))
    assert y.shape == simulated.shape
    assert ((y.double() - exact).abs() <= room + 1e-30).all(), module.last_kernel
    assert ((simulated.double() - exact).abs() <= room + 1e-30).all()
    if module.last_kernel == "dense":
        assert torch.equal(y, simulated)  # the dense kernel is the simulation's arithmetic, bit for bit


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_digits_mlp_lowers_every_linear_with_a_finite_bound(frontend):
    torch.manual_seed(0)
    model = DigitsMLP().eval()
    x = torch.rand(16, 64)
    program = set_calibration_data(slimfx.trace(model, (x,), frontend=frontend),
                                   [torch.rand(16, 64) for _ in range(4)])
    out = slimfx.run_pipeline(program, PIPELINES[0])
    run = out.log[-1]
    assert len(_modules(out)) == 2 and {m.mode for m in _modules(out)} == {"static_per_tensor"}
    assert math.isfinite(run.bound) and run.max_abs_diff <= run.bound
    assert "fake_quant" not in str(out) and out.num_params() == 0  # float weights are gone
    assert out.module(x).shape == (16, 10)


class FunctionalConvs(nn.Module):
    """F.conv2d in the forms a model writes them: bias / no bias, groups (depthwise), stride, dilation,
    numeric / 'same' / 'valid' padding; plus a 2x2 'same' conv (uneven padding) and a Conv1d, which stay."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.w3 = nn.Parameter(torch.randn(6, 8, 2, 2) * 0.3)
        self.w4 = nn.Parameter(torch.randn(6, 6, 2, 2) * 0.3)
        self.conv1d = nn.Conv1d(6, 4, 3)

    def forward(self, x):
        y = torch.relu(F.conv2d(x, self.w1, self.b1, 1, 1))
        y = torch.relu(F.conv2d(y, self.w2, None, 1, "same", 2, 8))
        y = F.conv2d(y, self.w3, stride=(2, 1), padding="valid")
        y = F.conv2d(y, self.w4, padding="same")
        return self.conv1d(y.flatten(2))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_functional_convs_lower_with_their_geometry(frontend):
    torch.manual_seed(0)
    model = FunctionalConvs().eval()
    x = torch.randn(2, 3, 9, 10)
    program = set_calibration_data(slimfx.trace(model, (x,), frontend=frontend),
                                   [torch.randn(2, 3, 9, 10) for _ in range(3)])
    report = check_contract(PIPELINES[1], program, extra_inputs=[(torch.randn(2, 3, 9, 10),)])
    run, out = report.runs[-1], report.result
    convs = _modules(out, Int8Conv2d)
    assert [(c.geometry.stride, c.geometry.padding, c.geometry.dilation, c.geometry.groups, c.bias is not None)
            for c in convs] == [((1, 1), (1, 1), (1, 1), 1, True), ((1, 1), (2, 2), (2, 2), 8, False),
                                ((2, 1), (0, 0), (1, 1), 1, False)]
    assert {(c.mode, c.act_bits) for c in convs} == {("static_per_tensor", 7)}
    assert any("pads unevenly" in note for note in run.notes) and any("1-d conv" in note for note in run.notes)
    assert run.max_abs_diff <= run.bound and math.isfinite(run.bound)
    state = out.module.state_dict()
    assert all(state[k].dtype == torch.int8 for k in state if k.endswith("weight_int8"))
    assert sum(k.endswith("weight_int8") for k in state) == 3


def test_layers_that_cannot_be_lowered_stay_and_are_noted():
    torch.manual_seed(0)
    program = slimfx.trace(DigitsMLP().eval(), (torch.rand(4, 64),))
    out = slimfx.run_pipeline(program, "quant-insert{weights=int4-group32},lower-int8")
    assert not _modules(out)
    assert any("symmetric per-channel integer weights" in n for n in out.log[-1].notes)
    out = slimfx.run_pipeline(program, "quant-insert,lower-int8")  # activations not calibrated
    assert not _modules(out) and any("calibrate" in n for n in out.log[-1].notes)
    out = slimfx.run_pipeline(program, "quant-insert{activations=none},lower-int8{activations=keep}")
    assert not _modules(out) and any("activations=keep" in n for n in out.log[-1].notes)
    out = slimfx.run_pipeline(program, "quant-insert{weights=int4-per-channel,activations=none},"
                                       "lower-int8{activations=dynamic-per-tensor}")
    assert {(m.mode, m.act_bits) for m in _modules(out)} == {("dynamic_per_tensor", 7)}
    assert all(int(m.weight_int8.abs().max()) <= 7 for m in _modules(out))  # int4 codes, stored as int8
    out = slimfx.run_pipeline(program, "quant-insert{activations=none},lower-int8{activations=dynamic-per-tensor-u8}")
    assert {(m.mode, m.act_bits) for m in _modules(out)} == {("dynamic_per_tensor", 8)}
    assert any("8-bit activations with 8-bit weights (dynamic_per_tensor)" in n for n in out.log[-1].notes)


def test_lowered_cnn_artifact_reloads_bit_for_bit(tmp_path):
    model, inputs = get_model("digits-cnn")
    pipeline = "fold-bn,quant-insert{activations=int7-per-tensor},calibrate{progress=false},lower-int8"
    out = slimfx.compress(model, pipeline, inputs, calib_data=[torch.rand(8, 1, 8, 8) for _ in range(2)])
    assert len(_modules(out.program, Int8Conv2d)) == 4 and not out.program.nodes_of(OpKind.CONV)
    slimfx.save(out, str(tmp_path))
    back = slimfx.load(str(tmp_path), lambda: get_model("digits-cnn")[0])
    assert [(m.act_bits, m.mode) for m in _modules(back.program, Int8Conv2d)] == [(7, "static_per_tensor")] * 4
    state = back.program.module.state_dict()
    assert {str(state[k].dtype) for k in state if k.endswith("weight_int8")} == {"torch.int8"}
    fresh = torch.rand_like(inputs[0])
    assert torch.equal(out(*inputs), back(*inputs)) and torch.equal(out(fresh), back(fresh))


STATIC7 = "quant-insert{activations=int7-per-tensor},calibrate{progress=false}"


def _calibrated(model: nn.Module, x: torch.Tensor, frontend: str = "fx"):
    """``model`` traced on ``x`` with three random calibration batches of its shape."""
    return set_calibration_data(slimfx.trace(model.eval(), (x,), frontend=frontend),
                                [torch.randn_like(x) for _ in range(3)])


def _exact_conv_kernel(monkeypatch) -> bool:
    """Force oneDNN (exact in any layout; dense's F.conv2d is not) when it is there; whether it is."""
    from slimfx.kernels import conv_kernels

    if conv_kernels.CONV_CANDIDATES["onednn"].is_available():
        monkeypatch.setenv("SLIMFX_KERNEL", "conv:onednn")
        return True
    return False


#: how each dialect writes the NCHW-contiguous copy the layout rewrite inserts
_NCHW_COPY = {"fx": ".contiguous()", "export": "aten.clone.default"}


def _lowered_both_layouts(program):
    """``program`` lowered with the default channels-last layout rewrite and with ``layout=keep``."""
    return (slimfx.run_pipeline(program, STATIC7 + ",lower-int8"),
            slimfx.run_pipeline(program, STATIC7 + ",lower-int8{layout=keep}"))


class _ViewAfterConvs(nn.Module):
    """A single-channel input (ambiguous layout), a conv chain with pooling and a residual add, a ``view``
    (raises on channels-last) and a second output straight from a conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = F.max_pool2d(torch.relu(self.c2(y)) + y, 2)
        z = self.c3(y)
        return self.fc(z.view(z.shape[0], -1)), z


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_channels_last_between_int8_convs_is_exact_and_hands_back_nchw(frontend, monkeypatch):
    """lower-int8 keeps activations channels-last between int8 convs (oneDNN's layout) and hands NCHW copies to
    ``view`` and the outputs: the same values as layout=keep (on one exact kernel), outputs NCHW-contiguous."""
    exact = _exact_conv_kernel(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    channels_last, keep = _lowered_both_layouts(_calibrated(_ViewAfterConvs(), x, frontend))
    with torch.no_grad():
        got, want = channels_last.module(x), keep.module(x)
    if exact:
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, want))
    assert all(t.is_contiguous() for t in got)
    convs = _modules(channels_last, Int8Conv2d)
    assert len(convs) == 3
    assert all(c.output_memory_format == torch.channels_last for c in convs)
    # x in; z copied back for its view and for the output (the size query reads it as it is)
    assert channels_last.log[-1].stats["layout_conversions"] == 3
    code = channels_last.module.code
    assert code.count("to_channels_last(") == 1 and code.count(_NCHW_COPY[frontend]) == 2
    with torch.no_grad():  # the first conv's input has C = 1 (either layout); its output is channels-last
        first = convs[0](x.contiguous(memory_format=torch.channels_last))
        assert first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    from slimfx.passes.quant.layout import to_channels_last

    unbatched = torch.randn(3, 4, 5)
    assert to_channels_last(unbatched) is unbatched  # a 3-D conv input passes the conversion unchanged


class _LayoutTraps(nn.Module):
    """Ops whose values or results depend on the layout: GELU, average pooling, flatten(2), an in-place relu."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        y = self.act(self.c1(x))
        g = F.gelu(self.c2(y))
        return F.adaptive_avg_pool2d(g, 1).view(x.shape[0], -1), torch.flatten(g, 2)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("inplace", [False, True])
def test_channels_last_stops_before_ops_whose_values_or_views_depend_on_layout(inplace, frontend, monkeypatch):
    exact = _exact_conv_kernel(monkeypatch)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6)
    channels_last, keep = _lowered_both_layouts(_calibrated(_LayoutTraps(inplace), x, frontend))
    with torch.no_grad():
        got, want = channels_last.module(x), keep.module(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) or not exact
    assert [t.is_contiguous() for t in got] == [t.is_contiguous() for t in want]
    code = channels_last.module.code
    assert "to_channels_last(" in code  # an in-place relu on a channels-last tensor is fine
    gelu_reads = {"fx": "gelu(contiguous", "export": "gelu.default(clone_default"}[frontend]
    assert gelu_reads in code.replace(" ", "")  # GELU reads an NCHW copy


class _ViewThenInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        v = y.view(y.shape[0], -1)  # aliases y: the relu below must show in v
        torch.relu_(y)
        return v


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_in_place_write_to_a_tensor_also_read_in_nchw_keeps_the_layout(frontend):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 5)
    out = slimfx.run_pipeline(_calibrated(_ViewThenInplace(), x, frontend), STATIC7 + ",lower-int8")
    assert "to_channels_last" not in out.module.code
    assert any("writes in place to a tensor that is also read in NCHW" in n for n in out.log[-1].notes)
    with torch.no_grad():
        assert (out.module(x) >= 0).all()  # the view sees the in-place relu


class _InplaceAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        y.add_(1.0)  # its result is unused: a dead-code sweep that ignores side effects deletes it
        return y * 2


def test_lowering_keeps_in_place_ops_whose_result_is_unused():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    report = check_contract(STATIC7 + ",lower-int8", _calibrated(_InplaceAfterConv(), x))
    run = report.runs[-1]
    assert "add_" in report.result.module.code
    assert run.max_abs_diff <= run.bound * (1 + 1e-5) + 1e-6 and run.max_abs_diff < 1e-3
    assert any("in-place" in n for n in run.notes)  # and the layout rewrite stays out of its way


class _DirectChains(nn.Module):
    """Quantized layers feeding each other directly (no op between), and an in-place op between two convs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 4, 1))
        self.fc1, self.fc2 = nn.Linear(4 * 36, 16), nn.Linear(16, 5)

    def forward(self, x):
        y = self.c2(self.c1(x))
        y.clamp_(-1.0, 1.0)
        z = self.c3(y)
        return self.fc2(self.fc1(z.flatten(1)))


def test_layers_feeding_each_other_directly_lower_within_the_bound():
    """Each layer's lowering replaces its node; the next layer must read the replacement (this raised
    'used before it has been defined' for conv -> conv and linear -> linear)."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, 6)
    report = check_contract(STATIC7 + ",lower-int8", _calibrated(_DirectChains(), x))
    run = report.runs[-1]
    assert run.stats["conv"] == 3 and run.stats["linear"] == 2
    assert "clamp_" in report.result.module.code
    assert run.max_abs_diff < 1e-3
