"""dce: delete nodes whose results are unused and that have no side effects."""

from __future__ import annotations

from dataclasses import dataclass

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
        modules_before = sum(1 for _ in program.module.modules())
        if self.options.prune_modules:
            program.module.delete_all_unused_submodules()
        modules_removed = modules_before - sum(1 for _ in program.module.modules())
        return PassResult(
            changed=bool(removed or modules_removed),
            stats={"nodes_removed": removed, "modules_removed": modules_removed},
        )
