"""Program: what a model IS inside slimfx: an fx.GraphModule plus what passes need to know about it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from slimfx.ir import meta as meta_mod
from slimfx.ir.ops import OpKind, kind

DIALECTS = ("torch", "aten")


@dataclass(frozen=True)
class PassRecord:
    """One applied pass: its name, the options it was given, and its pipeline text."""

    name: str
    options: dict[str, Any]
    text: str


@dataclass(frozen=True)
class LeafRecord:
    """A submodule the fx frontend kept opaque (a leaf) because it could not be traced, and why."""

    qualname: str
    reason: str


@dataclass
class Program:
    """An fx.GraphModule with its example inputs, dialect, provenance and cached analyses.

    ``module`` is runnable (``program.module(*inputs)``). Passes rewrite a Program in place; the pass
    manager clones first, so a Program given to :func:`slimfx.run_pipeline` is never mutated.
    """

    module: fx.GraphModule
    example_inputs: tuple
    dialect: str = "torch"
    provenance: list[PassRecord] = field(default_factory=list)
    leaves: list[LeafRecord] = field(default_factory=list)
    training: bool = False
    meta_mode: str = "none"
    output_spec: Any = None
    log: list[Any] = field(default_factory=list, repr=False)
    calibration_data: list[Any] | None = field(default=None, repr=False)
    train_data: Any = field(default=None, repr=False)
    teacher: Any = field(default=None, repr=False, compare=False)
    analyses: dict[str, Any] = field(default_factory=dict, repr=False)
    fake: meta_mod.FakeState | None = field(default=None, repr=False, compare=False)
    _compiled: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}, got {self.dialect!r}")
        self.example_inputs = tuple(self.example_inputs)
        if self._compiled is None:  # a GraphModule's code is compiled from its graph when it is built
            self._compiled = _code_fingerprint(self.graph)

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def kind(self, node: fx.Node) -> OpKind:
        """The canonical op kind of ``node`` (see :mod:`slimfx.ir.ops`)."""
        return kind(node, self.module)

    def nodes_of(self, *kinds: OpKind) -> list[fx.Node]:
        """All nodes whose kind is one of ``kinds``, in graph order."""
        wanted = set(kinds)
        return [n for n in self.graph.nodes if self.kind(n) in wanted]

    def propagate_meta(self) -> None:
        """(Re)compute shape/dtype metadata on every node, and the output spec on first call."""
        if self.fake is None:
            self.fake = meta_mod.FakeState()
        metas, mode = meta_mod.infer_meta(self.module, self.example_inputs, self.fake)
        meta_mod.annotate(self.module, metas)
        self.meta_mode = mode
        if self.output_spec is None:
            self.output_spec = self.current_output_spec()

    def current_output_spec(self) -> Any:
        """The metas of the graph's outputs, as currently annotated."""
        out = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        return _map_nodes(out.args[0], meta_mod.meta_of)

    def recompile(self) -> None:
        """Regenerate the module's Python code after a graph edit (skipped when the graph is unchanged
        since the last recompile through this method: codegen + compile is ~5 ms for 50 nodes)."""
        fingerprint = _code_fingerprint(self.graph)
        try:
            unchanged = fingerprint is not None and fingerprint == self._compiled
        except Exception:  # e.g. tensor constants among the args: always recompile
            unchanged = False
        if unchanged:
            return
        self.graph.lint()
        self.module.recompile()
        self._compiled = fingerprint

    def clone(self) -> Program:
        """A deep copy: the graph, parameters and submodules are new; example inputs are shared."""
        new_module = copy.deepcopy(self.module)
        return Program(
            module=new_module,
            example_inputs=self.example_inputs,
            dialect=self.dialect,
            provenance=list(self.provenance),
            leaves=list(self.leaves),
            training=self.training,
            meta_mode=self.meta_mode,
            output_spec=self.output_spec,
            log=list(self.log),
            calibration_data=self.calibration_data,  # data, not model state: shared, never copied
            train_data=self.train_data,  # likewise: labelled batches for passes that train (distill)
            teacher=self.teacher,  # the reference model a training pass distills from; never trained
        )

    def __call__(self, *inputs: Any) -> Any:
        with torch.no_grad():
            return self.module(*inputs)

    def num_params(self) -> int:
        """Number of parameter elements (buffers not counted)."""
        return sum(p.numel() for p in self.module.parameters())

    def pipeline_text(self) -> str:
        """The pipeline applied so far, as text."""
        return ",".join(r.text for r in self.provenance)

    def __str__(self) -> str:
        from slimfx.ir.printer import format_program

        return format_program(self)

    def to_dot(self) -> str:
        """Graphviz DOT text of the program (one box per node: name, kind, shape)."""
        from slimfx.ir.printer import to_dot

        return to_dot(self)


def _code_fingerprint(graph: fx.Graph) -> tuple | None:
    """Everything the generated forward depends on: node names, ops, targets and arguments, in order."""
    def typed(value: Any) -> Any:  # 1, 1.0 and True are == in Python but generate different code
        return fx.node.map_aggregate(value, lambda a: a if isinstance(a, fx.Node) else (type(a), a))

    return (id(graph), id(graph._codegen),
            tuple((n.name, n.op, n.target, typed(n.args), typed(n.kwargs)) for n in graph.nodes))


def _map_nodes(value: Any, fn) -> Any:
    if isinstance(value, fx.Node):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return tuple(_map_nodes(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_nodes(v, fn) for k, v in value.items()}
    return value
