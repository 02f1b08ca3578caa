"""CPU candidate implementations of the int8 linear and block-sparse linear kernels.

Each candidate is a small object with a ``name``, ``is_available()``, ``supports(...)`` and
``prepare(weights...) -> PreparedKernel`` (which prepacks the weight once); the prepared kernel's
``run(x2d)`` computes the layer for a 2-D activation. :mod:`slimfx.kernels.dispatch` times the
candidates on this machine, checks each against the spec in this file and picks the fastest correct one.
No candidate is assumed fast or even exact: on AVX2-only CPUs oneDNN/fbgemm int8 instructions saturate
int16 intermediates for full-range 8-bit activations (``vpmaddubsw``), which the dispatcher's
worst-case probe detects, and ``torch._int_mm`` is ~100x slower than fp32 matmul.

Activation-quantization modes (the numerics of :class:`slimfx.kernels.modules.Int8Linear`); in all of
them the weight is int8 ``w_q [N, K]`` with a per-output-channel fp32 scale ``w_scale [N]``
(symmetric, zero point 0) and ``y = s_x * w_scale[n] * sum_k (q_x - z_x)[m, k] * w_q[n, k] + bias[n]``:

* ``dynamic_per_token``: per row ``s_x = absmax(x[m]) / 127`` (clamped >= 1e-8), ``z_x = 0``,
  ``q_x = clamp(round_half_even(x / s_x), -127, 127)``. Identical to ``reference.w8a8_linear_ref``
  and the GPU kernel.
* ``dynamic_per_tensor`` (``bits=7``, the default): torch.ao / fbgemm dynamic quantization with
  ``reduce_range`` (7-bit activations, which never saturate int8 instructions on AVX2): over the whole input
  ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``s_x = (hi - lo) / 127``,
  ``z_x = clamp(round(-lo / s_x), 0, 127)`` (torch's ``ChooseQuantizationParams``),
  ``q_x = clamp(round(x * (1 / s_x)) + z_x, 0, 127)``.
  ``bits=8``: ONNX ``DynamicQuantizeLinear`` (onnxruntime's dynamic int8): the same range, in fp32
  ``s_x = (hi - lo) / 255`` (1 when ``hi == lo``), ``z_x = round_half_even(clamp(-lo / s_x, 0, 255))``,
  ``q_x = clamp(round_half_even(x / s_x) + z_x, 0, 255)``. Twice the resolution; exact on AVX2 CPUs without
  VNNI with weights in [-63, 63] (``weight_bits=7``), where onnxruntime's fused ``DynamicQuantizeMatMul``
  runs it (fbgemm does not: its own qparams widen scales below 6.1e-5).
* ``static_per_tensor``: a calibrated ``s_x`` and ``z_x`` in ``[0, 2**bits - 1]`` (quint8, the torch.ao
  static convention, for ``bits=8``), ``q_x = clamp(round_half_even(x / s_x) + z_x, 0, 2**bits - 1)`` (the
  fake-quant simulation's and ONNX QuantizeLinear's). ``bits=7`` is torch.ao's ``reduce_range``: with codes
  <= 127 and weights in [-127, 127] the int16 pair sums of ``vpmaddubsw`` cannot saturate, and neither can
  8-bit codes with weights in [-63, 63] (``ActQuant.weight_bits=7``), so fbgemm, oneDNN and onnxruntime
  are exact on AVX2 CPUs without VNNI for either.

Static codes are the fp32 division in every candidate, like the fake-quant simulation: the fbgemm path
quantizes in torch and hands fbgemm the integer codes (fbgemm's own quantizer, ``round(fma(x, 1 / s, z))``,
differs from the division at near-ties), onnxruntime quantizes with its QuantizeLinear, which is the division.
Dynamic per-tensor codes may round ties differently from the spec's multiply by ``1 / s_x`` (fbgemm's
quantizer; onnxruntime's division) and reach 128 where the spec clamps at 127: that mode's tolerance allows
it. The tolerances in :data:`INT8_TOLERANCE` state how far a candidate may be from :func:`int8_linear_spec`.

``avx2`` is slimfx's own kernel (``avx2_int8.c``, built at first use by :mod:`slimfx.kernels.native`): it computes
every mode's codes as the spec does (the division / product, the qparams bit for bit) and is exact for every code
width, picking the fastest exact GEMM path from the weights it is given (:func:`avx2_path`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from slimfx.errors import KernelError

ACT_MODES = ("dynamic_per_token", "dynamic_per_tensor", "static_per_tensor")
#: Activation modes of :class:`slimfx.kernels.Int8Conv2d`: ``weight_only`` keeps the activation in float.
CONV_ACT_MODES = ("static_per_tensor", "weight_only")

#: Allowed ``max|y - spec| / max(max|spec|, 1e-6)`` per mode. The exact-integer modes only differ from
#: the spec by fp32 rounding of the epilogue / summation order; ``dynamic_per_tensor`` also allows
#: fbgemm's rounding of activation ties (at most one 7-bit step on a few elements).
INT8_TOLERANCE = {"dynamic_per_token": 1e-4, "dynamic_per_tensor": 2e-2, "static_per_tensor": 1e-4,
                  "weight_only": 1e-4}
#: Same measure for block-sparse linear, per weight dtype (summation order only).
BSR_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 2e-2}
#: The most activation bytes ``grouped_gemm`` gathers for one batched GEMM (about an L2/L3 share).
GATHER_BYTES = 2 << 20


def int8_tolerance(mode: str, act_bits: int | None = None) -> float:
    """:data:`INT8_TOLERANCE` for an activation mode and code width: 8-bit dynamic per-tensor codes are the
    spec's in every candidate that supports them (ONNX's formula; fbgemm's own quantizer is not among them), so
    they get the exact modes' tolerance, tight enough to reject a kernel computing 7-bit codes instead."""
    if mode == "dynamic_per_tensor" and act_bits == 8:
        return INT8_TOLERANCE["static_per_tensor"]
    return INT8_TOLERANCE[mode]


