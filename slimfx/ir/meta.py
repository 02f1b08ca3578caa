"""Shape/dtype propagation on FakeTensors: a 10k-node model costs no real compute.

Each node gets ``node.meta["slimfx"]``: a :class:`TensorMeta` for a tensor, a tuple of them for ops that
return several tensors (split, MultiheadAttention), or the plain Python value for shape queries.
When fake propagation cannot run a node (a leaf module with data-dependent control flow), the whole graph
falls back to a real run on the example inputs; the program records that and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module

from slimfx.ir.ops import KIND_INFO, OpKind, data_input, find_submodule, kind

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
        self.current = n
        result = super().run_node(n)
        self.metas[n.name] = describe(result)
        return result


# kinds whose output shape/dtype is computed on plain meta tensors (the same op, no FakeTensor dispatch):
# a fake linear costs ~1.5 ms and a fake conv ~0.5 ms, their meta twins ~0.1 ms
_META_KINDS = {OpKind.LINEAR, OpKind.CONV, OpKind.RESHAPE, OpKind.PERMUTE, OpKind.POOL, OpKind.ADAPTIVE_POOL,
               OpKind.CONTIGUOUS}
_BROADCAST_KINDS = {OpKind.ADD, OpKind.SUB, OpKind.MUL}
_META_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """torch.broadcast_shapes for plain int shapes (~25x cheaper); None when they do not broadcast."""
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for shape in shapes:
        for i, size in enumerate(shape, rank - len(shape)):
            if size != out[i]:
                if out[i] != 1 and size != 1:
                    return None  # let FakeTensorMode raise its own error
                out[i] = max(out[i], size) if size != 0 and out[i] != 0 else 0
    return tuple(out)


def _sdpa_shape(n: fx.Node, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """scaled_dot_product_attention(q, k, v) without a mask, in closed form: [..., L, Ev] (the meta kernel
    costs ~0.7 ms). Anything else (masks, broadcast batch dims, GQA) returns None: FakeTensorMode runs it."""
    if n.target is not torch.nn.functional.scaled_dot_product_attention or len(args) != 3:
        return None
    if set(kwargs) - {"dropout_p", "is_causal", "scale"} or kwargs.get("attn_mask") is not None:
        return None
    q, k, v = args
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or len({q.dtype, k.dtype, v.dtype}) != 1:
        return None
    if not q.is_floating_point() or not q.dim() == k.dim() == v.dim() or q.dim() < 2:
        return None
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        return None
    return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device="meta")


_ADAPTIVE_POOLS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                   nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}


def _adaptive_pool_shape(pool: nn.Module, x: Any) -> tuple[int, ...] | None:
    """Output shape of an adaptive pooling module in closed form; None when it is not the plain case."""
    k = _ADAPTIVE_POOLS.get(type(pool))
    if k is None or getattr(pool, "return_indices", False) or not isinstance(x, torch.Tensor):
        return None
    if x.dim() not in (k + 1, k + 2) or any(s == 0 for s in x.shape[-k:]):
        return None  # let the kernel report it
    size = pool.output_size
    size = (size,) * k if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(size) != k or not all(isinstance(s, int) and s > 0 for s in size):
        return None  # None entries, odd sizes: the kernel decides
    return (*x.shape[:-k], *size)


def _has_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks, the module's own or global ones, can change what the layer sees or returns."""
    from torch.nn.modules import module as module_mod

    return bool(module._forward_hooks or module._forward_pre_hooks or module_mod._global_forward_hooks
                or module_mod._global_forward_pre_hooks)


def _conv_spatial(conv: nn.Module, sizes: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...] | None:
    """Output spatial sizes of a zero-padded conv, or None (string padding: let meta compute)."""
    if isinstance(conv.padding, str):
        return None
    out = []
    for size, k, s, p, d in zip(sizes, kernel, conv.stride, conv.padding, conv.dilation):
        length = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if length < 1:
            return None  # let the meta kernel raise its own error
        out.append(length)
    return tuple(out)


