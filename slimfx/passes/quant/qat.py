"""Quantization-aware training: qat-prepare, qat-fold-bn, qat-freeze.

A pipeline for QAT (the training loop is the user's, on ``program.module``)::

    quant-insert{weights=int4-per-channel},calibrate,qat-prepare{lsq=true}   # then train program.module
    qat-fold-bn,qat-freeze                                                   # after training, in eval mode

``qat-prepare`` swaps every FakeQuantize node for a :class:`QATFakeQuantize`, which computes the same
values (contract ``exact``: in eval mode or without autograd it *is* :func:`fake_quantize`) and adds
gradients:

- straight-through estimator: d x_hat / d x = 1 inside the clipping range (:func:`clip_range`), 0 outside;
- ``lsq=true`` (LSQ, Esser et al. 2019): integer scales become ``nn.Parameter`` s (initialised from
  calibration, not from LSQ's ``2 mean|x| / sqrt(qmax)``) with the LSQ gradient
  (``round(x/s) - x/s`` inside the range, ``qmin - zp`` / ``qmax - zp`` outside) scaled by
  ``g = 1 / sqrt(numel * qmax)``, numel = elements per scale for weights, features per example for
  activations; a learned scale is applied as ``max(|s|, 1e-8)``. Zero points stay fixed; fp8 and
  dynamic (per-token) scales are not learnable (noted).
- ``track_weights=true`` (without LSQ): in training mode a weight's qparams follow the weight's current
  min/max on every forward (the weight moves; frozen scales would clip it). The last ones are kept for eval.

BatchNorm stays unfolded during QAT (it trains with batch statistics). ``qat-fold-bn`` folds it afterwards
*with the fake-quant scale adjusted*: for a symmetric per-channel or group weight scheme (zero point 0),
``fq(W * a, s * |a|) = a * fq(W, s)`` per output channel (a = gamma / sqrt(var + eps)), so folding into the
weight and multiplying the weight's scales by ``|a|`` keeps the trained numerics (contract ``exact``, up to
float rounding). BNs after per-tensor or asymmetric weight schemes have no such identity and are kept
(noted). ``qat-freeze`` turns QATFakeQuantize nodes back into plain frozen FakeQuantize nodes (buffers,
no autograd), which ``lower-int8`` and artifacts expect.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import fx

from slimfx.errors import PassError
from slimfx.ir import ops
from slimfx.ir.layer import Layer, attribute_uses, get_attr_value, set_attr_value
from slimfx.ir.meta import tensor_meta
from slimfx.ir.ops import OpKind, data_input
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass
from slimfx.passes.cleanup.fold_bn import AttrUses, bn_affine, remove_folded_norm
from slimfx.passes.quant.fake_quant import FakeQuantize, fake_quant_module, fake_quant_nodes
from slimfx.passes.quant.observers import Observer
from slimfx.passes.quant.spec import (
    SCALE_FLOOR,
    QuantSpec,
    clip_range,
    dynamic_qparams,
    expand_qparam,
    fake_quantize,
    qparams_from_range,
    rows_view,
)


class _RoundSTE(torch.autograd.Function):
    """round-half-even forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``g`` backward (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx, x, g: float):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


class _StraightThrough(torch.autograd.Function):
    """Returns ``quantized``; the gradient reaches ``x`` where ``inside`` (the clipping range), else 0."""

    @staticmethod
    def forward(ctx, x, quantized, inside):
        ctx.save_for_backward(inside)
        return quantized

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def ste_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      spec: QuantSpec) -> torch.Tensor:
    """:func:`fake_quantize` with a straight-through gradient: 1 inside the clipping range, 0 outside.

    The value is bit-identical to :func:`fake_quantize`; ``scale`` receives no gradient.
    """
    scale = scale.detach()
    out = fake_quantize(x, scale, zero_point, spec)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return out
    lo, hi = clip_range(scale, zero_point, spec)
    lo, hi = expand_qparam(lo, x, spec), expand_qparam(hi, x, spec)
    inside = (x >= lo) & (x <= hi)
    return _StraightThrough.apply(x, out.detach(), inside)


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
                      grad_scale: float) -> torch.Tensor:
    """Integer fake-quant with a learnable ``scale`` (LSQ): STE for ``x``, LSQ gradient for ``scale``.

    Same arithmetic (and so the same values) as :func:`fake_quantize`.
    """
    s = expand_qparam(_GradScale.apply(scale.abs().clamp_min(SCALE_FLOOR), grad_scale), x, spec).to(x.dtype)
    zp = expand_qparam(zero_point, x, spec).to(x.dtype)
    q = torch.clamp(_RoundSTE.apply(x / s) + zp, spec.qmin, spec.qmax)
    return (q - zp) * s