@dataclass(frozen=True)
class ActQuant:
    """How an int8 module quantizes its input (see the module docstring for the numerics).

    ``bits`` is the width of unsigned activation codes ``[0, 2**bits - 1]``: for ``static_per_tensor`` 2 to 8
    (default 8, quint8; 7: torch.ao's reduce_range), for ``dynamic_per_tensor`` 7 (the default, torch.ao's
    formula) or 8 (ONNX ``DynamicQuantizeLinear``'s); per-token codes are symmetric int8 (``bits`` is 8).
    ``weight_only`` (convs) keeps the input in float. ``weight_bits`` bounds the module's weight codes,
    ``|w_q| <= 2**(weight_bits - 1) - 1``: the dispatcher probes with weights that wide, so 8-bit activation
    codes with 7-bit weights (whose int16 pair sums cannot saturate, 255 * 63 * 2 < 2**15) run exactly on
    fbgemm / oneDNN / onnxruntime on AVX2 CPUs.
    """

    mode: str = "dynamic_per_token"
    scale: float | None = None
    zero_point: int | None = None
    bits: int | None = None  # None: the mode's default (see default_act_bits)
    weight_bits: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ACT_MODES + ("weight_only",):
            raise KernelError(f"activation mode {self.mode!r} is not one of {ACT_MODES + ('weight_only',)}")
        if self.bits is None:
            object.__setattr__(self, "bits", default_act_bits(self.mode))
        if isinstance(self.scale, torch.Tensor) or isinstance(self.zero_point, torch.Tensor):  # read once, now
            object.__setattr__(self, "scale", None if self.scale is None else float(self.scale))
            object.__setattr__(self, "zero_point", None if self.zero_point is None else int(self.zero_point))
        if not 2 <= int(self.weight_bits) <= 8:
            raise KernelError(f"weight codes have 2 to 8 bits, got weight_bits={self.weight_bits!r}")
        if self.mode == "static_per_tensor":
            if not 2 <= int(self.bits) <= 8:
                raise KernelError(f"static_per_tensor activation codes have 2 to 8 bits, got bits={self.bits!r}")
            if self.scale is None or not (self.scale > 0 and math.isfinite(self.scale)):
                raise KernelError(
                    f"static_per_tensor needs a finite act_scale > 0 from calibration, got {self.scale!r}"
                )
            if self.zero_point is None or not 0 <= int(self.zero_point) <= self.code_max:
                raise KernelError(f"static_per_tensor with {self.bits}-bit codes needs act_zero_point in "
                                  f"[0, {self.code_max}], got {self.zero_point!r}")
            return
        if self.scale is not None or self.zero_point is not None:
            raise KernelError(f"{self.mode} computes its activation scale itself; pass act_scale=None")
        if self.mode == "dynamic_per_tensor" and self.bits not in (7, 8):
            raise KernelError(f"dynamic_per_tensor activation codes have 7 bits (torch.ao's formula) or 8 "
                              f"(ONNX DynamicQuantizeLinear's), got bits={self.bits!r}")
        if self.mode != "dynamic_per_tensor" and self.bits != 8:
            raise KernelError(f"bits={self.bits} is for static_per_tensor and dynamic_per_tensor; {self.mode} "
                              "has a fixed format")

    @property
    def code_max(self) -> int:
        """The largest unsigned activation code (255 for 8 bits, 127 for 7)."""
        return 2 ** int(self.bits) - 1

    @property
    def label(self) -> str:
        """The mode, with the activation / weight code widths that are not 8 bits (``static_per_tensor_u7``,
        ``static_per_tensor_w7``)."""
        return (self.mode + ("" if self.bits == default_act_bits(self.mode) else f"_u{self.bits}")
                + ("" if self.weight_bits == 8 else f"_w{self.weight_bits}"))


def default_act_bits(mode: str) -> int:
    """The activation code width a mode has unless told otherwise: 7 for ``dynamic_per_tensor`` (torch.ao's
    reduce_range), else 8."""
    return 7 if mode == "dynamic_per_tensor" else 8


@dataclass(frozen=True)
class QuantizedActivation:
    """An activation as the int8 GEMM operand ``values = q_u - offset`` plus its quantization params.

    ``q_u`` is the unsigned code in [0, 255] with zero point ``zero_point``; ``row_scale`` is ``s_x``
    per row. ``sum_k (q_u - zero_point) * w = sum_k values * w + shift * rowsum(w)``.
    """

    values: torch.Tensor
    offset: int
    zero_point: int
    row_scale: torch.Tensor

    @property
    def shift(self) -> int:
        return self.offset - self.zero_point

    def unsigned(self) -> torch.Tensor:
        """``q_u`` as uint8 (oneDNN's activation type)."""
        return (self.values.to(torch.int16) + self.offset).to(torch.uint8)


def choose_per_tensor_qparams(x: torch.Tensor, qmax: int = 127) -> tuple[float, int]:
    """torch's ``ChooseQuantizationParams(min, max, 0, qmax)`` (used by dynamic quantized linear)."""
    lo, hi = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)  # one pass
    _check_finite_range(lo, hi)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / qmax
    if _fp32(scale) == 0.0 or math.isinf(1.0 / scale):
        scale = 0.1
    small = 6.1e-5  # torch's SMALL_SCALE_THRESHOLD: tiny ranges are widened, keeping their sign pattern
    if scale < small:
        amplifier = small / scale
        scale = small
        if lo == 0:
            hi = scale * qmax
        elif hi == 0:
            lo = -scale * qmax
        else:
            lo, hi = lo * amplifier, hi * amplifier
    from_min = 0 - lo / scale
    from_max = qmax - hi / scale
    err_min = 0 - abs(lo / scale)
    err_max = qmax - abs(hi / scale)
    initial = from_min if err_min < err_max else from_max
    zero_point = 0 if initial < 0 else (qmax if initial > qmax else int(round(initial)))
    return _fp32(scale), zero_point


