"""quant-insert: put fake-quant nodes on the weights and inputs of linear/conv layers.

Options are small strings (see :mod:`slimfx.passes.quant.spec`): ``weights=int8-per-channel``,
``activations=int8-per-tensor``, ``observer=minmax`` (for activations; ``weight_observer`` for weights),
``skip=[patterns]`` (fnmatch on the layer's module path / node name: leave those layers in float) and
``rules=[SELECTOR:ROLE:SCHEME, ...]`` applied in order, later ones winning: SELECTOR is ``@linear`` /
``@conv`` (an op kind) or an fnmatch pattern on the layer name (an exact name is a per-layer override);
ROLE is ``weights``, ``activations`` or ``observer``. Example::

    quant-insert{weights=int8-per-channel,rules=[@conv:weights:int8-per-tensor,fc2:activations:none]}

For int8 CPU inference after ``lower-int8``, ``weights=int7-per-channel`` (8-bit activation codes, 7-bit
weights) or ``activations=int7-per-tensor`` (7-bit codes, 8-bit weights) is what fbgemm and oneDNN compute
exactly on AVX2 CPUs without VNNI (see :mod:`slimfx.passes.quant.spec`).

Weight fake-quant is frozen at once from the weight (its observer sees the weight). Activation fake-quant
waits for ``calibrate`` and passes the float through until then, so this pass's contract is ``changes``.
Module-form layers (``nn.Linear``/``nn.ConvNd`` call_module) are rewritten to their functional form so the
weight's fake-quant node shows in the graph; the module stays as the owner of its parameters. One input
feeding several layers with the same scheme gets one fake-quant node. Layers whose weight is computed
by the graph from non-constants, or already fake-quantized, are left alone and noted.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import fx

from slimfx.errors import PassError, PipelineError, did_you_mean
from slimfx.ir import ops
from slimfx.ir.layer import get_attr_value, to_functional, why_no_functional_form
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_module
from slimfx.passes.quant.observers import make_observer
from slimfx.passes.quant.spec import parse_spec

_KINDS = {"linear": OpKind.LINEAR, "conv": OpKind.CONV}
_ROLES = ("weights", "activations", "observer")
@dataclass
class QuantInsertOptions:
    """weights / activations: schemes (``none`` to skip); observer / weight_observer: observer names;
    skip: fnmatch patterns of layers to leave in float; rules: ``SELECTOR:ROLE:SCHEME`` overrides."""

    weights: str = "int8-per-channel"
    activations: str = "int8-per-tensor"
    observer: str = "minmax"
    weight_observer: str = "minmax"
    skip: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        parse_spec(self.weights, "weight", "weights")
        parse_spec(self.activations, "activation", "activations")
        make_observer(self.observer, parse_spec("int8-per-tensor", "activation"), "observer")
        make_observer(self.weight_observer, parse_spec("int8-per-channel", "weight"), "weight_observer")
        for rule in self.rules:
            parse_rule(rule)


@dataclass(frozen=True)
class Rule:
    selector: str
    role: str
    value: str

    def matches(self, kind: OpKind, names: list[str]) -> bool:
        if self.selector.startswith("@"):
            return _KINDS[self.selector[1:]] is kind
        return any(fnmatch.fnmatchcase(n, self.selector) for n in names)


def parse_rule(text: str) -> Rule:
    """Parse ``SELECTOR:ROLE:SCHEME``; PipelineError naming the rule and the fix."""
    parts = str(text).split(":")
    if len(parts) != 3 or not all(parts):
        raise PipelineError(f"option 'rules': {text!r} is not SELECTOR:ROLE:SCHEME, e.g. "
                            "@conv:weights:int8-per-tensor or fc2:activations:none")
    selector, role, value = parts
    if role not in _ROLES:
        raise PipelineError(f"option 'rules': {text!r}: unknown role {role!r}{did_you_mean(role, _ROLES)}; "
                            f"roles are {', '.join(_ROLES)}")
    if selector.startswith("@") and selector[1:] not in _KINDS:
        raise PipelineError(f"option 'rules': {text!r}: unknown op kind {selector!r}"
                            f"{did_you_mean(selector[1:], _KINDS)}; kinds are @linear, @conv")
    if role == "weights":
        parse_spec(value, "weight", "rules")
    elif role == "activations":
        parse_spec(value, "activation", "rules")
    else:
        make_observer(value, parse_spec("int8-per-tensor", "activation"), "rules")
    return Rule(selector, role, value)


def layer_names(program: Program, node: fx.Node) -> list[str]:
    """The names a layer answers to in skip/rules: node name, module path, and its weight's owner path."""
    names = [node.name]
    if node.op == "call_module":
        names.append(str(node.target))
    weight = _weight_arg(program, node)
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        owner = weight.target.rpartition(".")[0]
        if owner:
            names.append(owner)
    return names


