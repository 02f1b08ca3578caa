"""slimfx's AVX2 7-bit int8 kernel (``avx2_int8.c``): its codes and outputs against the spec, its build and loader."""

from __future__ import annotations

import ctypes
import platform
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.errors import KernelError
from slimfx.kernels import conv_kernels, cpu_kernels, dispatch, native
from slimfx.kernels.conv_kernels import ConvGeometry
from slimfx.kernels.cpu_kernels import ActQuant, int8_linear_spec, relative_error
from slimfx.kernels.modules import Int8Conv2d, Int8Linear

pytestmark = pytest.mark.usefixtures("private_kernel_cache")  # tests/conftest.py

AVX2 = cpu_kernels.INT8_CANDIDATES["avx2"]
AVX2_CONV = conv_kernels.CONV_CANDIDATES["avx2"]
x86_with_compiler = (platform.machine() in ("x86_64", "AMD64") and native.compiler() is not None
                     and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
needs_kernel = pytest.mark.skipif(not x86_with_compiler, reason="needs an x86-64 AVX2 CPU and a C compiler")
#: every mode the kernel runs: 7-bit codes x 7-bit weights (its fast "narrow" path), and the "wide" path's
ACTS = {"dynamic": ActQuant("dynamic_per_tensor", weight_bits=7),
        "static": ActQuant("static_per_tensor", 0.05, 61, bits=7, weight_bits=7),
        "static_narrow": ActQuant("static_per_tensor", 0.2, 3, bits=4, weight_bits=6),
        "dynamic_w8": ActQuant("dynamic_per_tensor"),  # torch.ao's dynamic scheme as it is
        "static_u7_w8": ActQuant("static_per_tensor", 0.05, 61, bits=7),
        "static_u8_w7": ActQuant("static_per_tensor", 0.03, 128, weight_bits=7),
        "onnx_u8_w7": ActQuant("dynamic_per_tensor", bits=8, weight_bits=7),
        "per_token_w7": ActQuant("dynamic_per_token", weight_bits=7),
        # 8-bit codes x 8-bit weights (the defaults), which saturate every other int8 kernel on AVX2: "split"
        "static_u8_w8": ActQuant("static_per_tensor", 0.03, 128),
        "onnx_u8_w8": ActQuant("dynamic_per_tensor", bits=8),
        "per_token_w8": ActQuant("dynamic_per_token")}


def _problem(m, n, k, seed, top=63):
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randint(-top, top + 1, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.05 + 1e-3
    return torch.randn(m, k, generator=g) * 3, w_q, w_scale, torch.randn(n, generator=g)


@needs_kernel
def test_kernel_builds_and_is_a_candidate_on_this_machine():
    """CI runs on x86-64 with gcc: the kernel must build there, not silently drop out of the dispatcher."""
    assert native.avx2_int8_unavailable() is None
    assert AVX2.is_available()
    assert all(AVX2.supports(act) for act in ACTS.values())
    paths = {name: cpu_kernels.avx2_path(act) for name, act in ACTS.items()}
    assert {n for n, p in paths.items() if p == cpu_kernels.AVX2_NARROW} == {"dynamic", "static", "static_narrow"}
    assert {n for n, p in paths.items() if p == cpu_kernels.AVX2_SPLIT} == {"static_u8_w8", "onnx_u8_w8",
                                                                             "per_token_w8"}


@needs_kernel
@settings(max_examples=30)
@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 300), act=st.sampled_from(sorted(ACTS)),
       with_bias=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_outputs_match_the_spec(m, n, k, act, with_bias, transposed, seed):
    act = ACTS[act]
    x, w_q, w_scale, bias = _problem(m, n, k, seed, top=2 ** (act.weight_bits - 1) - 1)
    if act.mode == "dynamic_per_token" and m > 1:
        x[m // 2] *= 1e-3  # rows of very different ranges
    if transposed:  # a strided (non-contiguous) input
        x = x.t().contiguous().t()
    bias = bias if with_bias else None
    out = AVX2.prepare(w_q, w_scale, bias, act).run(x)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert relative_error(out, int8_linear_spec(x, w_q, w_scale, bias, act)) <= 1e-5


@needs_kernel
@pytest.mark.parametrize("act", sorted(ACTS))
def test_worst_case_sums_several_k_blocks_and_thread_counts(act):
    """All-top codes times the widest weights each path allows (narrow: +-64, two pair sums 2 * 2 * 127 * 64 <
    2**15; wide: one pair sum of 255 * 64 or 127 * 128; split: -128 and 127), K over three cache blocks with a
    ragged end, rows and columns off the tile sizes; any thread count, the same bits."""
    act = ACTS[act]
    m, n, k = 70, 37, 2100
    x, w_q, w_scale, bias = _problem(m, n, k, 1, top=2 ** (act.weight_bits - 1) - 1)
    x[0] = x.abs().max()  # the top code along the whole row (dynamic / per-token) / clamped to it (static)
    w_q[0] = 127 if act.weight_bits == 8 else 64
    w_q[1] = -128 if act.weight_bits == 8 else -64
    run = AVX2.prepare(w_q, w_scale, bias, act)
    ref = int8_linear_spec(x, w_q, w_scale, bias, act)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(run.run(x))
    finally:
        torch.set_num_threads(threads)
    assert relative_error(outs[0], ref) <= 1e-6
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_kernel
@settings(max_examples=40)
@given(m=st.integers(1, 9), k=st.integers(1, 70), spread=st.floats(1e-3, 1e3), shift=st.floats(-3, 3),
       static=st.booleans(), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_codes_are_the_specs_bit_for_bit(m, k, spread, shift, static, ties, seed):
    """The C quantizer (vector body and scalar tail) against the spec's codes, near-ties included."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(m, k, generator=g) - 0.5 + shift) * spread
    if static:
        act = ActQuant("static_per_tensor", max(spread / 100, 1e-3), 40, bits=7, weight_bits=7)
        scale, zp, factor, divide = act.scale, act.zero_point, act.scale, 1
    else:
        act = ACTS["dynamic"]
        scale, zp = cpu_kernels.choose_per_tensor_qparams(x)
        factor, divide = 1.0 / scale, 0
    if ties:  # exact halves of the step: round half to even decides them
        x = (torch.randint(-300, 300, (m, k), generator=g).float() + 0.5) * torch.tensor(scale, dtype=torch.float32)
        if not static:
            scale, zp = cpu_kernels.choose_per_tensor_qparams(x)
            factor = 1.0 / scale
    qa = cpu_kernels.quantize_activation(x, act)
    want = (qa.values.int() + qa.offset).to(torch.uint8)
    kp = (k + 7) // 8 * 8
    codes = torch.full((m, kp), 255, dtype=torch.uint8)
    native.avx2_int8().slimfx_quantize_u7(x.data_ptr(), m, k, k, factor, divide, zp, act.code_max,
                                          codes.data_ptr(), kp, 2)
    assert torch.equal(codes[:, :k], want)
    assert int(codes[:, k:].int().sum()) == 0  # the padding multiplies zero weights


@needs_kernel
@settings(max_examples=200)
@given(lo=st.one_of(st.floats(-1e6, 0.0), st.sampled_from([0.0, -0.0, -1e-30, -6e-5])),
       hi=st.one_of(st.floats(0.0, 1e6), st.sampled_from([0.0, 1e-30, 3e-6, 7.6e-3])))
def test_qparams_in_c_are_the_specs_bit_for_bit(lo, hi):
    """The fused kernel picks the dynamic qparams in C: torch's formula in the spec's double arithmetic,
    tiny ranges (widened) and one-sided ones included."""
    lo, hi = (float(torch.tensor(v, dtype=torch.float32)) for v in (lo, hi))  # ranges of fp32 inputs
    want = cpu_kernels.choose_per_tensor_qparams(torch.tensor([lo, hi]))
    scale, zp = ctypes.c_float(), ctypes.c_int()
    native.avx2_int8().slimfx_choose_qparams(lo, hi, 127, ctypes.byref(scale), ctypes.byref(zp))
    assert (scale.value, zp.value) == want


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("act", ["dynamic", "onnx_u8_w7"])
def test_nan_or_inf_input_raises_and_names_the_problem(bad, act):
    x, w_q, w_scale, bias = _problem(9, 8, 37, 0)
    x[5, 36] = bad  # in the scalar tail of a row
    with pytest.raises(KernelError, match="NaN or inf"):
        AVX2.prepare(w_q, w_scale, bias, ACTS[act]).run(x)
    x[5, 36], x[2, 3] = 0.0, bad  # in the vector body
    with pytest.raises(KernelError, match="NaN or inf"):
        AVX2.prepare(w_q, w_scale, bias, ACTS[act]).run(x)


@needs_kernel
def test_empty_batch():
    x, w_q, w_scale, bias = _problem(0, 8, 16, 0)
    assert AVX2.prepare(w_q, w_scale, bias, ACTS["dynamic"]).run(x).shape == (0, 8)


@needs_kernel
def test_nan_codes_are_zero_not_garbage():
    x = torch.tensor([[float("nan")] * 20 + [1.0] * 3])
    codes = torch.full((1, 24), 7, dtype=torch.uint8)
    native.avx2_int8().slimfx_quantize_u7(x.data_ptr(), 1, 23, 23, 0.5, 1, 10, 127, codes.data_ptr(), 24, 1)
    assert codes[0, :20].tolist() == [0] * 20 and codes[0, 20:23].tolist() == [12] * 3


@needs_kernel
def test_the_path_follows_the_actual_weights():
    """The module's weight_bits is a bound; the path is chosen from the weights prepared: wider ones than the
    mode's narrow / wide bound take the split path and stay exact."""
    x, w_q, w_scale, bias = _problem(5, 8, 40, 0, top=63)
    assert AVX2.prepare(w_q, w_scale, bias, ACTS["static_u8_w7"]).path == cpu_kernels.AVX2_WIDE
    w_q[0, 0] = 100
    run = AVX2.prepare(w_q, w_scale, bias, ACTS["static_u8_w7"])
    assert run.path == cpu_kernels.AVX2_SPLIT
    assert relative_error(run.run(x), int8_linear_spec(x, w_q, w_scale, bias, ACTS["static_u8_w7"])) <= 1e-6
    with pytest.raises(KernelError, match="does not run"):
        AVX2.prepare(w_q, w_scale, bias, ActQuant("weight_only"))


@needs_kernel
def test_per_token_rows_with_nan_or_inf_come_out_non_finite_like_the_spec():
    """Per-token quantization is per row: a NaN / inf row gets a non-finite scale and output row (the spec's),
    the other rows their exact values; nothing raises."""
    x, w_q, w_scale, bias = _problem(6, 8, 40, 2, top=63)
    x[1, 3], x[4, 39] = float("nan"), float("inf")
    out = AVX2.prepare(w_q, w_scale, bias, ACTS["per_token_w7"]).run(x)
    ref = int8_linear_spec(x, w_q, w_scale, bias, ACTS["per_token_w7"])
    assert not torch.isfinite(out[[1, 4]]).any()
    keep = [0, 2, 3, 5]
    assert relative_error(out[keep], ref[keep]) <= 1e-5


@needs_kernel
def test_dispatcher_weighs_it_and_modules_use_it_when_forced():
    choice = dispatch.measure_int8(64, 48, 96, ACTS["dynamic"])
    assert "avx2" in choice.times_ms, choice.rejected
    lin = torch.nn.Linear(96, 48)
    module = Int8Linear.from_float(lin, mode="dynamic_per_tensor", weight_bits=7, kernel="avx2")
    x = torch.randn(5, 3, 96)
    y = module(x)
    assert module.last_kernel == "avx2" and y.shape == (5, 3, 48)
    ref = Int8Linear.from_float(lin, mode="dynamic_per_tensor", weight_bits=7, kernel="dense")(x)
    assert relative_error(y, ref) <= 1e-5


@needs_kernel
def test_its_threads_are_torchs_openmp_pool():
    """The library links the libgomp torch loaded: one OpenMP runtime in the process, not two pools."""
    native.avx2_int8()
    maps = Path("/proc/self/maps").read_text()
    gomps = {line.split()[-1] for line in maps.splitlines() if re.search(r"libgomp[^/]*\.so", line)}
    assert len(gomps) == 1, gomps


def test_switched_off_or_without_a_compiler_it_says_why(monkeypatch, tmp_path):
    assert "SLIMFX_NATIVE=0" in native._load_avx2_int8.__wrapped__("0")
    monkeypatch.setenv("SLIMFX_NATIVE", "0")
    assert "turned off" in native.avx2_int8_unavailable()
    assert not AVX2.is_available() and "turned off" in AVX2.unavailable_reason()
    choice = dispatch.measure_int8(16, 16, 32, ACTS["dynamic"])
    assert choice.rejected["avx2"].startswith(dispatch.NOT_AVAILABLE) and "SLIMFX_NATIVE" in choice.rejected["avx2"]
    monkeypatch.setattr(native, "compiler", lambda: None)
    why = native._load_avx2_int8.__wrapped__("1")
    assert isinstance(why, str) and ("install gcc" in why or "AVX2" in why or "x86-64" in why)


@needs_kernel
def test_a_failing_build_is_reported_with_the_compilers_message(monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path / "cache"))
    why = native._load_avx2_int8.__wrapped__("1")
    assert isinstance(why, str) and why.startswith("building the AVX2 int8 kernel with") and "error" in why
    assert not list((tmp_path / "cache" / "native").glob("*.so"))  # no half-written library left behind


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 20), o=st.integers(1, 20), h=st.integers(1, 12), w=st.integers(1, 12),
       kh=st.sampled_from([1, 2, 3, 5]), kw=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2, (2, 1)]),
       padding=st.sampled_from([0, 1, 2, (0, 1)]), dilation=st.sampled_from([1, 2]), with_bias=st.booleans(),
       channels_last=st.booleans(), bits=st.sampled_from([8, 7, 4]), seed=st.integers(0, 2**16))
