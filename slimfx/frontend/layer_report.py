"""Per-layer comparison of a compressed model with its float original, and the before/after totals.

One row per weight layer of the compressed program (linear / conv / transposed conv in module form, in
functional form over get_attr weights, behind pruning masks and fake-quant nodes, or lowered to a
``slimfx.kernels`` module): its parameter count, the sparsity of the weight it actually multiplies by
(masks and fake-quant applied; int8 codes for lowered layers), weight and activation bits, the kernel that
ran (the CPU dispatcher's choice for kernel modules, at the example inputs' shape), MACs on the example
inputs (dense: zeros are counted) and the SQNR of its output against the same layer of the original. State
that belongs to no weight layer (norm statistics, leftover buffers) gets rows of kind ``state``, so the
rows' bytes add up to the models' state bytes. A batch norm folded into the layer before it (fold-bn) is
recognised: the layer is compared with the norm's output.

Layers are matched by the qualified name of the module they came from: module targets, the owner of the
``.weight`` get_attr (``fc1.weight`` -> ``fc1``) and, for nodes a pass created (``int8_fc1``), the
``nn_module_stack`` the pass carried over. Both models are run as graphs (a plain nn.Module is traced first)
on the same example inputs, recording every layer's output; the SQNR is end to end: errors of earlier layers
accumulate into later ones. A layer whose output shape changed (channels removed by ``prune-channels``) has
no SQNR, since which channels were kept is not recorded.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from slimfx.errors import SlimfxError
from slimfx.ir import ops
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.kernels.modules import KERNEL_MODULES, BlockSparseLinear, Int8Conv2d, Int8Linear

LAYER_KINDS = {OpKind.LINEAR: "linear", OpKind.CONV: "conv", OpKind.CONV_TRANSPOSE: "conv_transpose"}
# The dispatcher family of each kernel module, as SLIMFX_KERNEL spells it (int8:<name>, conv:<name>, ...).
_KERNEL_FAMILY = {Int8Linear: "int8", Int8Conv2d: "conv", BlockSparseLinear: "bsr"}
# Nodes between a layer and its stored weight: the stored tensor, pruning masks, fake-quant.
_WEIGHT_CHAIN = {OpKind.PARAM, OpKind.MASK, OpKind.FAKE_QUANT}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass
class LayerRow:
    """One row of the per-layer table. ``sqnr_db`` is a float, ``"inf"`` (outputs identical) or None (see
    ``sqnr_note``); kind ``state`` rows only carry names, params and bytes."""

    layer: str
    kind: str
    params: int = 0
    params_before: int | None = None
    sparsity: float | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    kernel: str | None = None
    macs: int | None = None
    macs_before: int | None = None
    sqnr_db: float | str | None = None
    sqnr_note: str = ""
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Site:
    """A weight layer found in a graph: its name, its module or weight node, its fake-quant modules and the
    attribute paths of the state it owns."""

    node: fx.Node
    name: str
    kind: str
    module: nn.Module | None
    weight_node: fx.Node | None
    weight_fq: nn.Module | None
    act_fq: nn.Module | None
    state_targets: list[str] = field(default_factory=list)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """``10 log10(sum(ref^2) / sum((ref - out)^2))`` in float64; inf when equal, nan when ``reference`` is 0."""
    ref, out = reference.detach().double(), output.detach().double()
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return math.nan
    return 10.0 * math.log10(signal / noise)


def latency_ms(model: nn.Module, inputs: tuple, repeats: int = 15, warmup: int = 3) -> float:
    """Median milliseconds of ``model(*inputs)`` without gradients after ``warmup`` untimed calls, with torch's
    thread settings as they are."""
    with torch.no_grad():
        for _ in range(warmup):
            model(*inputs)
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def safetensors_bytes(module: nn.Module) -> int:
    """The size of ``module``'s state_dict written as one safetensors file (what an artifact stores)."""
    from safetensors.torch import save

    return len(save({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}))


def as_graph_module(model: nn.Module | Program, inputs: tuple, frontend: str = "auto") -> fx.GraphModule:
    """The graph of ``model``: a Program's module, a GraphModule itself, anything else traced by slimfx."""
    if isinstance(model, Program):
        return model.module
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise SlimfxError(f"the layer report needs an nn.Module or a Program, got {type(model).__name__}")
    from slimfx.frontend.trace import trace

    return trace(model, inputs, frontend=frontend).module


def _runnable(model: nn.Module | Program) -> nn.Module:
    return model.module if isinstance(model, Program) else model


def _slot_arg(node: fx.Node, role: str) -> Any:
    slots = ops.slots(node)
    if slots is None or role not in slots.args:
        return None
    index = slots.args[role]
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(role, slots.defaults.get(role))


