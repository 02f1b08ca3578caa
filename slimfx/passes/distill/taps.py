"""distill-taps / strip-taps: make a program also return named intermediate features, and undo it exactly.

A tapped program returns ``(original_output, {tap_name: feature})``: the graph's output node gets a
two-element tuple whose first element is exactly the previous output structure (the same fx nodes, so
the same values bit for bit) and whose second is a dict from tap name (the tapped node's name) to the
tapped node. The output node records the taps in ``node.meta[TAPS_KEY]`` (a :class:`TapRecord`), which
``Program.clone`` keeps (node meta is deep-copied with the graph), so a tapped program is recognised
without guessing from its output structure. ``program.output_spec`` is updated deliberately to the tapped
outputs' spec. In the ``aten`` dialect the graph returns a flat tuple that a pytree codegen unflattens;
there the taps are appended leaves and the codegen's ``out_spec`` is extended, so callers see the same
``(original_output, {tap_name: feature})`` structure.

``strip-taps`` restores the output node's argument (and, in the ``aten`` dialect, the codegen's out_spec)
and the output spec: no other node is touched, so outputs are bit-identical to the program before tapping.

Numerics contract: both passes keep the original outputs bit-identical (contract ``exact``). The pass
manager compares flattened outputs, which the extra features would not match; both passes implement
``comparable_outputs(reference, outputs)`` that returns the parts to compare (the original output).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx
from torch.utils import _pytree as pytree

from slimfx.errors import PassError
from slimfx.ir.meta import tensor_meta
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass

TAPS_KEY = "slimfx.distill.taps"
ROLES = ("student", "teacher")


@dataclass(frozen=True)
class TapRecord:
    """What distill-taps added to a program: the tap names (in tapping order) and the role.

    For graphs whose outputs are flattened by a pytree codegen (the ``aten`` dialect), ``out_spec`` is the
    original output TreeSpec and ``leaves`` the number of original output leaves; the taps follow them.
    """

    names: tuple[str, ...]
    role: str
    out_spec: Any = None
    leaves: int | None = None


def output_node(program: Program) -> fx.Node:
    """The graph's output node."""
    return next(n for n in reversed(program.graph.nodes) if n.op == "output")


def tap_record(program: Program) -> TapRecord | None:
    """The taps recorded on ``program``'s output node, or None when it is not tapped."""
    return output_node(program).meta.get(TAPS_KEY)


def _pytree_info(program: Program) -> Any:
    codegen = program.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    return info if info is not None and info.out_spec is not None else None


def _outputs(program: Program) -> tuple[Any, dict[str, fx.Node]]:
    """(original output argument, {tap name: node}) of the output node."""
    out, record = output_node(program), tap_record(program)
    if record is None:
        return out.args[0], {}
    if record.leaves is not None:
        leaves = tuple(out.args[0])
        return leaves[:record.leaves], dict(zip(record.names, leaves[record.leaves:]))
    original, taps = out.args[0]
    return original, dict(taps)


