"""Int8Linear and BlockSparseLinear: numerics vs the references, state_dict round-trips, fx, forcing."""

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
from slimfx.kernels import BlockSparseLinear, Int8Linear, cpu_kernels, dispatch, reference

CPU_INT8 = ["auto", "dense", "int_mm"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMFX_KERNEL", raising=False)
    dispatch.clear_memory_cache()
    yield
    dispatch.clear_memory_cache()


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


# fbgemm's dynamic linear only implements dynamic_per_tensor, so it has no static_per_tensor case
@pytest.mark.parametrize(("mode", "kernel"), [
    (mode, kernel)
    for mode in ("dynamic_per_tensor", "static_per_tensor")
    for kernel in CPU_INT8 + ["fbgemm", "onednn"]
    if kernel != "fbgemm" or mode == "dynamic_per_tensor"
])
def test_int8_linear_per_tensor_modes_match_spec(mode, kernel):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    static = {"act_scale": 0.03, "act_zero_point": 131} if mode == "static_per_tensor" else {}
    module = Int8Linear.from_float(linear, mode=mode, kernel=_kernel(kernel), **static)
    x = torch.randn(3, 7, 40)
    y = module(x)
    spec = cpu_kernels.int8_linear_spec(x.reshape(-1, 40), module.weight_int8, module.weight_scale,
                                        module.bias, module.act_quant()).reshape(3, 7, 24)
    err = cpu_kernels.relative_error(y, spec)
    if kernel == "onednn" and mode == "static_per_tensor":
        return  # 8-bit activations: exact only with VNNI; the dispatcher's probe decides (test_dispatch)
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
    for kernel in ["auto", "dense", "torch_bsr", "torch_csr"]:
        module = BlockSparseLinear.from_dense(linear, (16, 16), kernel=_kernel(kernel))
        ref = reference.bsr_linear_ref(x, module.weight, module.bias)
        y = module(x)
        assert y.shape == (2, 5, 64)
        assert cpu_kernels.relative_error(y, ref) <= 1e-4, kernel
        assert cpu_kernels.relative_error(y, linear(x).detach()) <= 1e-4, kernel


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


@_needs("triton", "slimfx.kernels.triton_bsr")
def test_forced_triton_interpreter_runs_block_sparse_linear(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SLIMFX_KERNEL", "bsr:triton")
    sparse = BlockSparseLinear.from_dense(_sparse_linear(32, 32, (16, 16), 0.5), (16, 16))
    x = torch.randn(4, 32)
    ref = reference.bsr_linear_ref(x, sparse.weight, sparse.bias)
    assert cpu_kernels.relative_error(sparse(x), ref) <= 1e-4
    assert sparse.last_kernel == "triton"
