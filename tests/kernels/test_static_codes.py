"""Static activation codes: every kernel quantizes exactly as the fake-quant simulation does, at near-ties too."""

from __future__ import annotations

import pytest
import torch

from slimfx.kernels import cpu_kernels, dispatch
from slimfx.kernels.cpu_kernels import INT8_TOLERANCE, ActQuant
from slimfx.passes.quant.spec import fake_quantize, parse_spec

pytestmark = pytest.mark.usefixtures("private_kernel_cache")  # tests/conftest.py

# (activation bits, weight bits): the two schemes whose int16 pair sums cannot saturate on AVX2
SCHEMES = [(8, 7), (7, 8)]


def _near_ties(scale: float, zero_point: int, code_max: int, n: int, seed: int = 0) -> torch.Tensor:
    """Values whose ``x / s`` lies within ~1e-6 (relative) of a half-integer code, and exact ties: where a
    multiply by ``1 / s``, a fused multiply-add with the zero point or a tie rule on the unsigned code would
    pick the other neighbour."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-zero_point - 3, code_max - zero_point + 3, (n,), generator=g).float() + 0.5
    jitter = 1 + (torch.rand(n, generator=g) - 0.5) * 4e-6
    jitter[: n // 4] = 1.0
    return (codes * torch.tensor(scale) * jitter).float()


def _division_codes(x: torch.Tensor, scale: float, zero_point: int, code_max: int) -> torch.Tensor:
    return (torch.round(x / torch.tensor(scale)) + zero_point).clamp(0, code_max)


@pytest.mark.parametrize("bits,weight_bits", SCHEMES)
@pytest.mark.parametrize("scale,zero_point", [(0.0371, 77), (0.0625, 33), (0.011, 64), (0.5, 3), (3e-4, 127)])
@pytest.mark.parametrize("name", ["dense", "fbgemm", "onednn", "onnxruntime", "int_mm"])
def test_every_static_kernel_quantizes_like_the_simulation(name, scale, zero_point, bits, weight_bits):
    """An identity-like weight reads each kernel's activation codes back from its output: one code rounded
    differently anywhere (say by fbgemm's own quantizer, ``round(fma(x, 1/s, z))``) fails the test."""
    cand = cpu_kernels.INT8_CANDIDATES[name]
    act = ActQuant("static_per_tensor", scale, zero_point, bits=bits, weight_bits=weight_bits)
    if not (cand.is_available() and cand.supports(act)):
        pytest.skip(f"{name} is not available here")
    k = 64
    x = _near_ties(scale, zero_point, act.code_max, n=k * 200).reshape(-1, k)
    top = 2 ** (weight_bits - 1) - 1
    w_q = (torch.eye(k) * top).to(torch.int8)
    y = cand.prepare(w_q, torch.full((k,), 1.0 / top), None, act).run(x)
    codes_read = torch.round(y.double() / scale).float() + zero_point
    assert torch.equal(codes_read, _division_codes(x, scale, zero_point, act.code_max))


def test_simulation_codes_are_the_division():
    scale, zero_point = 0.0371, -51  # signed int8 zero point: unsigned code 77
    x = _near_ties(scale, 77, 255, n=20000)
    got = fake_quantize(x, torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32),
                        parse_spec("int8-per-tensor", "activation"))
    assert torch.equal(got, (_division_codes(x, scale, 77, 255) - 77) * torch.tensor(scale))


class _FusedQuantizer:
    """fbgemm fed the fp32 activation: its own quantizer, which rounds near-ties differently."""

    name = "fused"
    modes = ("static_per_tensor",)

    def is_available(self):
        return cpu_kernels.INT8_CANDIDATES["fbgemm"].is_available()

    def supports(self, act):
        return act.mode == "static_per_tensor"

    def prepare(self, w_q, w_scale, bias, act):
        packed = cpu_kernels._fbgemm_prepack(w_q, w_scale, bias)

        class Run:
            def run(self, x2d):
                return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                    x2d.float().contiguous(), float(act.scale), int(act.zero_point), packed)
        return Run()


def test_the_probe_rejects_a_kernel_whose_codes_differ_at_ties(monkeypatch):
    """Random probe rows would rarely hit a tie; the static probe has a row of exact ties."""
    fused = _FusedQuantizer()
    if not fused.is_available():
        pytest.skip("fbgemm is not available in this torch build")
    monkeypatch.setitem(cpu_kernels.INT8_CANDIDATES, "fused", fused)
    act = ActQuant("static_per_tensor", 0.0371, 77, weight_bits=7)
    choice = dispatch.measure_int8(16, 64, 256, act)
    assert "wrong numbers" in choice.rejected["fused"], choice.rejected
    assert choice.choice != "fused"
    w_q, w_scale, bias = dispatch._probe_int8_weights(64, 256, weight_bits=7)
    x = dispatch._probe_activation(16, 256, w_q[0], act=act)
    ref = cpu_kernels.int8_linear_spec(x, w_q, w_scale, bias, act)
    assert cpu_kernels.relative_error(fused.prepare(w_q, w_scale, bias, act).run(x), ref) > \
        INT8_TOLERANCE["static_per_tensor"]