def _chain(root: nn.Module, start: Any) -> list[fx.Node]:
    """``start`` and the nodes it is computed from, as long as they are stored tensors, masks or fake-quant."""
    found, stack = [], [start]
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in found or ops.kind(node, root) not in _WEIGHT_CHAIN:
            continue
        found.append(node)
        stack.extend(node.all_input_nodes)
    return found


def _owner_of_weight(chain: list[fx.Node]) -> str | None:
    for node in chain:
        if node.op == "get_attr" and str(node.target).endswith(".weight"):
            return str(node.target).rpartition(".")[0]
    return None


def _stack_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    return str(path[0]) if isinstance(path, tuple) and path else None


def _is_kernel_module(module: nn.Module | None) -> bool:
    return isinstance(module, KERNEL_MODULES) or (
        module is not None and type(module).__module__.startswith("slimfx.kernels") and hasattr(module, "last_kernel"))


def find_layers(root: fx.GraphModule) -> list[_Site]:
    """The weight layers of a graph, in graph order, with their names and the state they own."""
    sites: list[_Site] = []
    claimed: set[str] = set()
    for node in root.graph.nodes:
        module = ops.find_submodule(root, node.target) if node.op == "call_module" else None
        if _is_kernel_module(module):
            kind = "conv" if hasattr(module, "in_channels") else "linear"
            name = _stack_path(node) or str(node.target)
            site = _Site(node, name, kind, module, None, None, None, [str(node.target)])
        elif ops.kind(node, root) in LAYER_KINDS and node.op in ("call_module", "call_function"):
            kind = LAYER_KINDS[ops.kind(node, root)]
            if module is not None:
                site = _Site(node, str(node.target), kind, module, None, None, None, [str(node.target)])
            else:
                chain = _chain(root, _slot_arg(node, "weight"))
                bias_chain = _chain(root, _slot_arg(node, "bias"))
                weight_fq = next((ops.find_submodule(root, n.target) for n in chain
                                  if ops.kind(n, root) is OpKind.FAKE_QUANT), None)
                name = _owner_of_weight(chain) or _stack_path(node) or node.name
                targets = [str(n.target) for n in chain + bias_chain if n.op in ("get_attr", "call_module")]
                weight = _slot_arg(node, "weight")
                site = _Site(node, name, kind, None, weight if isinstance(weight, fx.Node) else None,
                             weight_fq, None, targets)
        else:
            continue
        data = ops.data_input(node)
        if isinstance(data, fx.Node) and data.op == "call_module" and ops.kind(data, root) is OpKind.FAKE_QUANT:
            site.act_fq = ops.find_submodule(root, data.target)
            site.state_targets.append(str(data.target))
        if site.name in claimed:  # a module called twice, or two functional calls of one weight
            site.name = f"{site.name}#{node.name}"
        claimed.add(site.name)
        sites.append(site)
    return sites


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of the nodes asked for."""

    def __init__(self, module: fx.GraphModule, wanted: Iterable[fx.Node]):
        super().__init__(module)
        self.wanted = set(wanted)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result.detach() if isinstance(result, torch.Tensor) else result
        return result


def _batch_norm_after(root: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The batch norm that is the only user of ``node``, or None."""
    users = list(node.users)
    return users[0] if len(users) == 1 and ops.kind(users[0], root) is OpKind.BATCH_NORM else None


def _record(root: fx.GraphModule, sites: list[_Site], inputs: tuple) -> dict[fx.Node, Any]:
    wanted = [s.node for s in sites] + [s.weight_node for s in sites if s.weight_node is not None]
    wanted += [bn for s in sites if (bn := _batch_norm_after(root, s.node)) is not None]
    wanted += [d for s in sites if isinstance(d := ops.data_input(s.node), fx.Node)]
    wanted += [b for s in sites if isinstance(b := _slot_arg(s.node, "bias"), fx.Node)]
    recorder = _Recorder(root, wanted)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


@dataclass
class _Facts:
    params: int
    sparsity: float
    weight_bits: int
    act_bits: int
    kernel: str
    macs: int


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def _spec_bits(fq: nn.Module | None, fallback: int) -> int:
    spec = getattr(fq, "spec", None)
    return int(spec.bits) if spec is not None and spec.enabled else fallback


