"""The CPU candidates against the spec, and the dispatcher: measuring, rejecting, caching, forcing."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.errors import KernelError
from slimfx.kernels import bsr, cpu_kernels, dispatch, reference
from slimfx.kernels.cpu_kernels import INT8_TOLERANCE, ActQuant


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets an empty disk cache in a temp dir, an empty memory cache and no forcing."""
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMFX_KERNEL", raising=False)
    dispatch.clear_memory_cache()
    yield
    dispatch.clear_memory_cache()


def _act(mode: str) -> ActQuant:
    return ActQuant(mode, 0.04, 120) if mode == "static_per_tensor" else ActQuant(mode)


def _int8_problem(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.05 + 1e-3
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 2
    return x, w_q, w_scale, bias


# Candidates whose numerics hold on every CPU; oneDNN's 8-bit modes may saturate without VNNI.
EXACT_EVERYWHERE = {(name, mode) for name in ("dense", "int_mm") for mode in cpu_kernels.ACT_MODES} | {
    ("fbgemm", "dynamic_per_tensor"), ("onednn", "dynamic_per_tensor")}


@settings(max_examples=20)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 80),
       mode=st.sampled_from(cpu_kernels.ACT_MODES), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_candidates_match_spec(m, n, k, mode, with_bias, seed):
    x, w_q, w_scale, bias = _int8_problem(m, n, k, seed)
    bias = bias if with_bias else None
    act = _act(mode)
    ref = cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act)
    for name, cand in cpu_kernels.INT8_CANDIDATES.items():
        if name == "triton" or not cand.is_available() or not cand.supports(act):
            continue
        out = cand.prepare(w_q, w_scale, bias, act).run(x)
        err = cpu_kernels.relative_error(out, ref)
        if (name, mode) in EXACT_EVERYWHERE:
            assert err <= INT8_TOLERANCE[mode], (name, mode, err)


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
