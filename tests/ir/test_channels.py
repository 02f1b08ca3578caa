"""Channel groups on hand-written models: which channels couple, how indices map, and what is refused."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx.ir.channels import GroupCount, ParamDim, build_channel_groups, channel_groups
from slimfx.testing.models import ChannelShuffle, MultiheadSelfAttention, SelfAttention, SqueezeExcite

FRONTENDS = ["fx", "export"]


def _groups(module, *inputs, frontend="fx"):
    program = slimfx.trace(module.eval(), inputs, frontend=frontend)
    return program, build_channel_groups(program)


def _group_of(program, groups, module_path):
    """The group whose producers include the layer at ``module_path`` (module form) or its weight's owner."""
    for g in groups:
        for name in g.producers:
            node = next(n for n in program.graph.nodes if n.name == name)
            target = node.target if node.op == "call_module" else None
            if target is None:
                weight = node.args[1] if node.target is not torch.ops.aten.embedding.default else node.args[0]
                target = weight.target.rpartition(".")[0]
            if target == module_path:
                return g
    raise AssertionError(f"no group produced by {module_path}")


def _image(c=3, s=8):
    return torch.randn(2, c, s, s)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.c(F.relu(y + self.b(y))).mean((2, 3))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_residual_add_couples_both_convs(frontend):
    program, groups = _groups(Residual(), _image(), frontend=frontend)
    g = _group_of(program, groups, "a")
    assert g.prunable and g.size == 8
    assert len(g.producers) == 2 and len(g.consumers) == 2  # a and b produce; b and c consume
    assert _group_of(program, groups, "b") is g


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.r, self.out = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.cat([self.l(x), self.r(x)], dim=1)).mean((2, 3))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_concat_maps_each_input_to_its_offset(frontend):
    program, groups = _groups(Concat(), _image(), frontend=frontend)
    g = _group_of(program, groups, "l")
    assert g.prunable and g.size == 8
    consumer = next(p for p in g.members if isinstance(p, ParamDim) and p.dim == 1)
    left = next(p for p in g.members if isinstance(p, ParamDim) and p.dim == 0 and p.node == g.producers[0])
    right = next(p for p in g.members if isinstance(p, ParamDim) and p.dim == 0 and p.node == g.producers[1])
    assert g.members[consumer][:3].tolist() == g.members[left].tolist()
    assert g.members[consumer][3:].tolist() == g.members[right].tolist()


