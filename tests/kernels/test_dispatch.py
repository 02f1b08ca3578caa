"""The CPU candidates against the spec, and the dispatcher: measuring, rejecting, caching, forcing."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.errors import KernelError
from slimfx.kernels import bsr, conv_kernels, cpu_kernels, dispatch, reference
from slimfx.kernels.conv_kernels import ConvGeometry
from slimfx.kernels.cpu_kernels import INT8_TOLERANCE, ActQuant

pytestmark = pytest.mark.usefixtures("private_kernel_cache")  # tests/conftest.py


def _act(mode: str) -> ActQuant:
    if mode == "static_per_tensor_u7":
        return ActQuant("static_per_tensor", 0.08, 57, bits=7)
    if mode == "static_per_tensor_w7":
        return ActQuant("static_per_tensor", 0.04, 121, weight_bits=7)
    if mode == "dynamic_per_tensor_u8_w7":
        return ActQuant("dynamic_per_tensor", bits=8, weight_bits=7)
    if mode == "dynamic_per_token_w7":
        return ActQuant("dynamic_per_token", weight_bits=7)
    if mode == "dynamic_per_tensor_w7":
        return ActQuant("dynamic_per_tensor", weight_bits=7)
    if mode == "static_per_tensor_u7_w7":
        return ActQuant("static_per_tensor", 0.08, 57, bits=7, weight_bits=7)
    if mode == "dynamic_per_tensor_u8":
        return ActQuant("dynamic_per_tensor", bits=8)
    return ActQuant(mode, 0.04, 120) if mode == "static_per_tensor" else ActQuant(mode)


ACT_LABELS = cpu_kernels.ACT_MODES + ("static_per_tensor_u7", "static_per_tensor_w7", "dynamic_per_tensor_u8",
                                      "dynamic_per_tensor_u8_w7", "dynamic_per_tensor_w7", "static_per_tensor_u7_w7",
                                      "dynamic_per_token_w7")


def _int8_problem(m: int, n: int, k: int, seed: int, weight_bits: int = 8):
    g = torch.Generator().manual_seed(seed)
    top = 2 ** (weight_bits - 1) - 1
    w_q = torch.randint(-top, top + 1, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.05 + 1e-3
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 2
    return x, w_q, w_scale, bias


# Candidates whose numerics hold on every CPU; fbgemm's / oneDNN's 8-bit codes x 8-bit weights may saturate
# without VNNI, 7-bit codes or 7-bit weights never do.
EXACT_EVERYWHERE = {(name, label) for name in ("dense", "int_mm") for label in ACT_LABELS} | {
    ("fbgemm", "dynamic_per_tensor"), ("onednn", "dynamic_per_tensor"),
    ("fbgemm", "static_per_tensor_u7"), ("onednn", "static_per_tensor_u7"),
    ("fbgemm", "static_per_tensor_w7"), ("onednn", "static_per_tensor_w7"),
    ("onnxruntime", "static_per_tensor_u7"), ("onnxruntime", "static_per_tensor_w7"),
    ("onnxruntime", "dynamic_per_tensor"), ("onednn", "dynamic_per_tensor_u8_w7"),
    ("onnxruntime", "dynamic_per_tensor_u8_w7"),
} | {("avx2", label) for label in ACT_LABELS}  # slimfx's own kernel: exact for every code width


@settings(max_examples=20)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 80),
       mode=st.sampled_from(ACT_LABELS), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_candidates_match_spec(m, n, k, mode, with_bias, seed):
    act = _act(mode)
    x, w_q, w_scale, bias = _int8_problem(m, n, k, seed, act.weight_bits)
    bias = bias if with_bias else None
    ref = cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act)
    for name, cand in cpu_kernels.INT8_CANDIDATES.items():
        if name == "triton" or not cand.is_available() or not cand.supports(act):
            continue
        out = cand.prepare(w_q, w_scale, bias, act).run(x)
        err = cpu_kernels.relative_error(out, ref)
        if (name, mode) in EXACT_EVERYWHERE:
            assert err <= cpu_kernels.int8_tolerance(act.mode, act.bits), (name, mode, err)


def test_saturating_candidate_is_rejected_not_chosen():
    """Where oneDNN's 8-bit path is inexact (AVX2 without VNNI) the dispatcher must say so and skip it."""
    choice = dispatch.measure_int8(16, 64, 128, ActQuant("dynamic_per_token"))
    x, w_q, w_scale, bias = _int8_problem(16, 64, 128, 0)
    x[0] = 3.0  # all-max codes: the input that makes int16 pair sums saturate
    w_q[:, :2] = 127
    act = ActQuant("dynamic_per_token")
    onednn = cpu_kernels.INT8_CANDIDATES["onednn"]
    if onednn.is_available():
        err = cpu_kernels.relative_error(onednn.prepare(w_q, w_scale, bias, act).run(x),
                                         cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act))
        if err > INT8_TOLERANCE[act.mode]:
            assert "wrong numbers" in choice.rejected["onednn"]
            assert choice.choice != "onednn"
    assert choice.choice in choice.times_ms