def _facts(site: _Site, values: dict[fx.Node, Any]) -> _Facts:
    """Parameter count, weight sparsity, bits, kernel and MACs of one layer, from what the run recorded."""
    out, data = values.get(site.node), values.get(ops.data_input(site.node))
    in_bits = _bits(data.dtype) if isinstance(data, torch.Tensor) else 32
    module = site.module
    if _is_kernel_module(module):
        bias = getattr(module, "bias", None)
        if isinstance(module, BlockSparseLinear):
            shape = (module.out_features, module.in_features)
            zeros = math.prod(shape) - int(torch.count_nonzero(module.values))
            weight_bits = _bits(module.values.dtype)
        else:
            weight = getattr(module, "weight_int8", None)
            if weight is None:
                weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise SlimfxError(f"the layer report does not know where {type(module).__name__} "
                                  f"({site.node.target}) keeps its weight")
            shape, zeros, weight_bits = tuple(weight.shape), int((weight == 0).sum()), _bits(weight.dtype)
            if hasattr(module, "act_quant"):  # int8 storage of narrower codes (int7 / int4 schemes)
                weight_bits = module.act_quant().weight_bits
        mode = getattr(module, "mode", "")
        act_bits = in_bits if mode == "weight_only" else int(getattr(module, "act_bits", 8))
        family = _KERNEL_FAMILY.get(type(module), type(module).__name__)
        forced = getattr(module, "kernel", None)
        chosen = forced or getattr(module, "last_kernel", None) or "not run"
        kernel = f"{family}:{chosen}" + (" (forced)" if forced else "")
    else:
        weight = values.get(site.weight_node) if site.weight_node is not None else getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise SlimfxError(f"the layer report could not find the weight of %{site.node.name} ({site.name})")
        if module is not None:
            bias = getattr(module, "bias", None)
        else:
            raw_bias = _slot_arg(site.node, "bias")
            bias = values.get(raw_bias) if isinstance(raw_bias, fx.Node) else raw_bias
        shape, zeros = tuple(weight.shape), int((weight == 0).sum())
        weight_bits = _spec_bits(site.weight_fq, _bits(weight.dtype))
        act_bits = _spec_bits(site.act_fq, in_bits)
        if site.weight_fq is not None or site.act_fq is not None:
            kernel = "fake-quant (simulated)"
        else:
            masked = site.weight_node is not None and site.weight_node.op != "get_attr"
            kernel = f"dense {_DTYPE_NAMES.get(weight.dtype, str(weight.dtype))}" + (" (masked)" if masked else "")
    numel = math.prod(shape)
    params = numel + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
    return _Facts(params, zeros / numel if numel else 0.0, weight_bits, act_bits, kernel,
                  _macs(site.kind, shape, out, data))


def _macs(kind: str, weight_shape: tuple[int, ...], out: Any, data: Any) -> int:
    """Multiply-accumulates of one call: every output element of a linear / conv takes one MAC per weight of
    its filter (``in_features``, or ``in_channels / groups x kernel size``); a transposed conv spreads every
    input element over ``out_channels / groups x kernel size`` outputs."""
    per_filter = math.prod(weight_shape[1:])
    if kind == "conv_transpose":
        return data.numel() * per_filter if isinstance(data, torch.Tensor) else 0
    return out.numel() * per_filter if isinstance(out, torch.Tensor) else 0


def _sqnr(name: str, ref: Any, out: Any) -> tuple[float | str | None, str]:
    if ref is None:
        return None, f"no layer {name!r} in the original"
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None, "the layer's output is not a tensor"
    if ref.shape != out.shape:
        return None, (f"output {list(out.shape)} vs {list(ref.shape)} in the original: channels were removed and "
                      f"which ones were kept is not recorded")
    value = sqnr_db(ref, out)
    if math.isnan(value):
        return None, "the original output is all zeros"
    return ("inf", "identical outputs") if math.isinf(value) else (round(value, 2), "")


def _reference(graphs: tuple[fx.GraphModule, fx.GraphModule], ref: _Site | None, site: _Site,
               ref_values: dict[fx.Node, Any]) -> tuple[Any, str | None]:
    """What the original computed that ``site``'s output stands for: the same layer's output, or the output
    of the batch norm that followed it when that norm was folded into the layer (fold-bn)."""
    if ref is None:
        return None, None
    bn = _batch_norm_after(graphs[0], ref.node)
    if bn is not None and _batch_norm_after(graphs[1], site.node) is None:
        return ref_values.get(bn), str(bn.target) if bn.op == "call_module" else (_stack_path(bn) or bn.name)
    return ref_values.get(ref.node), None


def _attribute_state(root: nn.Module, sites: list[_Site]) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """State bytes per layer name, and (bytes, params) per owner path of the state no layer claims."""
    params = {name for name, _ in root.named_parameters()}
    per_layer: dict[str, int] = {}
    rest: dict[str, tuple[int, int]] = {}
    owners = {t: s.name for s in sites for t in s.state_targets}
    for key, tensor in root.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        parts = key.split(".")
        owner = next((owners[p] for p in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if p in owners),
                     None)
        if owner is not None:
            per_layer[owner] = per_layer.get(owner, 0) + size
            continue
        path = key.rpartition(".")[0] or key
        nbytes, count = rest.get(path, (0, 0))
        rest[path] = (nbytes + size, count + (tensor.numel() if key in params else 0))
    return per_layer, rest