def _node_names(node: fx.Node) -> list[str]:
    names = [node.name]
    if node.op == "call_module":
        names.append(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:  # torch.export records the module path each aten node came from
        names.append(str(list(stack.values())[-1][0]))
    return names


def _tappable(node: fx.Node) -> bool:
    return node.op in ("call_module", "call_function", "call_method", "placeholder") and tensor_meta(node) is not None


def match_nodes(program: Program, patterns: Iterable[str], option: str = "patterns") -> list[fx.Node]:
    """Tensor-valued nodes whose name or module path matches one of ``patterns`` (fnmatch), in graph order.

    A pattern that matches nothing raises PassError naming the option and listing candidate names.
    """
    patterns = list(patterns)
    candidates = [n for n in program.graph.nodes if _tappable(n)]
    chosen: list[fx.Node] = []
    for pattern in patterns:
        hits = [n for n in candidates if any(fnmatch.fnmatchcase(name, pattern) for name in _node_names(n))]
        if not hits:
            shown = ", ".join(n.name for n in candidates[:12]) + (", ..." if len(candidates) > 12 else "")
            raise PassError(
                f"distill-taps: {option} pattern {pattern!r} matches no tensor-valued node; patterns are fnmatch "
                f"on node names or module paths (e.g. 'features.*', 'relu_1'); nodes here: {shown}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    return sorted(chosen, key=order.__getitem__)


def add_taps(program: Program, nodes: Sequence[fx.Node], role: str = "student") -> list[str]:
    """Make ``program`` (in place) also return ``nodes`` as named features; returns the tap names.

    Tapping an already tapped program adds to its taps. Recompiles the module and sets
    ``program.output_spec`` to the tapped outputs' spec.
    """
    if role not in ROLES:
        raise PassError(f"distill-taps: role must be one of {ROLES}, got {role!r}")
    out, record = output_node(program), tap_record(program)
    original, taps = _outputs(program)
    for node in nodes:
        if node.graph is not program.graph:
            raise PassError(f"distill-taps: node %{node.name} belongs to another program")
        taps[node.name] = node
    names = tuple(taps)
    role = role if record is None else record.role
    info = _pytree_info(program)
    if info is None:
        out.args = ((original, taps),)
        out.meta[TAPS_KEY] = TapRecord(names, role)
    else:  # the codegen unflattens a flat tuple of leaves with out_spec: append the taps, extend the spec
        spec = info.out_spec if record is None else record.out_spec
        out.args = (tuple(original) + tuple(taps.values()),)
        skeleton = pytree.tree_unflatten([0] * len(original), spec)
        program.graph._codegen.pytree_info = info._replace(
            out_spec=pytree.tree_structure((skeleton, dict.fromkeys(names, 0))))
        out.meta[TAPS_KEY] = TapRecord(names, role, spec, len(original))
    program.recompile()
    program.output_spec = program.current_output_spec()
    return list(names)


def strip_taps(program: Program) -> bool:
    """Undo :func:`add_taps` in place: the output is the original structure again. False if not tapped."""
    out, record = output_node(program), tap_record(program)
    if record is None:
        return False
    original, _ = _outputs(program)
    out.args = (original,)
    if record.out_spec is not None:
        program.graph._codegen.pytree_info = program.graph._codegen.pytree_info._replace(out_spec=record.out_spec)
    del out.meta[TAPS_KEY]
    program.recompile()
    program.output_spec = program.current_output_spec()
    return True


def split_tapped(outputs: Any) -> tuple[Any, dict[str, Any]]:
    """``(original_output, features)`` of a tapped program's result."""
    return outputs[0], outputs[1]


def _comparable_tapped(reference: Any, outputs: Any, was_tapped: bool, is_tapped: bool) -> tuple[Any, Any]:
    return (reference[0] if was_tapped else reference), (outputs[0] if is_tapped else outputs)


@dataclass
class DistillTapsOptions:
    """student / teacher: fnmatch patterns of node names or module paths to tap (e.g. ['features.*']).
    role: which list applies to this program: student | teacher | auto (the non-empty one). With no
    patterns the pass changes nothing (the trainer pairs stages itself, see pair_stages).
    """

    student: list[str] = field(default_factory=list)
    teacher: list[str] = field(default_factory=list)
    role: str = "auto"


@register_pass
class DistillTaps(Pass):
    """Also return named intermediate features: output becomes (original_output, {tap_name: feature})."""

    name = "distill-taps"
    contract = Contract.EXACT
    Options = DistillTapsOptions
    tolerance = (0.0, 0.0)

    def run(self, program: Program) -> PassResult:
        role, patterns = self._chosen()
        self._was_tapped = tap_record(program) is not None
        if not patterns:
            self._is_tapped = self._was_tapped
            return PassResult(changed=False, notes=["no patterns given: nothing tapped"])
        nodes = match_nodes(program, patterns, option=role)
        names = add_taps(program, nodes, role)
        self._is_tapped = True
        return PassResult(
            stats={"taps": len(names)},
            notes=[f"outputs are now (original_output, {{tap: feature}}) with taps {', '.join(names)}; "
                   "output_spec updated on purpose; strip-taps restores the original outputs"],
        )

    def _chosen(self) -> tuple[str, list[str]]:
        role = self.options.role
        if role not in (*ROLES, "auto"):
            raise PassError(f"distill-taps: option role must be student, teacher or auto, got {role!r}")
        if role == "auto":
            if self.options.student and self.options.teacher:
                raise PassError(
                    "distill-taps: both student and teacher patterns given; a program plays one role: add "
                    "role=student or role=teacher to say which list applies to this program"
                )
            role = "teacher" if self.options.teacher else "student"
        return role, list(getattr(self.options, role))

    def comparable_outputs(self, reference: Any, outputs: Any) -> tuple[Any, Any]:
        """The parts of the outputs before/after this pass that its contract covers (the original output)."""
        return _comparable_tapped(reference, outputs, getattr(self, "_was_tapped", False),
                                  getattr(self, "_is_tapped", False))


@register_pass
class StripTaps(Pass):
    """Remove the features distill-taps added: outputs bit-identical to the program before tapping."""

    name = "strip-taps"
    contract = Contract.EXACT
    tolerance = (0.0, 0.0)

    def run(self, program: Program) -> PassResult:
        record = tap_record(program)
        self._was_tapped = strip_taps(program)
        if not self._was_tapped:
            return PassResult(changed=False, notes=["program has no taps: nothing to strip"])
        return PassResult(stats={"taps": len(record.names)},
                          notes=[f"removed taps {', '.join(record.names)}; output_spec restored"])

    def comparable_outputs(self, reference: Any, outputs: Any) -> tuple[Any, Any]:
        """The parts of the outputs before/after this pass that its contract covers (the original output)."""
        return _comparable_tapped(reference, outputs, getattr(self, "_was_tapped", False), False)


def _stage_ends(program: Program) -> list[fx.Node]:
    """The last node of each resolution stage (4-D activations by spatial size, in order of first
    appearance), then the feature the final linear reads (its 2-D input), when there is one."""
    ends: dict[tuple[int, ...], fx.Node] = {}
    for node in program.graph.nodes:
        meta = tensor_meta(node)
        if node.op == "placeholder" or not _tappable(node) or meta is None or len(meta.shape) != 4:
            continue
        ends[tuple(meta.shape[2:])] = node  # keeps first-appearance order of keys, last node per size
    stages = list(ends.values())
    linears = program.nodes_of(OpKind.LINEAR)
    if linears:
        source = linears[-1].args[0] if linears[-1].args else None
        if isinstance(source, fx.Node) and _tappable(source) and source.op != "placeholder":
            stages.append(source)
    return stages


def pair_stages(student: Program, teacher: Program) -> list[tuple[fx.Node, fx.Node]]:
    """Pair student and teacher stages automatically: the last node of each resolution stage (matched by
    spatial size, in order) and the features their final linear reads. Returns [(student_node,
    teacher_node)] in student graph order; stages one side lacks are left out. Both programs need meta.
    """
    for program in (student, teacher):
        if program.meta_mode == "none":
            program.propagate_meta()
    s_ends, t_ends = _stage_ends(student), _stage_ends(teacher)

    def key(node: fx.Node) -> tuple:
        shape = tensor_meta(node).shape
        return ("spatial", tuple(shape[2:])) if len(shape) == 4 else ("flat", len(shape))

    t_by_key: dict[tuple, fx.Node] = {}
    for node in t_ends:
        t_by_key.setdefault(key(node), node)
    pairs = [(s, t_by_key[key(s)]) for s in s_ends if key(s) in t_by_key]
    seen: set[fx.Node] = set()
    return [(s, t) for s, t in pairs if not (t in seen or seen.add(t))]


def format_pairs(pairs: Sequence[tuple[fx.Node, fx.Node]]) -> str:
    """A readable table of a pairing: one 'student %a [shape] <- teacher %b [shape]' line per pair."""
    return "\n".join(f"student %{s.name} {tensor_meta(s)} <- teacher %{t.name} {tensor_meta(t)}" for s, t in pairs)