def test_static_probe_reaches_the_top_code_and_7bit_codes_keep_fbgemm():
    """The probe for static activations must hit the largest code whatever the calibrated scale (else a
    saturating kernel would pass it); with 7-bit codes fbgemm / oneDNN are exact and stay candidates."""
    for act in (ActQuant("static_per_tensor", 0.004, 200), ActQuant("static_per_tensor", 0.3, 3, bits=7)):
        x = dispatch._probe_activation(8, 16, torch.ones(16), act=act)
        codes = cpu_kernels.quantize_activation(x, act)
        assert int((codes.values[0].int() + codes.offset).min()) == act.code_max
    act7 = ActQuant("static_per_tensor", 0.02, 30, bits=7)
    for exact in (act7, ActQuant("static_per_tensor", 0.02, 30, weight_bits=7)):  # 7-bit codes or weights
        choice = dispatch.measure_int8(64, 64, 256, exact)
        for name in ("fbgemm", "onednn", "onnxruntime"):
            if cpu_kernels.INT8_CANDIDATES[name].is_available():
                assert "wrong numbers" not in choice.rejected.get(name, ""), (exact, choice.rejected)
    act8 = ActQuant("static_per_tensor", 0.02, 30)
    choice8 = dispatch.measure_int8(64, 64, 256, act8)
    w_q, w_scale, bias = dispatch._probe_int8_weights(64, 256)
    x = dispatch._probe_activation(16, 256, w_q[0], act=act8)
    ref = cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act8)
    fbgemm = cpu_kernels.INT8_CANDIDATES["fbgemm"]
    if fbgemm.is_available() and fbgemm.supports(act8):
        err = cpu_kernels.relative_error(fbgemm.prepare(w_q, w_scale, bias, act8).run(x), ref)
        wrong = "wrong numbers" in choice8.rejected.get("fbgemm", "")
        assert wrong == (err > INT8_TOLERANCE["static_per_tensor"]), err
    assert "M64 N64 K256 float32 static_per_tensor_u7" in dispatch.int8_bucket(50, 64, 256, act7, torch.float32)
    w7 = dispatch._probe_int8_weights(64, 256, weight_bits=7)[0]
    assert int(w7.abs().max()) == 63 and int(w7[0, :2].min()) == 63  # the probe's worst case at 7 bits


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 6), o=st.integers(1, 6), size=st.integers(3, 8),
       kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]),
       depthwise=st.booleans(), act_kind=st.sampled_from(["u7", "u8", "u8_w7", "u7_w7", "weight_only"]),
       with_bias=st.booleans(),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_candidates_match_spec(n, c, o, size, kernel, stride, padding, depthwise, act_kind, with_bias,
                                    channels_last, seed):
    groups = c if depthwise else 1
    o = o * c if depthwise else o
    act = {"u7": ActQuant("static_per_tensor", 0.05, 70, bits=7), "u8": ActQuant("static_per_tensor", 0.03, 128),
           "u8_w7": ActQuant("static_per_tensor", 0.03, 127, weight_bits=7),
           "u7_w7": ActQuant("static_per_tensor", 0.05, 20, bits=7, weight_bits=7),  # the avx2 kernel's
           "weight_only": ActQuant("weight_only")}[act_kind]
    g = torch.Generator().manual_seed(seed)
    top = 2 ** (act.weight_bits - 1) - 1
    w_q = torch.randint(-top, top + 1, (o, c // groups, kernel, kernel), generator=g, dtype=torch.int8)
    w_scale = torch.rand(o, generator=g) * 0.05 + 1e-3
    bias = torch.randn(o, generator=g) if with_bias else None
    x = torch.randn(n, c, size, size, generator=g) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = ConvGeometry.of(stride, padding, 1, groups)
    ref = conv_kernels.int8_conv2d_spec(x, w_q, w_scale, bias, geometry, act)
    for name, cand in conv_kernels.CONV_CANDIDATES.items():
        if not cand.is_available() or not cand.supports(act, geometry):
            continue
        out = cand.prepare(w_q, w_scale, bias, geometry, act).run(x)
        assert conv_kernels.memory_format_of(out) == conv_kernels.memory_format_of(x) or out.shape[1] == 1
        if not (name == "onednn" and act_kind == "u8"):
            assert cpu_kernels.relative_error(out, ref) <= INT8_TOLERANCE[act.mode], (name, act_kind)


def test_conv_dispatch_rejects_saturating_kernels_caches_and_forces(monkeypatch):
    x_shape, w_shape, geometry = (2, 32, 6, 6), (8, 32, 3, 3), ConvGeometry.of(padding=1)
    act7, act8 = ActQuant("static_per_tensor", 0.05, 10, bits=7), ActQuant("static_per_tensor", 0.05, 10)
    act8_w7 = ActQuant("static_per_tensor", 0.05, 10, weight_bits=7)
    onednn = conv_kernels.CONV_CANDIDATES["onednn"]
    for act in (act7, act8, act8_w7):
        choice = dispatch.measure_conv(x_shape, w_shape, geometry, act)
        assert choice.choice in choice.times_ms and choice.family == "conv"
        if not onednn.is_available():
            continue
        w_q, w_scale, bias, _, x_check = dispatch._probe_conv(x_shape, w_shape, geometry, act, False)
        err = cpu_kernels.relative_error(onednn.prepare(w_q, w_scale, bias, geometry, act).run(x_check),
                                         conv_kernels.int8_conv2d_spec(x_check, w_q, w_scale, bias, geometry, act))
        wrong = "wrong numbers" in choice.rejected.get("onednn", "")
        assert wrong == (err > INT8_TOLERANCE[act.mode]), (act, err)
        if act is not act8:
            assert err <= INT8_TOLERANCE[act.mode]  # 7-bit codes or 7-bit weights never saturate
    first = dispatch.select_conv_kernel(x_shape, w_shape, geometry, act7)
    key = next(k for k in json.loads(dispatch.cache_path().read_text())["entries"] if k.startswith("conv"))
    assert "N2 C32 H6 W6 O8 k3x3 s1x1 p1x1 d1x1 g1 float32 nchw static_per_tensor_u7" in key
    dispatch.clear_memory_cache()
    monkeypatch.setattr(dispatch, "measure_conv", lambda *a, **k: (_ for _ in ()).throw(AssertionError("cached")))
    assert dispatch.select_conv_kernel((2, 32, 6, 6), w_shape, geometry, act7) == first
    monkeypatch.setenv("SLIMFX_KERNEL", "conv:dense_channels_last")
    assert dispatch.select_conv_kernel(x_shape, w_shape, geometry, act8) == "dense_channels_last"
    assert dispatch.select_conv_kernel(x_shape, w_shape, geometry, act8, device="cuda") == "dense_channels_last"
    monkeypatch.setenv("SLIMFX_KERNEL", "conv:onednn")
    with pytest.raises(KernelError, match="does not implement activation mode 'weight_only'"):
        dispatch.select_conv_kernel(x_shape, w_shape, geometry, ActQuant("weight_only"))
    with pytest.raises(KernelError, match="'onednn' is a CPU kernel"):
        dispatch.select_conv_kernel(x_shape, w_shape, geometry, act7, device="cuda")
    monkeypatch.delenv("SLIMFX_KERNEL")
    assert dispatch.select_conv_kernel(x_shape, w_shape, geometry, act7, device="cuda") == "dense"


@settings(max_examples=15)
@given(m=st.integers(1, 24), n=st.integers(1, 40), k=st.integers(1, 40), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_per_token_spec_is_the_reference(m, n, k, with_bias, seed):
    x, w_q, w_scale, bias = _int8_problem(m, n, k, seed)
    bias = bias if with_bias else None
    spec = cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, ActQuant())
    ref = reference.w8a8_linear_ref(x, w_q, w_scale, bias, out_dtype=torch.float32)
    assert cpu_kernels.relative_error(spec, ref) <= 1e-6


@settings(max_examples=20)
@given(m=st.integers(1, 16), k=st.integers(1, 64), shift=st.floats(-3, 3), spread=st.floats(1e-6, 100),
       seed=st.integers(0, 2**16))
def test_per_tensor_qparams_are_torchs(m, k, shift, spread, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * spread + shift
    scale, zp = cpu_kernels.choose_per_tensor_qparams(x)
    t_scale, t_zp = torch._choose_qparams_per_tensor(x, True)
    assert zp == t_zp
    assert scale == pytest.approx(t_scale, rel=1e-6)


@settings(max_examples=40)
@given(m=st.integers(1, 12), k=st.integers(1, 40), spread=st.floats(1e-6, 1e3), shift=st.floats(-3, 3),
       seed=st.integers(0, 2**16))
def test_8bit_dynamic_codes_are_onnx_dynamic_quantize_linear(m, k, spread, shift, seed):
    """The 8-bit dynamic per-tensor spec is ONNX DynamicQuantizeLinear as onnxruntime computes it: the same
    scale, zero point and codes (bit for bit), ties and one-sided ranges included."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * spread + shift * spread
    if seed % 4 == 0:
        x[0, 0] = 0.0 if k == 1 else x[0, 0]
        x = x.abs()  # ranges that only touch zero from one side
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in
         (("q", TensorProto.UINT8, [None, k]), ("s", TensorProto.FLOAT, []), ("z", TensorProto.UINT8, []))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, s, z = session.run(None, {"x": x.numpy()})
    act = ActQuant("dynamic_per_tensor", bits=8)
    ours = cpu_kernels.quantize_activation(x, act)
    assert (float(s), int(z)) == (float(ours.row_scale[0]), ours.zero_point)
    assert torch.equal(ours.unsigned(), torch.from_numpy(q))


@pytest.mark.parametrize("spread", [2e-4, 1e-2, 3.0])
def test_8bit_dynamic_candidates_are_exact_on_small_ranges_too(spread):
    """Every candidate of the 8-bit dynamic mode computes ONNX's codes, also for inputs whose range is under
    torch's smallest dynamic scale (6.1e-5 x 255): fbgemm, whose own qparams widen it 10x there, is not one."""
    act = ActQuant("dynamic_per_tensor", bits=8, weight_bits=7)
    assert not cpu_kernels.INT8_CANDIDATES["fbgemm"].supports(act)
    x, w_q, w_scale, bias = _int8_problem(8, 24, 64, seed=3, weight_bits=7)
    x = x * spread
    ref = cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act)
    for name, cand in cpu_kernels.INT8_CANDIDATES.items():
        if name != "triton" and cand.is_available() and cand.supports(act):
            err = cpu_kernels.relative_error(cand.prepare(w_q, w_scale, bias, act).run(x), ref)
            assert err <= cpu_kernels.int8_tolerance(act.mode, act.bits), (name, spread, err)


def test_the_8bit_dynamic_tolerance_rejects_7bit_codes():
    """A kernel that ignored act.bits (7-bit codes for the 8-bit mode) must fail the dispatcher's probe."""
    act8, act7 = ActQuant("dynamic_per_tensor", bits=8, weight_bits=7), ActQuant("dynamic_per_tensor", weight_bits=7)
    w_q, w_scale, bias = dispatch._probe_int8_weights(64, 256, weight_bits=7)
    x = dispatch._probe_activation(16, 256, w_q[0], act=act8)
    err = cpu_kernels.relative_error(cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act7),
                                     cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act8))
    assert err > cpu_kernels.int8_tolerance("dynamic_per_tensor", 8)


