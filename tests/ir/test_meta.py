"""Shape metadata shortcuts (closed-form linear/conv shapes) agree with what the layers really compute."""

import torch
import torch.nn as nn

import slimfx
from slimfx.ir.meta import tensor_meta


def _meta_of(program, name):
    return tensor_meta(next(n for n in program.graph.nodes if n.name == name)).shape


def test_a_hooked_linear_is_not_given_a_closed_form_shape():
    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 5)
            self.fc.register_forward_pre_hook(lambda m, args: (args[0].flatten(1),))

        def forward(self, x):
            return self.fc(x)

    x = torch.randn(2, 8, 4)
    program = slimfx.trace(Hooked(), x)
    assert _meta_of(program, "fc") == tuple(Hooked()(x).shape) == (2, 5)


def test_shapes_come_from_the_weights_not_stale_size_attributes():
    class Edited(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(8, 16)
            self.fc.weight = nn.Parameter(torch.randn(10, 8))  # out_features still says 16
            self.fc.bias = nn.Parameter(torch.randn(10))

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    model, x = Edited(), torch.randn(2, 3, 9, 9)
    program = slimfx.trace(model, x)
    assert _meta_of(program, "conv") == (2, 8, 5, 5) and _meta_of(program, "fc") == (2, 10)


def test_recompile_notices_an_argument_whose_type_changed():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 1

    program = slimfx.trace(Scale(), torch.arange(4))
    mul = next(n for n in program.graph.nodes if n.op == "call_function")
    mul.args = (mul.args[0], 1.0)  # 1 == 1.0 in Python, but the generated code differs
    program.recompile()
    assert program.module(torch.arange(4)).dtype == torch.float32


def _real_shapes(model, inputs: tuple):
    """Every node's real output shape, from running the traced module (the ground truth for meta)."""
    from slimfx.ir.meta import _RealProp

    program = slimfx.trace(model, inputs)
    real = _RealProp(program.module)
    real.metas, real.current = {}, None
    real.run(*inputs)
    return program, real.metas


def test_closed_form_pooling_and_attention_shapes_equal_the_real_ones():
    import torch.nn.functional as F

    class PoolsAndAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.pools = nn.ModuleList([nn.AdaptiveAvgPool2d((2, 3)), nn.AdaptiveMaxPool2d(1), nn.AdaptiveAvgPool2d(4)])
            self.pool1d, self.max = nn.AdaptiveAvgPool1d(5), nn.MaxPool2d(2)

        def forward(self, x, q, k, v):
            y = self.conv(x)
            outs = [p(y).flatten(1) for p in self.pools]
            outs += [self.pool1d(y.flatten(2)).flatten(1), self.max(y).flatten(1)]
            a = F.scaled_dot_product_attention(q, k, v)  # closed form
            b = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool))  # dispatched
            return torch.cat(outs, 1), a + b

    inputs = (torch.randn(2, 3, 11, 9), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 3))
    program, real = _real_shapes(PoolsAndAttention(), inputs)
    assert program.meta_mode == "fake"
    for node in program.graph.nodes:
        assert node.meta["slimfx"] == real[node.name], node.name


def test_shortcut_results_feed_ops_that_fake_tensors_must_run():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.pool = nn.Linear(6, 4), nn.AdaptiveAvgPool1d(2)

        def forward(self, x):
            y = self.fc(x)  # a plain meta tensor inside propagation
            z = torch.cumsum(y, dim=1)  # dispatched under FakeTensorMode: y must become a FakeTensor first
            z = torch.cat([z, torch.zeros(1, 5, 4)])  # ... on the device it stands for (cat checks devices)
            return torch.stack([z, self.pool(torch.cat([y, y[:1]]))[..., :1].expand_as(z)]).sum(0)

    x = torch.randn(3, 5, 6)
    program, real = _real_shapes(Mixed(), (x,))
    assert program.meta_mode == "fake"
    assert all(node.meta["slimfx"] == real[node.name] for node in program.graph.nodes)