def test_conv_matches_the_spec(n, c, o, h, w, kh, kw, stride, padding, dilation, with_bias, channels_last, bits,
                               seed):
    """im2col of the codes (padding = the zero point's code) into the GEMM, any geometry, both layouts."""
    geometry = ConvGeometry.of(stride, padding, dilation, 1)
    oh, ow = geometry.output_size(h, w, kh, kw)
    if oh < 1 or ow < 1:
        return
    g = torch.Generator().manual_seed(seed)
    act = ActQuant("static_per_tensor", 0.05, 2 ** bits // 3, bits=bits,
                   weight_bits=8 if seed % 2 else 7)  # narrow, wide and split paths
    top = 2 ** (act.weight_bits - 1) - 1
    w_q = torch.randint(-top, top + 1, (o, c, kh, kw), generator=g, dtype=torch.int8)
    w_scale = torch.rand(o, generator=g) * 0.05 + 1e-3
    bias = torch.randn(o, generator=g) if with_bias else None
    x = torch.randn(n, c, h, w, generator=g) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = AVX2_CONV.prepare(w_q, w_scale, bias, geometry, act).run(x)
    assert out.shape == (n, o, oh, ow)
    assert conv_kernels.memory_format_of(out) == conv_kernels.memory_format_of(x) or o == 1 or oh * ow == 1
    ref = conv_kernels.int8_conv2d_spec(x, w_q, w_scale, bias, geometry, act)
    assert relative_error(out, ref) <= 1e-5