def test_dynamic_quantization_of_nan_or_inf_names_the_problem():
    for bits in (7, 8):
        with pytest.raises(KernelError, match="NaN or inf"):
            act = ActQuant("dynamic_per_tensor", bits=bits)
            cpu_kernels.quantize_activation(torch.tensor([[1.0, float("nan")]]), act)


def test_dynamic_per_tensor_code_widths():
    assert ActQuant("dynamic_per_tensor").bits == 7 and ActQuant("dynamic_per_tensor").label == "dynamic_per_tensor"
    assert ActQuant("dynamic_per_tensor", bits=8, weight_bits=7).label == "dynamic_per_tensor_u8_w7"
    assert ActQuant("static_per_tensor", 0.1, 3).bits == 8 and ActQuant("dynamic_per_token").bits == 8
    for bad in (dict(mode="dynamic_per_tensor", bits=6), dict(mode="dynamic_per_token", bits=7)):
        with pytest.raises(KernelError, match="bits"):
            ActQuant(**bad)
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    assert cpu_kernels.quantize_activation(x, ActQuant("dynamic_per_tensor", bits=8)).unsigned().max() == 255
    assert cpu_kernels.quantize_activation(x, ActQuant("dynamic_per_tensor")).unsigned().max() <= 128


def test_fbgemm_mode_equals_torch_ao_dynamic_linear():
    linear = torch.nn.Linear(48, 24)
    qlinear = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)[0]
    from slimfx.kernels.modules import Int8Linear

    ours = Int8Linear.from_float(linear, mode="dynamic_per_tensor", kernel="dense")
    x = torch.randn(10, 48)
    # torch.ao quantizes the weight per tensor, we per channel: the same up to weight rounding.
    assert cpu_kernels.relative_error(ours(x), qlinear(x)) < 5e-2


