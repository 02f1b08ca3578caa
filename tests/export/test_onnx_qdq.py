"""ONNX QDQ export: Q/DQ per fake-quant node, checker-valid files, onnxruntime agrees with the simulation.

Tolerance, with onnxruntime's graph optimizations off (each ONNX op runs as written, in fp32):
``max|ort - sim| <= 1e-5 * (1 + max|sim|)``. Q/DQ themselves are bit-identical to slimfx's arithmetic
(fp32 ``x / scale``, round half to even, saturate, ``(q - zp) * scale``); what differs is the summation
order of Gemm/Conv (MLAS vs torch's oneDNN), a few fp32 ulps. Such an ulp can in principle push a value
that sits exactly on a rounding tie of the next Q to the other side (one quantization step); the
derandomized examples here hit no such tie, and a failure prints the model to check whether one did.
With optimizations on, onnxruntime fuses Q/DQ into integer kernels (QGemm, QLinearConv) that requantize
with their own rounding: checked separately, on a fixed model with int7 weights, to stay within a few
quantization steps (with int8 weights its AVX2 u8s8 kernels saturate: ~10% error measured on 256-wide MLPs).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
import slimfx.passes.quant.insert  # noqa: F401  (registers the passes)
from slimfx.export import QDQExportError, export_qdq
from slimfx.passes.quant.calibrate import set_calibration_data
from slimfx.passes.quant.fake_quant import fake_quant_nodes
from slimfx.testing import strategies as sst

RTOL = 1e-5


def _session(path, optimize=False):
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, inputs):
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def _flat(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().numpy()]
    return [o.detach().numpy() for o in outputs]


def _quantized(program, case, pipeline):
    program = set_calibration_data(program.clone(), [case.fresh_inputs(seed=s) for s in range(3)])
    return slimfx.run_pipeline(program, pipeline)


def _op_counts(path):
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")


@settings(max_examples=20)
@given(pair=sst.programs_with_cases(st.one_of(sst.mlps(), sst.cnns()), frontend="any"),
       weights=st.sampled_from(["int8-per-channel", "int8-per-tensor", "int7-per-channel", "int4-per-channel"]),
       activations=st.sampled_from(["int8-per-tensor", "int8-per-tensor-sym"]),
       weight_observer=st.sampled_from(["minmax", "mse"]),
       activation_dtype=st.sampled_from(["uint8", "int8"]))
def test_random_models_export_to_qdq_that_onnxruntime_runs_like_the_simulation(
        tmp_path_factory, pair, weights, activations, weight_observer, activation_dtype):
    program, case = pair
    quantized = _quantized(program, case, f"quant-insert{{weights={weights},activations={activations},"
                                          f"weight_observer={weight_observer}}},calibrate{{progress=false}}")
    path = tmp_path_factory.mktemp("qdq") / "model.onnx"
    report = export_qdq(quantized, path, activation_dtype=activation_dtype)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    n_fq = len(fake_quant_nodes(quantized.module, quantized.graph))
    assert n_fq > 0
    assert _op_counts(path) == (n_fq, n_fq) == (report.quantize_linear, report.dequantize_linear)
    session = _session(path)
    for seed in (0, 1):
        inputs = case.fresh_inputs(seed=100 + seed)
        with torch.no_grad():
            sims = _flat(quantized.module(*inputs))
        for got, sim in zip(_run(session, inputs), sims, strict=True):
            assert got.shape == sim.shape
            diff = float(np.abs(got - sim).max()) if sim.size else 0.0
            assert diff <= RTOL * (1 + float(np.abs(sim).max())), (case.description, diff)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _net_program(pipeline="quant-insert,calibrate{progress=false}"):
    torch.manual_seed(0)
    program = slimfx.trace(Net().eval(), (torch.randn(4, 3, 6, 6),))
    set_calibration_data(program, [torch.randn(4, 3, 6, 6) for _ in range(4)])
    return slimfx.run_pipeline(program, pipeline)


def test_per_channel_qparams_carry_their_axis_and_types(tmp_path):
    quantized = _net_program()
    export_qdq(quantized, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    tensors = {**inits, **consts}
    for node in model.graph.node:  # the exporter deduplicates equal initializers through Identity nodes
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    seen = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        scale, zp = tensors[node.input[1]], tensors[node.input[2]]
        axis = [a.i for a in node.attribute if a.name == "axis"]
        seen.append((len(scale.dims), zp.data_type, axis))
    weights = [s for s in seen if s[1] == onnx.TensorProto.INT8]
    acts = [s for s in seen if s[1] == onnx.TensorProto.UINT8]
    assert len(weights) == 3 and all(dims == 1 and axis == [0] for dims, _, axis in weights)
    assert len(acts) == 3 and all(dims == 0 and axis == [] for dims, _, axis in acts)


def test_dynamic_batch_and_fused_onnxruntime_stays_within_a_few_steps(tmp_path):
    # int7 weights: onnxruntime's fused u8s8 kernels saturate with full 8-bit weights on CPUs without VNNI.
    quantized = _net_program("quant-insert{weights=int7-per-channel},calibrate{progress=false}")
    path = tmp_path / "m.onnx"
    export_qdq(quantized, path, dynamic_batch=True)
    x = torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        sim = quantized.module(x).numpy()
    (exact,) = _run(_session(path), (x,))
    assert np.abs(exact - sim).max() <= RTOL * (1 + np.abs(sim).max())
    # Fused integer kernels requantize on their own; a flipped step moves the output by one step of the
    # last layer's input times its weights' row L1 norm (plus the same one layer up).
    (fused,) = _run(_session(path, optimize=True), (x,))
    fc2_in = next(m for n, m in fake_quant_nodes(quantized.module, quantized.graph) if n.name == "fq_fc2_input")
    step = float(fc2_in.scale) * float(quantized.module.fc2.weight.detach().abs().sum(dim=1).max())
    assert np.abs(fused - sim).max() <= 4 * step


@pytest.mark.parametrize("pipeline, match", [
    ("quant-insert{weights=int4-group8},calibrate{progress=false}", "opset 21"),
    ("quant-insert{activations=int4-per-tensor},calibrate{progress=false}", "8-bit range"),
    ("quant-insert{weights=fp8-e4m3},calibrate{progress=false}", "float8"),
    ("quant-insert{rules=[@linear:activations:int8-per-token]},calibrate{progress=false}", "per-token"),
    ("quant-insert", "calibrate"),
    ("quant-insert,calibrate{progress=false},lower-int8", "before lower-int8"),
])
def test_schemes_without_a_qdq_form_are_refused_with_the_reason(tmp_path, pipeline, match):
    import slimfx.passes.quant.lower  # noqa: F401

    with pytest.raises(QDQExportError, match=match):
        export_qdq(_net_program(pipeline), tmp_path / "m.onnx")
