"""verify(program): the IR invariants checked after every pass. Errors name the node and the pass."""

from __future__ import annotations

from torch import fx

from slimfx.errors import VerifyError
from slimfx.ir import meta as meta_mod
from slimfx.ir.program import Program


def verify(program: Program, after: str | None = None, check_meta: bool = True) -> None:
    """Raise VerifyError when the program breaks an invariant.

    Checks: the graph lints (nodes well-formed, defined before use, targets exist); every get_attr and
    call_module target exists; every node carries metadata and it agrees with a fresh propagation; the
    outputs' shapes and dtypes are those the program had when it was traced.
    ``after`` names the pass that just ran, for the message. ``check_meta=False`` skips the
    re-propagation (the pass manager does so right after it re-propagated metadata itself).
    """
    where = f" after pass {after!r}" if after else ""
    gm = program.module
    # Targets first: graph.lint() also rejects a missing target, but with a message that does not say
    # whether a submodule or an attribute is missing.
    for node in gm.graph.nodes:
        _check_target(gm, node, where)
    try:
        gm.graph.lint()
    except Exception as exc:
        raise VerifyError(f"graph is malformed{where}: {exc}") from exc
    fresh = meta_mod.infer_meta(gm, program.example_inputs, program.fake)[0] if check_meta else {}
    for node in gm.graph.nodes:
        if node.op == "output" or not check_meta:
            continue
        if node.name not in fresh:
            continue
        # Presence, not truthiness: ops that return None (aten._assert_tensor_metadata) have meta None.
        if meta_mod.META_KEY not in node.meta:
            raise VerifyError(
                f"node %{node.name} ({node.op} {node.target}) has no metadata{where}; "
                "a pass that adds nodes must call program.propagate_meta() or not preserve 'meta'"
            )
        stored = meta_mod.meta_of(node)
        if stored != fresh[node.name]:
            raise VerifyError(
                f"node %{node.name} ({node.op} {node.target}): stored metadata {stored} disagrees "
                f"with re-propagation {fresh[node.name]}{where}"
            )
    if program.output_spec is not None:
        current = program.current_output_spec()
        if current != program.output_spec:
            raise VerifyError(
                f"the program's outputs changed{where}: {program.output_spec} became {current}; "
                "passes must keep output shapes and dtypes"
            )


def _check_target(gm: fx.GraphModule, node: fx.Node, where: str) -> None:
    if node.op == "call_module":
        try:
            gm.get_submodule(node.target)
        except AttributeError as exc:
            raise VerifyError(f"node %{node.name} calls missing submodule {node.target!r}{where}") from exc
    elif node.op == "get_attr":
        owner, _, name = node.target.rpartition(".")
        try:
            module = gm.get_submodule(owner) if owner else gm
        except AttributeError as exc:
            raise VerifyError(f"node %{node.name} reads missing attribute {node.target!r}{where}") from exc
        if not hasattr(module, name):
            raise VerifyError(f"node %{node.name} reads missing attribute {node.target!r}{where}")
