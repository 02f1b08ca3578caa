"""The nn.Modules a compressed model runs on: :class:`Int8Linear`, :class:`Int8Conv2d`, :class:`BlockSparseLinear`.

All are inference modules whose state is plain tensors (buffers), so a state_dict saves with
safetensors and loads without pickled objects. ``forward`` asks :mod:`slimfx.kernels.dispatch` which
kernel to run (Triton on CUDA; the fastest correct CPU candidate for this machine and shape, measured
once and cached; or the one forced by ``kernel=`` / ``$SLIMFX_KERNEL``) and prepacks the weight for it
once. Under ``torch.fx`` tracing the modules record themselves as a single ``call_module`` node (a leaf)
with any tracer; under FakeTensor / meta propagation they only compute the output shape.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch import fx
from torch._subclasses.fake_tensor import is_fake

from slimfx.errors import KernelError
from slimfx.kernels import conv_kernels, cpu_kernels, dispatch
from slimfx.kernels.bsr import BSRWeight, dense_to_bsr
from slimfx.kernels.conv_kernels import ConvGeometry
from slimfx.kernels.cpu_kernels import ACT_MODES, CONV_ACT_MODES, ActQuant


def _is_shape_only(x: torch.Tensor) -> bool:
    if (type(x) is torch.Tensor and not torch._is_functional_tensor(x)
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)):  # the common case, ~5x cheaper
        return x.is_meta
    return x.device.type == "meta" or is_fake(x)  # is_fake also sees through functionalization wrappers


def _as_output(y: torch.Tensor, x: torch.Tensor, shape: tuple | None = None) -> torch.Tensor:
    """The kernel's output ``y`` in ``x``'s dtype and ``shape`` (no-ops skipped: each costs microseconds)."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if shape is None or y.shape == shape else y.reshape(shape)


def _record_leaf_call(module: nn.Module, x: fx.Proxy) -> fx.Proxy:
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


class _KeepAlive:
    """Holds a token's tensors so their ids cannot be reused while the token is cached; equal to any other
    (the token compares the ids, addresses and versions beside it)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: tuple) -> None:
        self.tensors = tensors

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _KeepAlive)

    def __hash__(self) -> int:
        return 0


def _version_token(*tensors: torch.Tensor | None) -> tuple:
    """Identity, address and version of each tensor: changes when a tensor is replaced (``load_state_dict``
    with ``assign=True`` included: the token keeps the old tensors, so a new one cannot reuse their id) or
    written in place through autograd-visible ops (writes through ``.data`` are not seen)."""
    return tuple([None if t is None else (id(t), t.data_ptr(), t._version, t.device) for t in tensors]
                 + [_KeepAlive(tensors)])


def _buffer_token(module: nn.Module, *names: str) -> tuple:
    """:func:`_version_token` of the module's buffers ``names``, read from ``_buffers`` directly (through
    ``nn.Module.__getattr__`` each read costs ~1 us, a few percent of a small layer's call)."""
    buffers = module._buffers
    return _version_token(*[buffers[name] for name in names])


