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
