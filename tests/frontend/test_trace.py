import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx.errors import TraceError


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class WithUntraceableChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.gate(F.relu(self.conv(x)))
        return self.head(y.mean((2, 3)))


class UntraceableTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.max() > 100:  # data-dependent control flow at the top level
            return y
        return -y


def test_leaf_fallback_records_the_untraceable_submodule_and_matches_eager():
    model = WithUntraceableChild().eval()
    x = torch.randn(2, 3, 8, 8)
    program = slimfx.trace(model, x, frontend="fx")
    assert [leaf.qualname for leaf in program.leaves] == ["gate"]
    assert "DataDependent could not be traced" in program.leaves[0].reason
    assert "if x.sum() > 0" in program.leaves[0].reason
    assert program.kind(next(n for n in program.graph.nodes if n.target == "gate")).value == "unknown"
    assert torch.equal(program(x), model(x))
    assert "leaf module 'gate'" in str(program)


def test_top_level_trace_error_names_module_line_and_remedies():
    with pytest.raises(TraceError) as info:
        slimfx.trace(UntraceableTop(), torch.randn(2, 4), frontend="fx")
    message = str(info.value)
    assert "UntraceableTop.forward" in message
    assert "test_trace.py" in message and "if y.max() > 100" in message
    assert "leaf_modules" in message and "frontend='export'" in message


def test_auto_falls_back_to_export_and_reports_both_when_both_fail():
    with pytest.raises(TraceError) as info:
        slimfx.trace(UntraceableTop(), torch.randn(2, 4), frontend="auto")
    assert "[fx]" in str(info.value) and "[export]" in str(info.value)


class NeedsExport(nn.Module):
    """symbolic_trace cannot iterate over a proxy; torch.export can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        parts = [self.lin(t) for t in x.unbind(1)]
        return torch.stack(parts, 1)


def test_auto_uses_export_when_fx_fails():
    model = NeedsExport().eval()
    x = torch.randn(2, 3, 4)
    program = slimfx.trace(model, x, frontend="auto")
    assert program.dialect == "aten"
    assert torch.equal(program(x), model(x))


def test_export_program_has_parameters_as_get_attr_and_matches_eager():
    model = WithUntraceableChild().eval()
    model.gate = nn.Identity()
    x = torch.randn(2, 3, 8, 8)
    program = slimfx.trace(model, x, frontend="export")
    assert program.dialect == "aten"
    targets = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    assert {"conv.weight", "conv.bias", "head.weight", "head.bias"} <= targets
    assert not any(n.op == "call_module" for n in program.graph.nodes)
    assert torch.equal(program(x), model(x))


def test_trace_never_mutates_the_model_or_inputs():
    model = WithUntraceableChild().eval()
    x = torch.randn(2, 3, 8, 8)
    x_copy = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for frontend in ("fx", "export"):
        model.gate = nn.Identity() if frontend == "export" else model.gate
        program = slimfx.trace(model, x, frontend=frontend)
        out = slimfx.run_pipeline(program, "fold-bn,canonicalize,dce")
        with torch.no_grad():
            for p in out.module.parameters():
                p.add_(1.0)
    assert torch.equal(x, x_copy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_bad_frontend_and_bad_inputs_are_clear_errors():
    with pytest.raises(TraceError, match="did you mean 'export'"):
        slimfx.trace(nn.Linear(2, 2), torch.randn(1, 2), frontend="exprt")
    with pytest.raises(TraceError, match="tensor or a tuple"):
        slimfx.trace(nn.Linear(2, 2), "not a tensor")
    with pytest.raises(TraceError, match="nn.Module"):
        slimfx.trace(lambda x: x, torch.randn(1))


def test_marked_leaf_modules_stay_opaque():
    model = WithUntraceableChild().eval()
    model.gate = nn.Identity()
    program = slimfx.trace(model, torch.randn(2, 3, 8, 8), frontend="fx", leaf_modules=["head"])
    assert [leaf.qualname for leaf in program.leaves] == ["head"]


def test_inputs_the_model_cannot_take_give_an_error_naming_the_layer_and_the_shapes():
    import slimfx.errors

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    with pytest.raises(slimfx.errors.TraceError) as info:
        slimfx.compress(model, "dce", torch.randn(2, 5))
    text = str(info.value)
    assert "[2, 5] float32" in text and "Linear" in text and "example_inputs" in text
    assert "both frontends" not in text  # the inputs are at fault; export is not tried
