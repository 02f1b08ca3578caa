"""FakeQuantize: the fake-quant node of the IR (``OpKind.FAKE_QUANT``).

A quantized layer reads its weight and its input through ``call_module`` nodes of FakeQuantize modules
registered on the program's root (``fq_<layer>_weight``, ``fq_<layer>_input``)::

    %fc1_weight = get_attr[fc1.weight]
    %fq_fc1_weight = call_module[fq_fc1_weight](%fc1_weight)      # OpKind.FAKE_QUANT
    %fq_fc1_input = call_module[fq_fc1_input](%x)                 # OpKind.FAKE_QUANT
    %fc1 = call_function[F.linear](%fq_fc1_input, %fq_fc1_weight, %fc1_bias)

Why a module and not a function with get_attr scale/zero_point: the node carries its observer during
calibration and its frozen qparams afterwards in one place (``scale`` and ``zero_point`` are buffers,
saved in the state_dict), and calibration is just running the program. The module's ``extra_repr`` shows
its scheme and state, so dumps say what each node does. The kind is registered in the op table when this
module is imported (the IR layer must not import passes); a graph holding a FakeQuantize imports it anyway.

States: ``observing`` (calibration: record, pass the float through), ``frozen`` (quantize with the frozen
qparams) and neither (an uncalibrated activation: pass through). Dynamic (per-token) schemes always
quantize with qparams computed from the tensor itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import fx

from slimfx.ir import ops
from slimfx.ir.ops import OpKind
from slimfx.passes.quant.observers import Observer
from slimfx.passes.quant.spec import QuantSpec, dynamic_qparams, error_bound, fake_quantize


class FakeQuantize(nn.Module):
    """Quantize-dequantize a tensor per ``spec``; ``role`` is "weight" or "activation" (for reports)."""

    def __init__(self, spec: QuantSpec, observer: Observer | None = None, role: str = "activation"):
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.role = role
        self.observing = False
        self.frozen = False
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    def freeze(self) -> None:
        """Take the observer's qparams and quantize with them from now on."""
        if self.spec.dynamic:
            self.frozen = True
            return
        if self.observer is None or not self.observer.observed:
            raise ValueError("FakeQuantize.freeze: the observer has seen no data")
        scale, zero_point = self.observer.qparams()
        self.scale = scale.detach().clone()
        self.zero_point = zero_point.detach().clone()
        self.observing = False
        self.frozen = True

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero_point) this module applies to ``x`` (dynamic schemes compute them from ``x``)."""
        if self.spec.dynamic:
            return dynamic_qparams(x, self.spec)
        return self.scale, self.zero_point

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per element of ``x`` inside the clipping range: the most this module may move it."""
        return error_bound(x, self.qparams(x)[0], self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            scale, zero_point = dynamic_qparams(x, self.spec)
            return fake_quantize(x, scale, zero_point, self.spec)
        if self.observing:
            self.observer.observe(x)
            return x
        if not self.frozen:
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def extra_repr(self) -> str:
        state = "dynamic" if self.spec.dynamic else (
            "frozen" if self.frozen else ("observing" if self.observing else "uncalibrated")
        )
        observer = f", observer={self.observer.name}" if self.observer is not None else ""
        return f"{self.role}, {self.spec}{observer}, {state}"


ops.register_module_kind(FakeQuantize, OpKind.FAKE_QUANT)


def fake_quant_module(program_module: nn.Module, node: fx.Node) -> FakeQuantize | None:
    """The FakeQuantize a node calls, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    try:
        sub = program_module.get_submodule(node.target)
    except AttributeError:
        return None
    return sub if isinstance(sub, FakeQuantize) else None


def fake_quant_nodes(program_module: nn.Module, graph: fx.Graph) -> list[tuple[fx.Node, FakeQuantize]]:
    """Every (node, FakeQuantize) of a graph, in order."""
    found = []
    for node in graph.nodes:
        module = fake_quant_module(program_module, node)
        if module is not None:
            found.append((node, module))
    return found
