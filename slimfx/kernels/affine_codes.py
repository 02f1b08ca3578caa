"""The one activation quantizer every static int8 path shares: fbgemm's fused one.

fbgemm's int8 linear quantizes an fp32 activation while it packs it, as
``u = clamp(round_half_even(fl32(x * fl32(1 / s) + z)), 0, 255)`` with the multiply-add *fused* (one
rounding; measured bit for bit on adversarial near-tie values). When the fake-quant simulation computes the
same codes, a lowered layer can hand its fp32 input straight to fbgemm — no separate pass computing codes —
and still equal the simulation exactly. So the simulation of static per-tensor activations
(:func:`slimfx.passes.quant.spec.fake_quantize`) and every other kernel (dense fallback, oneDNN, convs) use
:func:`unsigned_codes`.

torch has no fp32 fused multiply-add op; :func:`fused_multiply_add` uses ``Tensor.addcmul_`` where a one-time
self-test on adversarial values (per device type) shows it is fused, and an exact float64 emulation
elsewhere (the product of two fp32 is exact in float64; the one rounding of the sum to float64 cannot move a
value across a half-integer that the fp32 rounding would not).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["fused_multiply_add", "reciprocal", "unsigned_codes", "addcmul_is_fused"]


def reciprocal(scale: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
    """``fl32(1 / s)`` as an fp32 tensor (fbgemm's ``1.f / scale``; ``scale`` is rounded to fp32 first)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=device)
    return torch.ones((), dtype=torch.float32, device=s.device) / s


def _emulated(x: torch.Tensor, inv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (x.double() * inv.double() + z.double()).float()


def _shape_only(x: torch.Tensor) -> bool:
    if x.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x)


@functools.cache
def addcmul_is_fused(device_type: str) -> bool:
    """Whether ``z.addcmul_(x, inv)`` rounds once on ``device_type`` (checked on values whose
    separately rounded product lands on the other side of a half-integer; lengths exercise vector tails)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor(0.0371, dtype=torch.float32)
    inv = reciprocal(scale)
    for n in (1, 3, 7, 8, 9, 15, 17, 31, 33, 63, 65, 4099):
        ties = torch.randint(-80, 170, (n,), generator=g).float() + 0.5
        x = (ties * scale) * (1 + (torch.rand(n, generator=g) - 0.5) * 2e-6)
        for z in (0.0, 77.0, 128.0):
            zt = torch.tensor(z)
            want = _emulated(x, inv, zt)
            got = _addcmul(x.to(device_type), inv.to(device_type), zt.to(device_type)).cpu()
            if not torch.equal(got, want):
                return False
    return True


def _addcmul(x: torch.Tensor, inv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # z filled into an x-shaped tensor (x's memory format), then in place: ~20% faster on CPU than
    # torch.addcmul(z, x, inv), whose two 0-dim operands take a slower broadcasting path
    return torch.empty_like(x).copy_(z).addcmul_(x, inv)


def fused_multiply_add(x: torch.Tensor, inv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``fl32(x * inv + z)`` rounded once, elementwise, as a new fp32 tensor (``x`` fp32; ``inv``, ``z``
    0-dim fp32 tensors on ``x``'s device)."""
    if _shape_only(x) or addcmul_is_fused(x.device.type):
        return _addcmul(x, inv, z)
    return _emulated(x, inv, z)


def unsigned_codes(x: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int,
                   code_max: int) -> torch.Tensor:
    """``clamp(round_half_even(fl32(x * fl32(1 / s) + z)), 0, code_max)`` as an fp32 tensor of integers.

    ``zero_point`` is the unsigned code of 0.0 (in ``[0, code_max]``); ``x`` is read, never modified, and
    any float dtype is computed in fp32 (lossless for fp16 / bf16).
    """
    xf = x.float()
    inv = reciprocal(scale, xf.device)
    z = torch.as_tensor(zero_point, device=xf.device).to(torch.float32)
    return fused_multiply_add(xf, inv, z).round_().clamp_(0, code_max)