def _bsr_problem(m, n_blocks, k_blocks, block, density, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    keep = torch.rand(n_blocks, k_blocks, generator=g) < density
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    w = (torch.randn(n_blocks * bh, k_blocks * bw, generator=g) * mask).to(dtype)
    return (torch.randn(m, k_blocks * bw, generator=g).to(dtype), bsr.dense_to_bsr(w, block),
            torch.randn(n_blocks * bh, generator=g).to(dtype))


@settings(max_examples=25)
@given(m=st.integers(1, 33), n_blocks=st.integers(1, 5), k_blocks=st.integers(1, 5),
       block=st.sampled_from([(1, 1), (2, 4), (4, 2), (8, 8)]), density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_bsr_candidates_match_reference(m, n_blocks, k_blocks, block, density, with_bias, seed):
    x, w, bias = _bsr_problem(m, n_blocks, k_blocks, block, density, seed)
    bias = bias if with_bias else None
    ref = reference.bsr_linear_ref(x, w, bias)
    for name, cand in cpu_kernels.BSR_CANDIDATES.items():
        if name == "triton" or not cand.supports(w):
            continue
        out = cand.prepare(w, bias).run(x)
        assert cpu_kernels.relative_error(out, ref) <= cpu_kernels.BSR_TOLERANCE[torch.float32], name


@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_gemm_cut_into_small_gathers_matches_reference(monkeypatch, with_bias):
    # One row block per GEMM, and row blocks without stored blocks (bias only) next to full ones.
    monkeypatch.setattr(cpu_kernels, "GATHER_BYTES", 1)
    x, w, bias = _bsr_problem(7, 6, 5, (4, 2), 0.5, seed=3)
    w = bsr.dense_to_bsr(bsr.bsr_to_dense(w) * (torch.arange(24) >= 4).unsqueeze(1), (4, 2))
    bias = bias if with_bias else None
    counts = (w.crow_indices[1:] - w.crow_indices[:-1]).tolist()
    assert counts[0] == 0 and len(set(counts)) > 2
    prepared = cpu_kernels.BSR_CANDIDATES["grouped_gemm"].prepare(w, bias)
    assert prepared.unsort is not None  # rows are reordered by count and put back
    assert cpu_kernels.relative_error(prepared.run(x), reference.bsr_linear_ref(x, w, bias)) <= 1e-5
    assert prepared.run(x[:0]).shape == (0, 24)


@pytest.mark.parametrize("name", ["torch_bsr", "torch_csr"])
def test_torch_sparse_candidates_convert_no_indices_per_call(name):
    # int64 indices (torch's default) make torch copy them to MKL's int32 on every matmul.
    x, w, bias = _bsr_problem(8, 4, 4, (4, 4), 0.5, seed=1)
    prepared = cpu_kernels.BSR_CANDIDATES[name].prepare(w, bias)
    assert prepared.weight.crow_indices().dtype == prepared.weight.col_indices().dtype == torch.int32
    with torch.profiler.profile() as prof:
        prepared.run(x)
    ops = {event.name for event in prof.events()}
    assert "aten::_to_copy" not in ops, ops


def test_bsr_cache_entry_without_a_newer_candidate_is_measured_again(monkeypatch):
    dispatch.select_bsr_kernel(4, 16, 16, (4, 4), 0.5)
    path = dispatch.cache_path()
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    assert "grouped_gemm" in entry["times_ms"]
    # A cache written before grouped_gemm existed, which chose torch_csr.
    entry["choice"] = "torch_csr"
    entry["times_ms"] = {n: t for n, t in entry["times_ms"].items() if n != "grouped_gemm"}
    path.write_text(json.dumps(data))
    dispatch.clear_memory_cache()
    calls = []
    real = dispatch.measure_bsr
    monkeypatch.setattr(dispatch, "measure_bsr", lambda *a, **k: calls.append(a) or real(*a, **k))
    dispatch.select_bsr_kernel(4, 16, 16, (4, 4), 0.5)
    assert len(calls) == 1
    assert "grouped_gemm" in json.loads(path.read_text())["entries"][key]["times_ms"]
    dispatch.clear_memory_cache()
    dispatch.select_bsr_kernel(4, 16, 16, (4, 4), 0.5)  # the rewritten entry is complete: reused
    assert len(calls) == 1


def test_choice_is_cached_on_disk_and_reused(monkeypatch):
    act = ActQuant("dynamic_per_tensor")
    first = dispatch.select_int8_kernel(5, 32, 64, act)
    path = dispatch.cache_path()
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    assert entry["choice"] == first and entry["family"] == "int8" and "M8 N32 K64" in entry["bucket"]
    assert entry["machine"] == dispatch.machine_id()
    assert first in entry["times_ms"]

    dispatch.clear_memory_cache()

    def no_measuring(*args, **kwargs):
        raise AssertionError("must come from the disk cache")

    monkeypatch.setattr(dispatch, "measure_int8", no_measuring)
    assert dispatch.select_int8_kernel(7, 32, 64, act) == first  # same bucket: M 7 -> 8
    with pytest.raises(AssertionError, match="disk cache"):
        dispatch.select_int8_kernel(9, 32, 64, act)  # M 9 -> 16: a new bucket


def test_cached_choices_of_modes_some_candidates_lack_stand_in_a_new_process(monkeypatch):
    """A cached choice is measured again only for candidates that apply to it: fbgemm and onnxruntime do not
    implement per-token int8 nor oneDNN weight-only convs, so their absence must not void those choices."""
    per_token = ActQuant("dynamic_per_token")
    weight_only = ActQuant("weight_only")
    geometry = ConvGeometry.of(padding=1)
    dispatch.select_int8_kernel(16, 32, 64, per_token)
    dispatch.select_conv_kernel((2, 8, 6, 6), (8, 8, 3, 3), geometry, weight_only)
    measured = []
    monkeypatch.setattr(dispatch, "measure_int8", lambda *a, **k: measured.append("int8"))
    monkeypatch.setattr(dispatch, "measure_conv", lambda *a, **k: measured.append("conv"))
    dispatch.clear_memory_cache()  # a new process: only the disk cache is left
    dispatch.select_int8_kernel(16, 32, 64, per_token)
    dispatch.select_conv_kernel((2, 8, 6, 6), (8, 8, 3, 3), geometry, weight_only)
    assert measured == []


def test_memory_cache_measures_once_per_process(monkeypatch):
    calls = []
    real = dispatch.measure_bsr

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "measure_bsr", counting)
    for m in (3, 4, 4):
        dispatch.select_bsr_kernel(m, 16, 16, (4, 4), 0.5)
    assert len(calls) == 1


def test_corrupt_cache_file_is_measured_again():
    path = dispatch.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert dispatch.select_bsr_kernel(4, 16, 16, (4, 4), 0.5) in cpu_kernels.BSR_CANDIDATES
    assert json.loads(path.read_text())["version"] == dispatch.CACHE_VERSION


class _WrongButFast:
    name = "wrong"
    modes = cpu_kernels.ACT_MODES

    def is_available(self):
        return True

    def supports(self, act):
        return True

    def prepare(self, w_q, w_scale, bias, act):
        n = w_q.shape[0]

        class Run:
            def run(self, x):
                return torch.zeros(x.shape[0], n)

        return Run()


class _Broken(_WrongButFast):
    name = "broken"

    def prepare(self, w_q, w_scale, bias, act):
        raise RuntimeError("no kernel for this shape")


def test_wrong_or_failing_candidate_is_never_chosen(monkeypatch):
    monkeypatch.setitem(cpu_kernels.INT8_CANDIDATES, "wrong", _WrongButFast())
    monkeypatch.setitem(cpu_kernels.INT8_CANDIDATES, "broken", _Broken())
    choice = dispatch.measure_int8(8, 16, 32, ActQuant())
    assert choice.choice not in ("wrong", "broken")
    assert "wrong numbers" in choice.rejected["wrong"]
    assert "RuntimeError" in choice.rejected["broken"]
    text = dispatch.format_choice_table([vars(choice)])
    assert "wrong numbers" in text and f"**{choice.choice}**" in text


def test_env_var_and_argument_force_a_kernel(monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("forcing must not measure")

    monkeypatch.setattr(dispatch, "measure_int8", no_measuring)
    monkeypatch.setattr(dispatch, "measure_bsr", no_measuring)
    monkeypatch.setenv("SLIMFX_KERNEL", "int_mm")
    assert dispatch.select_int8_kernel(4, 8, 8) == "int_mm"
    assert dispatch.select_int8_kernel(4, 8, 8, kernel="dense") == "dense"  # the argument wins
    monkeypatch.setenv("SLIMFX_KERNEL", "int8:dense, bsr:torch_csr")
    assert dispatch.select_int8_kernel(4, 8, 8) == "dense"
    assert dispatch.select_bsr_kernel(4, 8, 8, (4, 4), 0.5) == "torch_csr"
    monkeypatch.setenv("SLIMFX_KERNEL", "int_m")
    with pytest.raises(KernelError, match="did you mean 'int_mm'"):
        dispatch.select_int8_kernel(4, 8, 8)
    monkeypatch.setenv("SLIMFX_KERNEL", "fbgemm")
    with pytest.raises(KernelError, match="does not implement activation mode 'dynamic_per_token'"):
        dispatch.select_int8_kernel(4, 8, 8)
    monkeypatch.setenv("SLIMFX_KERNEL", "int9:dense")
    with pytest.raises(KernelError, match="family 'int9'"):
        dispatch.select_int8_kernel(4, 8, 8)


def test_cuda_tensors_go_to_triton_and_reject_cpu_kernels(monkeypatch):
    assert dispatch.select_int8_kernel(4, 8, 8, device="cuda") == "triton"
    assert dispatch.select_bsr_kernel(4, 8, 8, (4, 4), 0.5, device="cuda") == "triton"
    with pytest.raises(KernelError, match="CUDA tensors always use 'triton'"):
        dispatch.select_int8_kernel(4, 8, 8, device="cuda", kernel="dense")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        dispatch.select_int8_kernel(4, 8, 8, kernel="triton")


def test_choice_table_lists_measured_choices():
    dispatch.select_int8_kernel(2, 16, 16, ActQuant("dynamic_per_tensor"))
    dispatch.select_bsr_kernel(2, 16, 16, (8, 8), 0.5)
    rows = dispatch.choice_table()
    assert {r["family"] for r in rows} == {"int8", "bsr"}
    text = dispatch.main_table(shapes=[(2, 16, 16)])
    assert text.startswith("CPU: ") and "| int8 | M2 N16 K16 float32 dynamic_per_token |" in text
    assert "avx2 kernel: " in text and "dynamic_per_tensor_w7" in text  # whether slimfx's own kernel is built


def test_forget_choices_drops_this_machines_entries_and_measures_again(monkeypatch):
    import json

    act = ActQuant("dynamic_per_tensor")
    dispatch.select_int8_kernel(2, 16, 16, act)
    path = dispatch.cache_path()
    data = json.loads(path.read_text())
    data["entries"]["int8 || another machine || M2 N16 K16 float32 dynamic_per_tensor"] = \
        next(iter(data["entries"].values()))
    path.write_text(json.dumps(data))
    assert dispatch.forget_choices() == 1
    left = json.loads(path.read_text())["entries"]
    assert list(left) == ["int8 || another machine || M2 N16 K16 float32 dynamic_per_tensor"]
    calls = []
    real = dispatch.measure_int8
    monkeypatch.setattr(dispatch, "measure_int8", lambda *a, **k: calls.append(a) or real(*a, **k))
    dispatch.select_int8_kernel(2, 16, 16, act)
    assert len(calls) == 1  # measured again, not read back


def test_cli_kernels_remeasure(capsys, monkeypatch):
    from slimfx.frontend.cli import main

    dispatch.select_int8_kernel(2, 16, 16, ActQuant("dynamic_per_tensor"))
    original = dispatch.main_table
    monkeypatch.setattr(dispatch, "main_table", lambda shapes=None: original(shapes=[(2, 16, 16)]))
    assert main(["kernels", "--remeasure"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 cached choices of this machine" in out and "| int8 | M2 N16 K16" in out


def test_finalists_are_retimed_alternately_so_a_load_burst_cannot_pick_the_slower_kernel():
    import time as _time

    from slimfx.kernels.dispatch import _confirm_finalists

    class Sleeper:
        def __init__(self, seconds):
            self.seconds = seconds

        def run(self, x):
            _time.sleep(self.seconds)

    # "fast" was first timed during a burst of load (50 ms for a 5 ms kernel); "slow" really takes 20 ms
    times = {"fast": 50.0, "slow": 20.0, "slower": 80.0}
    runners = {"fast": Sleeper(0.005), "slow": Sleeper(0.02), "slower": Sleeper(0.08)}
    _confirm_finalists(times, runners, torch.zeros(1))
    assert min(times, key=times.__getitem__) == "fast" and times["fast"] < 20.0
    assert times["slower"] == 80.0  # not a finalist: over FINALIST_FACTOR x the fastest first time
    # a third candidate within the factor of the fastest is a finalist too (first timed during a burst)
    times = {"a": 20.0, "b": 22.0, "c": 30.0, "d": 45.0}
    runners = {"a": Sleeper(0.02), "b": Sleeper(0.022), "c": Sleeper(0.005), "d": Sleeper(0.001)}
    _confirm_finalists(times, runners, torch.zeros(1))
    assert min(times, key=times.__getitem__) == "c" and times["d"] == 45.0
