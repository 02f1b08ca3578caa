"""Per-layer quantization sensitivity, and quant-keep-float: leave the most sensitive layers in float.

The sensitivity of a layer is the SQNR of the model's output when that layer alone is quantized (its weight
and input fake-quant nodes active, every other fake-quant node passed through)::

    sqnr_db = 10 * log10(sum(y ** 2) / sum((y - y_hat) ** 2))        over all output tensors and batches

Lower means more sensitive; ``inf`` means quantizing the layer changes nothing. The graph is evaluated by
an fx.Interpreter that routes the quantized value of a fake-quant node only into the layer under test, so
a fake-quant node shared by several layers (one input, one scheme) is measured per layer, and the program
itself is never modified.

Activation fake-quant nodes not yet calibrated are calibrated for the measurement only (on copies of their
modules) from the *float* program's activations, so every layer is measured as if all others were float.
Already frozen qparams are used as they are; note that ``calibrate`` calibrates with the weights
quantized, so after it a downstream layer's input qparams include the upstream layers' weight error.

``quant-keep-float{k=N}`` removes the fake-quant nodes of the N layers with the lowest SQNR, measured on
the calibration batches (or the example inputs when there are none; noted). Run it between ``quant-insert``
and ``calibrate`` (``quant-insert,quant-keep-float{k=1},calibrate``) so that the activations downstream of
a layer kept in float are then calibrated on its float output; after ``calibrate`` it still works but
says that those qparams are stale. Contract ``changes``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from slimfx.errors import PassError, PipelineError
from slimfx.ir import ops
from slimfx.ir.modes import set_training
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.pipeline import Pipeline
from slimfx.passes.quant.calibrate import calibration_data
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_module, fake_quant_nodes
from slimfx.passes.quant.insert import QuantInsert, QuantInsertOptions


@dataclass(frozen=True)
class QuantizedLayer:
    """A linear/conv node and the fake-quant nodes feeding it (weight and/or input)."""

    label: str
    node: fx.Node
    fake_quants: tuple[fx.Node, ...]


def _weight_arg(node: fx.Node) -> Any:
    slots = ops.slots(node)
    if slots is None or "weight" not in slots.args:
        return None
    index = slots.args["weight"]
    return node.args[index] if index < len(node.args) else node.kwargs.get("weight")


def layer_label(program: Program, node: fx.Node) -> str:
    """A layer's readable name: its module path (``fc2``, ``features.0``), else the node name."""
    if node.op == "call_module":
        return str(node.target)
    weight = _weight_arg(node)
    if fake_quant_module(program.module, weight) is not None:
        weight = weight.args[0]
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and "." in weight.target:
        return weight.target.rpartition(".")[0]
    return node.name


def quantized_layers(program: Program) -> list[QuantizedLayer]:
    """Every linear/conv of ``program`` that reads at least one fake-quant node, in graph order."""
    found = []
    for node in program.nodes_of(OpKind.LINEAR, OpKind.CONV):
        inputs = [_weight_arg(node) if node.op == "call_function" else None, ops.data_input(node)]
        fqs = tuple(dict.fromkeys(n for n in inputs if fake_quant_module(program.module, n) is not None))
        if fqs:
            found.append(QuantizedLayer(layer_label(program, node), node, fqs))
    return found


class _OneLayerQuantized(fx.Interpreter):
    """Evaluates the graph with every fake-quant node passed through, except into the ``active`` layer.

    ``modules`` replaces a fake-quant node's module (the calibrated copies of uncalibrated activations);
    with ``observe=True`` the observing ones among them see the float value of their input.
    """

    def __init__(self, module: fx.GraphModule, fake_quants: set[fx.Node], active: fx.Node | None,
                 modules: dict[fx.Node, FakeQuantize], observe: bool = False):
        super().__init__(module)
        self.fake_quants = fake_quants
        self.active = active
        self.modules = modules
        self.observe = observe
        self.quantized: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.fake_quants:
            x = self.env[n.args[0]]
            replacement = self.modules.get(n)
            if self.observe and replacement is not None:
                replacement(x)
            elif self.active is not None and self.active in n.users:
                self.quantized[n] = replacement(x) if replacement is not None else super().run_node(n)
            return x
        if n is self.active and self.quantized:
            args = fx.node.map_arg(n.args, lambda a: self.quantized[a] if a in self.quantized else self.env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: self.quantized[a] if a in self.quantized else self.env[a])
            return getattr(self, n.op)(n.target, args, kwargs)
        return super().run_node(n)