def _fp32(value: float) -> float:
    """``value`` rounded to fp32 (as ``float(torch.tensor(value))``, in ~0.2 us instead of ~5)."""
    return float(np.float32(value))


def _check_finite_range(lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise KernelError(f"dynamic activation quantization got an input with range [{lo}, {hi}]: NaN or inf has "
                          "no int8 code; find where the model produces it (or clamp the input)")


def onnx_dynamic_qparams(x: torch.Tensor) -> tuple[float, int]:
    """ONNX ``DynamicQuantizeLinear``'s uint8 (scale, zero point) of ``x``, in fp32 as onnxruntime computes
    them: the range widened to include 0, ``scale = (hi - lo) / 255`` (1 for an all-zero range or one so small
    that the division underflows to 0),
    ``zero_point = round_half_even(clamp(-lo / scale, 0, 255))``."""
    lo, hi = torch.aminmax(x.float()) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    lo, hi = lo.clamp(max=0.0).cpu(), hi.clamp(min=0.0).cpu()
    _check_finite_range(float(lo), float(hi))
    scale = (hi - lo) / 255 if bool(hi != lo) else torch.tensor(1.0)
    if float(scale) == 0.0:  # a range under 255 x the smallest float: quantize it as the empty range (all codes
        scale = torch.tensor(1.0)  # 0, the output the bias; onnxruntime's 0/0 zero point is undefined there)
    zero_point = torch.clamp(torch.div(-lo, scale), 0, 255).round()
    return float(scale), int(zero_point)


def onnx_dynamic_codes(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """ONNX ``DynamicQuantizeLinear`` of ``x``: (uint8 codes, scale, zero point); five passes over ``x``."""
    scale, zp = onnx_dynamic_qparams(x)
    codes = torch.div(x.float(), torch.tensor(scale, dtype=torch.float32, device=x.device)).round_()
    return codes.add_(zp).clamp_(0, 255).to(torch.uint8), scale, zp


def quantize_activation(x2d: torch.Tensor, act: ActQuant) -> QuantizedActivation:
    """Quantize a 2-D float activation ``[M, K]`` per ``act`` (the spec every candidate shares)."""
    x = x2d.float()
    if act.mode == "dynamic_per_token":
        from slimfx.kernels import reference

        q, scale = reference.quantize_per_token_ref(x)
        return QuantizedActivation(q, offset=128, zero_point=128, row_scale=scale.float())
    if act.mode == "dynamic_per_tensor" and act.bits == 8:
        q_u, scale, zp = onnx_dynamic_codes(x)
        row_scale = torch.full((x.shape[0],), scale, dtype=torch.float32, device=x.device)
        return QuantizedActivation((q_u.to(torch.int16) - 128).to(torch.int8), offset=128, zero_point=zp,
                                   row_scale=row_scale)
    if act.mode == "dynamic_per_tensor":
        scale, zp = choose_per_tensor_qparams(x)
        inv = torch.tensor(1.0 / scale, dtype=torch.float32)
        q = torch.clamp(torch.round(x * inv) + zp, 0, 127)
        values = (q - zp).to(torch.int8)
        row_scale = torch.full((x.shape[0],), scale, dtype=torch.float32, device=x.device)
        return QuantizedActivation(values, offset=zp, zero_point=zp, row_scale=row_scale)
    scale, zp = float(act.scale), int(act.zero_point)
    q = static_codes(x, act) + zp
    values = (q - 128).to(torch.int8)
    row_scale = torch.full((x.shape[0],), scale, dtype=torch.float32, device=x.device)
    return QuantizedActivation(values, offset=128, zero_point=zp, row_scale=row_scale)


def static_codes(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """``q_x - z_x`` of a ``static_per_tensor`` activation as an fp32 tensor of small integers.

    ``clamp(round_half_even(x / s_x), -z_x, code_max - z_x)``: the fake-quant simulation's
    ``clamp(round(x / s) + z, qmin, qmax) - z`` for any layout of ``x`` (an fp32 division, so bit for bit).
    Three passes over ``x`` (division, rounding, clamp in place), a new tensor; ``x`` is not modified.
    """
    zp = int(act.zero_point)
    return torch.div(x.float(), scale_tensor(act.scale, x.device)).round_().clamp_(-zp, act.code_max - zp)


def scale_tensor(scale: float, device: torch.device) -> torch.Tensor:
    """``scale`` as an fp32 0-d tensor on ``device``, made once per value and device (a tensor from a Python
    float costs ~4-10 us, ~2% of a small int8 layer's call); under a dispatch mode (FakeTensorMode, tracing) a
    fresh one, so no mode's tensor is ever cached. Shared: read it, never write into it."""
    if torch._C._len_torch_dispatch_stack():
        return torch.tensor(float(scale), dtype=torch.float32, device=device)
    return _cached_scale_tensor(float(scale), device)


@functools.lru_cache(maxsize=256)
def _cached_scale_tensor(scale: float, device: torch.device) -> torch.Tensor:
    """Made outside inference mode, so autograd may save it even when the first call ran under
    ``torch.inference_mode()``."""
    with torch.inference_mode(False):
        return torch.tensor(float(scale), dtype=torch.float32, device=device)


def int8_linear_spec(x2d: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, act: ActQuant) -> torch.Tensor:
    """The exact value of an int8 linear (fp64 accumulation of integer products, exact for K < 2**37).

    For ``dynamic_per_token`` this equals ``reference.w8a8_linear_ref`` up to its fp32 epilogue
    rounding; the tests check that.
    """
    qa = quantize_activation(x2d, act)
    acc = (qa.values.double() + qa.shift) @ w_q.double().t()
    y = acc * qa.row_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max(max|ref|, 1e-6)``; inf when shapes differ or out is not finite."""
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    if ref.numel() == 0:
        return 0.0
    diff = (out.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-6)


class PreparedKernel(Protocol):
    def run(self, x2d: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------
# int8 linear candidates. prepare(w_q int8 [N, K], w_scale fp32 [N], bias fp32 [N] | None, act)
# --------------------------------------------------------------------------------------------------


class _Int8Candidate:
    name = ""
    modes: tuple[str, ...] = ACT_MODES

    def is_available(self) -> bool:
        return True

    def supports(self, act: ActQuant) -> bool:
        return act.mode in self.modes

    def __repr__(self) -> str:
        return f"<int8 candidate {self.name}>"


class _DenseInt8Run:
    def __init__(self, w_q, w_scale, bias, act):
        self.weight = w_q.float() * w_scale.float()[:, None]
        self.bias = None if bias is None else bias.float()
        self.act = act

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.act.mode == "dynamic_per_token":
            # quantize_per_token_ref's exact ops, kept in fp32 and in place: each elementwise op is an
            # OpenMP region, and on a loaded machine every region costs a scheduler slice
            xf = x2d.float()
            scale = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp_min_(1e-8)
            x_hat = torch.div(xf, scale).round_().clamp_(-127, 127).mul_(scale)
        elif self.act.mode == "static_per_tensor":
            # the simulation's x_hat bit for bit: F.linear then computes exactly what the fake-quant program does
            x_hat = static_codes(x2d, self.act).mul_(scale_tensor(self.act.scale, x2d.device))
        else:
            qa = quantize_activation(x2d, self.act)
            x_hat = (qa.values.float() + qa.shift) * qa.row_scale[:, None]
        return F.linear(x_hat, self.weight, self.bias)


class DenseInt8(_Int8Candidate):
    """Dequantized fp32 weight + fake-quantized activation through fp32 ``F.linear`` (always works)."""

    name = "dense"

    def prepare(self, w_q, w_scale, bias, act) -> PreparedKernel:
        return _DenseInt8Run(w_q, w_scale, bias, act)


class _IntMMRun:
    def __init__(self, w_q, w_scale, bias, act):
        self.w_t = w_q.t()
        self.w_scale = w_scale.float()
        self.bias = None if bias is None else bias.float()
        self.rowsum = w_q.sum(dim=1, dtype=torch.int32)
        self.act = act

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        qa = quantize_activation(x2d, self.act)
        acc = torch._int_mm(qa.values, self.w_t)
        if qa.shift:
            acc = acc + qa.shift * self.rowsum
        y = acc.float() * qa.row_scale[:, None] * self.w_scale[None, :]
        return y if self.bias is None else y + self.bias


class IntMM(_Int8Candidate):
    """``torch._int_mm`` (int8 x int8 -> int32) with the quantization and epilogue in torch."""

    name = "int_mm"

    def is_available(self) -> bool:
        return hasattr(torch, "_int_mm")

    def prepare(self, w_q, w_scale, bias, act) -> PreparedKernel:
        return _IntMMRun(w_q, w_scale, bias, act)


def _quantized_engine_for_prepack() -> str | None:
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            return engine
    return None


def _fbgemm_prepack(w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed weight for ``w_q`` with per-output-channel ``w_scale`` (prepacked once per module)."""
    engine = _quantized_engine_for_prepack()
    previous = torch.backends.quantized.engine
    zeros = torch.zeros(w_q.shape[0], dtype=torch.long)
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is deprecated; prepack needs one
            qweight = torch._make_per_channel_quantized_tensor(w_q, w_scale.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
    finally:
        torch.backends.quantized.engine = previous


class _FbgemmDynamicRun:
    def __init__(self, w_q, w_scale, bias, act):
        self.packed = _fbgemm_prepack(w_q, w_scale, bias)

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x2d.float(), self.packed, True)


class _FbgemmStaticRun:
    """Static activations: the codes are computed here (:func:`static_codes`, the simulation's division)
    and handed to fbgemm as floats with scale 1, which it converts to uint8 exactly; ``s_x`` is folded
    into the packed per-channel weight scales. fbgemm then accumulates ``(q_x - z_x) * w_q`` in int32 and
    applies an fp32 epilogue (``acc * (s_x * w_scale[n]) + bias[n]``)."""

    def __init__(self, w_q, w_scale, bias, act):
        self.act = act
        self.packed = _fbgemm_prepack(w_q, w_scale.float() * act.scale, bias)

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        codes = static_codes(x2d, self.act)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            codes, 1.0, int(self.act.zero_point), self.packed)


class FbgemmInt8(_Int8Candidate):
    """fbgemm prepacked int8 linear (torch.ao's engine): its own dynamic per-tensor quantization
    (``dynamic_per_tensor``), or static per-tensor codes computed by slimfx (``static_per_tensor``).
    Its AVX2 kernel (``vpmaddubsw``) saturates int16 pair sums for 8-bit codes with 8-bit weights; with
    7-bit codes or 7-bit weights it is exact."""

    name = "fbgemm"
    modes = ("dynamic_per_tensor", "static_per_tensor")

    def is_available(self) -> bool:
        return (_quantized_engine_for_prepack() is not None and hasattr(torch.ops.quantized, "linear_dynamic")
                and hasattr(torch, "_make_per_channel_quantized_tensor"))

    def supports(self, act: ActQuant) -> bool:
        if act.mode == "static_per_tensor":
            return hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
        # 8-bit dynamic codes: fbgemm's own qparams widen any scale below 6.1e-5 (torch's ChooseQuantizationParams),
        # a 10x coarser step than ONNX's formula on inputs with a range under ~0.016
        return act.mode in self.modes and not (act.mode == "dynamic_per_tensor" and act.bits == 8)

    def prepare(self, w_q, w_scale, bias, act) -> PreparedKernel:
        if act.mode == "static_per_tensor":
            return _FbgemmStaticRun(w_q, w_scale, bias, act)
        return _FbgemmDynamicRun(w_q, w_scale, bias, act)


class _OnednnRun:
    def __init__(self, w_q, w_scale, bias, act):
        self.packed = torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None)
        self.w_scale = w_scale.float().contiguous()
        self.w_zero_point = torch.zeros(w_q.shape[0], dtype=torch.long)
        self.bias = None if bias is None else bias.float()
        self.act = act

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        # per-tensor uint8 codes made directly (not through QuantizedActivation's signed values and back: up to
        # nine passes over the activation instead of five, ~5% of a 1024x4096x4096 layer)
        if self.act.mode == "static_per_tensor":
            zp, scale = int(self.act.zero_point), float(self.act.scale)
            q_u = static_codes(x2d, self.act).add_(zp).to(torch.uint8)
        elif self.act.mode == "dynamic_per_tensor" and self.act.bits == 8:
            q_u, scale, zp = onnx_dynamic_codes(x2d)
        else:
            q_u = None
        if q_u is not None:
            return torch.ops.onednn.qlinear_pointwise(
                q_u, scale, zp, self.packed, self.w_scale, self.w_zero_point, self.bias, 1.0, 0,
                torch.float32, "none", [], "")
        qa = quantize_activation(x2d, self.act)
        per_row = self.act.mode == "dynamic_per_token"
        x_scale = 1.0 if per_row else float(qa.row_scale[0]) if qa.row_scale.numel() else 1.0
        y = torch.ops.onednn.qlinear_pointwise(
            qa.unsigned(), x_scale, qa.zero_point, self.packed, self.w_scale, self.w_zero_point,
            None if per_row else self.bias, 1.0, 0, torch.float32, "none", [], "")
        if per_row:
            y = y * qa.row_scale[:, None]
            if self.bias is not None:
                y = y + self.bias
        return y


class OnednnQLinear(_Int8Candidate):
    """oneDNN prepacked u8 x s8 linear with an fp32 output (exact on VNNI; saturates on AVX2 for 8-bit)."""

    name = "onednn"

    def is_available(self) -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")

    def prepare(self, w_q, w_scale, bias, act) -> PreparedKernel:
        return _OnednnRun(w_q, w_scale, bias, act)


class _OnnxruntimeRun:
    """One onnxruntime session per prepared weight, running MLAS's u8 x s8 GEMM with the weight prepacked at
    session creation, int32 accumulation, an fp32 epilogue and the bias:

    * static, and dynamic 7-bit: ``Clip`` (narrow static codes only) -> ``QuantizeLinear`` (the division, round
      half to even: the simulation's codes) -> ``com.microsoft.MatMulIntegerToFloat``; for 7-bit dynamic
      codes torch computes the qparams (:func:`choose_per_tensor_qparams`) and feeds them in;
    * dynamic 8-bit: ``com.microsoft.DynamicQuantizeMatMul``, which finds the range, quantizes
      (:func:`onnx_dynamic_qparams`, the division) and multiplies in one op.

    Measured on an AVX2 EPYC it runs 1.1-1.2x fbgemm's GEMM. The session keeps its own packed copy of the
    weight."""

    def __init__(self, w_q, w_scale, bias, act):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n, k = w_q.shape
        self.torch_qparams = act.mode == "dynamic_per_tensor" and act.bits == 7
        consts = {"w": w_q.t().contiguous().numpy(), "w_scale": w_scale.float().contiguous().numpy(),
                  "w_zero_point": np.zeros(n, dtype=np.int8)}
        if bias is not None:
            consts["bias"] = bias.float().contiguous().numpy()
        graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])]
        if act.mode == "dynamic_per_tensor" and act.bits == 8:
            nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "w_scale", "w_zero_point"]
                                      + (["bias"] if bias is not None else []), ["y"], domain="com.microsoft")]
        else:
            nodes = self._quantize_then_matmul(act, consts, graph_inputs, bias is not None)
        graph = helper.make_graph(
            nodes, "slimfx_int8_linear", graph_inputs,
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
            initializer=[numpy_helper.from_array(v, name) for name, v in consts.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # its pool would otherwise spin-wait after each run, stealing the cores from the torch ops around it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the extended level rewrites QuantizeLinear + MatMulIntegerToFloat into a path measured 1.6x slower
        # for an unknown batch size
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _quantize_then_matmul(self, act, consts: dict, graph_inputs: list, has_bias: bool) -> list:
        from onnx import TensorProto, helper

        if self.torch_qparams:
            graph_inputs += [helper.make_tensor_value_info("a_scale", TensorProto.FLOAT, []),
                             helper.make_tensor_value_info("a_zero_point", TensorProto.UINT8, [])]
        else:
            zp = int(act.zero_point)
            scale = np.array(float(act.scale), dtype=np.float32)
            consts.update(a_scale=scale, a_zero_point=np.array(zp, dtype=np.uint8))
        nodes, x_name = [], "x"
        if not self.torch_qparams and act.code_max < 255:  # QuantizeLinear clamps to uint8's range; clip narrower
            consts["lo"] = np.array(-zp * scale, dtype=np.float32)
            consts["hi"] = np.array((act.code_max - zp) * scale, dtype=np.float32)
            nodes.append(helper.make_node("Clip", ["x", "lo", "hi"], ["x_clipped"]))
            x_name = "x_clipped"
        nodes.append(helper.make_node("QuantizeLinear", [x_name, "a_scale", "a_zero_point"], ["q"]))
        inputs = ["q", "w", "a_scale", "w_scale", "a_zero_point", "w_zero_point"] + (["bias"] if has_bias else [])
        nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, ["y"], domain="com.microsoft"))
        return nodes

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        x = x2d.detach().float().contiguous()
        feed = {"x": x.numpy()}
        if self.torch_qparams:  # codes from the range: at most 128 (torch rounds the zero point), which u8 x s8
            # pair sums cannot saturate (128 * 127 * 2 < 2**15); the spec clamps at 127, like fbgemm within tolerance
            scale, zp = choose_per_tensor_qparams(x)
            feed.update(a_scale=np.array(scale, dtype=np.float32), a_zero_point=np.array(zp, dtype=np.uint8))
        return torch.from_numpy(self.session.run(None, feed)[0])


