"""CPU candidate implementations of the int8 2-D convolution (:class:`slimfx.kernels.Int8Conv2d`).

Same shape as the linear candidates of :mod:`slimfx.kernels.cpu_kernels`: ``name``, ``is_available()``,
``supports(act, geometry)`` and ``prepare(w_q, w_scale, bias, geometry, act) -> PreparedKernel`` (the
weight packed once); ``run(x, memory_format=None)`` takes a 4-D float input ``[N, C, H, W]`` and returns fp32
in ``memory_format``, by default the input's (what ``F.conv2d`` would return). :mod:`slimfx.kernels.dispatch`
checks each candidate against :func:`int8_conv2d_spec` on a worst-case probe and times the correct ones.

Numerics: the weight is int8 ``w_q [O, C/groups, kh, kw]`` with a per-output-channel fp32 scale
(symmetric, zero point 0); the activation is either ``static_per_tensor`` (codes as in
:func:`cpu_kernels.static_codes`, zero padding = the zero point) or ``weight_only`` (float). The value is
``conv(x_hat, w_q * w_scale) + bias`` with ``x_hat = (q_x - z_x) * s_x``.

Candidates: ``dense`` (the dequantized weight through fp32 ``F.conv2d``: bit for bit the fake-quant
simulation's arithmetic), ``dense_channels_last`` (the same in channels-last layout, often faster on CPU)
and ``onednn`` (``onednn::qconv2d_pointwise``, u8 x s8 with an int32 accumulator and an fp32 output; its
AVX2 kernel saturates int16 pair sums for 8-bit codes, exact for 7-bit ones). fbgemm's
``quantized::conv2d`` (torch.ao's) is not a candidate: it re-quantizes its output to 8 bits, which no
tolerance of this contract admits. ``avx2``: slimfx's own kernel (groups 1), an im2col of the codes into its
GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimfx.errors import KernelError
from slimfx.kernels.cpu_kernels import (
    ActQuant,
    Avx2Available,
    PreparedKernel,
    avx2_weights,
    check_avx2_input,
    scale_tensor,
    static_codes,
)


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return (value[0], value[0])
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise KernelError(f"Int8Conv2d: {name} must be an int or a pair of ints, got {value!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, zero padding, dilation (pairs) and groups of a 2-D convolution."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, stride=1, padding=0, dilation=1, groups: int = 1) -> ConvGeometry:
        """Normalise ints / pairs; KernelError for anything else (string padding is resolved by the caller)."""
        geometry = cls(_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), int(groups))
        if min(geometry.stride + geometry.dilation) < 1 or min(geometry.padding) < 0 or geometry.groups < 1:
            raise KernelError(f"Int8Conv2d: stride/dilation must be >= 1, padding >= 0 and groups >= 1, "
                              f"got {geometry}")
        return geometry

    def output_size(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        """The output's spatial size (F.conv2d's formula)."""
        sizes = []
        for size, k, s, p, d in zip((h, w), (kh, kw), self.stride, self.padding, self.dilation):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out channels-last (and not also plain contiguous), else contiguous:
    the layout F.conv2d gives its output for this input."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def dequantized_conv_weight(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``w_q * w_scale`` per output channel in fp32: the weight fake-quant's ``q * s`` bit for bit."""
    return w_q.float() * w_scale.float().reshape(-1, 1, 1, 1)