def _run(program: Program, fake_quants: set[fx.Node], active: fx.Node | None, modules: dict, batch: Any,
         observe: bool = False) -> list[torch.Tensor]:
    inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
    out = _OneLayerQuantized(program.module, fake_quants, active, modules, observe).run(*inputs)
    return [t.detach().double() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _float_calibrated_copies(program: Program, fake_quants: set[fx.Node], batches: list[Any]) -> dict:
    """Copies of the uncalibrated static fake-quant modules, calibrated on the *float* program's activations."""
    copies = {}
    for node, module in fake_quant_nodes(program.module, program.graph):
        if not module.frozen and not module.spec.dynamic and module.observer is not None:
            copy_ = copy.deepcopy(module)
            copy_.observing = True
            copies[node] = copy_
    if not copies:
        return copies
    for batch in batches:
        _run(program, fake_quants, None, copies, batch, observe=True)
    for node, module in list(copies.items()):
        module.observing = False
        if module.observer.observed:
            module.freeze()
        else:
            del copies[node]
    return copies


def sqnr_db(reference: list[torch.Tensor], approximation: list[torch.Tensor]) -> float:
    """``10 log10(sum y^2 / sum (y - y_hat)^2)`` over all tensors; inf when they are equal."""
    signal = sum(float(y.pow(2).sum()) for y in reference)
    noise = sum(float((y - y_hat).pow(2).sum()) for y, y_hat in zip(reference, approximation))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def fake_quant_sensitivity(program: Program, batches: list[Any]) -> list[tuple[QuantizedLayer, float]]:
    """Per quantized layer of a fake-quantized program, the output SQNR with it alone quantized; most
    sensitive (lowest SQNR) first. Uncalibrated activation fake-quants are calibrated (on copies) from the
    float program's activations, so each layer is measured as if every other layer stayed float."""
    layers = quantized_layers(program)
    fake_quants = {n for n, _ in fake_quant_nodes(program.module, program.graph)}
    was_training = program.module.training
    set_training(program.module, False)
    try:
        with torch.no_grad():
            modules = _float_calibrated_copies(program, fake_quants, batches)
            reference = [t for b in batches for t in _run(program, fake_quants, None, modules, b)]
            scored = []
            for layer in layers:
                quantized = [t for b in batches for t in _run(program, fake_quants, layer.node, modules, b)]
                scored.append((layer, sqnr_db(reference, quantized)))
    finally:
        set_training(program.module, was_training)
    return sorted(scored, key=lambda pair: pair[1])


def _quant_insert(spec: Any) -> QuantInsert:
    if isinstance(spec, QuantInsert):
        return spec
    if isinstance(spec, QuantInsertOptions):
        return QuantInsert(spec)
    if isinstance(spec, dict):
        return QuantInsert(**spec)
    text = str(spec).strip()
    if not text.startswith("quant-insert"):
        text = f"quant-insert{{{text}}}"
    passes = Pipeline.coerce(text).passes()
    if len(passes) != 1 or not isinstance(passes[0], QuantInsert):
        raise PipelineError(f"layer_sensitivity: spec {spec!r} is not quant-insert options, e.g. "
                            "'weights=int8-per-channel,activations=int8-per-tensor'")
    return passes[0]


def layer_sensitivity(program: Program, spec: Any = None, batches: list[Any] | None = None) -> list[tuple[str, float]]:
    """``[(layer, sqnr_db)]``, most sensitive first: the model output's SQNR when only that layer is quantized.

    ``spec``: quant-insert options (text such as ``"weights=int4-per-channel,activations=int8-per-tensor"``,
    a dict, QuantInsertOptions or a QuantInsert pass) applied to a copy of ``program``, its activations
    calibrated per layer on ``batches`` of float activations; None measures the fake-quant nodes
    ``program`` already has. ``batches``: tensors or tuples of inputs; default the program's calibration
    data, else its example inputs. ``program`` is not modified.
    """
    if batches is None:
        batches = calibration_data(program) or [program.example_inputs]
    batches = list(batches)
    if not batches:
        raise PassError("layer_sensitivity: no batches to measure on; pass batches=[inputs, ...]")
    if spec is not None:
        quant_insert = _quant_insert(spec)
        program = program.clone()
        quant_insert.run(program)
        program.recompile()
    if not quantized_layers(program):
        raise PassError("layer_sensitivity: no quantized layers. Give spec= (quant-insert options) or run "
                        "quant-insert on the program first")
    return [(layer.label, sqnr) for layer, sqnr in fake_quant_sensitivity(program, batches)]


@dataclass
class QuantKeepFloatOptions:
    """k: how many of the most sensitive quantized layers (lowest output SQNR) to put back in float."""

    k: int = 1

    def __post_init__(self) -> None:
        if int(self.k) < 0:
            raise PipelineError(f"option 'k' must be >= 0 (the number of layers to keep in float), got {self.k}")


@register_pass
class QuantKeepFloat(Pass):
    """Remove the fake-quant nodes of the k layers whose quantization hurts the output most (lowest SQNR)."""

    name = "quant-keep-float"
    contract = Contract.CHANGES
    Options = QuantKeepFloatOptions

    def run(self, program: Program) -> PassResult:
        k = int(self.options.k)
        if k == 0 or not quantized_layers(program):
            return PassResult(changed=False, notes=["no quantized layers (run quant-insert first)"] if k else [])
        notes = []
        batches = calibration_data(program)
        if not batches:
            batches = [program.example_inputs]
            notes.append("no calibration data: sensitivity measured on the example inputs")
        if any(m.frozen and not m.spec.dynamic and m.role == "activation"
               for _, m in fake_quant_nodes(program.module, program.graph)):
            notes.append("activations were calibrated with every layer quantized; run quant-keep-float before "
                         "calibrate so the layers after those kept in float calibrate on their float outputs")
        ranked = fake_quant_sensitivity(program, batches)
        if k > len(ranked):
            notes.append(f"k={k} but only {len(ranked)} layers are quantized: all are kept in float")
        for layer, sqnr in ranked[:k]:
            for fq_node in layer.fake_quants:
                layer.node.replace_input_with(fq_node, fq_node.args[0])
                if not fq_node.users:
                    target = str(fq_node.target)
                    program.graph.erase_node(fq_node)
                    owner, _, name = target.rpartition(".")
                    delattr(program.module.get_submodule(owner) if owner else program.module, name)
            notes.append(f"kept {layer.label} in float (output SQNR {sqnr:.1f} dB when quantized alone)")
        program.analyses.pop("attribute-uses", None)
        kept = [layer.label for layer, _ in ranked[:k]]
        return PassResult(stats={"kept_float": kept}, notes=notes)
