"""decompose-attention: write nn.MultiheadAttention calls out as q/k/v projections, heads and SDPA."""

from __future__ import annotations

from slimfx.ir.attention import decompose_attention
from slimfx.ir.program import Program
from slimfx.passes.base import Contract, Pass, PassResult, register_pass


@register_pass
class DecomposeAttention(Pass):
    """Write nn.MultiheadAttention as q/k/v linears + SDPA + out_proj (so its heads can be pruned); exact."""

    name = "decompose-attention"
    contract = Contract.EXACT
    tolerance = (1e-4, 1e-5)  # another attention kernel: same function, different float rounding

    def run(self, program: Program) -> PassResult:
        done, notes = decompose_attention(program)
        return PassResult(changed=done > 0, stats={"decomposed": done}, notes=notes)