class QATFakeQuantize(FakeQuantize):
    """A FakeQuantize that trains: STE gradients, optionally learnable (LSQ) scales, tracked weight ranges."""

    def __init__(self, spec: QuantSpec, observer: Observer | None = None, role: str = "activation",
                 lsq: bool = False, track_weights: bool = True):
        super().__init__(spec, observer, role)
        self.lsq = False
        self.track_weights = track_weights
        if lsq:
            self.make_learnable()

    @classmethod
    def from_fake_quantize(cls, fq: FakeQuantize, lsq: bool = False, track_weights: bool = True) -> QATFakeQuantize:
        """A QATFakeQuantize with ``fq``'s scheme, observer, state and qparams."""
        new = cls(fq.spec, fq.observer, fq.role, lsq=False, track_weights=track_weights)
        new.observing, new.frozen = fq.observing, fq.frozen
        new.scale = fq.scale.detach().clone()
        new.zero_point = fq.zero_point.detach().clone()
        if lsq:
            new.make_learnable()
        return new

    @property
    def learnable(self) -> bool:
        """Whether LSQ can learn this node's scale (integer, static schemes only)."""
        return self.spec.dtype == "int" and not self.spec.dynamic

    def make_learnable(self) -> None:
        """Turn the ``scale`` buffer into an ``nn.Parameter`` (LSQ). ValueError for fp8 / dynamic schemes."""
        if not self.learnable:
            raise ValueError(f"LSQ learns integer static scales; {self.spec} has none to learn")
        if self.lsq:
            return
        value = self._buffers.pop("scale")
        self.register_parameter("scale", nn.Parameter(value.detach().clone().float()))
        self.lsq = True

    def freeze(self) -> None:
        if not self.lsq:
            super().freeze()
            return
        if self.observer is None or not self.observer.observed:
            raise ValueError("QATFakeQuantize.freeze: the observer has seen no data")
        scale, zero_point = self.observer.qparams()
        with torch.no_grad():
            self.scale.data = scale.detach().clone().float()
        self.zero_point = zero_point.detach().clone()
        self.observing = False
        self.frozen = True

    def effective_scale(self) -> torch.Tensor:
        """The scale applied, detached: a learned scale is used as ``max(|s|, 1e-8)`` (SGD may flip its sign)."""
        return self.scale.detach().abs().clamp_min(SCALE_FLOOR) if self.lsq else self.scale.detach()

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lsq:
            return self.effective_scale(), self.zero_point
        return super().qparams(x)

    def _grad_scale(self, x: torch.Tensor) -> float:
        if self.role == "weight":
            numel = x.numel() / max(self.scale.numel(), 1)
        else:
            numel = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(numel, 1) * self.spec.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            scale, zero_point = dynamic_qparams(x, self.spec)
            return ste_fake_quantize(x, scale, zero_point, self.spec)
        if self.observing:
            self.observer.observe(x)
            return x
        if not self.frozen:
            return x
        if self.lsq:
            if not torch.is_grad_enabled():
                return fake_quantize(x, self.effective_scale(), self.zero_point, self.spec)
            return lsq_fake_quantize(x, self.scale, self.zero_point, self.spec, self._grad_scale(x))
        if self.role == "weight" and self.track_weights and self.training and torch.is_grad_enabled():
            rows = rows_view(x.detach().float(), self.spec)
            scale, zero_point = qparams_from_range(rows.amin(dim=1), rows.amax(dim=1), self.spec)
            self.scale, self.zero_point = scale, zero_point
        return ste_fake_quantize(x, self.scale, self.zero_point, self.spec)

    def extra_repr(self) -> str:
        mode = "lsq" if self.lsq else ("tracked" if self.role == "weight" and self.track_weights else "ste")
        return f"{super().extra_repr()}, qat={mode}"