@needs_kernel
def test_conv_support_and_a_module_forced_onto_it():
    act = ACTS["static"]
    assert AVX2_CONV.supports(act, ConvGeometry.of(1, 1, 1, 1))
    assert not AVX2_CONV.supports(act, ConvGeometry.of(1, 1, 1, 4))  # grouped / depthwise: not a GEMM
    assert AVX2_CONV.supports(ActQuant("static_per_tensor", 0.05, 61, bits=8), ConvGeometry.of(1, 1, 1, 1))
    assert not AVX2_CONV.supports(ActQuant("weight_only", weight_bits=7), ConvGeometry.of(1, 1, 1, 1))
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    forced = Int8Conv2d.from_float(conv, mode="static_per_tensor", act_scale=0.04, act_zero_point=60, act_bits=7,
                                   weight_bits=7, kernel="avx2")
    dense = Int8Conv2d.from_float(conv, mode="static_per_tensor", act_scale=0.04, act_zero_point=60, act_bits=7,
                                  weight_bits=7, kernel="dense")
    y = forced(x)
    assert forced.last_kernel == "avx2" and relative_error(y, dense(x)) <= 1e-5
    choice = dispatch.measure_conv((2, 8, 10, 10), (16, 8, 3, 3), ConvGeometry.of(1, 1, 1, 1), forced.act_quant())
    assert "avx2" in choice.times_ms, choice.rejected