class OnnxruntimeInt8(_Int8Candidate):
    """onnxruntime's int8 linear (MLAS), for per-tensor activations (static, dynamic with torch.ao's 7-bit
    qparams, or ONNX's own 8-bit dynamic quantization), when onnxruntime is installed (``pip install
    slimfx[onnx]``). Its u8 x s8 kernels saturate int16 pair sums on AVX2 for 8-bit codes with 8-bit weights
    (the dispatcher's probe rejects it there); with 7-bit codes or 7-bit weights it is exact."""

    name = "onnxruntime"
    modes = ("static_per_tensor", "dynamic_per_tensor")

    def is_available(self) -> bool:
        return _onnxruntime_available()

    def skip_reason(self) -> str | None:
        """Why the dispatcher should not pick it here (forcing it still works): beside torch's OpenMP threads,
        which spin-wait for milliseconds after each op unless ``OMP_WAIT_POLICY=PASSIVE``, its own threads
        get half the cores — measured 1.5x slower than alone, slower than fbgemm."""
        if torch.get_num_threads() == 1 or _openmp_threads_sleep_when_idle():
            return None
        return ("torch's OpenMP threads spin-wait after each op and slow its threads ~1.5x; start Python with "
                "OMP_WAIT_POLICY=PASSIVE to use it")

    def prepare(self, w_q, w_scale, bias, act) -> PreparedKernel:
        return _OnnxruntimeRun(w_q, w_scale, bias, act)