class _FakeProp(fx.Interpreter):
    """Propagates FakeTensors. Three shortcuts keep a 10k-node graph cheap (FakeTensorProp took 40 ms per
    BatchNorm when parameters were real tensors): parameters and buffers are faked once for the whole run;
    ops whose kind preserves shape and dtype (norms, activations, dropout, identity) pass their input's
    fake value through instead of dispatching; linears, convs, pooling and view ops run on plain meta
    tensors, and same-dtype broadcasts, adaptive pooling and mask-free attention are computed in closed form.
    Their results stay plain meta tensors (their device kept aside) and become FakeTensors only where a
    node that is dispatched under FakeTensorMode, as anything the shortcuts cannot handle is, reads them.
    """

    def __init__(self, gm: fx.GraphModule, fake: FakeState):
        super().__init__(gm)
        self.fake = fake
        self.mode = fake.mode
        self.metas: dict[str, Any] = {}
        # shortcut results stay plain meta tensors (wrapping one as a FakeTensor costs ~35 us, 10x the op):
        # their device is kept here, and they become FakeTensors only where a dispatched node reads them
        self.devices: dict[int, tuple[torch.Tensor, torch.device]] = {}

    # parameters are faked lazily, where a node that is dispatched under FakeTensorMode uses them
    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self.fake.twin(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        with _reparametrize_module(module, self.fake.module_twins(module)):
            return module(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        op_kind = kind(n, self.module) if n.op in ("call_module", "call_function", "call_method") else None
        result = None if op_kind is None else self._passthrough(n, op_kind)
        if result is None and op_kind is not None:
            result = self._shortcut(n, op_kind)
        if result is None:
            for source in n.all_input_nodes if n.op != "output" else ():  # output only returns its values
                device = self._plain_meta_device(self.env.get(source))
                if device is not None:
                    self.env[source] = self.mode.fake_tensor_converter.from_meta_and_device(
                        self.mode, self.env[source], device)
            with self.mode:
                result = super().run_node(n)
        self.metas[n.name] = describe(result)
        return result

    def _plain_meta_device(self, t: Any) -> torch.device | None:
        """The device of a shortcut result (a plain meta tensor), else None."""
        entry = self.devices.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def _device(self, t: torch.Tensor) -> torch.device | None:
        """The device a propagated value stands for (FakeTensor or shortcut meta tensor), else None."""
        fake_device = getattr(t, "fake_device", None)
        return fake_device if fake_device is not None else self._plain_meta_device(t)

    def _shortcut(self, n: fx.Node, op_kind: OpKind) -> torch.Tensor | None:
        if op_kind not in _META_KINDS and op_kind not in _BROADCAST_KINDS and op_kind is not OpKind.SDPA:
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        devices = [self._device(t) for t in tensors]
        if not tensors or any(d is None for d in devices):
            return None
        device = devices[0]
        try:
            if op_kind in _BROADCAST_KINDS:
                out = self._broadcast(n, args, kwargs, tensors)
            elif op_kind is OpKind.SDPA:
                out = _sdpa_shape(n, args, kwargs)
            elif n.op == "call_module":
                out = self._module_on_meta(n, op_kind, args, kwargs)
            elif n.op == "call_method":
                out = getattr(_to_meta(args[0]), n.target)(*_to_meta(args[1:]), **_to_meta(kwargs))
            else:
                out = n.target(*_to_meta(args), **_to_meta(kwargs))
        except Exception:  # let FakeTensorMode run it (and report its error, if it is a real one)
            return None
        if not isinstance(out, torch.Tensor) or out.device.type != "meta":
            return None
        self.devices[id(out)] = (out, device)
        return out

    def _module_on_meta(self, n: fx.Node, op_kind: OpKind, args: tuple, kwargs: dict) -> torch.Tensor | None:
        sub = find_submodule(self.module, n.target)
        if sub is None or kwargs or len(args) != 1 or _has_hooks(sub):
            return None
        if type(sub) not in _META_MODULES:  # pooling: no state, the module itself runs on a meta tensor
            stateless = not sub._parameters and not sub._buffers and not sub._modules
            if not stateless or op_kind not in _META_KINDS:
                return None
            shape = _adaptive_pool_shape(sub, args[0])  # the meta kernel of adaptive pooling costs ~0.3 ms
            if shape is not None:
                return torch.empty(shape, dtype=args[0].dtype, device="meta")
            return sub(_to_meta(args[0]))
        x, w = args[0], sub.weight
        if not isinstance(x, torch.Tensor) or x.dtype != w.dtype or x.dim() < 1:
            return None
        if type(sub) is nn.Linear:  # closed form: meta linear on a 3-D input still costs ~0.9 ms
            if w.dim() != 2 or x.shape[-1] != w.shape[1]:
                return None  # let FakeTensorMode report the mismatch
            return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device="meta")
        if x.dim() != w.dim() or x.shape[1] != w.shape[1] * sub.groups:
            return None
        spatial = _conv_spatial(sub, tuple(x.shape[2:]), tuple(w.shape[2:]))
        if spatial is None:
            return sub._conv_forward(_to_meta(x), _to_meta(w), _to_meta(sub.bias))
        return torch.empty((x.shape[0], w.shape[0], *spatial), dtype=x.dtype, device="meta")

    @staticmethod
    def _broadcast(n: fx.Node, args: tuple, kwargs: dict, tensors: list) -> torch.Tensor | None:
        # closed form only for the plain case: two operands, tensors of one floating dtype, python scalars
        if kwargs or len(args) != 2 or len({t.dtype for t in tensors}) != 1 or not tensors[0].is_floating_point():
            return None
        if any(not isinstance(a, (torch.Tensor, int, float)) or isinstance(a, bool) for a in args):
            return None
        shape = _broadcast_shape(*(tuple(t.shape) for t in tensors))
        return None if shape is None else torch.empty(shape, dtype=tensors[0].dtype, device="meta")

    def _passthrough(self, n: fx.Node, op_kind: OpKind) -> torch.Tensor | None:
        # contiguous keeps the shape but not the strides, which a later view depends on
        if not KIND_INFO[op_kind].same_shape or op_kind is OpKind.CONTIGUOUS:
            return None
        schema = getattr(n.target, "_schema", None)
        if schema is not None and len(schema.returns) != 1:  # e.g. aten's batch norm returns 3 tensors
            return None
        source = data_input(n)
        value = self.env.get(source) if isinstance(source, fx.Node) else None
        return value if isinstance(value, torch.Tensor) else None


class FakeState:
    """A FakeTensorMode and the fake twins of a module's parameters, reused across propagations.

    Re-propagating after every pass is then cheap: twins are made only for tensors that a dispatched node
    uses and that a pass replaced, and FakeTensorMode's dispatch cache stays warm. Entries hold the real
    tensor so an id is never reused.
    """

    def __init__(self) -> None:
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._twins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._used: set[int] = set()

    def twin(self, t: torch.Tensor) -> torch.Tensor:
        """The fake twin of a real parameter/buffer (made once, reused while the tensor is alive)."""
        entry = self._twins.get(id(t))
        if entry is None or entry[0] is not t or entry[1].shape != t.shape or entry[1].dtype != t.dtype:
            # only shape/dtype/strides matter; wrapping a meta tensor skips from_tensor's full description
            # of the real one and the dispatch cache (each ~50x the cost of this)
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            entry = (t, self.mode.fake_tensor_converter.from_meta_and_device(self.mode, meta, t.device))
            self._twins[id(t)] = entry
        self._used.add(id(t))
        return entry[1]

    def module_twins(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Fake twins of ``module``'s parameters and buffers, by name (for _reparametrize_module)."""
        state = dict(module.named_parameters(remove_duplicate=False))
        state.update(module.named_buffers(remove_duplicate=False))
        return {name: self.twin(t) for name, t in state.items()}

    def start(self) -> None:
        self._used: set[int] = set()

    def finish(self) -> None:
        """Forget the twins this propagation did not use (so replaced tensors are not kept alive)."""
        self._twins = {k: v for k, v in self._twins.items() if k in self._used}


def infer_meta(
    gm: fx.GraphModule, example_inputs: tuple, fake: FakeState | None = None
) -> tuple[dict[str, Any], str]:
    """Compute the meta of every node without touching ``gm``.

    Returns (metas by node name, mode) where mode is "fake" or "real (<why fake failed>)".
    """
    fake = fake or FakeState()
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    # a failed fake run is handled below, not an error: mute torch's log of it (``disabled``, not a level:
    # setLevel clears the cache of every logger in the process, ~0.2 ms per call)
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        fake.start()
        with torch.no_grad():
            fake_inputs = [fake.mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
            prop = _FakeProp(gm, fake)
            prop.run(*fake_inputs)
        fake.finish()
        return prop.metas, "fake"
    except Exception as exc:  # fake execution cannot run data-dependent code; fall back to real values
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        quiet.disabled = was_disabled
    real = _RealProp(gm)
    real.metas, real.current = {}, None
    try:
        with torch.no_grad():
            real.run(*example_inputs)
    except Exception as exc:  # the model cannot run on these inputs at all: say where and what to check
        raise _cannot_run(real.current, gm, example_inputs, exc) from exc
    return real.metas, f"real ({reason})"


def _cannot_run(node: fx.Node | None, gm: fx.GraphModule, inputs: tuple, exc: Exception) -> Exception:
    from slimfx.errors import TraceError

    shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor)
                       else type(t).__name__ for t in inputs)
    where = "the graph"
    if node is not None:
        where = f"%{node.name} ({node.op} {node.target}"
        if node.op == "call_module":
            where += f": {type(find_submodule(gm, str(node.target))).__name__}"
        where += ")"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = TraceError(f"the model does not run on the example inputs ({shapes}): {where} raised "
                       f"{type(exc).__name__}: {first}. Check that example_inputs have the shapes and dtypes the "
                       "model's forward expects (batch first), e.g. the shape of one real batch.")
    error.bad_inputs = True  # trace(frontend="auto") does not retry another frontend: the inputs are at fault
    return error


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
