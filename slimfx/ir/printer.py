"""Readable text dumps of a Program, and Graphviz DOT for pictures."""

from __future__ import annotations

from typing import Any

from torch import fx

from slimfx.ir import meta as meta_mod
from slimfx.ir.program import Program


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}={_fmt_arg(v)}" for k, v in a.items()) + "}"
    return repr(a)


def target_name(node: fx.Node) -> str:
    """A short readable name for what the node calls."""
    if node.op in ("call_module", "get_attr", "call_method"):
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        if hasattr(t, "_schema") or "aten" in str(t):
            return str(t)
        mod = getattr(t, "__module__", None) or ""
        mod = {"_operator": "operator", "torch.nn.functional": "F", "torch._C._nn": "F"}.get(mod, mod)
        return f"{mod}.{getattr(t, '__name__', str(t))}" if mod else getattr(t, "__name__", str(t))
    return str(node.target)


def _fmt_meta(m: Any) -> str:
    if m is None:
        return "?"
    if isinstance(m, tuple):
        return "(" + ", ".join(_fmt_meta(x) for x in m) + ")"
    return str(m)


def format_node(program: Program, node: fx.Node) -> str:
    """One line: name, kind, shape/dtype, and the call."""
    args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
    call = f"{node.op}[{target_name(node)}]({args})"
    if node.op == "placeholder":
        call = "input"
    elif node.op == "get_attr":
        call = f"get_attr[{node.target}]"
    elif node.op == "output":
        call = f"return {_fmt_arg(node.args[0])}"
    return f"  %{node.name:<24} {program.kind(node).value:<20} {_fmt_meta(meta_mod.meta_of(node)):<28} {call}"


def format_program(program: Program) -> str:
    """The whole program as text: a header (dialect, counts, passes applied, leaves) and a line per node."""
    nodes = list(program.graph.nodes)
    lines = [
        f"program dialect={program.dialect} nodes={len(nodes)} params={program.num_params():,} "
        f"meta={program.meta_mode.split(' ')[0]}",
        f"  pipeline: {program.pipeline_text() or '(none)'}",
    ]
    for leaf in program.leaves:
        lines.append(f"  leaf module {leaf.qualname!r}: {leaf.reason}")
    lines.extend(format_node(program, n) for n in nodes)
    return "\n".join(lines)


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(program: Program) -> str:
    """Graphviz DOT text: a box per node (name, kind, shape) and an edge per data dependency."""
    lines = ["digraph program {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    for node in program.graph.nodes:
        label = f"{node.name}\\n{program.kind(node).value}\\n{_dot_escape(_fmt_meta(meta_mod.meta_of(node)))}"
        lines.append(f'  "{node.name}" [label="{label}"];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines)
