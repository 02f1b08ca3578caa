"""smooth-quant: move activation outliers into the weights before quantizing (SmoothQuant, Xiao et al. 2023).

For the linears reading one activation X (q/k/v after a LayerNorm share theirs), per input channel j::

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)      (max over the calibration batches and over
                                                             the columns of every linear reading X)

then X_j is divided by s_j and column j of each of those weights multiplied by s_j, so every product
``X W^T`` is unchanged (contract ``exact``, up to float rounding) while X's channels get flatter and easier
to quantize per tensor. The division is folded into the LayerNorm producing X when X feeds only those
linears and the LayerNorm has a constant per-channel weight (``gamma / s``, ``beta / s``); otherwise a
constant per-channel multiply node (``x * (1/s)``, a buffer ``smooth_<node>_inv_scale``) is inserted in front
of them. Channels with no signal (max 0) keep ``s = 1``; ``s`` is clamped to ``[1e-5, 1e5]``.

Statistics come from the calibration batches (:func:`set_calibration_data`); without any, from the
program's example inputs (noted): a random model is smoothed for its example inputs and stays exact for
every input. Run it before ``quant-insert``: linears whose weight is already fake-quantized, shared, or
computed by the graph are left alone (noted when fake-quantized).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from slimfx.errors import PipelineError
from slimfx.ir.layer import Layer
from slimfx.ir.modes import set_training
from slimfx.ir.ops import OpKind, data_input
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.quant.calibrate import calibration_data
from slimfx.passes.quant.fake_quant import fake_quant_module

SMOOTH_MIN, SMOOTH_MAX = 1e-5, 1e5


@dataclass
class SmoothQuantOptions:
    """alpha: migration strength in [0, 1] (0.5 balances activations and weights; higher moves more of
    the activations' range into the weights); fold: fold 1/s into a preceding LayerNorm when possible."""

    alpha: float = 0.5
    fold: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise PipelineError(f"option 'alpha' must be in [0, 1] (SmoothQuant uses 0.5, up to 0.75-0.85 for "
                                f"models with strong outliers), got {self.alpha}")


class _ChannelMax(fx.Interpreter):
    """Runs the graph and records, for the watched nodes, the running max |value| over all but the last dim."""

    def __init__(self, module: fx.GraphModule, watched: set[fx.Node]):
        super().__init__(module)
        self.watched = watched
        self.maxima: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.watched and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1:
            batch_max = value.detach().abs().reshape(-1, value.shape[-1]).amax(dim=0).float()
            previous = self.maxima.get(n)
            if previous is None or previous.shape == batch_max.shape:
                self.maxima[n] = batch_max if previous is None else torch.maximum(previous, batch_max)
        return value


def activation_channel_max(program: Program, nodes: set[fx.Node], batches: list[Any]) -> dict[fx.Node, torch.Tensor]:
    """Per node, max |value| per last-dim channel over ``batches`` (a batch: a tensor or a tuple of inputs)."""
    interpreter = _ChannelMax(program.module, nodes)
    was_training = program.module.training
    set_training(program.module, False)
    try:
        with torch.no_grad():
            for batch in batches:
                interpreter.run(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    finally:
        set_training(program.module, was_training)
    return interpreter.maxima


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = x_max**alpha / w_max**(1-alpha)`` (float64), 1 where either max is 0."""
    x_max, w_max = x_max.double(), w_max.double()
    s = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
    usable = (x_max > 0) & (w_max > 0) & torch.isfinite(s)
    return torch.where(usable, s, torch.ones_like(s)).clamp(SMOOTH_MIN, SMOOTH_MAX)


def _linear_layer(program: Program, node: fx.Node) -> tuple[Layer | None, str | None]:
    try:
        layer = Layer(program, node)
    except ValueError:
        return None, None
    raw = node.args[1] if node.op == "call_function" and len(node.args) > 1 else node.kwargs.get("weight")
    if fake_quant_module(program.module, raw) is not None:
        return None, f"kept {node.name}: its weight is already fake-quantized (run smooth-quant before quant-insert)"
    weight = layer.tensor("weight")
    if weight is None or weight.dim() != 2 or not weight.is_floating_point() or layer.is_shared():
        return None, None
    return layer, None


def _foldable_norm(program: Program, x: fx.Node, layers: list[Layer], channels: int) -> Layer | None:
    if program.kind(x) is not OpKind.LAYER_NORM or set(x.users) != {layer.node for layer in layers}:
        return None
    try:
        norm = Layer(program, x)
    except ValueError:
        return None
    weight, bias = norm.tensor("weight"), norm.get("bias")
    if weight is None or weight.shape != (channels,) or norm.is_shared():
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (channels,)):
        return None
    return norm


def _insert_scale(program: Program, x: fx.Node, layers: list[Layer], inverse: torch.Tensor) -> None:
    root = program.module
    base = f"smooth_{x.name}_inv_scale"
    name, i = base, 0
    while hasattr(root, name):
        i += 1
        name = f"{base}_{i}"
    root.register_buffer(name, inverse)
    mul = torch.ops.aten.mul.Tensor if program.dialect == "aten" else torch.mul
    first = min((layer.node for layer in layers), key=lambda n: list(program.graph.nodes).index(n))
    with program.graph.inserting_before(first):
        getter = program.graph.get_attr(name)
        scaled = program.graph.call_function(mul, (x, getter))
    for layer in layers:
        layer.node.replace_input_with(x, scaled)


@register_pass
class SmoothQuant(Pass):
    """Divide linear inputs by per-channel scales and multiply the weights' columns by them (SmoothQuant)."""

    name = "smooth-quant"
    contract = Contract.EXACT
    Options = SmoothQuantOptions
    tolerance = (1e-4, 1e-5)

    def run(self, program: Program) -> PassResult:
        notes: list[str] = []
        groups: dict[fx.Node, list[Layer]] = {}
        for node in program.nodes_of(OpKind.LINEAR):
            layer, note = _linear_layer(program, node)
            if note:
                notes.append(note)
            x = data_input(node)
            if layer is not None and isinstance(x, fx.Node):
                groups.setdefault(x, []).append(layer)
        if not groups:
            return PassResult(changed=False, notes=notes or ["no linear layers with constant weights"])
        batches = calibration_data(program)
        if not batches:
            batches = [program.example_inputs]
            notes.append("no calibration data: activation ranges taken from the example inputs")
        maxima = activation_channel_max(program, set(groups), batches)
        folded = inserted = 0
        for x, layers in groups.items():
            weights = [layer.tensor("weight") for layer in layers]
            channels = weights[0].shape[1]
            x_max = maxima.get(x)
            if x_max is None or x_max.shape != (channels,) or any(w.shape[1] != channels for w in weights):
                notes.append(f"kept the linears reading %{x.name}: no per-channel activation range for them")
                continue
            w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
            s = smoothing_scales(x_max, w_max, float(self.options.alpha))
            norm = _foldable_norm(program, x, layers, channels) if self.options.fold else None
            with torch.no_grad():
                if norm is not None:
                    gamma = norm.tensor("weight")
                    norm.set("weight", (gamma.double() / s).to(gamma.dtype))
                    beta = norm.tensor("bias")
                    if beta is not None:
                        norm.set("bias", (beta.double() / s).to(beta.dtype))
                    folded += 1
                else:
                    _insert_scale(program, x, layers, (1.0 / s).to(weights[0].dtype))
                    inserted += 1
                for layer, weight in zip(layers, weights):
                    layer.set("weight", (weight.double() * s).to(weight.dtype))
        program.analyses.pop("attribute-uses", None)
        smoothed = folded + inserted
        return PassResult(changed=smoothed > 0, notes=notes,
                          stats={"smoothed": smoothed, "folded_into_norm": folded, "scale_nodes": inserted})
