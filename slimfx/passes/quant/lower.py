"""lower-int8: replace fake-quantized linear layers by :class:`slimfx.kernels.Int8Linear`.

A linear whose weight goes through a frozen ``int8-per-channel`` (symmetric) fake-quant node becomes one
``call_module`` of an Int8Linear holding exactly the simulated int8 weight and scales. Its activation mode:
``static_per_tensor`` with the calibrated scale / zero point when its input is a frozen int8 per-tensor
fake-quant node (the kernel's quantizer is the simulation's, bit for bit); ``dynamic_per_token`` when the
input is a per-token fake-quant node, or when it has none (``activations=dynamic-per-token``, the
default; ``activations=keep`` leaves such layers alone). Convs, fp8/int4/grouped weights and
uncalibrated inputs stay in fake-quant float and are noted.

Contract ``bounded``, with a bound computed, not measured: the pass runs the simulation on the example
inputs and propagates through the graph an upper bound of each node's max-abs deviation, from
(1) each kernel's documented tolerance (``slimfx.kernels.INT8_TOLERANCE`` x max|output|), (2) the fp32
rounding of the simulation's own matmul (``gamma_K x max(|x| @ |W|^T + |b|)``), (3) activation quantization
the simulation did not do (``scale / 2`` per element x the row's L1 norm of W) and (4) downstream
re-quantization, where a perturbed input may round one step differently (``delta + scale``), through each
op's Lipschitz constant (L1 row norms for linear/conv, 1 for ReLU, ...). An op without a rule makes the
bound infinite (noted). The bound holds for the example inputs the pass manager checks it on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import fx

from slimfx.ir import ops
from slimfx.ir.layer import Layer
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.kernels import INT8_TOLERANCE, Int8Linear
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.cleanup.dce import delete_unused_submodules
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_module
from slimfx.passes.quant.spec import FP8_E4M3_ABS_FLOOR, FP8_E4M3_REL

_U = 2.0**-24  # fp32 unit roundoff

# Lipschitz constants (max |f'|) of elementwise activations, by function/module name.
_LIPSCHITZ = {"relu": 1.0, "relu6": 1.0, "hardtanh": 1.0, "tanh": 1.0, "sigmoid": 0.25, "gelu": 1.13,
              "silu": 1.1, "hardswish": 1.5, "hardsigmoid": 1.0 / 6.0}
_PASS_THROUGH = {OpKind.RESHAPE, OpKind.PERMUTE, OpKind.CONTIGUOUS, OpKind.IDENTITY, OpKind.DROPOUT,
                 OpKind.GETITEM, OpKind.SLICE, OpKind.CAT, OpKind.SPLIT, OpKind.POOL, OpKind.ADAPTIVE_POOL,
                 OpKind.MASK}


@dataclass
class LowerInt8Options:
    """activations: mode for linears whose input has no fake-quant node (dynamic-per-token or keep)."""

    activations: Literal["dynamic-per-token", "keep"] = "dynamic-per-token"


@dataclass
class _Plan:
    node: fx.Node
    label: str
    x: fx.Node  # what the Int8Linear reads
    weight_fq: fx.Node
    act_fq: fx.Node | None
    mode: str


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def _target_name(program: Program, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(program.module.get_submodule(node.target)).__name__.lower()
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


@register_pass
class LowerInt8(Pass):
    """Replace fake-quantized int8 linears by Int8Linear kernels (static or dynamic per-token activations)."""

    name = "lower-int8"
    contract = Contract.BOUNDED
    Options = LowerInt8Options

    def run(self, program: Program) -> PassResult:
        notes: list[str] = []
        plans = [p for p in (self._plan(program, n, notes) for n in program.nodes_of(OpKind.LINEAR)) if p]
        if not plans:
            return PassResult(changed=False, notes=notes or ["no fake-quantized linear layers to lower"], bound=0.0)
        bound, why = self._bound(program, plans)
        if why:
            notes.append(f"the error bound is infinite: {why}")
        for plan in plans:
            self._lower(program, plan)
        program.graph.eliminate_dead_code()
        _drop_unused_attributes(program)
        program.analyses.pop("attribute-uses", None)
        modes = sorted({p.mode for p in plans})
        notes.append(f"lowered {len(plans)} linear layer(s) to Int8Linear ({', '.join(modes)}); convs stay in "
                     "fake-quant float")
        return PassResult(stats={"lowered": len(plans)}, notes=notes, bound=bound)

    def _plan(self, program: Program, node: fx.Node, notes: list[str]) -> _Plan | None:
        if node.op != "call_function":
            return None
        layer = Layer(program, node)
        raw_weight = layer._raw("weight")
        wfq = fake_quant_module(program.module, raw_weight)
        if wfq is None:
            return None
        label = node.name
        spec = wfq.spec
        if not (spec.dtype == "int" and spec.bits == 8 and spec.granularity == "per-channel" and spec.narrow
                and spec.axis == 0 and wfq.frozen):
            notes.append(f"kept %{label}: weights are {spec}, Int8Linear needs int8-per-channel-sym")
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
            return _Plan(node, label, x, raw_weight, None, "dynamic_per_token")
        aspec = afq.spec
        if aspec.dynamic:
            return _Plan(node, label, x.args[0], raw_weight, x, "dynamic_per_token")
        if aspec.dtype == "int" and aspec.bits == 8 and aspec.granularity == "per-tensor" and not aspec.narrow:
            if not afq.frozen:
                notes.append(f"kept %{label}: its input's fake-quant is not calibrated (run calibrate first)")
                return None
            return _Plan(node, label, x.args[0], raw_weight, x, "static_per_tensor")
        notes.append(f"kept %{label}: activations are {aspec}; Int8Linear runs int8 per-tensor or per-token")
        return None

    def _lower(self, program: Program, plan: _Plan) -> None:
        wfq: FakeQuantize = program.module.get_submodule(plan.weight_fq.target)
        weight = _value(program, plan.weight_fq.args[0]).detach().float()
        scale = wfq.scale.detach().float().reshape(-1)
        bias = Layer(program, plan.node).get("bias")
        out_features, in_features = weight.shape
        kwargs: dict[str, Any] = {}
        if plan.mode == "static_per_tensor":
            afq: FakeQuantize = program.module.get_submodule(plan.act_fq.target)
            kwargs = {"act_scale": afq.scale.reshape(()).clone(),
                      "act_zero_point": int(afq.zero_point.reshape(())) + 128}
        module = Int8Linear(in_features, out_features, bias is not None, plan.mode, **kwargs)
        module.weight_int8.copy_(torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        module.weight_scale.copy_(scale)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        target = _fresh(program.module, f"int8_{plan.label}")
        program.module.add_submodule(target, module)
        with program.graph.inserting_before(plan.node):
            new = program.graph.call_module(target, (plan.x,))
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


def _lowered_delta(plan: _Plan, values: dict, delta: dict) -> float:
    w_hat = values[plan.weight_fq]
    x_sim = values[ops.data_input(plan.node)]  # what the simulated linear multiplies
    x_raw = values[plan.x]
    y_sim = values[plan.node]
    d_x = delta.get(plan.x, 0.0)
    if plan.act_fq is None:  # the kernel quantizes what the simulation kept in float
        amax = float(x_raw.abs().max()) if x_raw.numel() else 0.0
        d_q = d_x + (amax + d_x) / 254
    elif d_x == 0.0:
        d_q = 0.0  # the kernel's quantizer is the simulation's, on the same input
    elif plan.mode == "dynamic_per_token":
        amax = float(x_raw.abs().max())
        d_q = d_x + (2 * amax + d_x) / 254
    else:
        d_q = d_x + _act_scale(plan, values)
    row_l1 = float(w_hat.abs().sum(dim=1).max())
    e_act = d_q * row_l1
    bias = plan.node.args[2] if len(plan.node.args) > 2 else plan.node.kwargs.get("bias")
    b = values.get(bias) if isinstance(bias, fx.Node) else bias
    accum = x_sim.abs().reshape(-1, x_sim.shape[-1]) @ w_hat.abs().t()
    if isinstance(b, torch.Tensor):
        accum = accum + b.abs()
    e_fp = _gamma(w_hat.shape[1] + 4) * float(accum.max()) if accum.numel() else 0.0
    peak = (float(y_sim.abs().max()) if y_sim.numel() else 0.0) + e_act + e_fp
    return INT8_TOLERANCE[plan.mode] * peak + e_act + e_fp


def _act_scale(plan: _Plan, values: dict) -> float:
    return float(values["__scale__" + plan.act_fq.name])


def _propagate(program: Program, node: fx.Node, values: dict, delta: dict, d_in: float) -> float | None:
    kind = program.kind(node)
    fq = fake_quant_module(program.module, node)
    if fq is not None:
        x = values[node.args[0]]
        if fq.spec.dynamic:
            return d_in + (2 * float(x.abs().max()) + d_in) / 254
        scale = float(fq.scale.max())
        if fq.spec.dtype == "fp8-e4m3":
            return d_in + 2 * FP8_E4M3_REL * (float(x.abs().max()) + d_in) + 2 * scale * FP8_E4M3_ABS_FLOOR
        return d_in + scale if fq.frozen else d_in
    if kind in _PASS_THROUGH:
        return d_in
    if kind is OpKind.SHAPE:
        return 0.0
    if kind is OpKind.ACTIVATION:
        return _LIPSCHITZ.get(_target_name(program, node).rstrip("_"), math.inf) * d_in
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
        name = _target_name(program, node)
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
            if fq is not None:
                values["__scale__" + n.name] = float(fq.scale.max())
            return result

    with torch.no_grad():
        Recorder(program.module).run(*program.example_inputs)
    return values


def _value(program: Program, node: fx.Node) -> torch.Tensor:
    from slimfx.passes.quant.insert import _constant_value

    found = _constant_value(program, node)
    if found is None:
        raise ValueError(f"%{node.name} is not a constant")
    return found


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
