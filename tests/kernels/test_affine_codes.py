"""The shared static-activation quantizer: a fused multiply-add, fbgemm's bit for bit, on near-tie values."""

from __future__ import annotations

import pytest
import torch

from slimfx.kernels import affine_codes, cpu_kernels
from slimfx.kernels.affine_codes import unsigned_codes
from slimfx.kernels.cpu_kernels import ActQuant
from slimfx.passes.quant.qat import lsq_fake_quantize
from slimfx.passes.quant.spec import fake_quantize, parse_spec


def _near_ties(scale: float, zero_point: int, code_max: int, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """Values whose ``x / s`` lies within ~1e-6 (relative) of a half-integer code: where a separately
    rounded product, a division or a tie rule on the signed code would pick the other neighbour."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-zero_point - 3, code_max - zero_point + 3, (n,), generator=g).float() + 0.5
    jitter = 1 + (torch.rand(n, generator=g) - 0.5) * 4e-6
    x = codes * torch.tensor(scale) * jitter
    exact_ties = codes[: n // 10] * torch.tensor(scale)  # x / s exactly k + 0.5 when s is a power of two
    return torch.cat([x, exact_ties]).float()


def _division_codes(x, scale, zero_point, code_max):
    return (torch.round(x / torch.tensor(scale)) + zero_point).clamp(0, code_max)


@pytest.mark.parametrize("scale,zero_point,code_max", [(0.0371, 77, 255), (0.0625, 33, 255), (0.011, 64, 127),
                                                       (0.5, 3, 255), (3e-4, 128, 255)])
def test_codes_are_a_fused_multiply_add_on_every_path(monkeypatch, scale, zero_point, code_max):
    x = _near_ties(scale, zero_point, code_max)
    emulated = (x.double() * affine_codes.reciprocal(scale).double() + zero_point).float().round().clamp(0, code_max)
    codes = unsigned_codes(x, scale, zero_point, code_max)
    assert torch.equal(codes, emulated)
    assert not torch.equal(codes, _division_codes(x, scale, zero_point, code_max))  # the test can tell them apart
    monkeypatch.setattr(affine_codes, "addcmul_is_fused", lambda device_type: False)  # the float64 fallback
    assert torch.equal(unsigned_codes(x, scale, zero_point, code_max), emulated)


@pytest.mark.parametrize("bits,weight_bits,scale,zero_point", [(8, 7, 0.0371, 77), (8, 7, 0.0625, 129),
                                                               (7, 8, 0.011, 63), (7, 8, 0.125, 5)])
def test_fbgemm_quantizes_the_fp32_input_exactly_as_the_codes_say(bits, weight_bits, scale, zero_point):
    """fbgemm gets the fp32 activation and quantizes it itself: an identity-like weight reads its codes back
    from the output, so one code rounded differently anywhere fails the test."""
    fbgemm = cpu_kernels.INT8_CANDIDATES["fbgemm"]
    act = ActQuant("static_per_tensor", scale, zero_point, bits=bits, weight_bits=weight_bits)
    if not (fbgemm.is_available() and fbgemm.supports(act)):
        pytest.skip("fbgemm is not available in this torch build")
    k = 64
    x = _near_ties(scale, zero_point, act.code_max, n=k * 300).reshape(-1, k)
    top = 2 ** (weight_bits - 1) - 1
    w_q = (torch.eye(k) * top).to(torch.int8)
    w_scale = torch.full((k,), 1.0 / top)
    y = fbgemm.prepare(w_q, w_scale, None, act).run(x)
    codes_read = torch.round(y.double() / scale).float() + zero_point
    assert torch.equal(codes_read, unsigned_codes(x, scale, zero_point, act.code_max))


def test_activation_fake_quant_uses_the_kernel_codes_and_weights_keep_the_division():
    scale, zero_point = 0.0371, -51  # signed int8 zero point: unsigned code 77
    x = _near_ties(scale, 77, 255)
    act = parse_spec("int8-per-tensor", "activation")
    got = fake_quantize(x, torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32), act)
    want = (unsigned_codes(x, scale, 77, 255) - 77) * torch.tensor(scale)
    assert torch.equal(got, want)
    weight = parse_spec("int8-per-tensor", "weight")
    w_got = fake_quantize(x, torch.tensor([scale]), torch.tensor([0], dtype=torch.int32), weight)
    w_want = torch.clamp(torch.round(x / torch.tensor(scale)), -127, 127) * torch.tensor(scale)
    assert torch.equal(w_got, w_want)


def test_lsq_values_equal_fake_quant_and_its_gradients_stay_lsqs():
    scale, zero_point = 0.0371, -51
    spec = parse_spec("int8-per-tensor", "activation")
    x = _near_ties(scale, 77, 255, n=4000).requires_grad_()
    s = torch.tensor([scale], requires_grad=True)
    zp = torch.tensor([zero_point], dtype=torch.int32)
    out = lsq_fake_quantize(x, s, zp, spec, grad_scale=1.0)
    assert torch.equal(out.detach(), fake_quantize(x.detach(), s.detach(), zp, spec))
    out.sum().backward()
    # the gradients are the LSQ expression's: round straight through, clamp's mask, LSQ's scale gradient
    x2, s2 = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    q = torch.clamp(x2 / s2 + (torch.round(x2 / s2) - x2 / s2).detach() + zero_point, -128, 127)
    ((q - zero_point) * s2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.allclose(s.grad, s2.grad, rtol=1e-4)
