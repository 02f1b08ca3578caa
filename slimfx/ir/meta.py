"""Shape/dtype propagation on FakeTensors: a 10k-node model costs no real compute.

Each node gets ``node.meta["slimfx"]``: a :class:`TensorMeta` for a tensor, a tuple of them for ops that
return several tensors (split, MultiheadAttention), or the plain Python value for shape queries.
When fake propagation cannot run a node (a leaf module with data-dependent control flow), the whole graph
falls back to a real run on the example inputs; the program records that and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module

from slimfx.ir.ops import KIND_INFO, data_input, kind

META_KEY = "slimfx"


@dataclass(frozen=True)
class TensorMeta:
    """Static facts about one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"[{', '.join(map(str, self.shape))}] {dtype}"


def describe(value: Any) -> Any:
    """Turn a (fake or real) value into its static description."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(describe(v) for v in value)
    if isinstance(value, torch.SymInt):
        return int(value)
    if isinstance(value, torch.Size):
        return tuple(int(s) for s in value)
    return value


class _RealProp(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.metas[n.name] = describe(result)
        return result


class _FakeProp(fx.Interpreter):
    """Propagates FakeTensors. Two shortcuts keep a 10k-node graph cheap (FakeTensorProp took 40 ms per
    BatchNorm when parameters were real tensors): parameters and buffers are faked once for the whole run,
    and ops whose kind preserves shape and dtype (norms, activations, dropout, identity) pass their input's
    fake value through instead of dispatching.
    """

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm)
        self.mode = mode
        self.metas: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = self._passthrough(n)
        if result is None:
            with self.mode:
                result = super().run_node(n)
        self.metas[n.name] = describe(result)
        return result

    def _passthrough(self, n: fx.Node) -> torch.Tensor | None:
        if n.op not in ("call_module", "call_function", "call_method"):
            return None
        if not KIND_INFO[kind(n, self.module)].same_shape:
            return None
        schema = getattr(n.target, "_schema", None)
        if schema is not None and len(schema.returns) != 1:  # e.g. aten's batch norm returns 3 tensors
            return None
        source = data_input(n)
        value = self.env.get(source) if isinstance(source, fx.Node) else None
        return value if isinstance(value, torch.Tensor) else None


class FakeState:
    """A FakeTensorMode and the fake twins of a module's parameters, reused across propagations.

    Re-propagating after every pass is then cheap: only tensors a pass replaced get new twins, and
    FakeTensorMode's dispatch cache stays warm. Entries hold the real tensor so an id is never reused.
    """

    def __init__(self) -> None:
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._twins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fake_state(self, gm: fx.GraphModule) -> dict[str, torch.Tensor]:
        state = dict(gm.named_parameters(remove_duplicate=False))
        state.update(gm.named_buffers(remove_duplicate=False))
        twins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = {}
        converter = self.mode.fake_tensor_converter
        for name, t in state.items():
            entry = twins.get(id(t)) or self._twins.get(id(t))
            if entry is None or entry[0] is not t or entry[1].shape != t.shape or entry[1].dtype != t.dtype:
                # only shape/dtype/strides matter; wrapping a meta tensor skips from_tensor's full
                # description of the real one and the dispatch cache (each ~50x the cost of this)
                meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                entry = (t, converter.from_meta_and_device(self.mode, meta, t.device))
            twins[id(t)] = entry
            out[name] = entry[1]
        self._twins = twins
        return out


def infer_meta(
    gm: fx.GraphModule, example_inputs: tuple, fake: FakeState | None = None
) -> tuple[dict[str, Any], str]:
    """Compute the meta of every node without touching ``gm``.

    Returns (metas by node name, mode) where mode is "fake" or "real (<why fake failed>)".
    """
    fake = fake or FakeState()
    try:
        with torch.no_grad():
            fake_state = fake.fake_state(gm)
            fake_inputs = [fake.mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
            prop = _FakeProp(gm, fake.mode)
            with _reparametrize_module(gm, fake_state):
                prop.run(*fake_inputs)
        return prop.metas, "fake"
    except Exception as exc:  # fake execution cannot run data-dependent code; fall back to real values
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    real = _RealProp(gm)
    real.metas = {}
    with torch.no_grad():
        real.run(*example_inputs)
    return real.metas, f"real ({reason})"


def annotate(gm: fx.GraphModule, metas: dict[str, Any]) -> None:
    """Store metas on the nodes of ``gm``."""
    for node in gm.graph.nodes:
        if node.name in metas:
            node.meta[META_KEY] = metas[node.name]


def meta_of(node: fx.Node) -> Any:
    """The stored meta of a node (None when it was never propagated)."""
    return node.meta.get(META_KEY)


def tensor_meta(node: fx.Node) -> TensorMeta | None:
    """The TensorMeta of a single-tensor node, else None."""
    m = node.meta.get(META_KEY)
    return m if isinstance(m, TensorMeta) else None