class _KernelModule(nn.Module):
    """Shared machinery: the per-module cache of the prepacked weight for the chosen kernel."""

    def __init__(self, kernel: str | None) -> None:
        super().__init__()
        self.kernel = kernel
        self.last_kernel: str | None = None
        self._prepared: tuple | None = None
        self._kernel_choices: dict[tuple, object] = {}

    def _memo_choice(self, token: tuple, key: tuple, choose):
        """``choose()``'s answer, asked once per ``key`` + forcing + dispatcher generation while ``token``
        (the version token of the module's tensors, and the values of any scalars the answer reads) stays.

        Asking the dispatcher costs ~50-150 us per call (the forcing env var parsed, the bucket formatted,
        the activation qparams read from their buffers, the weight's width or density computed): ~5% of a
        256x1024x1024 int8 layer and ~9% of a 90%-sparse one. ``key`` must hold everything else the answer
        depends on (shape bucket, device, dtype). A new token drops every memoized answer (and with them the
        old tensors the token kept alive).
        """
        memo = self.__dict__.setdefault("_kernel_choices", {})  # modules pickled before the memo existed
        if self.__dict__.get("_memo_token") != token:
            memo.clear()
            self._memo_token = token
        key = key + (self.kernel, os.environ.get("SLIMFX_KERNEL"), dispatch.generation)
        answer = memo.get(key)
        if answer is None:
            if len(memo) >= 64:  # keys of devices / batch buckets pile up otherwise
                memo.clear()
            answer = memo[key] = choose()
        return answer

    def _prepared_for(self, name: str, token: tuple, prepare):
        key = (name, token)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, prepare())
        if self.last_kernel != name:
            self.last_kernel = name
        return self._prepared[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_prepared"] = None  # prepacked library objects are rebuilt on demand, never copied/pickled
        state["_kernel_choices"] = {}  # keyed by the source tensors' identities: meaningless in a copy
        state["_memo_token"] = None
        state.pop("_weight_bits_cache", None)
        return state

    def _kernel_repr(self) -> str:
        if self.kernel is not None:
            return f"kernel={self.kernel} (forced)"
        return f"kernel=auto (last run: {self.last_kernel or 'not run yet'})"


class Int8Linear(_KernelModule):
    """``y = x @ dequant(W)^T + b`` with an int8 weight and quantized activations.

    State (all buffers): ``weight_int8`` int8 [N, K], ``weight_scale`` fp32 [N] (per output channel,
    symmetric), ``bias`` fp32 [N] or None, and for ``static_per_tensor`` ``act_scale`` (fp32 scalar) and
    ``act_zero_point`` (int32 scalar in [0, 2**act_bits - 1]). The activation is quantized per ``mode``:

    * ``"dynamic_per_token"`` (default): symmetric int8 per row, the GPU kernel's numerics; reference
      ``reference.w8a8_linear_ref``. Every kernel is within 1e-4 x max|reference| of it.
    * ``"dynamic_per_tensor"``: per-tensor asymmetric codes from the input's range: ``act_bits=7`` (default)
      torch.ao's dynamic quantization (``reduce_range``), what fbgemm runs natively; ``act_bits=8`` ONNX
      ``DynamicQuantizeLinear``'s, onnxruntime's fused dynamic int8, exact on AVX2 CPUs with 7-bit weights;
      within 2e-2 x max|spec| of :func:`cpu_kernels.int8_linear_spec` for 7-bit codes (fbgemm rounds ties its
      own way), 1e-4 for 8-bit codes (:func:`cpu_kernels.int8_tolerance`).
    * ``"static_per_tensor"``: the calibrated ``act_scale`` / ``act_zero_point``, ``act_bits``-bit unsigned
      codes (8: quint8; 7: torch.ao's reduce_range); the int8 kernels are exact on AVX2 CPUs for 7-bit codes
      or 7-bit weights (the module reports its weights' width to the dispatcher); within 1e-4 x max|spec|,
      and for the ``dense`` kernel bit for bit the fake-quant simulation.

    The output has the input's dtype; the arithmetic is int8 x int8 with an exact int32 accumulator (or
    fp32 emulating it exactly for the dense kernel) and an fp32 epilogue.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mode: str = "dynamic_per_token", act_scale: float | torch.Tensor | None = None,
                 act_zero_point: int | torch.Tensor | None = None, kernel: str | None = None,
                 act_bits: int | None = None) -> None:
        super().__init__(kernel)
        if mode not in ACT_MODES:
            raise KernelError(f"Int8Linear: mode {mode!r} is not one of {ACT_MODES}")
        self.in_features, self.out_features, self.mode = int(in_features), int(out_features), mode
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.act_bits = _register_act_qparams(self, "Int8Linear", mode, act_scale, act_zero_point, act_bits)
        self._dynamic_act_bits = True  # marks act_bits as this format's (see __setstate__)
        if kernel is not None:
            dispatch.forced_kernel("int8", kernel)  # unknown names fail at construction

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "dynamic_per_token",
                   act_scale: float | torch.Tensor | None = None, act_zero_point: int | None = None,
                   kernel: str | None = None, act_bits: int | None = None, weight_bits: int = 8) -> Int8Linear:
        """Quantize ``linear``'s weight per output channel, symmetric: with ``t = 2**(weight_bits - 1) - 1``
        (127 for 8 bits), ``scale = max(absmax / t, 1e-8)``, ``q = clamp(round_half_even(w / scale), -t, t)``;
        the bias is kept in fp32. ``weight_bits=7`` lets the int8 kernels of AVX2 CPUs without VNNI run 8-bit
        activation codes (per-token, dynamic per-tensor or static) exactly."""
        if not isinstance(linear, nn.Linear):
            raise KernelError(f"Int8Linear.from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, mode,
                     act_scale, act_zero_point, kernel, act_bits).to(w.device)
        module.weight_int8.copy_(_quantize_per_channel(w, module.weight_scale, weight_bits))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def act_quant(self) -> ActQuant:
        """The activation quantization this module applies (reads the static buffers when present)."""
        return _act_quant(self)

    def __setstate__(self, state: dict) -> None:
        # pickled before act_bits applied to dynamic_per_tensor: those stored 8 for what were torch.ao's 7-bit codes
        if state.get("mode") == "dynamic_per_tensor" and "_dynamic_act_bits" not in state:
            state = dict(state, act_bits=7)
        state["_dynamic_act_bits"] = True
        super().__setstate__(state)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the int8 weight stands for."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):
            return _record_leaf_call(self, x)
        if x.shape[-1] != self.in_features:
            raise KernelError(f"Int8Linear: input's last dim must be in_features={self.in_features}, "
                              f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        if _is_shape_only(x):
            return x.new_empty(*lead, self.out_features)
        x2d = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        token = _buffer_token(self, "weight_int8", "weight_scale", "bias") + _act_values(self)

        def choose() -> tuple[ActQuant, str]:
            act = self.act_quant()
            return act, dispatch.select_int8_kernel(x2d.shape[0], self.out_features, self.in_features, act,
                                                    device=x.device, dtype=x.dtype, kernel=self.kernel)

        act, name = self._memo_choice(token, (dispatch._round_up_pow2(x2d.shape[0]), x.device, x.dtype), choose)
        prepared = self._prepared_for(name, token, lambda: cpu_kernels.INT8_CANDIDATES[name].prepare(
            self.weight_int8, self.weight_scale, self.bias, act))
        return _as_output(prepared.run(x2d), x, (*lead, self.out_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={_mode_repr(self)}, {self._kernel_repr()}")


def _register_act_qparams(module: nn.Module, owner: str, mode: str, act_scale, act_zero_point,
                          act_bits: int | None) -> int:
    """Register ``act_scale`` / ``act_zero_point`` buffers for ``static_per_tensor`` (validated now, not at
    the first forward); refuse them for the other modes. Returns the activation code width (``None``: the
    mode's default)."""
    act_bits = cpu_kernels.default_act_bits(mode) if act_bits is None else act_bits
    if mode == "static_per_tensor":
        if act_scale is None:
            raise KernelError(f"{owner}(mode='static_per_tensor') needs act_scale from calibration (and "
                              f"act_zero_point in [0, 2**act_bits - 1], default 2**(act_bits - 1))")
        zp = 2 ** (int(act_bits) - 1) if act_zero_point is None else act_zero_point
        module.register_buffer("act_scale", torch.as_tensor(act_scale, dtype=torch.float32).reshape(()))
        module.register_buffer("act_zero_point", torch.as_tensor(zp, dtype=torch.int32).reshape(()))
        ActQuant(mode, float(module.act_scale), int(module.act_zero_point), int(act_bits))
        return int(act_bits)
    if act_scale is not None or act_zero_point is not None:
        raise KernelError(f"{owner}(mode={mode!r}) has no static activation qparams; "
                          "act_scale/act_zero_point are for mode='static_per_tensor'")
    if mode == "dynamic_per_tensor":
        if act_bits not in (7, 8):
            raise KernelError(f"{owner}(mode='dynamic_per_tensor'): act_bits must be 7 (torch.ao's dynamic "
                              f"quantization, the default) or 8 (ONNX DynamicQuantizeLinear's), got {act_bits!r}")
        return int(act_bits)
    if act_bits != 8:
        raise KernelError(f"{owner}(mode={mode!r}): act_bits is for mode='static_per_tensor' or "
                          f"'dynamic_per_tensor'; {mode} has a fixed format")
    return 8


def _act_values(module: nn.Module) -> tuple:
    """The static activation qparams' values (two scalar reads): they key the module's memo and prepacked
    kernel by value, so writes the version counter misses (through ``.data``, numpy) still reach the run."""
    if module.mode != "static_per_tensor":
        return (module.mode, module.act_bits)
    buffers = module._buffers
    return (float(buffers["act_scale"]), int(buffers["act_zero_point"]), module.act_bits)


def _act_quant(module: nn.Module) -> ActQuant:
    weight_bits = _weight_bits(module)
    if module.mode == "static_per_tensor":
        return ActQuant(module.mode, float(module.act_scale), int(module.act_zero_point), module.act_bits,
                        weight_bits)
    return ActQuant(module.mode, bits=module.act_bits if module.mode == "dynamic_per_tensor" else None,
                    weight_bits=weight_bits)


def _weight_bits(module: nn.Module) -> int:
    """The fewest bits holding every weight code (``|w_q| <= 2**(b - 1) - 1``; at most 8), cached until the
    weight changes: kernels that saturate on full-range 8-bit codes may be exact for narrower weights."""
    token = _version_token(module.weight_int8)
    cached = module.__dict__.get("_weight_bits_cache")
    if cached is None or cached[0] != token:
        w = module.weight_int8
        top = max(int(w.max()), -int(w.min())) if w.numel() else 0
        cached = (token, min(8, max(2, top.bit_length() + 1)))
        module._weight_bits_cache = cached
    return cached[1]


def _mode_repr(module: nn.Module) -> str:
    if module.mode in ("static_per_tensor", "dynamic_per_tensor"):
        return f"{module.mode}, act_bits={module.act_bits}"
    return module.mode


def _quantize_per_channel(w: torch.Tensor, scale_out: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-output-channel ``bits``-bit codes of ``w`` (axis 0) as int8; writes the scales."""
    if not 2 <= int(bits) <= 8:
        raise KernelError(f"weight_bits must be 2 to 8 (codes stored as int8), got {bits!r}")
    top = 2 ** (int(bits) - 1) - 1
    rows = w.reshape(w.shape[0], -1)
    scale = (rows.abs().amax(dim=1) / top).clamp_min(1e-8)
    scale_out.copy_(scale)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.round(w / scale.reshape(shape)).clamp_(-top, top).to(torch.int8)


class Int8Conv2d(_KernelModule):
    """``y = conv2d(x_hat, dequant(W)) + b`` with an int8 weight, like ``nn.Conv2d`` (zero padding).

    State (all buffers): ``weight_int8`` int8 [O, C/groups, kh, kw], ``weight_scale`` fp32 [O] (per output
    channel, symmetric), ``bias`` fp32 [O] or None, and for ``static_per_tensor`` ``act_scale`` (fp32
    scalar) and ``act_zero_point`` (int32 scalar in [0, 2**act_bits - 1]). ``mode``:

    * ``"static_per_tensor"``: ``x_hat = (clamp(round_half_even(x / s) + z, 0, 2**act_bits - 1) - z) * s``,
      the fake-quant simulation's; ``act_bits=7`` (torch.ao's reduce_range) or weights within [-63, 63] let
      oneDNN's int8 convolution run exactly on AVX2 CPUs;
    * ``"weight_only"``: ``x_hat = x`` (float activations).

    Every kernel is within 1e-4 x max|spec| of :func:`conv_kernels.int8_conv2d_spec`; ``dense`` computes
    the simulation's fp32 ``F.conv2d`` bit for bit. The output has the input's dtype and memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 mode: str = "static_per_tensor", act_scale: float | torch.Tensor | None = None,
                 act_zero_point: int | torch.Tensor | None = None, act_bits: int = 8,
                 kernel: str | None = None) -> None:
        super().__init__(kernel)
        if mode not in CONV_ACT_MODES:
            raise KernelError(f"Int8Conv2d: mode {mode!r} is not one of {CONV_ACT_MODES}")
        self.geometry = ConvGeometry.of(stride, padding, dilation, groups)
        kh, kw = conv_kernels._pair(kernel_size, "kernel_size")
        if in_channels % self.geometry.groups or out_channels % self.geometry.groups:
            raise KernelError(f"Int8Conv2d: in_channels={in_channels} and out_channels={out_channels} must be "
                              f"divisible by groups={self.geometry.groups}")
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), (kh, kw)
        self.mode = mode
        self.register_buffer("weight_int8", torch.zeros(out_channels, in_channels // self.geometry.groups, kh, kw,
                                                        dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32) if bias else None)
        self.act_bits = _register_act_qparams(self, "Int8Conv2d", mode, act_scale, act_zero_point, act_bits)
        #: The output's memory format; None: the input's, like F.conv2d. lower-int8 sets channels_last where
        #: the next consumers take any layout (see slimfx.passes.quant.layout).
        self.output_memory_format: torch.memory_format | None = None
        if kernel is not None:
            dispatch.forced_kernel("conv", kernel)  # unknown names fail at construction

    @classmethod
    def from_float(cls, conv: nn.Conv2d, mode: str = "static_per_tensor",
                   act_scale: float | torch.Tensor | None = None, act_zero_point: int | None = None,
                   act_bits: int = 8, kernel: str | None = None, weight_bits: int = 8) -> Int8Conv2d:
        """Quantize ``conv``'s weight per output channel, symmetric (as :meth:`Int8Linear.from_float`)."""
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise KernelError(f"Int8Conv2d.from_float expects an nn.Conv2d with numeric zero padding, got {conv!r}")
        w = conv.weight.detach().float()
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, mode, act_scale, act_zero_point,
                     act_bits, kernel).to(w.device)
        module.weight_int8.copy_(_quantize_per_channel(w, module.weight_scale, weight_bits))
        if conv.bias is not None:
            module.bias.copy_(conv.bias.detach().float())
        return module

    def act_quant(self) -> ActQuant:
        """The activation quantization this module applies (reads the static buffers when present)."""
        return _act_quant(self)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the int8 weight stands for."""
        return conv_kernels.dequantized_conv_weight(self.weight_int8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):
            return _record_leaf_call(self, x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise KernelError(f"Int8Conv2d: input must be [N, C, H, W] or [C, H, W] with C=in_channels="
                              f"{self.in_channels}, got shape {tuple(x.shape)}")
        batched = x.dim() == 4
        x4d = x if batched else x.unsqueeze(0)
        (n, _, h, w), (kh, kw) = x4d.shape, self.kernel_size
        oh, ow = self.geometry.output_size(h, w, kh, kw)
        if oh < 1 or ow < 1:
            raise KernelError(f"Int8Conv2d: input {tuple(x.shape)} is smaller than the (dilated) kernel "
                              f"{self.kernel_size} with padding {self.geometry.padding}")
        if _is_shape_only(x):
            out = x4d.new_empty(n, self.out_channels, oh, ow)
            return out if batched else out.squeeze(0)
        channels_last = conv_kernels.memory_format_of(x4d) == torch.channels_last
        token = _buffer_token(self, "weight_int8", "weight_scale", "bias") + _act_values(self)

        def choose() -> tuple[ActQuant, str]:
            act = self.act_quant()
            return act, dispatch.select_conv_kernel(tuple(x4d.shape), tuple(self.weight_int8.shape), self.geometry,
                                                    act, device=x.device, dtype=x.dtype,
                                                    channels_last=channels_last, kernel=self.kernel)

        key = (dispatch._round_up_pow2(n),) + tuple(x4d.shape[1:]) + (channels_last, x.device, x.dtype)
        act, name = self._memo_choice(token, key, choose)
        prepared = self._prepared_for(name, token, lambda: conv_kernels.CONV_CANDIDATES[name].prepare(
            self.weight_int8, self.weight_scale, self.bias, self.geometry, act))
        out_format = self.__dict__.get("output_memory_format") if batched else None
        out = _as_output(prepared.run(x4d, out_format), x)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={g.stride}, "
                f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, bias={self.bias is not None}, "
                f"mode={_mode_repr(self)}, {self._kernel_repr()}")


class BlockSparseLinear(_KernelModule):
    """``y = x @ W^T + b`` with ``W`` stored block-sparse (BSR: only nonzero ``(bh, bw)`` blocks).

    State (buffers): ``crow_indices`` int32 [N/bh + 1], ``col_indices`` int32 [nnz_blocks], ``values``
    [nnz_blocks, bh, bw], ``bias`` [N] or None. Any kernel equals ``reference.bsr_linear_ref`` up to
    summation order (1e-4 x max|reference| in fp32). Loading a state_dict with a different number of
    blocks resizes the buffers. The output has the input's dtype (on CPU often as a transposed view: the
    kernels compute ``y^T`` row-major, the layout MKL and the grouped GEMMs are fast in).

    ``forward`` asks the dispatcher once per M bucket, device and weight version, and converts the weight
    for the chosen kernel once per weight version; a call with the same shape then only runs the kernel.
    """

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], nnz_blocks: int = 0,
                 bias: bool = True, dtype: torch.dtype = torch.float32, kernel: str | None = None) -> None:
        super().__init__(kernel)
        bh, bw = int(block[0]), int(block[1])
        if bh < 1 or bw < 1 or out_features % bh or in_features % bw:
            raise KernelError(f"BlockSparseLinear: block {tuple(block)} must divide the weight "
                              f"[{out_features}, {in_features}]")
        self.in_features, self.out_features, self.block = int(in_features), int(out_features), (bh, bw)
        self.register_buffer("crow_indices", torch.zeros(out_features // bh + 1, dtype=torch.int32))
        self.register_buffer("col_indices", torch.zeros(nnz_blocks, dtype=torch.int32))
        self.register_buffer("values", torch.zeros(nnz_blocks, bh, bw, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        if kernel is not None:
            dispatch.forced_kernel("bsr", kernel)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block: tuple[int, int] = (32, 32),
                   kernel: str | None = None) -> BlockSparseLinear:
        """Store ``linear``'s weight as BSR, keeping every block with any nonzero element."""
        if not isinstance(linear, nn.Linear):
            raise KernelError(f"BlockSparseLinear.from_dense expects an nn.Linear, "
                              f"got {type(linear).__name__}")
        w = dense_to_bsr(linear.weight.detach(), tuple(block))
        return cls.from_bsr(w, None if linear.bias is None else linear.bias.detach(), kernel)

    @classmethod
    def from_bsr(cls, w: BSRWeight, bias: torch.Tensor | None = None,
                 kernel: str | None = None) -> BlockSparseLinear:
        """Wrap an existing :class:`BSRWeight` (and bias)."""
        n, k = w.shape
        module = cls(k, n, w.block, w.nnz_blocks, bias is not None, w.values.dtype, kernel).to(w.device)
        module.crow_indices.copy_(w.crow_indices)
        module.col_indices.copy_(w.col_indices)
        module.values.copy_(w.values)
        if bias is not None:
            module.bias.copy_(bias)
        return module

    @property
    def weight(self) -> BSRWeight:
        return BSRWeight((self.out_features, self.in_features), self.block, self.crow_indices,
                         self.col_indices, self.values)

    @property
    def density(self) -> float:
        return self.weight.density

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("col_indices", "values"):  # nnz_blocks is data, not architecture
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(getattr(self, name)).resize_(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):
            return _record_leaf_call(self, x)
        if x.shape[-1] != self.in_features:
            raise KernelError(f"BlockSparseLinear: input's last dim must be in_features={self.in_features}, "
                              f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        if _is_shape_only(x):
            return x.new_empty(*lead, self.out_features)
        x2d = x.reshape(-1, self.in_features)
        token = _buffer_token(self, "crow_indices", "col_indices", "values", "bias")
        name = self._memo_choice(token, (dispatch._round_up_pow2(x2d.shape[0]), x.device),
                                 lambda: dispatch.select_bsr_kernel(
                                     x2d.shape[0], self.out_features, self.in_features, self.block, self.density,
                                     device=x.device, dtype=self.values.dtype, kernel=self.kernel))
        prepared = self._prepared_for(name, token,
                                      lambda: cpu_kernels.BSR_CANDIDATES[name].prepare(self.weight, self.bias))
        return _as_output(prepared.run(x2d), x, (*lead, self.out_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"density={self.density:.3f}, bias={self.bias is not None}, {self._kernel_repr()}")


#: The kernel-backed modules (fx leaves; lowering passes produce them).
KERNEL_MODULES = (Int8Linear, Int8Conv2d, BlockSparseLinear)