def compare_layers(original: nn.Module | Program, compressed: nn.Module | Program, inputs: tuple,
                   frontend: str = "auto") -> list[LayerRow]:
    """The per-layer rows of ``compressed`` against ``original`` on ``inputs`` (both run once, as graphs; a
    model that is not a graph yet is traced with ``frontend``)."""
    inputs = tuple(inputs)
    graphs = as_graph_module(original, inputs, frontend), as_graph_module(compressed, inputs, frontend)
    (ref_sites, sites) = find_layers(graphs[0]), find_layers(graphs[1])
    ref_values, values = _record(graphs[0], ref_sites, inputs), _record(graphs[1], sites, inputs)
    ref_by_name = {s.name: s for s in ref_sites}
    ref_facts = {s.name: _facts(s, ref_values) for s in ref_sites}
    ref_bytes, ref_rest = _attribute_state(graphs[0], ref_sites)
    own_bytes, own_rest = _attribute_state(graphs[1], sites)
    rows = []
    for site in sites:
        facts, ref = _facts(site, values), ref_by_name.get(site.name)
        before = ref_facts.get(site.name)
        reference, folded = _reference(graphs, ref, site, ref_values)
        value, note = _sqnr(site.name, reference, values.get(site.node))
        if folded and value is not None:
            note = f"vs the original's {folded} (folded into this layer)"
        rows.append(LayerRow(site.name, site.kind, facts.params, before.params if before else None, facts.sparsity,
                             facts.weight_bits, facts.act_bits, facts.kernel, facts.macs,
                             before.macs if before else None, value, note, ref_bytes.get(site.name, 0),
                             own_bytes.get(site.name, 0)))
    names = {s.name for s in sites}
    for ref in ref_sites:
        if ref.name not in names:
            facts = ref_facts[ref.name]
            rows.append(LayerRow(ref.name, ref.kind, 0, facts.params, None, None, None, "removed", 0, facts.macs,
                                 None, "removed by compression", ref_bytes.get(ref.name, 0), 0))
    for path in dict.fromkeys([*ref_rest, *own_rest]):
        nbytes_before, params_before = ref_rest.get(path, (0, 0))
        nbytes_after, params_after = own_rest.get(path, (0, 0))
        rows.append(LayerRow(path, "state", params_after, params_before, bytes_before=nbytes_before,
                             bytes_after=nbytes_after))
    return rows


def totals(original: nn.Module | Program, compressed: nn.Module | Program, inputs: tuple, rows: list[LayerRow],
           artifact: str | None = None, repeats: int = 5) -> dict[str, Any]:
    """Params (every row's weights and biases, int8 codes included), bytes on disk (``artifact``'s
    model.safetensors when given, else the state written as safetensors in memory), MACs of the weight layers
    and CPU latency (median ms per call on ``inputs``) of both models."""
    after_path = os.path.join(artifact, "model.safetensors") if artifact else None
    if after_path is not None and not os.path.isfile(after_path):
        raise SlimfxError(f"{after_path} is missing: pass the folder `slimfx run --out` wrote, or no artifact")
    batch = next((list(t.shape) for t in inputs if isinstance(t, torch.Tensor)), [])
    return {
        "params_before": sum(r.params_before or 0 for r in rows),
        "params_after": sum(r.params for r in rows),
        "bytes_on_disk_before": safetensors_bytes(_runnable(original)),
        "bytes_on_disk_after": os.path.getsize(after_path) if after_path else safetensors_bytes(_runnable(compressed)),
        "macs_before": sum(r.macs_before or 0 for r in rows),
        "macs_after": sum(r.macs or 0 for r in rows),
        "latency_ms_before": latency_ms(_runnable(original), inputs, repeats=repeats),
        "latency_ms_after": latency_ms(_runnable(compressed), inputs, repeats=repeats),
        "latency_input": batch,
        "torch_threads": torch.get_num_threads(),
    }


def layer_report(original: nn.Module | Program, compressed: nn.Module | Program, inputs: tuple,
                 artifact: str | None = None, repeats: int = 5, frontend: str = "auto") -> dict[str, Any]:
    """``{"layers": [row dicts], "totals": {...}}``: :func:`compare_layers` and :func:`totals` in one call."""
    rows = compare_layers(original, compressed, inputs, frontend)
    return {"layers": [r.as_dict() for r in rows],
            "totals": totals(original, compressed, inputs, rows, artifact=artifact, repeats=repeats)}
