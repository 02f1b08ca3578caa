"""Quantization schemes as small strings, and the fake-quant arithmetic every quant pass shares.

A scheme string names the number format, the granularity and (optionally) the symmetry::

    int8-per-channel[-sym|-asym]    one scale per output channel (axis 0 of a weight)
    int8-per-tensor[-sym|-asym]     one scale for the whole tensor
    int8-per-token                  dynamic, symmetric, one scale per row computed at run time (activations)
    int4-group128[-sym|-asym]       one scale per group of 128 consecutive input elements of each row
    fp8-e4m3[-per-tensor|-per-channel]   round to the float8 e4m3 grid after dividing by a scale
    none                            leave the tensor in float

On x86 CPUs without VNNI (AVX2) the int8 kernels (fbgemm, oneDNN, onnxruntime's MLAS) sum pairs of u8 x s8
products in int16, which saturates for 8-bit activation codes with 8-bit weights. ``lower-int8`` runs two schemes
exactly there: ``int7-per-channel`` weights with 8-bit activations (255 * 63 * 2 < 2^15), or ``int7-per-tensor``
activations (torch.ao's ``reduce_range``) with 8-bit weights; 8-bit both runs slimfx's own avx2 kernel (nibble-split
weights) or, without a C compiler, the float fallback. 7-bit both is that kernel's fastest path.

Integer formats: symmetric weights use the narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0
(int8: [-127, 127], what :class:`slimfx.kernels.Int8Linear` stores); symmetric activations use the full
range ``[-2^(b-1), 2^(b-1)-1]`` with zero point 0; asymmetric tensors use the full range with a zero point.
Defaults: weights symmetric, activations asymmetric. The arithmetic is the kernels' (and ONNX QuantizeLinear's):
``q = clamp(round_half_even(x / scale) + zp, qmin, qmax)``, ``x_hat = (q - zp) * scale``, fp32 division,
``scale >= 1e-8``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from slimfx.errors import PipelineError, did_you_mean

SCALE_FLOOR = 1e-8
FP8_E4M3_MAX = 448.0
#: Half the spacing of float8 e4m3's subnormals (2**-9), relative to the scale: the absolute error floor.
FP8_E4M3_ABS_FLOOR = 2.0**-10
#: Half an e4m3 ulp relative to the value (3 mantissa bits): the relative error of a normal number.
FP8_E4M3_REL = 2.0**-4

_EXAMPLES = ["none", "int8-per-tensor", "int7-per-tensor", "int8-per-channel", "int8-per-token", "int4-per-channel",
             "int4-group128", "int8-per-tensor-sym", "int8-per-channel-asym", "fp8-e4m3",
             "fp8-e4m3-per-channel"]
_INT = re.compile(r"^int(?P<bits>[2-8])-(?P<gran>per-tensor|per-channel|per-token|group(?P<group>[0-9]+))"
                  r"(?:-(?P<sym>sym|asym))?$")
_FP8 = re.compile(r"^fp8-e4m3(?:-(?P<gran>per-tensor|per-channel))?$")


@dataclass(frozen=True)
class QuantSpec:
    """A parsed scheme. ``granularity`` is per-tensor, per-channel, per-token or group; ``axis`` the channel
    axis (0 for weights); ``group_size`` the group length along the flattened input dims of each row."""

    text: str
    dtype: str  # "int" or "fp8-e4m3"
    bits: int = 8
    granularity: str = "per-tensor"
    symmetric: bool = True
    narrow: bool = False
    group_size: int = 0
    axis: int = 0

    @property
    def enabled(self) -> bool:
        return self.dtype != "none"

    @property
    def dynamic(self) -> bool:
        return self.granularity == "per-token"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def __str__(self) -> str:
        return self.text


NONE = QuantSpec("none", "none")


def parse_spec(text: str, role: str, option: str = "weights") -> QuantSpec:
    """Parse a scheme string for ``role`` ("weight" or "activation"); PipelineError with a did-you-mean."""
    raw = str(text).strip().lower()
    if raw in ("none", "float", "off"):
        return NONE
    weight = role == "weight"
    match = _INT.match(raw)
    if match:
        gran = match["gran"]
        sym = match["sym"]
        symmetric = (sym == "sym") if sym else (weight or gran == "per-token")
        if gran == "per-token":
            if weight:
                raise PipelineError(f"option {option!r}: {text!r} is dynamic per-token, which is for activations; "
                                    "use int8-per-channel for weights")
            if sym == "asym":
                raise PipelineError(f"option {option!r}: {text!r}: per-token quantization is symmetric only")
        group = 0
        if match["group"] is not None:
            group = int(match["group"])
            if group < 1:
                raise PipelineError(f"option {option!r}: {text!r} needs a group size >= 1, e.g. int4-group128")
            if not weight:
                raise PipelineError(f"option {option!r}: {text!r} is grouped, which is for weights; "
                                    "use int8-per-tensor or int8-per-token for activations")
            gran = "group"
        if gran == "per-channel" and not weight:
            raise PipelineError(f"option {option!r}: per-channel activations are not supported ({text!r}); "
                                "use int8-per-tensor or int8-per-token")
        return QuantSpec(raw, "int", int(match["bits"]), gran, symmetric, narrow=symmetric and weight,
                         group_size=group)
    match = _FP8.match(raw)
    if match:
        gran = match["gran"] or ("per-channel" if weight else "per-tensor")
        if gran == "per-channel" and not weight:
            raise PipelineError(f"option {option!r}: per-channel activations are not supported ({text!r})")
        return QuantSpec(raw, "fp8-e4m3", 8, gran, True)
    raise PipelineError(
        f"option {option!r}: unknown quantization scheme {text!r}{did_you_mean(raw, _EXAMPLES)}; "
        f"schemes look like {', '.join(_EXAMPLES)} (intB-per-tensor|per-channel|per-token|groupN[-sym|-asym])"
    )


def rows_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as a 2-D [slots, elements] tensor, one row per scale (groups zero-padded to full length)."""
    if spec.granularity == "per-tensor":
        return x.reshape(1, -1)
    if spec.granularity == "per-token":
        return x.reshape(-1, x.shape[-1])
    rows = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    if spec.granularity == "group":
        g = spec.group_size
        pad = (-rows.shape[1]) % g
        if pad:
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], pad)], dim=1)
        rows = rows.reshape(-1, g)
    return rows