ops.register_module_kind(QATFakeQuantize, OpKind.FAKE_QUANT)


def _replace_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    owner, _, name = target.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, name, module)


@dataclass
class QatPrepareOptions:
    """lsq: learn integer scales (LSQ); track_weights: without LSQ, weight qparams follow the weight's
    min/max while training."""

    lsq: bool = False
    track_weights: bool = True


@register_pass
class QatPrepare(Pass):
    """Make fake-quant nodes trainable: straight-through gradients, optional LSQ learnable scales."""

    name = "qat-prepare"
    contract = Contract.EXACT
    Options = QatPrepareOptions

    def run(self, program: Program) -> PassResult:
        o = self.options
        prepared, learnable, notes = 0, 0, []
        for node, fq in fake_quant_nodes(program.module, program.graph):
            lsq = o.lsq and fq.spec.dtype == "int" and not fq.spec.dynamic
            if o.lsq and not lsq:
                notes.append(f"%{node.name} ({fq.spec}): scale not learnable (fp8 or dynamic); STE only")
            if isinstance(fq, QATFakeQuantize):
                fq.track_weights = o.track_weights
                if lsq:
                    fq.make_learnable()
                    learnable += 1
                continue
            _replace_submodule(program.module, str(node.target),
                               QATFakeQuantize.from_fake_quantize(fq, lsq=lsq, track_weights=o.track_weights))
            prepared += 1
            learnable += int(lsq)
        if not prepared and not learnable:
            return PassResult(changed=False, notes=notes or ["no fake-quant nodes: run quant-insert first"])
        return PassResult(stats={"prepared": prepared, "learnable_scales": learnable}, notes=notes)


@register_pass
class QatFreeze(Pass):
    """Turn trained QAT fake-quant nodes back into plain frozen FakeQuantize nodes (for lowering/export)."""

    name = "qat-freeze"
    contract = Contract.EXACT

    def run(self, program: Program) -> PassResult:
        frozen = 0
        for node, fq in fake_quant_nodes(program.module, program.graph):
            if not isinstance(fq, QATFakeQuantize):
                continue
            plain = FakeQuantize(fq.spec, fq.observer, fq.role)
            plain.observing, plain.frozen = fq.observing, fq.frozen
            plain.scale = fq.effective_scale().clone()
            plain.zero_point = fq.zero_point.detach().clone()
            _replace_submodule(program.module, str(node.target), plain)
            frozen += 1
        return PassResult(changed=frozen > 0, stats={"frozen": frozen})


@dataclass
class QatFoldBnOptions:
    """strict: raise on a BatchNorm after a fake-quantized layer that cannot be folded, instead of noting."""

    strict: bool = False


@register_pass
class QatFoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into a fake-quantized conv/linear, scaling the weight's fake-quant scales."""

    name = "qat-fold-bn"
    contract = Contract.EXACT
    Options = QatFoldBnOptions
    tolerance = (1e-4, 1e-5)

    def run(self, program: Program) -> PassResult:
        folded, notes = 0, []
        uses = AttrUses(program)
        for bn in program.nodes_of(OpKind.BATCH_NORM):
            bn_layer = Layer(program, bn)
            producer = data_input(bn)
            weight_fq = _weight_fake_quant(program, producer)
            if weight_fq is None:
                continue  # not after a fake-quantized layer: plain fold-bn's job
            if bn_layer.get("training"):
                raise PassError(
                    f"qat-fold-bn: BatchNorm %{bn.name} ({bn_layer.name}) is in training mode. Call "
                    "program.module.eval() after QAT training (BN folds its running statistics)."
                )
            reason = _why_not(program, bn, bn_layer, producer, weight_fq)
            if reason:
                notes.append(f"kept %{bn.name}: {reason}")
                if self.options.strict:
                    raise PassError(f"qat-fold-bn: cannot fold %{bn.name}: {reason}")
                continue
            _fold_scaled(program, Layer(program, producer), bn_layer, weight_fq)
            remove_folded_norm(program, bn, producer, uses)
            folded += 1
        program.analyses.pop("attribute-uses", None)
        return PassResult(changed=folded > 0, stats={"folded": folded}, notes=notes)


