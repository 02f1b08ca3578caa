"""ONNX QDQ export: a fake-quantized program as an ONNX model of QuantizeLinear/DequantizeLinear pairs.

Every frozen :class:`~slimfx.passes.quant.fake_quant.FakeQuantize` node becomes one ``QuantizeLinear``
followed by one ``DequantizeLinear`` with the node's frozen scale and zero point (per-tensor: scalar
qparams; per-channel: 1-D qparams and ``axis``), the format onnxruntime and TensorRT read as "quantize
here". The rest of the program exports as float ops, so the file computes what slimfx simulates:

* int8 symmetric weights (``[-127, 127]``, zero point 0) export as ``int8`` Q/DQ of the *fake-quantized*
  weight. ONNX saturates to the full int8 range ``[-128, 127]``; the fake-quantized weight already lies
  on the narrow grid, so Q/DQ of it reproduces the simulation exactly even when the observer clipped.
* int8 activations (``[-128, 127]`` with a zero point, symmetric or not) export as ``uint8`` by default
  (``q + 128``, zero point + 128: the same values, onnxruntime's preferred U8S8 layout) or as ``int8``.
* ONNX's QuantizeLinear rounds half to even after dividing by the scale, as slimfx's arithmetic does.
* Weights of fewer bits (``int7-per-channel``, ``int4-per-channel``) export as int8 Q/DQ of the
  fake-quantized weight, exactly (their grid lies inside int8's). ``int7`` weights are what onnxruntime
  needs on x86 CPUs without VNNI: its fused u8s8 kernels (vpmaddubsw) saturate int16 pair sums with full
  8-bit weights, so an int8-weight QDQ model runs there with errors the simulation does not have
  (measured on AVX2: ~10-20% of max|y| on 3-layer MLPs, vs exact with int7 weights).

Not exportable at opsets <= 20 (the TorchScript exporter's range), with a :class:`QDQExportError` naming
the node: grouped schemes (int4-group128), which need opset 21's blocked quantization; activations of
fewer than 8 bits (ONNX saturates to the 8-bit range); fp8-e4m3, which needs opset 19 FLOAT8 plus a torch
exporter that emits it; dynamic per-token activations (a scale per row computed at run time has no QDQ
form); uncalibrated activations.
Programs already lowered to :class:`slimfx.kernels.Int8Linear` are refused: export before ``lower-int8``.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from slimfx.errors import SlimfxError
from slimfx.ir.modes import set_training
from slimfx.ir.program import Program
from slimfx.kernels.modules import KERNEL_MODULES
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_nodes
from slimfx.passes.quant.insert import _constant_value
from slimfx.passes.quant.spec import QuantSpec, fake_quantize

__all__ = ["QDQExport", "QDQExportError", "export_qdq"]

_ACTIVATION_DTYPES = {"uint8": (torch.uint8, 128), "int8": (torch.int8, 0)}


class QDQExportError(SlimfxError):
    """A program (or one of its fake-quant nodes) has no exact QDQ form at the requested opset."""


@dataclass(frozen=True)
class QDQExport:
    """What :func:`export_qdq` wrote: the file, and how many fake-quant nodes became Q/DQ pairs."""

    path: Path
    opset: int
    fake_quant_nodes: int
    quantize_linear: int
    dequantize_linear: int


class _QuantDequant(torch.autograd.Function):
    """Fake-quant for tracing: runs slimfx's arithmetic, exports as QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, onnx_scale, onnx_zero_point, spec, axis):  # noqa: ARG004
        return fake_quantize(x, scale, zero_point, spec)

    @staticmethod
    def symbolic(g, x, scale, zero_point, onnx_scale, onnx_zero_point, spec, axis):  # noqa: ARG004
        kwargs = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, onnx_scale, onnx_zero_point, **kwargs)
        return g.op("DequantizeLinear", q, onnx_scale, onnx_zero_point, **kwargs)


