"""verify: check the IR invariants now (the pass manager also does this after every pass)."""

from __future__ import annotations

from slimfx.ir.program import Program
from slimfx.ir.verify import verify
from slimfx.passes.base import Contract, Pass, PassResult, register_pass


@register_pass
class Verify(Pass):
    """Check the IR invariants (graph lint, targets exist, metadata consistent, output shapes kept)."""

    name = "verify"
    contract = Contract.EXACT
    preserves = frozenset({"meta", "*"})

    def run(self, program: Program) -> PassResult:
        verify(program, after=None)
        return PassResult(changed=False)