def _weight_arg(program: Program, node: fx.Node):
    if node.op == "call_module":
        return None
    slots = ops.slots(node)
    index = slots.args["weight"]
    return node.args[index] if index < len(node.args) else node.kwargs.get("weight")


def _set_weight_arg(node: fx.Node, value: fx.Node) -> None:
    index = ops.slots(node).args["weight"]
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "weight": value}


def _constant_value(program: Program, value) -> torch.Tensor | None:
    """The value of a weight argument computed from constants only (get_attr, or ops of get_attrs), else None."""
    if isinstance(value, fx.Node):
        if value.op == "get_attr":
            found = get_attr_value(program.module, value.target)
            return found if isinstance(found, torch.Tensor) else None
        if value.op == "call_function" and not value.kwargs:
            args = [_constant_value(program, a) if isinstance(a, fx.Node) else a for a in value.args]
            if any(a is None for a in args):
                return None
            with torch.no_grad():
                return value.target(*args)
        return None
    return None


def _to_functional(program: Program, node: fx.Node) -> fx.Node | str:
    """Rewrite an nn.Linear/ConvNd call_module node to F.linear/F.convNd; a reason string when it can't."""
    reason = why_no_functional_form(program.module.get_submodule(node.target))
    return reason if reason else to_functional(program, node)


def _fresh_name(root: nn.Module, base: str) -> str:
    base = "fq_" + "".join(c if c.isalnum() or c == "_" else "_" for c in base)
    name, i = base, 0
    while hasattr(root, name):
        i += 1
        name = f"{base}_{i}"
    return name


@register_pass
class QuantInsert(Pass):
    """Insert fake-quant nodes on linear/conv weights (frozen now) and inputs (calibrated later)."""

    name = "quant-insert"
    contract = Contract.CHANGES
    Options = QuantInsertOptions

    def run(self, program: Program) -> PassResult:
        o = self.options
        rules = [parse_rule(r) for r in o.rules]
        notes: list[str] = []
        weights = activations = 0
        shared_inputs: dict[tuple, fx.Node] = {}
        for node in list(program.graph.nodes):
            kind = program.kind(node)
            if kind not in (OpKind.LINEAR, OpKind.CONV):
                continue
            names = layer_names(program, node)
            label = names[-1] if len(names) > 1 else node.name
            if any(fnmatch.fnmatchcase(n, p) for n in names for p in o.skip):
                continue
            config = {"weights": o.weights, "activations": o.activations, "observer": o.observer}
            for rule in rules:
                if rule.matches(kind, names):
                    config[rule.role] = rule.value
            w_spec = parse_spec(config["weights"], "weight", "weights")
            a_spec = parse_spec(config["activations"], "activation", "activations")
            if not (w_spec.enabled or a_spec.enabled):
                continue
            if node.op != "call_module" and fake_quant_module(program.module, _weight_arg(program, node)):
                notes.append(f"kept {label}: already fake-quantized")
                continue
            if a_spec.dynamic and kind is not OpKind.LINEAR:
                raise PassError(f"quant-insert: layer {label} is a conv; per-token activations ({a_spec}) are "
                                "for linear layers. Add a rule such as @conv:activations:int8-per-tensor")
            if w_spec.enabled:
                if node.op == "call_module":
                    new = _to_functional(program, node)
                    if isinstance(new, str):
                        notes.append(f"kept {label}: {new}")
                        continue
                    node = new
                weight_node = _weight_arg(program, node)
                value = _constant_value(program, weight_node)
                if value is None or not value.is_floating_point():
                    notes.append(f"kept {label}'s weight in float: it is not a float constant of the program")
                else:
                    observer = make_observer(o.weight_observer, w_spec, "weight_observer")
                    fq = FakeQuantize(w_spec, observer, role="weight")
                    observer.observe(value.detach())
                    fq.freeze()
                    target = _fresh_name(program.module, f"{label}_weight")
                    program.module.add_submodule(target, fq)
                    with program.graph.inserting_before(node):
                        fq_node = program.graph.call_module(target, (weight_node,))
                    _set_weight_arg(node, fq_node)
                    weights += 1
            if a_spec.enabled:
                x = ops.data_input(node)
                if not isinstance(x, fx.Node):
                    continue
                key = (x, str(a_spec), config["observer"])
                fq_node = shared_inputs.get(key)
                if fq_node is None:
                    fq = FakeQuantize(a_spec, None if a_spec.dynamic else make_observer(config["observer"], a_spec),
                                      role="activation")
                    target = _fresh_name(program.module, f"{label}_input")
                    program.module.add_submodule(target, fq)
                    with program.graph.inserting_before(node):  # consumers sharing it come later
                        fq_node = program.graph.call_module(target, (x,))
                    shared_inputs[key] = fq_node
                    activations += 1
                node.replace_input_with(x, fq_node)
        program.analyses.pop("attribute-uses", None)
        changed = weights + activations > 0
        return PassResult(changed=changed, stats={"weights": weights, "activations": activations}, notes=notes)