def _weight_fake_quant(program: Program, producer) -> fx.Node | None:
    """The fake-quant node feeding ``producer``'s weight, when producer is a functional linear/conv."""
    if not isinstance(producer, fx.Node) or program.kind(producer) not in (OpKind.LINEAR, OpKind.CONV):
        return None
    slots = ops.slots(producer)
    if slots is None or "weight" not in slots.args:
        return None
    index = slots.args["weight"]
    weight = producer.args[index] if index < len(producer.args) else producer.kwargs.get("weight")
    return weight if fake_quant_module(program.module, weight) is not None else None


def _why_not(program: Program, bn: fx.Node, bn_layer: Layer, producer: fx.Node, weight_fq: fx.Node) -> str | None:
    fq = fake_quant_module(program.module, weight_fq)
    spec = fq.spec
    if not (spec.symmetric and spec.granularity in ("per-channel", "group") and spec.axis == 0) or bool(
        fq.zero_point.detach().ne(0).any()
    ):
        return (f"{spec} weights have no per-output-channel symmetric scale to adjust; use a symmetric "
                "per-channel/group weight scheme, or fold-bn before quant-insert")
    if not fq.frozen:
        return f"%{weight_fq.name} is not frozen"
    if len(producer.users) != 1:
        return f"the output of %{producer.name} is also used elsewhere"
    if any(u.op == "call_function" and u.target is operator.getitem and u.args[1] != 0 for u in bn.users):
        return "a batch-norm statistic output is used"
    source = weight_fq.args[0] if weight_fq.args else None
    if not (isinstance(source, fx.Node) and source.op == "get_attr"):
        return f"%{producer.name}'s weight is computed by the graph, not a constant"
    uses = attribute_uses(program)
    if len(weight_fq.users) != 1 or uses.get(source.target, 0) != 1 or uses.get(weight_fq.target, 0) != 1:
        return f"%{producer.name}'s weight or its fake-quant node is shared with another node"
    layer = Layer(program, producer)
    if layer.get("bias") is not None and layer.tensor("bias") is None:
        return f"%{producer.name}'s bias is computed by the graph, not a constant"
    if bn_layer.is_shared():
        return f"%{bn.name} shares its parameters with another node"
    for role in ("running_mean", "running_var"):
        if bn_layer.tensor(role) is None:
            return f"%{bn.name} has no constant {role}"
    weight = get_attr_value(program.module, source.target)
    if bn_layer.tensor("running_mean").numel() != weight.shape[0]:
        return f"channel counts differ ({weight.shape[0]} vs {bn_layer.tensor('running_mean').numel()})"
    meta = tensor_meta(producer)
    if layer.kind is OpKind.LINEAR and (meta is None or len(meta.shape) != 2):
        return "a BatchNorm after a linear is folded only for [batch, features] activations"
    return None


def _fold_scaled(program: Program, layer: Layer, bn: Layer, weight_fq: fx.Node) -> None:
    fq = fake_quant_module(program.module, weight_fq)
    target = weight_fq.args[0].target
    weight = get_attr_value(program.module, target)
    factor, shift = bn_affine(bn)
    bias = layer.tensor("bias")
    bias = bias.double() if bias is not None else torch.zeros_like(factor)
    shape = [-1] + [1] * (weight.dim() - 1)
    per_slot = factor.abs().repeat_interleave(fq.scale.numel() // factor.numel())
    with torch.no_grad():
        set_attr_value(program.module, target, (weight.double() * factor.reshape(shape)).to(weight.dtype))
        layer.set("bias", (bias * factor + shift).to(weight.dtype))
        current = fq.effective_scale() if isinstance(fq, QATFakeQuantize) else fq.scale.detach()
        new_scale = (current.double().reshape(-1) * per_slot).clamp_min(SCALE_FLOOR)
        new_scale = new_scale.to(fq.scale.dtype).reshape(fq.scale.shape)
        if isinstance(fq.scale, nn.Parameter):
            fq.scale.data = new_scale
        else:
            fq.scale = new_scale