def _openmp_threads_sleep_when_idle() -> bool:
    """Whether the environment (read by libgomp when torch loads it) makes OpenMP workers sleep at once."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    spins = os.environ.get("GOMP_SPINCOUNT", "").strip()
    return policy == "passive" or (spins.isdigit() and int(spins) <= 10000)


@functools.cache
def _onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        return False
    return "CPUExecutionProvider" in ort.get_available_providers()


def triton_available() -> bool:
    """Triton runs on CUDA, or on CPU tensors only under ``TRITON_INTERPRET=1`` (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


class _TritonInt8Run:
    def __init__(self, w_q, w_scale, bias, act):
        self.w_q, self.w_scale = w_q, w_scale.float()
        self.bias = None if bias is None else bias.float()
        self.rowsum = w_q.sum(dim=1, dtype=torch.int32).float()
        self.act = act

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.act.mode == "dynamic_per_token":
            from slimfx.kernels import triton_quant

            return triton_quant.w8a8_linear(x2d, self.w_q, self.w_scale, self.bias, out_dtype=torch.float32)
        from slimfx.kernels import triton_int8_gemm

        qa = quantize_activation(x2d, self.act)
        bias = self.bias
        if qa.shift:  # static zero point: sum (q - z) w = sum a w + shift * rowsum(w), a per-column constant
            correction = qa.shift * float(qa.row_scale[0]) * self.rowsum * self.w_scale
            bias = correction if bias is None else bias + correction
        return triton_int8_gemm.int8_gemm(qa.values, self.w_q, b_layout="nk", row_scale=qa.row_scale,
                                          col_scale=self.w_scale, bias=bias, out_dtype=torch.float32)


class TritonInt8(_Int8Candidate):
    """The Triton int8 kernels (CUDA; on CPU only forced, under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def is_available(self) -> bool:
        return triton_available()

    def prepare(self, w_q, w_scale, bias, act) -> PreparedKernel:
        return _TritonInt8Run(w_q, w_scale, bias, act)


#: slimfx_linear_fused's activation modes (avx2_int8.c)
_AVX2_MODES = {"static_per_tensor": 0, "dynamic_per_tensor": 1, "dynamic_per_token": 3}
#: avx2_int8.c's GEMM paths
AVX2_WIDE, AVX2_NARROW, AVX2_SPLIT = 0, 1, 2


def avx2_path(act: ActQuant, top: int | None = None) -> int:
    """The GEMM path of slimfx's AVX2 kernel for ``act``'s codes and weight codes up to ``top`` in size (default:
    ``act.weight_bits``' bound), each exact: NARROW when two int16 pair sums fit (7-bit codes, ``top <= 64``;
    the fastest), WIDE when one does (8-bit codes with ``top <= 64``, or 7-bit codes), else SPLIT (nibble weights;
    8-bit codes with 8-bit weights). Per-token codes are offset into [1, 255]."""
    top = 2 ** (act.weight_bits - 1) - 1 if top is None else top
    codes = 255 if act.mode == "dynamic_per_token" else act.code_max
    if codes <= 127 and top <= 64:
        return AVX2_NARROW
    return AVX2_WIDE if 2 * codes * top <= 2**15 - 1 else AVX2_SPLIT


def avx2_weights(lib, w2d: torch.Tensor, act: ActQuant) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An int8 weight ``[N, K]`` packed for ``act``'s path: (packed bytes, int32 row sums, path)."""
    w = w2d.detach().to(torch.int8).contiguous()
    n, k = w.shape
    top = max(int(w.max()), -int(w.min())) if w.numel() else 0  # not w.abs(): int8 abs(-128) is -128
    codes = 127 if act.mode == "dynamic_per_token" else act.code_max
    if codes * top * k >= 2**31:  # the int32 accumulator must hold sum_k (q - z) * w (wrapping partials cancel)
        raise KernelError(f"the avx2 kernel accumulates in int32: K={k} with |w| up to {top} and codes up to "
                          f"{codes} may overflow it; another kernel (the dispatcher's fallback) must run this layer")
    path = avx2_path(act, top)
    packed = torch.empty(int(lib.slimfx_packed_weight_bytes(n, k, int(path == AVX2_SPLIT))), dtype=torch.int8)
    pack = lib.slimfx_pack_weights_split if path == AVX2_SPLIT else lib.slimfx_pack_weights
    pack(w.data_ptr(), n, k, packed.data_ptr())
    return packed, w.sum(dim=1, dtype=torch.int32).contiguous(), path


class _Avx2Int8Run:
    """slimfx's own AVX2 kernel (``avx2_int8.c``): the weight packed once, then per call one C call and one
    parallel region on torch's OpenMP threads: the input's range and qparams (dynamic modes, the spec's formulas
    bit for bit), the codes (the spec's fp32 division or product, round half to even), the GEMM with the epilogue
    fused, on the fastest exact path (:func:`avx2_path`)."""

    def __init__(self, w_q, w_scale, bias, act):
        from slimfx.kernels import native

        if act.mode not in _AVX2_MODES:
            raise KernelError(f"the avx2 kernel does not run activation mode {act.mode!r}")
        self.lib = native.avx2_int8()
        self.n, self.k = w_q.shape
        self.kp = (self.k + 7) // 8 * 8
        self.packed, self.colsum, self.path = avx2_weights(self.lib, w_q, act)
        self.w_scale = w_scale.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.act = act
        self.mode = 2 if act.mode == "dynamic_per_tensor" and act.bits == 8 else _AVX2_MODES[act.mode]

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        check_avx2_input(x2d, self.k, "in_features")
        x = x2d.detach().float().contiguous()
        m = x.shape[0]
        out = torch.empty((m, self.n), dtype=torch.float32)
        if m == 0:
            return out
        static = self.act.mode == "static_per_tensor"
        scale, zp = (float(self.act.scale), int(self.act.zero_point)) if static else (0.0, 0)
        report = (ctypes.c_float * 2)()  # dynamic: the chosen (scale, zero point), or the range holding NaN/inf
        status = self.lib.slimfx_linear_fused(
            x.data_ptr(), m, self.k, self.k, self.mode, scale, zp, self.act.code_max, self.path,
            self.packed.data_ptr(), self.n, self.colsum.data_ptr(), self.w_scale.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(), out.data_ptr(), self.n, torch.get_num_threads(),
            report)
        if status == 1:
            _check_finite_range(report[0], report[1])
        if status:
            raise KernelError(f"the avx2 int8 kernel failed (status {status}: out of memory for {m} x {self.kp} "
                              "activation codes)")
        return out


def check_avx2_input(x: torch.Tensor, width: int, what: str, dim: int = -1) -> None:
    """The C kernels read ``x`` through a raw pointer: it must be a CPU tensor of the prepared width."""
    if x.device.type != "cpu":
        raise KernelError(f"the avx2 kernel runs on CPU tensors, got one on {x.device}")
    if x.dim() < 2 or x.shape[dim] != width:
        raise KernelError(f"the avx2 kernel was prepared for {what}={width}, got an input of shape {tuple(x.shape)}")


class Avx2Available:
    """Availability of slimfx's native AVX2 kernel, shared by its linear and conv candidates."""

    def is_available(self) -> bool:
        from slimfx.kernels import native

        return native.avx2_int8_unavailable() is None

    def unavailable_reason(self) -> str | None:
        from slimfx.kernels import native

        return native.avx2_int8_unavailable()


class Avx2Int8(Avx2Available, _Int8Candidate):
    """slimfx's AVX2 int8 linear (``avx2_int8.c``, built with the machine's C compiler at first use,
    :mod:`slimfx.kernels.native`), exact for every per-tensor and per-token mode whatever the code widths
    (:func:`avx2_path`). With 7-bit codes and weights in [-64, 64] two ``vpmaddubsw`` pair sums add in int16
    before one ``vpmaddwd`` widens them: a quarter fewer multiplier instructions than any 8-bit kernel on AVX2
    needs (MLAS, fbgemm, oneDNN); 8-bit codes with 8-bit weights, which saturate those kernels, run on nibble-split
    weights."""

    name = "avx2"
    modes = ("static_per_tensor", "dynamic_per_tensor", "dynamic_per_token")

    def prepare(self, w_q, w_scale, bias, act) -> PreparedKernel:
        return _Avx2Int8Run(w_q, w_scale, bias, act)


INT8_CANDIDATES: dict[str, _Int8Candidate] = {
    c.name: c for c in (DenseInt8(), FbgemmInt8(), OnednnQLinear(), OnnxruntimeInt8(), Avx2Int8(), IntMM(),
                        TritonInt8())
}


# --------------------------------------------------------------------------------------------------
# block-sparse linear candidates. prepare(w: BSRWeight, bias | None); run(x2d) in the weight's dtype
# --------------------------------------------------------------------------------------------------


def bsr_linear_spec(x2d: torch.Tensor, w, bias: torch.Tensor | None) -> torch.Tensor:
    """Block-sparse linear ``x @ W^T + b`` in fp64 (the value candidates are checked against)."""
    from slimfx.kernels import bsr

    y = x2d.double() @ bsr.bsr_to_dense(w).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.to(w.values.dtype)


class _BsrCandidate:
    name = ""

    def is_available(self) -> bool:
        return True

    def supports(self, w) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<block-sparse candidate {self.name}>"


class _SparseMatmulRun:
    """``y = (W @ x^T)^T + b`` through torch's sparse CSR/BSR matmul (MKL sparse BLAS on CPU).

    The operand order and layouts are the fast ones for MKL: the dense operand ``x^T`` and the result
    ``y^T`` row-major (MKL's column-major path was ~6x slower here), so torch copies ``x^T`` once per call
    and writes ``y^T`` contiguously; ``y`` is returned as its transposed view, no copy. The bias is the
    ``beta * C`` input of one ``addmm``, not a second pass over the output. The weight's indices are int32
    (MKL's LP64 index type); int64 ones would be converted on every call.
    """

    def __init__(self, weight_sparse: torch.Tensor, bias, dtype):
        self.weight = weight_sparse
        self.bias_column = None if bias is None else bias.to(dtype).reshape(-1, 1)
        self.dtype = dtype

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        x_t = x2d.to(self.dtype).t()
        if self.bias_column is None:
            return (self.weight @ x_t).t()
        return torch.addmm(self.bias_column, self.weight, x_t).t()


class TorchBsr(_BsrCandidate):
    """torch's BSR tensor times the transposed activation (MKL sparse BLAS on CPU)."""

    name = "torch_bsr"

    def supports(self, w) -> bool:
        return w.block[0] == w.block[1] or w.device.type != "cpu"

    def prepare(self, w, bias) -> PreparedKernel:
        from slimfx.kernels import bsr

        if not self.supports(w):
            raise KernelError(f"torch_bsr: torch's CPU BSR matmul (MKL) needs square blocks, got block "
                              f"{w.block}; use torch_csr or dense")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "sparse is beta" / "invariant checks" notices
            weight = bsr.to_torch_bsr(w)
        return _SparseMatmulRun(weight, bias, w.values.dtype)


class TorchCsr(_BsrCandidate):
    """torch's CSR tensor (element sparsity; zeros inside kept blocks are dropped too)."""

    name = "torch_csr"

    def prepare(self, w, bias) -> PreparedKernel:
        from slimfx.kernels import bsr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "sparse is beta" / "invariant checks" notices
            weight = bsr.to_torch_csr(w)
        return _SparseMatmulRun(weight, bias, w.values.dtype)


class _GroupedGemmRun:
    """Block-sparse linear as a few dense batched GEMMs over the stored blocks only.

    Row-block ``r`` of ``y^T`` is ``W_r @ X_r`` where ``W_r [bh, c*bw]`` concatenates its ``c`` stored
    blocks and ``X_r [c*bw, M]`` stacks the matching row-blocks of ``x^T``. Row blocks with the same ``c``
    are grouped (prepared once: weights ``[g, bh, c*bw]``, gather indices, bias) so that one
    ``index_select`` plus one ``baddbmm`` computes a whole group; groups are cut so that the gathered
    activation stays under :data:`GATHER_BYTES` (cache-sized: on a 2-core EPYC larger chunks ran ~1.5x
    slower). The result rows come out sorted by ``c`` and are put back in order with one ``index_select``.

    It issues two parallel ops per chunk (~140 for 512x4096x4096 at block 32 and 90% sparsity), so it
    suffers most when torch's threads outnumber free cores: with other processes busy on both of 2 cores it
    ran 10-50x slower than idle, MKL's single call ~2x. The dispatcher times it under the load of the moment.
    """

    def __init__(self, w, bias):
        (n, k), (bh, bw) = w.shape, w.block
        self.shape, self.block, self.dtype = (n, k), (bh, bw), w.values.dtype
        rows = n // bh
        crow = w.crow_indices.long()
        counts = crow[1:] - crow[:-1]
        order = torch.argsort(counts, stable=True)
        bias_rows = None if bias is None else bias.to(self.dtype).reshape(rows, bh, 1)
        self.groups = []  # (first sorted row, row blocks, stored blocks per row, gather index, weights, bias)
        start = 0
        for count, size in zip(*(t.tolist() for t in torch.unique_consecutive(counts[order], return_counts=True))):
            members = order[start:start + size]
            blocks = crow[members].unsqueeze(1) + torch.arange(count, device=crow.device)  # [g, c]
            gather = w.col_indices.long()[blocks].reshape(-1)
            weights = w.values[blocks].permute(0, 2, 1, 3).reshape(size, bh, count * bw).contiguous()
            group_bias = None if bias_rows is None else bias_rows[members].contiguous()
            self.groups.append((start, size, count, gather, weights, group_bias))
            start += size
        identity = torch.equal(order, torch.arange(rows, device=order.device))
        self.unsort = None if identity else torch.argsort(order)

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        (n, k), (bh, bw) = self.shape, self.block
        m = x2d.shape[0]
        x_t = x2d.to(self.dtype).t().contiguous().view(k // bw, bw, m)  # row-blocks of x^T, each contiguous
        y_sorted = torch.empty(n // bh, bh, m, dtype=self.dtype, device=x2d.device)
        row_bytes = bw * max(m, 1) * x_t.element_size()
        for start, size, count, gather, weights, bias in self.groups:
            if count == 0:
                y_sorted[start:start + size] = 0 if bias is None else bias
                continue
            step = max(1, GATHER_BYTES // (count * row_bytes))
            for i in range(0, size, step):
                g = min(step, size - i)
                x_g = x_t.index_select(0, gather[i * count:(i + g) * count]).view(g, count * bw, m)
                out = y_sorted[start + i:start + i + g]
                if bias is None:
                    torch.bmm(weights[i:i + g], x_g, out=out)
                else:
                    torch.baddbmm(bias[i:i + g], weights[i:i + g], x_g, out=out)
        y_t = y_sorted if self.unsort is None else y_sorted.index_select(0, self.unsort)
        return y_t.view(n, m).t()


class GroupedGemm(_BsrCandidate):
    """Dense batched GEMMs over the stored blocks, row blocks grouped by their block count (pure torch)."""

    name = "grouped_gemm"

    def prepare(self, w, bias) -> PreparedKernel:
        return _GroupedGemmRun(w, bias)


class _DenseBsrRun:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        return F.linear(x2d.to(self.weight.dtype), self.weight, self.bias)


class DenseBsr(_BsrCandidate):
    """The weight densified once, through ``F.linear`` (always works; wins below ~75% sparsity)."""

    name = "dense"

    def prepare(self, w, bias) -> PreparedKernel:
        from slimfx.kernels import bsr

        return _DenseBsrRun(bsr.bsr_to_dense(w), None if bias is None else bias.to(w.values.dtype))


class _TritonBsrRun:
    def __init__(self, w, bias):
        self.w, self.bias = w, bias

    def run(self, x2d: torch.Tensor) -> torch.Tensor:
        from slimfx.kernels import triton_bsr

        return triton_bsr.bsr_linear(x2d.to(self.w.values.dtype), self.w, self.bias)


class TritonBsr(_BsrCandidate):
    """The Triton BSR kernel (CUDA; on CPU only forced, under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def is_available(self) -> bool:
        return triton_available()

    def prepare(self, w, bias) -> PreparedKernel:
        return _TritonBsrRun(w, bias)


BSR_CANDIDATES: dict[str, _BsrCandidate] = {
    c.name: c for c in (DenseBsr(), TorchBsr(), TorchCsr(), GroupedGemm(), TritonBsr())
}