def expand_qparam(value: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Broadcast a per-slot qparam (shape [slots]) against ``x``."""
    if spec.granularity == "per-tensor":
        return value.reshape(())
    if spec.granularity == "per-token":
        return value.reshape(*x.shape[:-1], 1)
    channels = x.shape[spec.axis]
    if spec.granularity == "group":
        per_row = value.reshape(channels, -1).repeat_interleave(spec.group_size, dim=1)
        inner = x.movedim(spec.axis, 0).shape[1:]
        per_row = per_row[:, : inner.numel()].reshape(channels, *inner)
        return per_row.movedim(0, spec.axis)
    shape = [1] * x.dim()
    shape[spec.axis] = channels
    return value.reshape(shape)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (per slot) covering ``[lo, hi]`` (zero is always representable)."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if spec.dtype == "fp8-e4m3":
        scale = (torch.maximum(-lo, hi) / FP8_E4M3_MAX).clamp_min(SCALE_FLOOR)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(SCALE_FLOOR)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(SCALE_FLOOR)
    zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``x`` with per-slot ``scale``/``zero_point`` (see the module docstring)."""
    s = expand_qparam(scale, x, spec).to(x.dtype)
    if spec.dtype == "fp8-e4m3":
        scaled = (x / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        return scaled.to(torch.float8_e4m3fn).to(x.dtype) * s
    zp = expand_qparam(zero_point, x, spec).to(x.dtype)
    q = torch.clamp(torch.round(x / s) + zp, spec.qmin, spec.qmax)
    return (q - zp) * s


def dynamic_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric qparams of ``x`` computed from the tensor itself (Int8Linear's dynamic mode)."""
    scale = (x.detach().float().abs().amax(dim=-1).reshape(-1) / spec.qmax).clamp_min(SCALE_FLOOR)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def clip_range(scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot, the interval ``[lo, hi]`` inside which the rounding error is at most ``scale / 2``."""
    if spec.dtype == "fp8-e4m3":
        return -FP8_E4M3_MAX * scale, FP8_E4M3_MAX * scale
    zp = zero_point.float()
    return (spec.qmin - zp - 0.5) * scale, (spec.qmax - zp + 0.5) * scale


def error_bound(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per element of ``x`` inside the clipping range, the most fake-quant may move it.

    Integer formats: ``scale / 2``. fp8 e4m3: half an ulp, ``max(|x| * 2**-4, scale * 2**-10)``.
    """
    s = expand_qparam(scale, x, spec).to(torch.float32)
    if spec.dtype == "fp8-e4m3":
        return torch.maximum(x.abs().float() * FP8_E4M3_REL, s * FP8_E4M3_ABS_FLOOR)
    return (s / 2).expand_as(x)
