"""Int8Linear, Int8Conv2d and BlockSparseLinear: numerics vs the references, state_dict round-trips, fx, forcing."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from slimfx.errors import KernelError
from slimfx.kernels import BlockSparseLinear, Int8Conv2d, Int8Linear, conv_kernels, cpu_kernels, dispatch, reference

CPU_INT8 = ["auto", "dense", "int_mm"]
CPU_CONV = ["auto", "dense", "dense_channels_last", "onednn"]


pytestmark = pytest.mark.usefixtures("private_kernel_cache")  # tests/conftest.py


def _kernel(name: str) -> str | None:
    return None if name == "auto" else name


def _sparse_linear(n: int, k: int, block: tuple[int, int], density: float, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n)
    keep = torch.rand(n // block[0], k // block[1]) < density
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear


@settings(max_examples=12)
@given(lead=st.lists(st.integers(1, 5), min_size=0, max_size=2), k=st.integers(1, 48), n=st.integers(1, 32),
       bias=st.booleans(), kernel=st.sampled_from(CPU_INT8), seed=st.integers(0, 2**16))
def test_int8_linear_per_token_matches_w8a8_reference(lead, k, n, bias, kernel, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    module = Int8Linear.from_float(linear, kernel=_kernel(kernel))
    x = torch.randn(*lead, k)
    y = module(x)
    ref = reference.w8a8_linear_ref(x, module.weight_int8, module.weight_scale, module.bias)
    assert y.shape == (*lead, n) and y.dtype == x.dtype
    assert cpu_kernels.relative_error(y, ref) <= cpu_kernels.INT8_TOLERANCE["dynamic_per_token"]


@pytest.mark.parametrize(("mode", "kernel", "bits"), [
    (mode, kernel, bits)
    for mode, bits in (("dynamic_per_tensor", 7), ("dynamic_per_tensor", 8), ("static_per_tensor", 8),
                       ("static_per_tensor", 7))
    for kernel in CPU_INT8 + ["fbgemm", "onednn"]
])
def test_int8_linear_per_tensor_modes_match_spec(mode, kernel, bits):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    static = {"act_scale": 0.03 * 2 ** (8 - bits), "act_zero_point": 2 ** (bits - 1) + 3, "act_bits": bits} \
        if mode == "static_per_tensor" else {"act_bits": bits}
    module = Int8Linear.from_float(linear, mode=mode, kernel=_kernel(kernel), **static)
    x = torch.randn(3, 7, 40)
    if kernel == "fbgemm" and mode == "dynamic_per_tensor" and bits == 8:  # fbgemm's qparams are not ONNX's
        with pytest.raises(KernelError, match="does not implement"):
            module(x)
        return
    y = module(x)
    spec = cpu_kernels.int8_linear_spec(x.reshape(-1, 40), module.weight_int8, module.weight_scale,
                                        module.bias, module.act_quant()).reshape(3, 7, 24)
    err = cpu_kernels.relative_error(y, spec)
    if kernel in ("fbgemm", "onednn") and bits == 8:
        return  # 8-bit codes: exact only with VNNI; the dispatcher's probe decides (test_dispatch)
    assert err <= cpu_kernels.INT8_TOLERANCE[mode], err
    # the quantized layer stays close to the float one it came from
    assert cpu_kernels.relative_error(y, linear(x).detach()) < 0.05


def test_from_float_quantizes_per_channel_symmetric():
    linear = nn.Linear(8, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0] * 8, [-2.0, 1.0] * 4, [0.0] * 8]))
    module = Int8Linear.from_float(linear)
    assert module.weight_int8.dtype == torch.int8
    assert torch.equal(module.weight_int8[0], torch.full((8,), 127, dtype=torch.int8))
    assert torch.equal(module.weight_int8[1], torch.tensor([-127, 64] * 4, dtype=torch.int8))
    assert torch.allclose(module.weight_scale, torch.tensor([1 / 127, 2 / 127, 1e-8]))
    assert torch.equal(module.weight_int8[2], torch.zeros(8, dtype=torch.int8))
    narrow = Int8Linear.from_float(linear, weight_bits=7)
    assert torch.equal(narrow.weight_int8[1], torch.tensor([-63, 31] * 4, dtype=torch.int8))  # 1 / fl32(2 / 63) < 31.5
    assert torch.allclose(narrow.weight_scale, torch.tensor([1 / 63, 2 / 63, 1e-8]))
    assert narrow.act_quant().weight_bits == 7
    with pytest.raises(KernelError, match="weight_bits must be 2 to 8"):
        Int8Linear.from_float(linear, weight_bits=9)


def test_per_token_int8_with_7bit_weights_runs_exactly_on_an_int8_kernel():
    """8-bit per-token codes (the GPU kernel's numerics) with 7-bit weights cannot saturate int16 pair sums:
    oneDNN must pass the dispatcher's probe then (with 8-bit weights it may not, without VNNI)."""
    torch.manual_seed(5)
    module = Int8Linear.from_float(nn.Linear(256, 64), "dynamic_per_token", weight_bits=7)
    x = torch.randn(32, 256)
    ref = reference.w8a8_linear_ref(x, module.weight_int8, module.weight_scale, module.bias)
    assert cpu_kernels.relative_error(module(x), ref) <= cpu_kernels.INT8_TOLERANCE["dynamic_per_token"]
    choice = dispatch.measure_int8(32, 64, 256, module.act_quant())
    if cpu_kernels.INT8_CANDIDATES["onednn"].is_available():
        assert "onednn" in choice.times_ms, choice.rejected


@pytest.mark.parametrize("mode", ["dynamic_per_token", "static_per_tensor"])
def test_int8_state_dict_round_trip_is_bit_identical(mode, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    static = {"act_scale": 0.05} if mode == "static_per_tensor" else {}
    module = Int8Linear.from_float(nn.Linear(32, 16), mode=mode, **static)
    state = module.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    safetensors.save_file(state, tmp_path / "int8.safetensors")
    fresh = Int8Linear(32, 16, mode=mode, **static)
    fresh.load_state_dict(safetensors.load_file(tmp_path / "int8.safetensors"))
    x = torch.randn(5, 32)
    assert torch.equal(module(x), fresh(x))
    assert fresh.last_kernel == module.last_kernel


def test_int8_modules_report_the_width_of_their_weight_codes():
    """Kernels that saturate on 8-bit weights may be exact for narrower ones: the module tells the dispatcher
    how wide its codes are, and notices when they change."""
    torch.manual_seed(0)
    module = Int8Linear.from_float(nn.Linear(16, 8), "static_per_tensor", act_scale=0.05, act_zero_point=128)
    assert module.act_quant().weight_bits == 8
    module.weight_int8.clamp_(-63, 63)
    assert module.act_quant().weight_bits == 7 and module.act_quant().label == "static_per_tensor_w7"
    module.weight_int8[0, 0] = -128
    assert module.act_quant().weight_bits == 8
    conv = Int8Conv2d.from_float(nn.Conv2d(3, 4, 3), act_scale=0.1, act_zero_point=3, act_bits=7)
    conv.weight_int8.clamp_(-7, 7)
    assert conv.act_quant().weight_bits == 4


def test_changed_qparams_or_a_cleared_dispatcher_reach_the_memoized_choice(monkeypatch):
    """The module memoizes its kernel choice and activation qparams per input bucket; new qparams in place,
    new weight codes or a cleared dispatcher must not run the stale ones."""
    torch.manual_seed(3)
    linear = nn.Linear(32, 8)
    module = Int8Linear.from_float(linear, "static_per_tensor", act_scale=0.05, act_zero_point=128)
    x = torch.randn(4, 32)
    module(x)
    module.act_scale.fill_(0.02)
    module.act_zero_point.fill_(100)
    want = cpu_kernels.int8_linear_spec(x, module.weight_int8, module.weight_scale, module.bias, module.act_quant())
    assert cpu_kernels.relative_error(module(x), want) <= cpu_kernels.INT8_TOLERANCE["static_per_tensor"]
    module.weight_int8.clamp_(-63, 63)  # now 7-bit weights: a different dispatcher bucket
    asked = []
    real = dispatch.select_int8_kernel
    monkeypatch.setattr(dispatch, "select_int8_kernel", lambda *a, **k: asked.append(a[3]) or real(*a, **k))
    module(x)
    module(x)
    assert [act.weight_bits for act in asked] == [7]
    dispatch.clear_memory_cache()
    module(x)
    assert len(asked) == 2


def test_qparams_written_behind_autograd_or_reassigned_reach_the_run():
    """The memo keys static qparams by value: ``.data`` writes (no version bump) and new buffer tensors (as
    ``load_state_dict(assign=True)`` makes, possibly at a freed address with version 0) must not run stale."""
    torch.manual_seed(4)
    module = Int8Linear.from_float(nn.Linear(32, 8), "static_per_tensor", act_scale=0.05, act_zero_point=128,
                                   kernel="dense")
    x = torch.randn(4, 32)

    def check():
        want = cpu_kernels.int8_linear_spec(x, module.weight_int8, module.weight_scale, module.bias,
                                            module.act_quant())
        assert cpu_kernels.relative_error(module(x), want) <= cpu_kernels.INT8_TOLERANCE["static_per_tensor"]

    check()
    module.act_scale.data.fill_(0.02)
    check()
    module.act_zero_point.numpy()[...] = 90
    check()
    for scale in (0.05, 0.02, 0.05, 0.01, 0.07):
        module.act_scale = torch.tensor(scale)
        check()


def test_module_pickled_before_the_memo_existed_still_runs():
    module = Int8Linear.from_float(nn.Linear(8, 4))
    del module.__dict__["_kernel_choices"]  # the state an older slimfx pickled
    assert module(torch.randn(2, 8)).shape == (2, 4)


def test_functionalized_fake_tracing_only_propagates_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    module = Int8Linear.from_float(nn.Linear(8, 4), "static_per_tensor", act_scale=0.05, act_zero_point=100)
    graph = make_fx(torch.func.functionalize(module), tracing_mode="fake")(torch.randn(2, 8))
    assert isinstance(graph, fx.GraphModule)


def test_loading_new_weights_reprepares_the_kernel():
    torch.manual_seed(2)
    a, b = Int8Linear.from_float(nn.Linear(16, 8)), Int8Linear.from_float(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    a(x)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


def test_block_sparse_linear_matches_reference_for_each_kernel():
    linear = _sparse_linear(64, 96, (16, 16), 0.4)
    x = torch.randn(2, 5, 96)
    for kernel in ["auto", "dense", "torch_bsr", "torch_csr", "grouped_gemm"]:
        module = BlockSparseLinear.from_dense(linear, (16, 16), kernel=_kernel(kernel))
        ref = reference.bsr_linear_ref(x, module.weight, module.bias)
        y = module(x)
        assert y.shape == (2, 5, 64)
        assert cpu_kernels.relative_error(y, ref) <= 1e-4, kernel
        assert cpu_kernels.relative_error(y, linear(x).detach()) <= 1e-4, kernel


def test_block_sparse_linear_dispatches_and_converts_its_weight_once(monkeypatch):
    selects, prepared = [], []
    real_select = dispatch.select_bsr_kernel
    monkeypatch.setattr(dispatch, "select_bsr_kernel", lambda *a, **k: selects.append(a) or real_select(*a, **k))
    for name, cand in cpu_kernels.BSR_CANDIDATES.items():
        monkeypatch.setattr(cand, "prepare", lambda w, b, real=cand.prepare, name=name:
                            prepared.append((name, w.values)) or real(w, b))
    module = BlockSparseLinear.from_dense(_sparse_linear(32, 64, (8, 8), 0.3), (8, 8))

    def conversions():  # of the module's own weight (measuring also prepares every candidate's probe)
        return [name for name, values in prepared if values is module.values]

    x = torch.randn(6, 64)
    ys = [module(x) for _ in range(4)] + [module(x[:5])]  # 5 rows: the same M bucket as 6
    assert len(selects) == 1 and conversions() == [module.last_kernel]
    assert all(torch.equal(y, ys[0]) for y in ys[1:4]) and torch.equal(ys[4], ys[0][:5])
    module(torch.randn(40, 64))  # a new M bucket: ask again; the weight is converted only for a new kernel
    assert len(selects) == 2 and len(conversions()) == len(set(conversions()))
    with torch.no_grad():
        module.values.mul_(2)  # new weights: ask and convert again
    assert torch.allclose(module(x), 2 * ys[0] - module.bias, atol=1e-5)
    assert len(selects) == 3 and conversions()[-1] == module.last_kernel


@pytest.mark.parametrize("kernel", ["dense", "torch_bsr", "torch_csr", "grouped_gemm"])
def test_block_sparse_forward_copies_no_weight(kernel):
    module = BlockSparseLinear.from_dense(_sparse_linear(32, 64, (8, 8), 0.3), (8, 8), kernel=kernel)
    x = torch.randn(6, 64)
    module(x)
    with torch.profiler.profile() as prof:
        module(x)
    ops = {event.name for event in prof.events()}
    conversions = {op for op in ops if op == "aten::_to_copy" or "to_sparse" in op or "to_dense" in op}
    assert not conversions, conversions


def test_block_sparse_state_dict_round_trip_resizes_blocks(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    module = BlockSparseLinear.from_dense(_sparse_linear(32, 64, (8, 8), 0.3), (8, 8))
    assert 0 < module.density < 1
    safetensors.save_file(module.state_dict(), tmp_path / "bsr.safetensors")
    fresh = BlockSparseLinear(64, 32, (8, 8))  # nnz_blocks unknown when building the skeleton
    fresh.load_state_dict(safetensors.load_file(tmp_path / "bsr.safetensors"))
    x = torch.randn(6, 64)
    assert fresh.values.shape == module.values.shape
    assert torch.equal(module(x), fresh(x))


def test_extra_repr_names_the_kernel():
    module = Int8Linear.from_float(nn.Linear(16, 8))
    assert "not run yet" in repr(module)
    module(torch.randn(2, 16))
    assert f"last run: {module.last_kernel}" in repr(module)
    forced = BlockSparseLinear.from_dense(nn.Linear(16, 8), (4, 4), kernel="torch_csr")
    assert "kernel=torch_csr (forced)" in repr(forced) and "block=(4, 4)" in repr(forced)


def test_fx_traces_both_modules_as_leaves():
    model = nn.Sequential(Int8Linear.from_float(nn.Linear(16, 32)), nn.ReLU(),
                          BlockSparseLinear.from_dense(_sparse_linear(8, 32, (4, 4), 0.5), (4, 4)))
    gm = fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2"]
    x = torch.randn(3, 16)
    assert torch.equal(gm(x), model(x))


def test_meta_and_fake_inputs_only_propagate_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = Int8Linear.from_float(nn.Linear(16, 8))
    assert module(torch.empty(2, 3, 16, device="meta")).shape == (2, 3, 8)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = module(mode.from_tensor(torch.randn(4, 16)))
    assert y.shape == (4, 8)
    assert module.last_kernel is None  # nothing was measured or run


def test_deepcopy_after_forward():
    module = Int8Linear.from_float(nn.Linear(16, 8), mode="dynamic_per_tensor", kernel="fbgemm")
    x = torch.randn(3, 16)
    y = module(x)
    assert torch.equal(copy.deepcopy(module)(x), y)


def _conv_input(n, c, h, w, act, channels_last, seed):
    """Values spread over the static code range and past both ends (clipped), on the grid and between."""
    g = torch.Generator().manual_seed(seed)
    if act.mode == "weight_only":
        x = torch.randn(n, c, h, w, generator=g)
    else:
        codes = torch.randint(-3, act.code_max + 4, (n, c, h, w), generator=g).float()
        x = (codes - act.zero_point + torch.rand(n, c, h, w, generator=g) - 0.5) * act.scale
        x.view(-1)[:2] = torch.tensor([(act.code_max - act.zero_point) * act.scale, -act.zero_point * act.scale])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@settings(max_examples=25, deadline=None)
@given(data=st.data(), per_group_in=st.integers(1, 4), per_group_out=st.integers(1, 4),
       groups=st.sampled_from([1, 2, 3, "depthwise"]), kernel_size=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
       stride=st.sampled_from([1, 2, (2, 1)]), padding=st.sampled_from([0, 1, (2, 0)]),
       dilation=st.sampled_from([1, 2]), bias=st.booleans(), act_kind=st.sampled_from(["u7", "u8", "weight_only"]),
       kernel=st.sampled_from(CPU_CONV), channels_last=st.booleans(), batch=st.sampled_from([1, 3, None]),
       seed=st.integers(0, 2**16))
def test_int8_conv2d_matches_spec_and_the_float_conv(data, per_group_in, per_group_out, groups, kernel_size,
                                                      stride, padding, dilation, bias, act_kind, kernel,
                                                      channels_last, batch, seed):
    if groups == "depthwise":
        groups, per_group_in = data.draw(st.integers(2, 6)), 1
    torch.manual_seed(seed)
    conv = nn.Conv2d(per_group_in * groups, per_group_out * groups, kernel_size, stride, padding, dilation,
                     groups, bias=bias)
    if act_kind == "weight_only":
        if kernel == "onednn":
            kernel = "dense"  # oneDNN's convolution has integer activations only
        module = Int8Conv2d.from_float(conv, mode="weight_only", kernel=_kernel(kernel))
    else:
        bits = 7 if act_kind == "u7" else 8
        zp = data.draw(st.integers(0, 2**bits - 1))
        module = Int8Conv2d.from_float(conv, act_scale=0.02, act_zero_point=zp, act_bits=bits,
                                       kernel=_kernel(kernel))
    act = module.act_quant()
    size = data.draw(st.integers(max(module.kernel_size) * dilation, 9))
    x = _conv_input(batch or 1, conv.in_channels, size, size + 1, act, channels_last, seed)
    if batch is None:
        x = x[0]  # unbatched [C, H, W]
    y = module(x)
    x4d = x if batch else x.unsqueeze(0)
    spec = conv_kernels.int8_conv2d_spec(x4d, module.weight_int8, module.weight_scale, module.bias,
                                         module.geometry, act)
    spec = spec if batch else spec[0]
    assert y.shape == spec.shape == conv(x).shape and y.dtype == x.dtype
    assert conv_kernels.memory_format_of(y) == conv_kernels.memory_format_of(conv(x))
    if not (module.last_kernel == "onednn" and act_kind == "u8"):  # 8-bit codes saturate without VNNI
        assert cpu_kernels.relative_error(y, spec) <= cpu_kernels.INT8_TOLERANCE[act.mode]
    if module.last_kernel == "dense":  # bit for bit the fake-quant simulation: dequantized x and W, F.conv2d
        x_hat = x.float() if act_kind == "weight_only" else \
            (cpu_kernels.static_codes(x, act) * torch.tensor(act.scale))
        w_hat = module.weight_int8.float() * module.weight_scale.reshape(-1, 1, 1, 1)
        assert torch.equal(y, nn.functional.conv2d(x_hat, w_hat, module.bias, conv.stride, conv.padding,
                                                   conv.dilation, conv.groups))


def test_int8_conv2d_7bit_onednn_is_exact_at_the_saturating_worst_case():
    """All codes at the top and full-range same-sign weights: int16 pair sums of 8-bit codes would saturate."""
    module = Int8Conv2d(64, 8, 3, padding=1, act_scale=0.05, act_zero_point=0, act_bits=7, kernel="onednn")
    module.weight_int8.fill_(127)
    module.weight_int8[1::2] = -127
    x = torch.full((2, 64, 6, 6), 127 * 0.05)
    spec = conv_kernels.int8_conv2d_spec(x, module.weight_int8, module.weight_scale, module.bias,
                                         module.geometry, module.act_quant())
    assert float(spec.abs().max()) == pytest.approx(127 * 127 * 64 * 9 * 0.05, rel=1e-6)
    assert cpu_kernels.relative_error(module(x), spec) <= 1e-6


def test_int8_conv2d_state_dict_holds_int8_and_round_trips_bit_identically(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(4)
    module = Int8Conv2d.from_float(nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), act_scale=0.04,
                                   act_zero_point=60, act_bits=7)
    state = module.state_dict()
    assert state["weight_int8"].dtype == torch.int8 and state["weight_int8"].shape == (8, 3, 3, 3)
    assert state["act_zero_point"].dtype == torch.int32 and state["weight_scale"].dtype == torch.float32
    safetensors.save_file(state, tmp_path / "conv.safetensors")
    fresh = Int8Conv2d(6, 8, 3, stride=2, padding=1, groups=2, act_scale=1.0, act_zero_point=0, act_bits=7)
    fresh.load_state_dict(safetensors.load_file(tmp_path / "conv.safetensors"))
    x = torch.randn(2, 6, 10, 10)
    assert torch.equal(module(x), fresh(x)) and fresh.act_quant() == module.act_quant()
    assert torch.equal(copy.deepcopy(module)(x), module(x))


def test_int8_conv2d_traces_as_a_leaf_and_only_propagates_shapes_on_meta():
    module = Int8Conv2d.from_float(nn.Conv2d(3, 4, 3, stride=2), mode="weight_only")
    gm = fx.symbolic_trace(nn.Sequential(module, nn.ReLU()))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert module(torch.empty(5, 3, 9, 9, device="meta")).shape == (5, 4, 4, 4)
    assert module.last_kernel is None
    assert "mode=weight_only" in repr(module) and "stride=(2, 2)" in repr(module)


def test_module_errors_name_the_problem():
    with pytest.raises(KernelError, match="needs act_scale"):
        Int8Linear(8, 4, mode="static_per_tensor")
    with pytest.raises(KernelError, match="act_zero_point in \\[0, 255\\]"):
        Int8Linear(8, 4, mode="static_per_tensor", act_scale=0.1, act_zero_point=300)
    with pytest.raises(KernelError, match="mode 'per_token'"):
        Int8Linear(8, 4, mode="per_token")
    with pytest.raises(KernelError, match="did you mean 'int_mm'"):
        Int8Linear(8, 4, kernel="intmm")
    with pytest.raises(KernelError, match="in_features=8"):
        Int8Linear(8, 4)(torch.randn(2, 9))
    with pytest.raises(KernelError, match="block \\(3, 3\\) must divide"):
        BlockSparseLinear(8, 8, (3, 3))
    with pytest.raises(KernelError, match="act_zero_point in \\[0, 127\\]"):
        Int8Linear(8, 4, mode="static_per_tensor", act_scale=0.1, act_zero_point=128, act_bits=7)
    with pytest.raises(KernelError, match="act_bits is for mode='static_per_tensor'"):
        Int8Linear(8, 4, act_bits=7)
    with pytest.raises(KernelError, match="act_bits must be 7 .* or 8"):
        Int8Linear(8, 4, mode="dynamic_per_tensor", act_bits=6)
    with pytest.raises(KernelError, match="mode 'dynamic_per_token' is not one of"):
        Int8Conv2d(4, 4, 3, mode="dynamic_per_token")
    with pytest.raises(KernelError, match="divisible by groups=3"):
        Int8Conv2d(4, 6, 3, groups=3, mode="weight_only")
    with pytest.raises(KernelError, match="C=in_channels=4"):
        Int8Conv2d(4, 4, 3, mode="weight_only")(torch.randn(1, 3, 8, 8))
    with pytest.raises(KernelError, match="smaller than the \\(dilated\\) kernel"):
        Int8Conv2d(4, 4, 5, mode="weight_only")(torch.randn(1, 4, 3, 3))
    with pytest.raises(KernelError, match="not a conv kernel"):
        Int8Conv2d(4, 4, 3, mode="weight_only", kernel="fbgemm")
    with pytest.raises(KernelError, match="does not implement activation mode 'weight_only'"):
        Int8Conv2d(4, 4, 3, mode="weight_only", kernel="onednn")(torch.randn(1, 4, 5, 5))


def _needs(*modules: str):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed yet: {missing}")


@_needs("triton", "slimfx.kernels.triton_quant", "slimfx.kernels.triton_int8_gemm")
def test_forced_triton_interpreter_runs_int8_linear(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SLIMFX_KERNEL", "triton")
    torch.manual_seed(3)
    int8 = Int8Linear.from_float(nn.Linear(24, 16))
    x = torch.randn(5, 24)
    ref = reference.w8a8_linear_ref(x, int8.weight_int8, int8.weight_scale, int8.bias)
    assert cpu_kernels.relative_error(int8(x), ref) <= 1e-4
    assert int8.last_kernel == "triton"
    static = Int8Linear.from_float(nn.Linear(24, 16), mode="static_per_tensor", act_scale=0.02,
                                   act_zero_point=140)
    spec = cpu_kernels.int8_linear_spec(x, static.weight_int8, static.weight_scale, static.bias,
                                        static.act_quant())
    assert cpu_kernels.relative_error(static(x), spec) <= 1e-4
    for bits in (7, 8):  # both dynamic per-tensor formulas, through the GEMM with the zero-point correction
        dynamic = Int8Linear.from_float(nn.Linear(24, 16), mode="dynamic_per_tensor", act_bits=bits)
        spec = cpu_kernels.int8_linear_spec(x, dynamic.weight_int8, dynamic.weight_scale, dynamic.bias,
                                            dynamic.act_quant())
        assert cpu_kernels.relative_error(dynamic(x), spec) <= 1e-4 and dynamic.last_kernel == "triton"


@_needs("triton", "slimfx.kernels.triton_bsr")
def test_forced_triton_interpreter_runs_block_sparse_linear(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SLIMFX_KERNEL", "bsr:triton")
    sparse = BlockSparseLinear.from_dense(_sparse_linear(32, 32, (16, 16), 0.5), (16, 16))
    x = torch.randn(4, 32)
    ref = reference.bsr_linear_ref(x, sparse.weight, sparse.bias)
    assert cpu_kernels.relative_error(sparse(x), ref) <= 1e-4
    assert sparse.last_kernel == "triton"


def test_dynamic_per_tensor_act_bits_default_repr_and_change_after_a_run():
    """7-bit codes unless told (torch.ao's formula; modules saved before act_bits existed for this mode meant
    that too); the width shows in the repr, and changing it on a module that already ran takes effect."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    module = Int8Linear.from_float(linear, mode="dynamic_per_tensor", weight_bits=7, kernel="dense")
    assert module.act_bits == 7 and "act_bits=7" in repr(module)
    x = torch.randn(5, 32) * 3
    y7 = module(x)
    module.act_bits = 8
    y8 = module(x)
    spec8 = cpu_kernels.int8_linear_spec(x, module.weight_int8, module.weight_scale, module.bias,
                                         cpu_kernels.ActQuant("dynamic_per_tensor", bits=8, weight_bits=7))
    assert torch.equal(y8, spec8.float()) or cpu_kernels.relative_error(y8, spec8) <= 1e-6
    assert not torch.equal(y7, y8)  # twice the resolution
    assert cpu_kernels.relative_error(y8, linear(x).detach()) < cpu_kernels.relative_error(y7, linear(x).detach())


def test_dynamic_modules_pickled_before_act_bits_keep_their_7bit_codes():
    """Before act_bits applied to dynamic_per_tensor, such modules stored act_bits=8 for torch.ao's 7-bit codes:
    unpickled now they must keep computing 7-bit codes; a module saved now keeps its width either way."""
    import pickle

    linear = nn.Linear(16, 8)
    old = Int8Linear.from_float(linear, mode="dynamic_per_tensor", kernel="dense")
    state = old.__getstate__()
    del state["_dynamic_act_bits"]
    state["act_bits"] = 8  # what those versions stored
    revived = Int8Linear.__new__(Int8Linear)
    revived.__setstate__(state)
    assert revived.act_bits == 7
    for bits in (7, 8):
        module = Int8Linear.from_float(linear, mode="dynamic_per_tensor", act_bits=bits, kernel="dense")
        assert pickle.loads(pickle.dumps(module)).act_bits == bits


def test_shape_only_sees_fake_tensors_inside_functorch_transforms():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from slimfx.kernels.modules import _is_shape_only

    seen = []
    with FakeTensorMode():
        x = torch.randn(3, 4)
        torch.func.vmap(lambda t: seen.append(_is_shape_only(t)) or t)(x)
    assert seen == [True]
    assert not _is_shape_only(torch.randn(2)) and _is_shape_only(torch.randn(2, device="meta"))