class _QDQ(nn.Module):
    """Stands in for one FakeQuantize during export; ``constant`` replaces the input of a weight node."""

    def __init__(self, fq: FakeQuantize, onnx_dtype: torch.dtype, offset: int,
                 constant: torch.Tensor | None) -> None:
        super().__init__()
        self.spec = fq.spec
        per_tensor = fq.spec.granularity == "per-tensor"
        self.axis = None if per_tensor else fq.spec.axis
        self.register_buffer("scale", fq.scale.detach().float().clone())
        self.register_buffer("zero_point", fq.zero_point.detach().clone())
        self.register_buffer("onnx_scale", self.scale.reshape(()) if per_tensor else self.scale.reshape(-1))
        zp = (fq.zero_point.detach().to(torch.int32) + offset).to(onnx_dtype)
        self.register_buffer("onnx_zero_point", zp.reshape(()) if per_tensor else zp.reshape(-1))
        self.register_buffer("constant", None if constant is None else
                             fake_quantize(constant.detach().float(), self.scale, self.zero_point, self.spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant is not None:
            x = self.constant
        return _QuantDequant.apply(x, self.scale, self.zero_point, self.onnx_scale, self.onnx_zero_point,
                                   self.spec, self.axis)


def _why_not_exportable(spec: QuantSpec, fq: FakeQuantize, opset: int) -> str | None:
    if spec.dynamic:
        return (f"{spec} is dynamic per-token (a scale per row computed at run time), which QDQ cannot "
                "express; quantize activations with int8-per-tensor for an ONNX export")
    if spec.dtype == "fp8-e4m3":
        return (f"{spec} is not exportable to QDQ at opset {opset}: float8 QuantizeLinear needs opset 19 and "
                "an exporter that emits it; export int8 schemes, or keep this layer in float (skip=[...])")
    if spec.granularity == "group":
        return (f"{spec} is not exportable to QDQ at opset {opset}: grouped quantization needs opset 21 "
                "(blocked axis); use intB-per-channel / int8-per-tensor for ONNX")
    if spec.bits != 8 and fq.role != "weight":
        return (f"{spec} is not exportable to QDQ at opset {opset}: ONNX saturates activations to the 8-bit "
                "range (int4 needs opset 21); use int8 activations")
    if not fq.frozen:
        return "its activation is not calibrated yet (it passes the float through); run calibrate first"
    return None


def _replacements(program: Program, opset: int, activation_dtype: str) -> dict[str, _QDQ]:
    onnx_dtype_act, offset_act = _ACTIVATION_DTYPES[activation_dtype]
    found: dict[str, _QDQ] = {}
    for node, fq in fake_quant_nodes(program.module, program.graph):
        if node.target in found:
            continue
        why = _why_not_exportable(fq.spec, fq, opset)
        if why:
            raise QDQExportError(f"export_qdq: fake-quant node %{node.name} ({fq.role}, {fq.spec}): {why}")
        constant = None
        if fq.role == "weight":
            constant = _constant_value(program, node.args[0])
            if constant is None:
                raise QDQExportError(f"export_qdq: weight fake-quant node %{node.name} reads a tensor the graph "
                                     "computes from its inputs; only constant weights export as QDQ")
        # Weights: int8 with zero point 0 (narrow grid inside ONNX's int8 range); activations: the chosen type.
        dtype, offset = (torch.int8, 0) if fq.role == "weight" else (onnx_dtype_act, offset_act)
        found[node.target] = _QDQ(fq, dtype, offset, constant)
    return found


def export_qdq(program: Program, path: str | os.PathLike, opset: int = 17, *,
               activation_dtype: str = "uint8", input_names: list[str] | None = None,
               output_names: list[str] | None = None, dynamic_batch: bool = False) -> QDQExport:
    """Write ``program`` (a fake-quant program: quant-insert, then calibrate) as an ONNX QDQ model.

    Contract: the file passes ``onnx.checker.check_model``; it holds exactly one QuantizeLinear and one
    DequantizeLinear per fake-quant module of the program; run by onnxruntime with graph optimizations
    off it computes the program's fake-quant simulation up to fp32 summation order (see the tests for the
    tolerance). ``activation_dtype`` is "uint8" (default) or "int8"; ``dynamic_batch`` makes dim 0 of
    every input and output symbolic. The program is not modified. Raises :class:`QDQExportError` for
    schemes without an exact QDQ form (see the module docstring).
    """
    if activation_dtype not in _ACTIVATION_DTYPES:
        raise QDQExportError(f"export_qdq: activation_dtype must be 'uint8' or 'int8', got {activation_dtype!r}")
    if not 13 <= opset <= 20:
        raise QDQExportError(f"export_qdq: opset {opset} is not supported; per-channel QDQ needs opset >= 13 and "
                             "the TorchScript exporter stops at 20")
    lowered = [name for name, m in program.module.named_modules() if isinstance(m, KERNEL_MODULES)]
    if lowered:
        raise QDQExportError(f"export_qdq: the program holds lowered kernel modules ({', '.join(lowered[:3])}); "
                             "export the fake-quant program, before lower-int8")
    replacements = _replacements(program, opset, activation_dtype)
    module = set_training(copy.deepcopy(program.module), False)
    for target, qdq in replacements.items():
        module.set_submodule(target, qdq)
    inputs = tuple(program.example_inputs)
    input_names = input_names or [f"input_{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = module(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    output_names = output_names or [f"output_{i}" for i in range(n_out)]
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    return QDQExport(path, opset, len(replacements), ops.count("QuantizeLinear"), ops.count("DequantizeLinear"))