def _x_hat(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    if act.mode == "weight_only":
        return x.float()
    return static_codes(x, act).mul_(scale_tensor(act.scale, x.device))


def int8_conv2d_spec(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     geometry: ConvGeometry, act: ActQuant) -> torch.Tensor:
    """The value every candidate must compute, in fp64 (then rounded to fp32): products of small integers
    and fp32 scales are exact in fp64, so only the final rounding and fp64 summation differ from exact."""
    if act.mode == "weight_only":
        x64 = x.double()
    else:
        x64 = static_codes(x, act).double() * float(act.scale)
    w64 = w_q.double() * w_scale.double().reshape(-1, 1, 1, 1)
    return geometry.conv(x64, w64, None if bias is None else bias.double()).float()


class _ConvCandidate:
    name = ""
    modes: tuple[str, ...] = ("static_per_tensor", "weight_only")

    def is_available(self) -> bool:
        return True

    def supports(self, act: ActQuant, geometry: ConvGeometry) -> bool:
        return act.mode in self.modes

    def __repr__(self) -> str:
        return f"<int8 conv candidate {self.name}>"


class _DenseConvRun:
    def __init__(self, w_q, w_scale, bias, geometry, act, channels_last: bool):
        self.weight = dequantized_conv_weight(w_q, w_scale)
        if channels_last:
            self.weight = self.weight.contiguous(memory_format=torch.channels_last)
        self.bias = None if bias is None else bias.float()
        self.geometry, self.act, self.channels_last = geometry, act, channels_last

    def run(self, x: torch.Tensor, memory_format: torch.memory_format | None = None) -> torch.Tensor:
        layout = memory_format or memory_format_of(x)
        x_hat = _x_hat(x, self.act)
        if self.channels_last:
            x_hat = x_hat.contiguous(memory_format=torch.channels_last)
        return self.geometry.conv(x_hat, self.weight, self.bias).contiguous(memory_format=layout)


class DenseConv(_ConvCandidate):
    """The dequantized fp32 weight through ``F.conv2d`` in the input's layout (always works)."""

    name = "dense"

    def prepare(self, w_q, w_scale, bias, geometry, act) -> PreparedKernel:
        return _DenseConvRun(w_q, w_scale, bias, geometry, act, channels_last=False)


class DenseConvChannelsLast(_ConvCandidate):
    """The dequantized fp32 weight through ``F.conv2d`` in channels-last layout (oneDNN's preferred one)."""

    name = "dense_channels_last"

    def prepare(self, w_q, w_scale, bias, geometry, act) -> PreparedKernel:
        return _DenseConvRun(w_q, w_scale, bias, geometry, act, channels_last=True)


class _OnednnConvRun:
    def __init__(self, w_q, w_scale, bias, geometry, act):
        g = geometry
        self.act, self.geometry = act, geometry
        self.w_scale = w_scale.float().contiguous()
        self.w_zero_point = torch.zeros(w_q.shape[0], dtype=torch.long)
        self.bias = None if bias is None else bias.float()
        self.packed = torch.ops.onednn.qconv_prepack(
            w_q.contiguous(), self.w_scale, float(act.scale), int(act.zero_point), list(g.stride),
            list(g.padding), list(g.dilation), g.groups, None)

    def run(self, x: torch.Tensor, memory_format: torch.memory_format | None = None) -> torch.Tensor:
        g, zp = self.geometry, int(self.act.zero_point)
        codes = static_codes(x, self.act).add_(zp)
        q = torch.empty(codes.shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)
        q.copy_(codes)
        y = torch.ops.onednn.qconv2d_pointwise(
            q, float(self.act.scale), zp, self.packed, self.w_scale, self.w_zero_point, self.bias,
            list(g.stride), list(g.padding), list(g.dilation), g.groups, 1.0, 0, torch.float32, "none", [], "")
        return y.contiguous(memory_format=memory_format or memory_format_of(x))


class OnednnQConv(_ConvCandidate):
    """oneDNN prepacked u8 x s8 convolution with an fp32 output (static activations only)."""

    name = "onednn"
    modes = ("static_per_tensor",)

    def is_available(self) -> bool:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")
                and hasattr(torch.ops.onednn, "qconv_prepack"))

    def prepare(self, w_q, w_scale, bias, geometry, act) -> PreparedKernel:
        return _OnednnConvRun(w_q, w_scale, bias, geometry, act)


class _Avx2ConvRun:
    """slimfx's AVX2 conv (``avx2_int8.c``): the weight packed once as ``[O, kh * kw * C]``; per call one C call,
    one parallel region: codes of the channels-last input, im2col on the codes, the GEMM on its exact path."""

    def __init__(self, w_q, w_scale, bias, geometry, act):
        from slimfx.kernels import native

        if act.mode != "static_per_tensor" or geometry.groups != 1:
            raise KernelError(f"the avx2 conv runs static activations and groups=1, got {act.mode} and "
                              f"groups={geometry.groups}")
        self.lib = native.avx2_int8()
        self.o, self.c, self.kh, self.kw = w_q.shape
        w2d = w_q.detach().to(torch.int8).permute(0, 2, 3, 1).reshape(self.o, -1)
        self.packed, self.colsum, self.path = avx2_weights(self.lib, w2d, act)
        self.w_scale = w_scale.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.geometry, self.act = geometry, act

    def run(self, x: torch.Tensor, memory_format: torch.memory_format | None = None) -> torch.Tensor:
        check_avx2_input(x, self.c, "in_channels", dim=1)
        if x.dim() != 4:
            raise KernelError(f"the avx2 conv takes a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
        layout = memory_format or memory_format_of(x)
        g = self.geometry
        xc = x.detach().float().contiguous(memory_format=torch.channels_last)
        n, c, h, w = xc.shape
        oh, ow = g.output_size(h, w, self.kh, self.kw)
        out = torch.empty((n, oh, ow, self.o), dtype=torch.float32)
        if out.numel():
            status = self.lib.slimfx_conv2d(
                xc.data_ptr(), n, h, w, c, self.kh, self.kw, *g.stride, *g.padding, *g.dilation, oh, ow,
                float(self.act.scale), int(self.act.zero_point), self.act.code_max, self.path,
                self.packed.data_ptr(), self.o,
                self.colsum.data_ptr(), self.w_scale.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                out.data_ptr(), torch.get_num_threads())
            if status:
                raise KernelError(f"the avx2 int8 conv ran out of memory for {n * oh * ow} rows of im2col codes")
        return out.permute(0, 3, 1, 2).contiguous(memory_format=layout)


class Avx2Conv(Avx2Available, _ConvCandidate):
    """slimfx's AVX2 kernel (see :class:`slimfx.kernels.cpu_kernels.Avx2Int8`) as a convolution: static
    activations of any code width, groups 1."""

    name = "avx2"
    modes = ("static_per_tensor",)

    def supports(self, act: ActQuant, geometry: ConvGeometry) -> bool:
        return act.mode in self.modes and geometry.groups == 1

    def prepare(self, w_q, w_scale, bias, geometry, act) -> PreparedKernel:
        return _Avx2ConvRun(w_q, w_scale, bias, geometry, act)


CONV_CANDIDATES: dict[str, _ConvCandidate] = {
    c.name: c for c in (DenseConv(), DenseConvChannelsLast(), OnednnQConv(), Avx2Conv())
}
