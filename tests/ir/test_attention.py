"""decompose-attention: nn.MultiheadAttention written out as q/k/v projections + SDPA, and its heads pruned."""

import copy

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.ir.attention import why_not_decomposable
from slimfx.ir.ops import OpKind


class Block(nn.Module):
    def __init__(self, batch_first=True, kdim=None, **mha_options):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, **mha_options)
        self.kv = nn.Linear(3, kdim) if kdim else None
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        kv = self.kv(x) if self.kv is not None else h
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        out = self.attn(h, kv, kv, need_weights=False)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out + h if self.batch_first else out).mean(1)


def _x():
    return torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options", [{}, {"batch_first": False}, {"kdim": 6}, {"bias": False}])
def test_decomposition_computes_the_same_function(options):
    model = Block(**options).eval()
    program = slimfx.trace(model, _x())
    out = slimfx.run_pipeline(program, "decompose-attention")
    assert not out.nodes_of(OpKind.MULTIHEAD_ATTENTION)
    assert out.log[-1].stats["decomposed"] == 1
    assert len(out.nodes_of(OpKind.SDPA)) == 1
    torch.testing.assert_close(out.module(_x()), model(_x()), rtol=1e-5, atol=1e-6)
    assert isinstance(model.attn, nn.MultiheadAttention)  # the user's model is untouched


def test_prune_channels_removes_whole_heads_of_multihead_attention_exactly_when_they_are_zero():
    model = Block().eval()
    zeroed = copy.deepcopy(model)
    e, hd = 8, 4
    with torch.no_grad():  # zero head 1's value rows: its output is then 0 whatever q and k are
        zeroed.attn.in_proj_weight[2 * e + hd:3 * e] = 0
        zeroed.attn.in_proj_bias[2 * e + hd:3 * e] = 0
    pruned = slimfx.run_pipeline(slimfx.trace(zeroed, _x()), "prune-channels{sparsity=0.5,ignore=[inp,head]}")
    shapes = {n: tuple(p.shape) for n, p in pruned.module.named_parameters()}
    assert shapes["attn.q_proj.weight"] == (4, 8) and shapes["attn.out_proj.weight"] == (8, 4)
    torch.testing.assert_close(pruned.module(_x()), zeroed(_x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,reason", [
    ("mask", "mask"), ("weights", "attention weights"), ("bias_kv", "add_bias_kv"), ("dropout", "training"),
])
def test_what_cannot_be_written_out_is_kept_whole_with_a_reason(case, reason):
    class Refused(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=case == "bias_kv",
                                              dropout=0.5 if case == "dropout" else 0.0)

        def forward(self, x):
            h = self.inp(x)
            mask = torch.zeros(5, 5, dtype=torch.bool) if case == "mask" else None
            out, weights = self.attn(h, h, h, attn_mask=mask, need_weights=case == "weights")
            return out.mean(1) + (weights.mean() if case == "weights" else 0)

    model = Refused()
    if case != "dropout":
        model.eval()
    program = slimfx.trace(model, _x())
    node = program.nodes_of(OpKind.MULTIHEAD_ATTENTION)[0]
    assert reason in why_not_decomposable(program, node)
    result = slimfx.run_pipeline(program, "decompose-attention", check_numerics=case != "dropout")
    assert result.nodes_of(OpKind.MULTIHEAD_ATTENTION) and reason in result.log[-1].notes[0]


@pytest.mark.parametrize("case", ["called twice", "tensor read"])
def test_shared_or_read_attention_is_kept_whole_and_pruning_still_runs(case):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.head = nn.Linear(3, 8), nn.MultiheadAttention(8, 2, batch_first=True), \
                nn.Linear(8, 2)

        def forward(self, x):
            h = self.attn(*(self.inp(x),) * 3, need_weights=False)[0]
            if case == "called twice":
                h = self.attn(h, h, h, need_weights=False)[0]
            out = self.head(h).mean(1)
            return out + self.attn.in_proj_bias.sum() if case == "tensor read" else out

    model = Shared().eval()
    program = slimfx.trace(model, _x())
    for pipeline in ("decompose-attention", "prune-channels{sparsity=0.5}"):
        result = slimfx.run_pipeline(program, pipeline)
        assert result.nodes_of(OpKind.MULTIHEAD_ATTENTION)
        assert any("also uses it" in note for note in result.log[-1].notes)
        torch.testing.assert_close(result.module(_x()), model(_x()), rtol=1e-5, atol=1e-6) \
            if pipeline == "decompose-attention" else None
