"""lower-int8: replace fake-quantized linear and conv layers by real int8 modules from :mod:`slimfx.kernels`.

A linear or 2-d conv whose weight goes through a frozen symmetric per-channel integer fake-quant node of at
most 8 bits (``int8-per-channel``, also int7/int4) becomes one ``call_module`` of an
:class:`~slimfx.kernels.Int8Linear` / :class:`~slimfx.kernels.Int8Conv2d` holding exactly the simulated
int8 weight and scales. Activation mode:

* ``static_per_tensor`` when the input goes through a frozen integer per-tensor fake-quant node (any width
  up to 8 bits), with its calibrated scale and zero point: the kernel's quantizer is the simulation's, bit
  for bit. 8-bit codes with 7-bit weights (``weights=int7-per-channel``) or 7-bit codes
  (``activations=int7-per-tensor``, torch.ao's ``reduce_range``) with 8-bit weights are what fbgemm and
  oneDNN compute exactly on AVX2 CPUs without VNNI; 8-bit codes with 8-bit weights saturate them there and run
  slimfx's own AVX2 kernel (``avx2``, :mod:`slimfx.kernels.native`) on nibble-split weights (the dispatcher
  measures and checks, it never assumes). 7-bit codes with 7-bit weights (``weights=int7-per-channel,
  activations=int7-per-tensor``) run that kernel's fast path, a quarter fewer multiplies than any 8-bit kernel:
  the fastest int8 linear / conv on those CPUs;
* ``dynamic_per_token`` (linears) when the input is a per-token fake-quant node;
* an input without a fake-quant node: linears quantize it at run time per ``activations``
  (``dynamic-per-token``, the default and the GPU kernel's numerics; ``dynamic-per-tensor``, torch.ao's
  dynamic quantization with 7-bit codes, fast on x86 CPUs, fastest with ``weights=int7-per-channel`` (the
  ``avx2`` kernel); ``dynamic-per-tensor-u8``, ONNX's 8-bit
  ``DynamicQuantizeLinear``, half the step, exact on the int8 kernels of AVX2 CPUs with
  ``weights=int7-per-channel``: onnxruntime's fused kernel under ``OMP_WAIT_POLICY=PASSIVE``, else oneDNN);
  convs keep it in float (``weight_only``: int8 storage, the
  simulation's arithmetic); ``activations=keep`` leaves both alone.

fp8 / grouped / asymmetric weights, 1-d/3-d convs, geometry or biases computed by the graph, and
uncalibrated inputs stay in fake-quant float and are noted.

Contract ``bounded``, with a bound computed, not measured: the pass runs the simulation on the example
inputs and propagates through the graph an upper bound of each node's max-abs deviation, from
(1) each kernel's documented tolerance (``slimfx.kernels.INT8_TOLERANCE`` x max|output|), (2) the fp32
rounding of the simulation's own matmul / conv and of the kernel's (each at most
``gamma_K x max(|x| (*) |W| + |b|)``, K the fan-in), (3) activation quantization the simulation did not do
(``scale / 2`` per element, or a whole step where ties may round differently, x the L1 norm of a weight row
/ filter) and (4) downstream re-quantization, where a perturbed input may round one step differently
(``delta + scale``), through each op's Lipschitz constant (L1 row norms for linear/conv, 1 for ReLU, ...).
An op without a rule makes the bound infinite (noted). The bound holds for the example inputs the pass
manager checks it on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import fx

from slimfx.errors import KernelError
from slimfx.ir import ops
from slimfx.ir.layer import Layer
from slimfx.ir.ops import OpKind, is_pure
from slimfx.ir.program import Program
from slimfx.kernels import ConvGeometry, Int8Conv2d, Int8Linear
from slimfx.kernels.cpu_kernels import default_act_bits, int8_tolerance
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.cleanup.dce import delete_unused_submodules
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_module
from slimfx.passes.quant.layout import keep_int8_convs_channels_last
from slimfx.passes.quant.spec import FP8_E4M3_ABS_FLOOR, FP8_E4M3_REL

_U = 2.0**-24  # fp32 unit roundoff
#: torch's ChooseQuantizationParams widens smaller scales to this (dynamic per-tensor activations).
_TORCH_SMALL_SCALE = 6.1e-5

# Lipschitz constants (max |f'|) of elementwise activations, by function/module name.
_LIPSCHITZ = {"relu": 1.0, "relu6": 1.0, "hardtanh": 1.0, "tanh": 1.0, "sigmoid": 0.25, "gelu": 1.13,
              "silu": 1.1, "hardswish": 1.5, "hardsigmoid": 1.0 / 6.0}
_PASS_THROUGH = {OpKind.RESHAPE, OpKind.PERMUTE, OpKind.CONTIGUOUS, OpKind.IDENTITY, OpKind.DROPOUT,
                 OpKind.GETITEM, OpKind.SLICE, OpKind.CAT, OpKind.SPLIT, OpKind.POOL, OpKind.ADAPTIVE_POOL,
                 OpKind.MASK}


@dataclass
class LowerInt8Options:
    """activations: what to do with layers whose input has no fake-quant node: linears quantize it at run
    time (dynamic-per-token, dynamic-per-tensor with 7-bit codes, or dynamic-per-tensor-u8 with 8-bit codes)
    and convs keep it in float; keep leaves both alone."""

    activations: Literal["dynamic-per-token", "dynamic-per-tensor", "dynamic-per-tensor-u8", "keep"] = \
        "dynamic-per-token"
    #: channels-last: keep activations channels-last between lowered convs (oneDNN's layout; values unchanged)
    layout: Literal["channels-last", "keep"] = "channels-last"


@dataclass
class _Plan:
    node: fx.Node
    label: str
    x: fx.Node  # what the int8 module reads
    weight_fq: fx.Node
    act_fq: fx.Node | None
    mode: str
    act_bits: int = 8
    geometry: ConvGeometry | None = None  # None for linears
    weight_bits: int = 8

    @property
    def module_name(self) -> str:
        return "Int8Linear" if self.geometry is None else "Int8Conv2d"


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def _static_qparams(fq: FakeQuantize) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero_point) a static fake-quant node applies (a learned QAT scale as it is applied)."""
    scale, zero_point = fq.qparams(torch.empty(0))
    return scale.detach().float(), zero_point.detach()


