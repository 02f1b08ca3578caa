"""Channel importance: how much each unit of a :class:`~slimfx.ir.channels.ChannelGroup` matters.

An importance is any object with ``score(program, group) -> Tensor[group.size]`` (higher = keep). Built-ins:
``l1`` / ``l2`` (norms of the producers' filters plus the consumers' input slices), ``bn-scale`` (|gamma| of
the group's BatchNorms, falling back to l1), ``taylor`` (sum of |w * dL/dw| over calibration batches) and
``random`` (seeded). New ones plug in with :func:`register_importance` and are then usable by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from slimfx.errors import PassError, PipelineError, did_you_mean
from slimfx.ir.channels import PRODUCER_DIMS, ChannelGroup, ParamDim, TensorDim
from slimfx.ir.layer import Layer, get_attr_value
from slimfx.ir.numerics import flatten_tensors
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program

CALIBRATION_KEY = "calibration-data"
"""``program.analyses[CALIBRATION_KEY]``: an iterable of input tuples (or single tensors) for ``taylor``."""

_GRADIENTS_KEY = "parameter-gradients"


class Importance(Protocol):
    """Scores the units of a channel group; higher means more important (kept first)."""

    def score(self, program: Program, group: ChannelGroup) -> torch.Tensor: ...


def _per_unit(group: ChannelGroup, port: Any, per_index: torch.Tensor) -> torch.Tensor:
    if group.identity:  # unit i is index i: nothing to gather
        return per_index.double()
    out = torch.zeros(group.size, dtype=torch.float64)
    return out.index_add_(0, group.members[port], per_index.double())


def _weight_ports(program: Program, group: ChannelGroup) -> list[tuple[ParamDim, torch.Tensor]]:
    """The group's conv/linear/embedding weight slices (producers' filters, consumers' input slices)."""
    found = []
    nodes = {n.name: n for n in program.graph.nodes}
    for port in group.members:
        if isinstance(port, ParamDim) and port.role == "weight" and program.kind(nodes[port.node]) in PRODUCER_DIMS:
            tensor = Layer(program, nodes[port.node]).tensor("weight")
            if tensor is not None:
                found.append((port, tensor.detach()))
    return found


def _reduce_except(tensor: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over every dim but ``dim`` (reduced in place, not via movedim + reshape, which copies the tensor
    when ``dim`` is not the first), accumulated in ``dtype``."""
    others = [d for d in range(tensor.dim()) if d != dim]
    return tensor.sum(others, dtype=dtype) if others else tensor.to(dtype or tensor.dtype)


def _lp_sum_except(tensor: torch.Tensor, dim: int, p: int) -> torch.Tensor:
    """sum |x|^p (p = 1 or 2) over every dim but ``dim``, accumulated in float64 (no float64 copy)."""
    return _reduce_except(tensor.abs() if p == 1 else tensor.square(), dim, torch.float64)


class Magnitude:
    """The Lp norm (p = 1 or 2) of every weight slice a unit owns, producers and consumers together."""

    def __init__(self, p: int):
        self.p = p

    def score(self, program: Program, group: ChannelGroup) -> torch.Tensor:
        total = torch.zeros(group.size, dtype=torch.float64)
        for port, tensor in _weight_ports(program, group):
            total += _per_unit(group, port, _lp_sum_except(tensor, port.dim, self.p))
        return total if self.p == 1 else total.pow(1.0 / self.p)


class BatchNormScale:
    """|gamma| of the group's BatchNorm layers (networks trained with sparsity on gamma); l1 without BN."""

    def score(self, program: Program, group: ChannelGroup) -> torch.Tensor:
        nodes = {n.name: n for n in program.graph.nodes}
        total, found = torch.zeros(group.size, dtype=torch.float64), False
        for port in group.members:
            if isinstance(port, ParamDim) and port.role == "weight" and \
                    program.kind(nodes[port.node]) is OpKind.BATCH_NORM:
                gamma = Layer(program, nodes[port.node]).tensor("weight")
                if gamma is not None:
                    total += _per_unit(group, port, gamma.detach().abs())
                    found = True
        return total if found else Magnitude(1).score(program, group)


class Taylor:
    """First-order Taylor: sum over a unit's weights of |w * dL/dw|, L = mean squared output on the
    calibration batches in ``program.analyses["calibration-data"]`` (no labels needed)."""

    def score(self, program: Program, group: ChannelGroup) -> torch.Tensor:
        grads = _gradients(program)
        nodes = {n.name: n for n in program.graph.nodes}
        total = torch.zeros(group.size, dtype=torch.float64)
        for port, tensor in _weight_ports(program, group):
            target = Layer(program, nodes[port.node]).param_target("weight")
            grad = grads.get(target)
            if grad is not None:
                total += _per_unit(group, port, _reduce_except((tensor * grad).double().abs(), port.dim))
        for port in group.members:  # constants used as data (learned positions)
            if isinstance(port, TensorDim) and program.kind(nodes[port.node]) is OpKind.PARAM:
                grad = grads.get(nodes[port.node].target)
                if grad is not None:
                    value = get_attr_value(program.module, nodes[port.node].target).detach()
                    total += _per_unit(group, port, _reduce_except((value * grad).double().abs(), port.dim))
        return total


def _gradients(program: Program) -> dict[str, torch.Tensor]:
    cached = program.analyses.get(_GRADIENTS_KEY)
    if cached is not None:
        return cached
    batches = program.calibration_data or program.analyses.get(CALIBRATION_KEY)
    if not batches:
        raise PassError(
            "importance 'taylor' needs calibration data: set program.calibration_data to a list of input "
            "batches (slimfx.passes.quant.calibrate.set_calibration_data), or use importance=l1"
        )
    module = program.module
    params = dict(module.named_parameters(remove_duplicate=False))
    saved = {name: (p.requires_grad, p.grad) for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for batch in batches:
                inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
                outputs = [t for t in flatten_tensors(module(*inputs)) if t.is_floating_point()]
                loss = sum(t.float().pow(2).mean() for t in outputs)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
        cached = {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
    finally:
        for name, p in params.items():
            p.requires_grad_(saved[name][0])
            p.grad = saved[name][1]
    program.analyses[_GRADIENTS_KEY] = cached
    return cached


class RandomImportance:
    """Uniform random scores, seeded per group (a baseline)."""

    def __init__(self, seed: int):
        self.seed = seed

    def score(self, program: Program, group: ChannelGroup) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + group.id)
        return torch.rand(group.size, generator=generator, dtype=torch.float64)


IMPORTANCES: dict[str, Callable[[int], Importance]] = {
    "l1": lambda seed: Magnitude(1),
    "l2": lambda seed: Magnitude(2),
    "bn-scale": lambda seed: BatchNormScale(),
    "taylor": lambda seed: Taylor(),
    "random": RandomImportance,
}
"""Importance factories by name; each takes the pass's ``seed``."""


def register_importance(name: str) -> Callable[[Callable[[int], Importance]], Callable[[int], Importance]]:
    """Register ``factory(seed) -> Importance`` under ``name`` (usable as ``importance=name``)."""

    def decorate(factory: Callable[[int], Importance]) -> Callable[[int], Importance]:
        IMPORTANCES[name] = factory
        return factory

    return decorate


def make_importance(name: str, seed: int = 0) -> Importance:
    """The importance registered as ``name``; PipelineError with a did-you-mean otherwise."""
    if name not in IMPORTANCES:
        raise PipelineError(f"unknown importance {name!r}{did_you_mean(name, IMPORTANCES)}; "
                            f"choose from {', '.join(sorted(IMPORTANCES))}")
    return IMPORTANCES[name](seed)