def test_onnxruntime_is_skipped_beside_spinning_openmp_threads_and_weighed_once_they_sleep(monkeypatch):
    """torch's OpenMP workers spin for milliseconds after each op (unless OMP_WAIT_POLICY=PASSIVE), which made
    onnxruntime's threads 1.5x slower inside a model than alone: the dispatcher must not pick it then, and a
    choice cached then must be measured again once the environment lets it run."""
    if not cpu_kernels.INT8_CANDIDATES["onnxruntime"].is_available():
        pytest.skip("onnxruntime is not installed")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    act = ActQuant("static_per_tensor", 0.05, 60, bits=7)
    first = dispatch.select_int8_kernel(32, 64, 128, act)
    bucket = dispatch.int8_bucket(32, 64, 128, act, torch.float32)
    cached = next(c for c in dispatch._memory.values() if c.bucket == bucket)
    assert cached.rejected["onnxruntime"].startswith("skipped: torch's OpenMP threads spin-wait")
    assert first != "onnxruntime"
    measured = []
    real = dispatch.measure_int8
    monkeypatch.setattr(dispatch, "measure_int8", lambda *a, **k: measured.append(a) or real(*a, **k))
    dispatch.clear_memory_cache()
    dispatch.select_int8_kernel(32, 64, 128, act)
    assert measured == []  # nothing new to weigh: the disk cache stands
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    dispatch.clear_memory_cache()
    dispatch.select_int8_kernel(32, 64, 128, act)
    assert len(measured) == 1
    again = next(c for c in dispatch._memory.values() if c.bucket == bucket)
    assert "onnxruntime" in again.times_ms or not again.rejected["onnxruntime"].startswith("skipped")


def test_an_onnxruntime_choice_cached_under_passive_is_measured_again_without_it(monkeypatch):
    if not cpu_kernels.INT8_CANDIDATES["onnxruntime"].is_available():
        pytest.skip("onnxruntime is not installed")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    act = ActQuant("static_per_tensor", 0.05, 60, bits=7)
    real = dispatch._best_ms

    def best_ms(fn, budget_s):  # onnxruntime wins this process's measurement
        return 1e-6 if getattr(fn, "__defaults__", None) and isinstance(fn.__defaults__[0],
                                                                         cpu_kernels._OnnxruntimeRun) else \
            real(fn, budget_s)

    monkeypatch.setattr(dispatch, "_best_ms", best_ms)
    monkeypatch.setattr(dispatch, "_confirm_finalists", lambda *a: None)
    assert dispatch.select_int8_kernel(32, 64, 128, act) == "onnxruntime"
    monkeypatch.setattr(dispatch, "_best_ms", real)
    monkeypatch.delenv("OMP_WAIT_POLICY")  # the next process starts without it
    dispatch.clear_memory_cache()
    assert dispatch.select_int8_kernel(32, 64, 128, act) != "onnxruntime"


def test_the_shared_scale_tensor_works_with_autograd_after_an_inference_mode_call():
    """static_codes reuses one scale tensor per value: made under inference_mode it would be an inference
    tensor, which autograd refuses to save; a later call on an input that requires grad must still work."""
    act = ActQuant("static_per_tensor", 0.04321, 5)  # a scale no other test uses: the first call makes it
    with torch.inference_mode():
        cpu_kernels.static_codes(torch.randn(3, 4), act)
    x = torch.randn(3, 4, requires_grad=True)
    torch.div(x, cpu_kernels.scale_tensor(act.scale, x.device)).sum().backward()
    assert x.grad is not None and cpu_kernels.static_codes(x, act).shape == (3, 4)


def test_the_scale_cache_keeps_no_fake_tensor_and_reads_tensor_scales_once():
    from torch._subclasses.fake_tensor import FakeTensorMode

    act = ActQuant("static_per_tensor", 0.05321, 5)  # a scale no other test uses
    with FakeTensorMode():
        cpu_kernels.static_codes(torch.randn(2, 3), act)  # under a mode: not cached
    assert cpu_kernels.static_codes(torch.full((1, 2), 0.5321), act).tolist() == [[10.0, 10.0]]
    scale = torch.tensor(0.05)
    act_t = ActQuant("static_per_tensor", scale, torch.tensor(3))
    assert type(act_t.scale) is float and type(act_t.zero_point) is int
    scale.fill_(0.25)  # the ActQuant read it when made; a new one reads the new value
    x = torch.tensor([[0.5, 1.0]])
    assert cpu_kernels.static_codes(x, ActQuant("static_per_tensor", scale, 3)).tolist() == [[2.0, 4.0]]
