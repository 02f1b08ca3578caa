"""dce: delete nodes whose results are unused and that have no side effects."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from slimfx.ir.ops import is_pure
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass


@dataclass
class DceOptions:
    """prune_modules: also delete submodules and attributes no node uses any more."""

    prune_modules: bool = True


@register_pass
class DeadCodeElimination(Pass):
    """Delete unused side-effect-free nodes, then unused submodules; UNKNOWN and in-place ops are kept."""

    name = "dce"
    contract = Contract.EXACT
    Options = DceOptions
    preserves = frozenset({"meta"})

    def run(self, program: Program) -> PassResult:
        graph = program.graph
        removed = 0
        for node in reversed(list(graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr" or is_pure(node, program.module):
                graph.erase_node(node)
                removed += 1
        modules_removed = delete_unused_submodules(program.module) if self.options.prune_modules else 0
        return PassResult(
            changed=bool(removed or modules_removed),
            stats={"nodes_removed": removed, "modules_removed": modules_removed},
        )


def delete_unused_submodules(gm: fx.GraphModule) -> int:
    """Delete submodules no call_module/get_attr node uses; returns how many were deleted.

    GraphModule.delete_all_unused_submodules does the same with a list membership test per module,
    which is quadratic: 6 s of a 2000-block model's compile. This keeps the used paths in a set.
    """
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        parts = str(node.target).split(".")
        used.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        if node.op == "call_module":
            try:
                sub = gm.get_submodule(node.target)
            except AttributeError:
                continue
            used.update(f"{node.target}.{name}" for name, _ in sub.named_modules() if name)
    deleted = 0
    for name, _ in list(gm.named_modules()):
        if name and name not in used and gm.delete_submodule(name):
            deleted += 1
    return deleted