def _lowerable_weight(fq: FakeQuantize) -> bool:
    spec = fq.spec
    return (spec.dtype == "int" and spec.bits <= 8 and spec.granularity == "per-channel" and spec.narrow
            and spec.axis == 0 and fq.frozen)


def _conv_geometry(layer: Layer, weight_shape: torch.Size) -> tuple[ConvGeometry | None, str | None]:
    """The conv's geometry as constants, or the reason it has none."""
    values = {role: layer.get(role) for role in ("stride", "padding", "dilation", "groups")}
    for role, value in values.items():
        if isinstance(value, fx.Node) or (isinstance(value, (tuple, list)) and
                                          any(isinstance(v, fx.Node) for v in value)):
            return None, f"its {role} is computed by the graph"
    padding = values["padding"]
    try:
        if padding == "valid":
            padding = 0
        elif padding == "same":
            dilation = ConvGeometry.of(dilation=values["dilation"]).dilation
            totals = [d * (k - 1) for d, k in zip(dilation, weight_shape[2:])]
            if any(t % 2 for t in totals):
                return None, "padding='same' pads unevenly for its even (dilated) kernel"
            padding = tuple(t // 2 for t in totals)
        return ConvGeometry.of(values["stride"], padding, values["dilation"], values["groups"]), None
    except KernelError as exc:
        return None, str(exc)


@register_pass
class LowerInt8(Pass):
    """Replace fake-quantized int8 linears / 2-d convs by Int8Linear / Int8Conv2d kernels."""

    name = "lower-int8"
    contract = Contract.BOUNDED
    Options = LowerInt8Options

    def run(self, program: Program) -> PassResult:
        notes: list[str] = []
        nodes = program.nodes_of(OpKind.LINEAR, OpKind.CONV)
        plans = [p for p in (self._plan(program, n, notes) for n in nodes) if p]
        if not plans:
            return PassResult(changed=False, notes=notes or ["no fake-quantized linear or conv layers to lower"],
                              bound=0.0)
        bound, why = self._bound(program, plans)
        if why:
            notes.append(f"the error bound is infinite: {why}")
        for plan in plans:
            self._lower(program, plan)
        # only what the lowering orphaned (the fake-quant nodes): torch's DCE would also drop in-place ops
        # whose result is unused (``y.add_(1)``), silently changing the program
        module = program.module
        program.graph.eliminate_dead_code(is_impure_node=lambda n: not is_pure(n, module))
        _drop_unused_attributes(program)
        program.analyses.pop("attribute-uses", None)
        stats = {"lowered": len(plans)}
        if self.options.layout == "channels-last" and any(p.module_name == "Int8Conv2d" for p in plans):
            stats["layout_conversions"], why = keep_int8_convs_channels_last(program)
            if why:
                notes.append(why)
        for kind, module_name in (("linear", "Int8Linear"), ("conv", "Int8Conv2d")):
            group = [p for p in plans if p.module_name == module_name]
            stats[kind] = len(group)
            if group:
                modes = sorted({p.mode + (f"[{p.act_bits}-bit]" if p.act_bits != 8 else "") for p in group})
                notes.append(f"lowered {len(group)} {kind} layer(s) to {module_name} ({', '.join(modes)})")
        eight_by_eight = sorted({p.mode for p in plans if p.act_bits == 8 and p.weight_bits == 8
                                 and p.mode in ("static_per_tensor", "dynamic_per_tensor")})
        if eight_by_eight:
            notes.append(f"8-bit activations with 8-bit weights ({', '.join(eight_by_eight)}): on x86 CPUs without "
                         "VNNI fbgemm / oneDNN / onnxruntime saturate on them; slimfx's avx2 kernel runs them exactly "
                         "on nibble-split weights (~1.2-1.4x fp32), and quant-insert{weights=int7-per-channel} with "
                         "activations=int7-per-tensor (or lower-int8{activations=dynamic-per-tensor}) is its fastest "
                         "path (~2.3-2.5x fp32); without a C compiler the dispatcher falls back to float there")
        return PassResult(stats=stats, notes=notes, bound=bound)

    def _plan(self, program: Program, node: fx.Node, notes: list[str]) -> _Plan | None:
        if node.op != "call_function":
            return None
        layer = Layer(program, node)
        raw_weight = layer._raw("weight")
        wfq = fake_quant_module(program.module, raw_weight)
        if wfq is None:
            return None
        label = node.name
        is_conv = program.kind(node) is OpKind.CONV
        module_name = "Int8Conv2d" if is_conv else "Int8Linear"
        if not _lowerable_weight(wfq):
            state = "" if wfq.frozen else " (not frozen)"
            notes.append(f"kept %{label}: weights are {wfq.spec}{state}; {module_name} needs symmetric "
                         "per-channel integer weights of at most 8 bits, e.g. int8-per-channel")
            return None
        weight = _constant(program, raw_weight.args[0])
        if weight is None:
            notes.append(f"kept %{label}: its weight is computed by the graph from non-constants")
            return None
        geometry = None
        if is_conv:
            if weight.dim() != 4:
                notes.append(f"kept %{label}: a {weight.dim() - 2}-d conv; Int8Conv2d lowers 2-d convs only")
                return None
            geometry, why = _conv_geometry(layer, weight.shape)
            if geometry is None:
                notes.append(f"kept %{label}: {why}")
                return None
        bias = layer.get("bias")
        if bias is not None and not isinstance(bias, torch.Tensor):
            notes.append(f"kept %{label}: its bias is computed by the graph")
            return None
        x = ops.data_input(node)
        afq = fake_quant_module(program.module, x)
        if afq is None:
            if self.options.activations == "keep":
                notes.append(f"kept %{label}: its input is not fake-quantized (activations=keep)")
                return None
            if is_conv:
                return _Plan(node, label, x, raw_weight, None, "weight_only", geometry=geometry)
            mode, _, width = self.options.activations.replace("-", "_").partition("_u")
            return _Plan(node, label, x, raw_weight, None, mode, int(width or default_act_bits(mode)),
                         weight_bits=wfq.spec.bits)
        aspec = afq.spec
        if aspec.dynamic and not is_conv:
            return _Plan(node, label, x.args[0], raw_weight, x, "dynamic_per_token")
        if aspec.dtype == "int" and aspec.granularity == "per-tensor":
            if not afq.frozen:
                notes.append(f"kept %{label}: its input's fake-quant is not calibrated (run calibrate first)")
                return None
            return _Plan(node, label, x.args[0], raw_weight, x, "static_per_tensor", aspec.bits, geometry,
                         wfq.spec.bits)
        notes.append(f"kept %{label}: activations are {aspec}; {module_name} runs integer per-tensor (static)"
                     + ("" if is_conv else " or per-token") + " activations")
        return None

    def _lower(self, program: Program, plan: _Plan) -> None:
        wfq: FakeQuantize = program.module.get_submodule(plan.weight_fq.target)
        weight = _constant(program, plan.weight_fq.args[0]).detach().float()
        scale = _static_qparams(wfq)[0].reshape(-1)
        bias = Layer(program, plan.node).get("bias")
        kwargs: dict[str, Any] = {}
        if plan.mode == "dynamic_per_tensor":
            kwargs = {"act_bits": plan.act_bits}
        elif plan.mode == "static_per_tensor":
            afq: FakeQuantize = program.module.get_submodule(plan.act_fq.target)
            act_scale, act_zero_point = _static_qparams(afq)
            # the simulation's codes run qmin..qmax around its zero point; the kernels' run 0..2**bits - 1
            kwargs = {"act_scale": act_scale.reshape(()).clone(),
                      "act_zero_point": int(act_zero_point.reshape(())) - afq.spec.qmin,
                      "act_bits": plan.act_bits}
        if plan.geometry is None:
            out_features, in_features = weight.shape
            module = Int8Linear(in_features, out_features, bias is not None, plan.mode, **kwargs)
        else:
            g = plan.geometry
            out_channels, per_group, kh, kw = weight.shape
            module = Int8Conv2d(per_group * g.groups, out_channels, (kh, kw), g.stride, g.padding, g.dilation,
                                g.groups, bias is not None, plan.mode, **kwargs)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        spec = wfq.spec
        q = torch.round(weight / scale.reshape(shape)).clamp_(spec.qmin, spec.qmax)  # the simulation's codes
        module.weight_int8.copy_(q.to(torch.int8))
        module.weight_scale.copy_(scale)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        target = _fresh(program.module, f"int8_{plan.label}")
        program.module.add_submodule(target, module)
        # read the input now, not from the plan: lowering an earlier layer replaces its node, and a conv that
        # feeds this one directly would otherwise be referenced after it was erased
        x = plan.act_fq.args[0] if plan.act_fq is not None else ops.data_input(plan.node)
        with program.graph.inserting_before(plan.node):
            new = program.graph.call_module(target, (x,))
        new.meta = dict(plan.node.meta)
        plan.node.replace_all_uses_with(new)
        program.graph.erase_node(plan.node)

    def _bound(self, program: Program, plans: list[_Plan]) -> tuple[float, str | None]:
        values = _run_recording(program)
        lowered = {p.node: p for p in plans}
        delta: dict[fx.Node, float] = {}
        for node in program.graph.nodes:
            if node.op == "output":
                outs = [delta.get(a, 0.0) for a in _flat_nodes(node.args)]
                return max(outs, default=0.0), None
            if node in lowered:
                delta[node] = _lowered_delta(lowered[node], values, delta)
                continue
            d_in = max((delta.get(a, 0.0) for a in _flat_nodes((node.args, node.kwargs))), default=0.0)
            if d_in == 0.0:
                delta[node] = 0.0
                continue
            d = _propagate(program, node, values, delta, d_in)
            if d is None or not math.isfinite(d):
                return math.inf, f"no error rule for %{node.name} ({program.kind(node).value})"
            out = values.get(node)
            peak = float(out.abs().max()) if isinstance(out, torch.Tensor) and out.numel() else 0.0
            delta[node] = d + 4 * _U * (peak + d)  # both programs round their (different) results
        return math.inf, "no output node"


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _input_error(plan: _Plan, values: dict, d_x: float) -> float:
    """Max |kernel's dequantized input - simulation's input| per element."""
    x_raw = values[plan.x]
    if plan.act_fq is None:  # the kernel quantizes what the simulation kept in float (or keeps it too)
        if plan.mode == "weight_only":
            return d_x
        if plan.mode == "dynamic_per_tensor":  # a whole step: fbgemm rounds 7-bit ties its own way, and an
            # 8-bit zero point rounded off the range's end may clamp the top code by half a step more
            lo = min(float(x_raw.min()), 0.0) - d_x if x_raw.numel() else 0.0
            hi = max(float(x_raw.max()), 0.0) + d_x if x_raw.numel() else 0.0
            if plan.act_bits == 8:  # ONNX's scale: no floor (fbgemm, whose qparams widen small scales, is not run)
                return d_x + (hi - lo) / 255
            return d_x + max((hi - lo) / 127, _TORCH_SMALL_SCALE)
        return d_x + (_max_abs(x_raw) + d_x) / 254
    if d_x == 0.0:
        return 0.0  # the kernel's quantizer is the simulation's, on the same input
    if plan.mode == "dynamic_per_token":
        return d_x + (2 * _max_abs(x_raw) + d_x) / 254
    return d_x + _act_scale(plan, values)


def _lowered_delta(plan: _Plan, values: dict, delta: dict) -> float:
    w_hat = values[plan.weight_fq]
    x_sim = values[ops.data_input(plan.node)]  # what the simulated layer multiplies
    y_sim = values[plan.node]
    d_q = _input_error(plan, values, delta.get(plan.x, 0.0))
    e_act = d_q * float(w_hat.abs().reshape(w_hat.shape[0], -1).sum(dim=1).max())
    bias = plan.node.args[2] if len(plan.node.args) > 2 else plan.node.kwargs.get("bias")
    b = values.get(bias) if isinstance(bias, fx.Node) else bias
    if plan.geometry is None:
        accum = x_sim.abs().reshape(-1, x_sim.shape[-1]) @ w_hat.abs().t()
        if isinstance(b, torch.Tensor):
            accum = accum + b.abs()
    else:
        accum = plan.geometry.conv(x_sim.abs(), w_hat.abs(), None if not isinstance(b, torch.Tensor) else b.abs())
    # the simulation and the kernel each round their own sum (the kernel's inputs are within d_q)
    e_fp = _gamma(w_hat[0].numel() + 4) * (_max_abs(accum) + e_act)
    peak = _max_abs(y_sim) + e_act + e_fp
    return int8_tolerance(plan.mode, plan.act_bits) * peak + e_act + 2 * e_fp


def _act_scale(plan: _Plan, values: dict) -> float:
    return float(values["__scale__" + plan.act_fq.name])


def _propagate(program: Program, node: fx.Node, values: dict, delta: dict, d_in: float) -> float | None:
    kind = program.kind(node)
    fq = fake_quant_module(program.module, node)
    if fq is not None:
        x = values[node.args[0]]
        if fq.spec.dynamic:
            return d_in + (2 * float(x.abs().max()) + d_in) / 254
        scale = float(_static_qparams(fq)[0].max())
        if fq.spec.dtype == "fp8-e4m3":
            return d_in + 2 * FP8_E4M3_REL * (float(x.abs().max()) + d_in) + 2 * scale * FP8_E4M3_ABS_FLOOR
        return d_in + scale if fq.frozen else d_in
    if kind in _PASS_THROUGH:
        return d_in
    if kind is OpKind.SHAPE:
        return 0.0
    if kind is OpKind.ACTIVATION:
        return _LIPSCHITZ.get(ops.target_name(node, program.module).rstrip("_"), math.inf) * d_in
    if kind is OpKind.SOFTMAX:
        return d_in  # ||J||_inf = max_i 2 p_i (1 - p_i) <= 1/2
    if kind in (OpKind.ADD, OpKind.SUB):
        return sum(delta.get(a, 0.0) for a in _flat_nodes(node.args))
    if kind is OpKind.MUL:
        a, b = (node.args + (None, None))[:2]
        def magnitude(v: Any) -> float:
            if isinstance(v, fx.Node) and isinstance(values.get(v), torch.Tensor):
                return float(values[v].abs().max()) if values[v].numel() else 0.0
            return abs(float(v)) if isinstance(v, (int, float)) else math.inf

        da = delta.get(a, 0.0) if isinstance(a, fx.Node) else 0.0
        db = delta.get(b, 0.0) if isinstance(b, fx.Node) else 0.0
        return (magnitude(a) * db if db else 0.0) + (magnitude(b) * da if da else 0.0) + da * db
    if kind is OpKind.REDUCE:
        x, y = values.get(node.args[0]), values.get(node)
        name = ops.target_name(node, program.module)
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return None
        return d_in if name.startswith("mean") else d_in * x.numel() / max(y.numel(), 1)
    if kind in (OpKind.LINEAR, OpKind.CONV):
        layer = Layer(program, node)
        weight = layer.tensor("weight")
        if weight is None:
            raw = layer._raw("weight") if node.op == "call_function" else None
            weight = values.get(raw) if isinstance(raw, fx.Node) else None
            if raw is not None and delta.get(raw, 0.0) > 0:
                return None
        if weight is None:
            return None
        lip = float(weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1).max())
        x = values[ops.data_input(node)]
        fan_in = weight[0].numel()
        accum = (float(x.abs().max()) + d_in) * lip
        return lip * d_in + 2 * _gamma(fan_in + 2) * accum
    if kind is OpKind.BATCH_NORM:
        layer = Layer(program, node)
        var, gamma = layer.tensor("running_var"), layer.tensor("weight")
        if layer.get("training") or var is None:
            return None
        eps = float(layer.get("eps") or 1e-5)
        factor = (gamma.abs() if gamma is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
        return float(factor.detach().max()) * d_in
    return None


def _run_recording(program: Program) -> dict:
    values: dict = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            values[n] = result.detach() if isinstance(result, torch.Tensor) else result
            fq = fake_quant_module(program.module, n)
            if fq is not None and not fq.spec.dynamic:
                values["__scale__" + n.name] = float(_static_qparams(fq)[0].max())
            return result

    with torch.no_grad():
        Recorder(program.module).run(*program.example_inputs)
    return values


def _constant(program: Program, node: fx.Node) -> torch.Tensor | None:
    from slimfx.passes.quant.insert import _constant_value

    return _constant_value(program, node)


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _fresh(root: nn.Module, base: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
    name, i = base, 0
    while hasattr(root, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _drop_unused_attributes(program: Program) -> None:
    """Delete fake-quant modules, float layers and root-level weights no node uses any more (the int8 copy
    replaced them). Whole modules go, never single attributes of a module that stays: a Linear without its
    weight would break printing and state_dict loading."""
    delete_unused_submodules(program.module)
    used = {n.target for n in program.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(program.module.named_parameters(recurse=False)):
        if name not in used:
            delattr(program.module, name)