@needs_kernel
def test_no_input_features_gives_the_bias_not_garbage():
    """K = 0 (an empty GEMM): the epilogue still runs, out = bias (review finding: uninitialised memory)."""
    x, w_q, w_scale, bias = _problem(3, 5, 0, 0)
    for name in ("dynamic", "static", "per_token_w7", "onnx_u8_w7"):
        out = AVX2.prepare(w_q, w_scale, bias, ACTS[name]).run(x)
        assert torch.equal(out, bias.expand(3, 5)), name
    geometry = ConvGeometry.of(1, 1, 1, 1)
    w4 = torch.zeros(4, 0, 3, 3, dtype=torch.int8)
    y = AVX2_CONV.prepare(w4, w_scale[:4], bias[:4], geometry, ACTS["static"]).run(torch.zeros(2, 0, 5, 5))
    assert torch.equal(y, bias[:4].reshape(1, 4, 1, 1).expand(2, 4, 5, 5))


@needs_kernel
def test_inputs_it_cannot_read_are_refused():
    x, w_q, w_scale, bias = _problem(3, 16, 64, 0)
    run = AVX2.prepare(w_q, w_scale, bias, ACTS["dynamic"])
    with pytest.raises(KernelError, match="in_features=64"):
        run.run(x[:, :40])  # would read past the input
    with pytest.raises(KernelError, match="CPU tensors"):
        run.run(torch.empty(3, 64, device="meta"))
    conv = AVX2_CONV.prepare(torch.zeros(4, 3, 3, 3, dtype=torch.int8), w_scale[:4], None, ConvGeometry.of(1, 1),
                             ACTS["static"])
    with pytest.raises(KernelError, match="in_channels=3"):
        conv.run(torch.zeros(1, 5, 6, 6))
    with pytest.raises(KernelError, match="CPU kernel"):  # forcing it on CUDA tensors is refused up front
        dispatch._check_forced_runnable("conv", "avx2", torch.device("cuda"))