class Depthwise(nn.Module):
    def __init__(self, groups=8, mult=1):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * mult, 3, padding=1, groups=groups)
        self.pw = nn.Conv2d(8 * mult, 4, 1)

    def forward(self, x):
        return self.pw(F.relu(self.dw(self.a(x)))).mean((2, 3))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_depthwise_couples_its_input_and_output_channels(frontend):
    program, groups = _groups(Depthwise(mult=2), _image(), frontend=frontend)
    g = _group_of(program, groups, "a")
    assert g.prunable and g.size == 8
    assert _group_of(program, groups, "dw") is g
    counts = [p for p in g.members if isinstance(p, GroupCount)]
    assert len(counts) == 1
    rows = next(p for p in g.members if isinstance(p, ParamDim) and p.node == counts[0].node and p.dim == 0)
    assert g.members[rows].tolist() == torch.arange(8).repeat_interleave(2).tolist()  # channel multiplier 2


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_grouped_conv_removes_whole_groups(frontend):
    program, groups = _groups(Depthwise(groups=2), _image(), frontend=frontend)
    g = _group_of(program, groups, "a")
    assert g.prunable and g.size == 2  # 8 channels in 2 groups of 4


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_se_gate_couples_with_the_gated_channels(frontend):
    class SE(nn.Module):
        def __init__(self, fc):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.se = SqueezeExcite(2, 8, 4, fc, "sigmoid")
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.se(self.a(x))).mean((2, 3))

    for fc in ("conv", "linear"):
        program, groups = _groups(SE(fc), _image(), frontend=frontend)
        g = _group_of(program, groups, "a")
        assert g.prunable and g.size == 8
        assert _group_of(program, groups, "se.expand") is g
        assert _group_of(program, groups, "se.reduce").prunable


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_flatten_linear_expands_each_channel_by_the_spatial_size(frontend):
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4 * 9, 2)

        def forward(self, x):
            return self.fc(self.a(x).flatten(1))

    program, groups = _groups(Head(), _image(s=3), frontend=frontend)
    g = _group_of(program, groups, "a")
    assert g.prunable and g.size == 4
    cols = next(p for p in g.members if isinstance(p, ParamDim) and p.dim == 1)
    assert g.members[cols].tolist() == torch.arange(4).repeat_interleave(9).tolist()


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("dims,style", [(2, "reshape"), (2, "unflatten"), (1, "view")])
def test_channel_shuffle_couples_strided_channels_and_prunes_exactly(frontend, dims, style):
    conv = nn.Conv2d if dims == 2 else nn.Conv1d

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.shuffle, self.out = conv(3, 8, 1), ChannelShuffle(dims, 8, 2, style), conv(8, 2, 1)

        def forward(self, x):
            return self.out(self.shuffle(self.a(x))).mean(-1)

    model = Shuffle().eval()
    x = _image() if dims == 2 else torch.randn(2, 3, 8)
    program, groups = _groups(model, x, frontend=frontend)
    assert program.meta_mode == "fake"  # .contiguous() gets contiguous strides, so the view after it can run
    g = _group_of(program, groups, "a")
    assert g.prunable, g.reason
    assert g.size == 4  # a unit = one index of the inner (channels per group) dim
    filters = next(p for p in g.members if isinstance(p, ParamDim) and p.role == "weight" and p.dim == 0)
    # a's filter c = k * 4 + j (group k, index j) belongs to unit j: units {0, 4}, {1, 5}, ...
    assert g.members[filters].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    cols = next(p for p in g.members if isinstance(p, ParamDim) and p.role == "weight" and p.dim == 1)
    # after the shuffle, out's input channel j * 2 + k comes from unit j
    assert g.members[cols].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # zero the units to remove, then remove them physically: the outputs must not change
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for c in (1, 5, 3, 7):  # units 1 and 3
            zeroed.a.weight[c] = 0
            zeroed.a.bias[c] = 0
    pruned = slimfx.run_pipeline(slimfx.trace(zeroed, x, frontend=frontend),
                                 "prune-channels{sparsity=0.5,importance=l1}")
    assert (program.num_params(), pruned.num_params()) == (50, 26)  # a: 8 -> 4 filters; out: 8 -> 4 inputs
    torch.testing.assert_close(pruned.module(x), zeroed(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_separate_qkv_attention_prunes_whole_heads_and_mha_waits_for_decomposition(frontend):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.sa = SelfAttention(8, 2, False, "view")
            self.mha = MultiheadSelfAttention(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.mha(self.sa(h)).mean(1)

    program, groups = _groups(Attn(), torch.randn(2, 5, 3), frontend=frontend)
    heads = _group_of(program, groups, "sa.q")
    assert heads.prunable and heads.size == 2  # units are heads
    assert _group_of(program, groups, "sa.k") is heads and _group_of(program, groups, "sa.v") is heads
    stream = _group_of(program, groups, "sa.out")
    if frontend == "fx":  # the module is whole until decompose-attention (run by prune-channels) writes it out
        assert not stream.prunable and "decompose-attention" in stream.reason
        decomposed = slimfx.run_pipeline(program, "decompose-attention")
        groups = build_channel_groups(decomposed)
        assert _group_of(decomposed, groups, "sa.out").prunable
        mha_heads = _group_of(decomposed, groups, "mha.attn.q_proj")
        assert mha_heads.prunable and mha_heads.size == 2  # nn.MultiheadAttention's heads, whole
        assert _group_of(decomposed, groups, "mha.attn.k_proj") is mha_heads
    else:
        assert stream.prunable and not _group_of(program, groups, "mha.attn").prunable


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_channels_reaching_the_output_are_never_prunable(frontend):
    class ConvClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.cls = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return F.adaptive_avg_pool2d(self.cls(F.relu(self.a(x))), 1).flatten(1)

    program, groups = _groups(ConvClassifier(), _image(), frontend=frontend)
    assert _group_of(program, groups, "a").prunable
    cls = _group_of(program, groups, "cls")
    assert not cls.prunable and "output" in cls.reason


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_unknown_op_blocks_its_group_and_names_it(frontend):
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.flip(self.a(x), [1])).mean((2, 3))

    program, groups = _groups(Flip(), _image(), frontend=frontend)
    g = _group_of(program, groups, "a")
    assert not g.prunable and "flip" in g.reason and "does not know" in g.reason


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_layernorm_over_the_channels_is_refused_and_groupnorm_keeps_whole_groups(frontend):
    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gn, self.b = nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 6, 1)
            self.ln, self.c = nn.LayerNorm(6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.b(self.gn(self.a(x))).mean((2, 3))
            return self.c(self.ln(h))

    program, groups = _groups(Norms(), _image(), frontend=frontend)
    gn = _group_of(program, groups, "a")
    assert gn.prunable and gn.size == 4
    ln = _group_of(program, groups, "b")
    assert not ln.prunable and "LayerNorm" in ln.reason


def test_groups_are_a_cached_analysis():
    import slimfx.passes.prune.channels  # noqa: F401  (registers the analysis)
    from slimfx.passes.analysis import get_analysis

    program, _ = _groups(Residual(), _image())
    assert get_analysis(program, "channel-groups") is channel_groups(program)
