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
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

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


class _FakeProp(FakeTensorProp):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.metas[n.name] = describe(result)
        return result


def infer_meta(gm: fx.GraphModule, example_inputs: tuple) -> tuple[dict[str, Any], str]:
    """Compute the meta of every node without touching ``gm``.

    Returns (metas by node name, mode) where mode is "fake" or "real: <why fake failed>".
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = _FakeProp(gm, mode)
    prop.metas = {}
    try:
        with torch.no_grad():
            fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
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