@needs_kernel
def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path / "cache"))
    assert not isinstance(native._load_avx2_int8.__wrapped__("1"), str)
    (built,) = (tmp_path / "cache" / "native").glob("*.so")
    built.unlink()  # a new file (this process maps the old one: writing into it in place would crash it)
    built.write_bytes(b"not a shared library")
    lib = native._load_avx2_int8.__wrapped__("1")
    assert not isinstance(lib, str), lib
    assert lib.slimfx_abi_version() == native.ABI_VERSION


def test_build_errors_name_the_compilers_error_line():
    message = "x.c: In function 'f':\nx.c:3:5: error: 'y' undeclared\n    3 | y;\n      | ^\nx.c:3:5: note: each"
    assert native._first_error(message) == "x.c:3:5: error: 'y' undeclared"


@needs_kernel
def test_minus_128_weights_count_in_the_path_choice():
    """int8 abs(-128) is -128 in torch: the path must see |w| = 128 (review finding: a -128 beside small weights
    picked the wide / narrow path and saturated)."""
    x, w_q, w_scale, bias = _problem(7, 6, 40, 4, top=60)
    w_q[2, 5] = -128
    for name in ("static_u8_w8", "per_token_w8", "static", "dynamic"):
        run = AVX2.prepare(w_q, w_scale, bias, ACTS[name])
        assert run.path != cpu_kernels.AVX2_NARROW, name
        assert relative_error(run.run(x), int8_linear_spec(x, w_q, w_scale, bias, ACTS[name])) <= 1e-5, name


@needs_kernel
def test_fan_in_beyond_the_int32_accumulator_is_refused():
    """sum_k (q - z) * w must fit int32: 8-bit codes x 127 x K = 70000 may not, so prepare refuses (the dispatcher
    then runs another kernel) instead of wrapping to a wrong sign."""
    w_q = torch.full((2, 70000), 127, dtype=torch.int8)
    with pytest.raises(KernelError, match="int32"):
        AVX2.prepare(w_q, torch.ones(2), None, ACTS["static_u8_w8"])
    AVX2.prepare(w_q[:, :60000], torch.ones(2), None, ACTS["static_u8_w8"])  # 255 * 127 * 60000 < 2**31


@needs_kernel
def test_an_onnx_range_that_underflows_quantizes_as_the_empty_range():
    x = torch.zeros(2, 9)
    x[0, 3] = 1e-44  # (hi - lo) / 255 underflows to 0 in fp32
    assert cpu_kernels.onnx_dynamic_qparams(x) == (1.0, 0)
    x, w_q, w_scale, bias = _problem(2, 4, 9, 0, top=63)
    x = torch.zeros(2, 9)
    x[0, 3] = 1e-44
    out = AVX2.prepare(w_q, w_scale, bias, ACTS["onnx_u8_w7"]).run(x)
    assert torch.equal(out, int8_linear_spec(x, w_q, w_scale, bias, ACTS["onnx_u8_w7"]))
