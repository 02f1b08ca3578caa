import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx.errors import PassError
from slimfx.ir.ops import OpKind


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model


class AllFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, groups=3)
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False)
        self.bn_up = nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = self.bn_up(self.up(y))
        return self.bn_fc(self.fc(y.mean((2, 3))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fold_bn_folds_conv_conv_transpose_and_linear_in_both_dialects(frontend):
    model = randomize_bn(AllFoldable()).eval()
    x = torch.randn(2, 3, 8, 8)
    out = slimfx.run_pipeline(slimfx.trace(model, x, frontend=frontend), "fold-bn,dce")
    assert out.log[0].stats == {"folded": 3}
    assert not out.nodes_of(OpKind.BATCH_NORM)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    # fold-bn alone leaves none of the folded norms' tensors behind (they would inflate the artifact)
    folded = slimfx.run_pipeline(slimfx.trace(model, x, frontend=frontend), "fold-bn")
    leftovers = [k for k in folded.module.state_dict() if "bn" in k]
    assert not leftovers, leftovers


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fold_bn_refuses_training_mode_bn_with_a_clear_message(frontend):
    model = randomize_bn(AllFoldable()).train()
    program = slimfx.trace(model, torch.randn(2, 3, 8, 8), frontend=frontend)
    with pytest.raises(PassError, match=r"BatchNorm .* is in training mode.*model\.eval\(\)"):
        slimfx.run_pipeline(program, "fold-bn", check_numerics=False)


class Opaque(nn.Module):
    """A user op slimfx has no table row for: UNKNOWN."""

    def forward(self, x):
        return x * 1.5 + 0.1


class UnknownAround(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.opaque = Opaque()
        self.bn = nn.BatchNorm2d(4)
        self.side = Opaque()

    def forward(self, x):
        self.side(x)  # result unused, but UNKNOWN ops may have side effects
        return self.bn(self.opaque(self.conv(x)))


def test_unknown_ops_are_left_alone_by_fold_bn_and_dce():
    model = randomize_bn(UnknownAround()).eval()
    x = torch.randn(2, 3, 4, 4)
    program = slimfx.trace(model, x, frontend="fx", leaf_modules=["opaque", "side"])
    out = slimfx.run_pipeline(program, "fold-bn,dce")
    targets = [n.target for n in out.graph.nodes if n.op == "call_module"]
    assert targets == ["side", "conv", "opaque", "bn"]  # nothing folded through or deleted
    assert out.log[0].stats == {"folded": 0}
    assert any("its input is a unknown op" in note for note in out.log[0].notes)
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=0)


def test_fold_bn_strict_raises_and_shared_producers_are_kept():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # y has another user: folding would change it

    model = randomize_bn(Shared()).eval()
    program = slimfx.trace(model, torch.randn(1, 2, 3, 3))
    out = slimfx.run_pipeline(program, "fold-bn")
    assert out.log[0].stats == {"folded": 0}
    with pytest.raises(PassError, match="also used elsewhere"):
        slimfx.run_pipeline(program, "fold-bn{strict=true}")


class Variants(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.flat = nn.Flatten()
        self.ident = nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        a = self.act(x) + x.relu() + torch.relu(x)
        b = self.pool(a).view(a.shape[0], 4, -1).permute(0, 2, 1).reshape(2, -1)
        c = torch.add(self.flat(self.ident(a)), 1.0).sigmoid()
        d = F.dropout(self.drop(b), 0.2, training=False)
        return torch.cat([c.mul(2), d.div(3)], 1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_canonicalize_gives_one_form_and_is_bit_exact(frontend):
    model = Variants().eval()
    x = torch.randn(2, 4, 4, 4)
    out = slimfx.run_pipeline(slimfx.trace(model, x, frontend=frontend), "canonicalize,dce")
    assert not out.nodes_of(OpKind.DROPOUT, OpKind.IDENTITY)
    if frontend == "fx":
        assert not [n for n in out.graph.nodes if n.op in ("call_method", "call_module")]
        relus = [n for n in out.graph.nodes if n.target is F.relu]
        assert len(relus) == 3
        assert [n.target for n in out.nodes_of(OpKind.ADD)] == [operator.add] * 3
        assert {n.target for n in out.nodes_of(OpKind.RESHAPE)} <= {torch.reshape, torch.flatten}
    assert torch.equal(out(x), model(x))


def test_canonicalize_keeps_dropout_in_training_and_inplace_aliasing():
    class InplaceAlias(nn.Module):
        def __init__(self):
            super().__init__()
            self.ident = nn.Identity()

        def forward(self, x):
            y = x * 1.0
            z = self.ident(y)
            z.add_(1.0)  # must keep writing into z, not into y
            return y + z

    model = InplaceAlias().eval()
    x = torch.randn(3)
    out = slimfx.run_pipeline(slimfx.trace(model, x), "canonicalize,dce")
    assert torch.equal(out(x), model(x))
    train = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    prog = slimfx.trace(train, torch.randn(2, 3))
    out = slimfx.run_pipeline(prog, "canonicalize", check_numerics=False)
    assert out.nodes_of(OpKind.DROPOUT)


def test_dce_removes_dead_pure_nodes_and_unused_modules():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            self.unused(x).relu()  # dead
            return self.used(x)

    program = slimfx.trace(Dead().eval(), torch.randn(2, 3))
    out = slimfx.run_pipeline(program, "dce")
    assert out.log[0].stats == {"nodes_removed": 2, "modules_removed": 1}
    assert not hasattr(out.module, "unused")


def test_fold_bn_keeps_a_norm_whose_tensors_forward_still_reads():
    class ReadsGamma(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.bn.weight.view(1, -1, 1, 1)

    model = randomize_bn(ReadsGamma()).eval()
    x = torch.randn(2, 3, 8, 8)
    out = slimfx.run_pipeline(slimfx.trace(model, x), "fold-bn")
    assert out.log[0].stats == {"folded": 1} and "bn.weight" in out.module.state_dict()
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)

