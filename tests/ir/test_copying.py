"""copy_module: the fast deep copy trace() makes of the user's model."""

import copy

import torch
import torch.nn as nn

from slimfx.ir.copying import copy_module


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.bn = nn.BatchNorm1d(4)
        self.names = ["a", "b"]  # a mutable plain attribute
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("table", torch.arange(3))

    def forward(self, x):
        return self.bn(self.b(self.a(x))) + self.frozen.sum() + self.table.sum()


class WithOwnCopy(nn.Module):
    copies = 0

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)

    def __deepcopy__(self, memo):
        WithOwnCopy.copies += 1
        new = WithOwnCopy()
        new.fc.load_state_dict(self.fc.state_dict())
        return new


def test_copy_is_deep_keeps_ties_flags_and_outputs():
    model = Custom().eval()
    model.bn.running_mean.fill_(0.5)
    c = copy_module(model)
    x = torch.randn(3, 4)
    assert torch.equal(c(x), model(x))
    assert c.b.weight is c.a.weight and c.a.weight is not model.a.weight
    assert not c.frozen.requires_grad and isinstance(c.frozen, nn.Parameter) and c.a.weight.requires_grad
    assert not c.training and not c.bn.training
    assert c.names == model.names and c.names is not model.names
    for t in (*c.parameters(), *c.buffers()):
        assert all(t.data_ptr() != o.data_ptr() for o in (*model.parameters(), *model.buffers()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # editing the copy leaves the original alone
        c.a.weight.zero_()
        c.bn.running_mean.fill_(2.0)
    c.names.append("z")
    c.register_forward_hook(lambda *a: None)
    c.a.register_forward_pre_hook(lambda *a: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.names == ["a", "b"] and not model._forward_hooks and not model.a._forward_pre_hooks


def test_modules_with_their_own_copy_rules_are_copied_by_them():
    WithOwnCopy.copies = 0
    outer = nn.Sequential(WithOwnCopy(), nn.ReLU())
    c = copy_module(outer)
    assert WithOwnCopy.copies == 1 and c[0] is not outer[0]
    x = torch.randn(1, 2)
    assert torch.equal(c(x), outer(x))
    assert torch.equal(copy_module(outer)(x), copy.deepcopy(outer)(x))


def test_non_empty_and_special_dicts_are_deep_copied():
    import collections

    m = nn.Linear(2, 2)
    m.cache = collections.defaultdict(list)
    c = copy_module(m)
    c.cache["k"].append(1)  # the factory survives the copy
    assert c.cache["k"] == [1] and "k" not in m.cache
