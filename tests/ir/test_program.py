"""Program: metadata propagation, printing, DOT, verify() and clone()."""

from __future__ import annotations

import operator
import re
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import slimfx
from slimfx.errors import VerifyError
from slimfx.ir.meta import META_KEY, TensorMeta, meta_of
from slimfx.ir.program import Program
from slimfx.zoo import get_model

FRONTENDS = ["fx", "export"]


class Mixed(nn.Module):
    """Convs, a split into a tuple, integer inputs, a dtype change and an op not in the table."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(10, 4)
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x, idx):
        a, b = torch.split(F.relu(self.bn(self.conv(x))), 2, dim=1)
        pooled = (a + b).mean((2, 3)).repeat(1, 2)  # repeat is UNKNOWN; meta still flows through it
        y = F.linear(pooled + self.emb(idx).sum(1), self.w)
        return y, y.argmax(-1), y.half()


def mixed_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2, 3), generator=g)


def real_metas(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    """Every node's value described from a real run, independently of slimfx.ir.meta."""

    def describe(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return TensorMeta(tuple(v.shape), v.dtype)
        if isinstance(v, (tuple, list)):
            return tuple(describe(x) for x in v)
        return v

    seen: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            seen[n.name] = describe(value)
            return value

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


@pytest.fixture(params=FRONTENDS)
def mixed(request) -> Program:
    return slimfx.trace(Mixed().eval(), mixed_inputs(), frontend=request.param)


# ---------------------------------------------------------------- meta propagation


def test_meta_on_every_node_matches_a_real_run(mixed):
    assert mixed.meta_mode == "fake"
    expected = real_metas(mixed.module, mixed.example_inputs)
    for node in mixed.graph.nodes:
        assert META_KEY in node.meta, f"%{node.name} has no meta"
        assert meta_of(node) == expected[node.name], f"%{node.name}"


def test_meta_shapes_dtypes_and_split_tuples(mixed):
    nodes = list(mixed.graph.nodes)
    split = next(n for n in nodes if "split" in str(n.target))
    assert meta_of(split) == (TensorMeta((2, 2, 6, 6), torch.float32),) * 2
    for getitem in split.users:
        assert meta_of(getitem) == TensorMeta((2, 2, 6, 6), torch.float32)
    idx = [n for n in nodes if n.op == "placeholder"][1]
    assert meta_of(idx) == TensorMeta((2, 3), torch.int64)
    (conv,) = mixed.nodes_of(slimfx.OpKind.CONV)
    assert meta_of(conv) == TensorMeta((2, 4, 6, 6), torch.float32)
    outputs = mixed.current_output_spec()
    assert outputs == (TensorMeta((2, 5), torch.float32), TensorMeta((2,), torch.int64),
                       TensorMeta((2, 5), torch.float16))
    assert mixed.output_spec == outputs
    assert str(TensorMeta((2, 5), torch.float16)) == "[2, 5] float16"


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class WithDataDependentLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependentGate()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(F.relu(self.conv(x))).mean((2, 3)))


def test_data_dependent_leaf_falls_back_to_real_meta():
    x = torch.randn(2, 3, 8, 8)
    program = slimfx.trace(WithDataDependentLeaf(), x, frontend="fx")
    assert [leaf.qualname for leaf in program.leaves] == ["gate"]
    assert program.meta_mode.startswith("real"), program.meta_mode
    assert "(" in program.meta_mode  # says why fake propagation failed
    expected = real_metas(program.module, (x,))
    for node in program.graph.nodes:
        assert meta_of(node) == expected[node.name]
    assert "meta=real" in str(program).splitlines()[0]
    slimfx.verify(program)


# ---------------------------------------------------------------- printing


def test_str_lists_every_node_with_name_kind_and_shape(mixed):
    text = str(mixed)
    lines = text.splitlines()
    assert lines[0].startswith(f"program dialect={mixed.dialect} nodes={len(mixed.graph.nodes)}")
    assert f"params={mixed.num_params():,}" in lines[0]
    for node in mixed.graph.nodes:
        line = next((ln for ln in lines if ln.strip().startswith(f"%{node.name} ")), None)
        assert line is not None, f"no line for %{node.name}"
        assert f" {mixed.kind(node).value} " in line
        m = meta_of(node)
        if isinstance(m, TensorMeta):
            assert str(m) in line


def test_to_dot_is_a_digraph_with_a_node_per_fx_node_and_an_edge_per_dependency(mixed):
    dot = mixed.to_dot()
    assert dot.startswith("digraph")
    assert dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    node_lines = re.findall(r'^\s*"([^"]+)" \[label="([^"]*)"\];$', dot, flags=re.M)
    names = [n.name for n in mixed.graph.nodes]
    assert [name for name, _ in node_lines] == names
    for (name, label), node in zip(node_lines, mixed.graph.nodes):
        assert label.split("\\n")[:2] == [name, mixed.kind(node).value]
    edges = set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)";$', dot, flags=re.M))
    expected = {(i.name, n.name) for n in mixed.graph.nodes for i in n.all_input_nodes}
    assert edges == expected
    assert len(dot.splitlines()) == 3 + len(node_lines) + sum(len(n.all_input_nodes) for n in mixed.graph.nodes) + 1


# ---------------------------------------------------------------- verify


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return F.linear(F.relu(self.conv(x)).mean((2, 3)), self.w)


@pytest.fixture
def small() -> Program:
    return slimfx.trace(Small(), torch.randn(2, 3, 8, 8), frontend="fx")


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name", ["digits-cnn", "vit-mini"])
def test_freshly_traced_programs_verify(name, frontend):
    model, inputs = get_model(name)
    slimfx.verify(slimfx.trace(model, inputs, frontend=frontend))


def test_verify_accepts_the_mixed_program(mixed):
    slimfx.verify(mixed, after="x")


def test_nodes_whose_value_is_none_verify_and_survive_a_pipeline():
    # torch.export puts aten._assert_tensor_metadata (returns None) before a dtype cast: its meta is None,
    # which is not "missing"; verify used to reject every exported program with a .half()/.to(dtype).
    program = slimfx.trace(Mixed().eval(), mixed_inputs(), frontend="export")
    none_valued = [n for n in program.graph.nodes if META_KEY in n.meta and meta_of(n) is None]
    assert none_valued, "expected an op returning None in the exported graph"
    slimfx.verify(program)
    out = slimfx.run_pipeline(program, "dce")
    torch.testing.assert_close(out(*program.example_inputs), program(*program.example_inputs))


@pytest.mark.parametrize("after", [None, "x"])
def test_verify_rejects_stale_meta_naming_the_node_and_the_pass(small, after):
    node = next(n for n in small.graph.nodes if n.op == "call_function" and n.target is F.relu)
    node.meta[META_KEY] = TensorMeta((2, 4, 5, 5), torch.float32)
    with pytest.raises(VerifyError, match=rf"%{node.name}\b.*disagrees") as info:
        slimfx.verify(small, after=after)
    assert ("after pass 'x'" in str(info.value)) == (after == "x")
    slimfx.verify(small, after=after, check_meta=False)  # only re-propagation finds stale meta


def test_verify_rejects_a_wrong_dtype_in_meta(small):
    node = small.nodes_of(slimfx.OpKind.CONV)[0]
    node.meta[META_KEY] = TensorMeta((2, 4, 6, 6), torch.float16)
    with pytest.raises(VerifyError, match=r"%conv\b"):
        slimfx.verify(small, after="x")


def test_verify_rejects_missing_meta_on_a_new_node(small):
    (conv,) = small.nodes_of(slimfx.OpKind.CONV)
    with small.graph.inserting_after(conv):
        neg = small.graph.call_function(torch.neg, (conv,))
    conv.replace_all_uses_with(neg, delete_user_cb=lambda user: user is not neg)
    small.recompile()
    with pytest.raises(VerifyError, match=rf"%{neg.name} .*has no metadata after pass 'x'"):
        slimfx.verify(small, after="x")
    small.propagate_meta()
    slimfx.verify(small, after="x")


def test_verify_rejects_a_call_to_a_deleted_submodule(small):
    delattr(small.module, "conv")
    with pytest.raises(VerifyError, match=r"%conv calls missing submodule 'conv' after pass 'x'"):
        slimfx.verify(small, after="x")


def test_verify_rejects_a_get_attr_of_a_missing_attribute(small):
    delattr(small.module, "w")
    with pytest.raises(VerifyError, match=r"%w reads missing attribute 'w' after pass 'x'"):
        slimfx.verify(small, after="x")


def test_verify_rejects_a_get_attr_under_a_missing_submodule():
    program = slimfx.trace(Small(), torch.randn(2, 3, 8, 8), frontend="export")
    delattr(program.module, "conv")
    with pytest.raises(VerifyError, match=r"%conv_weight reads missing attribute 'conv.weight'"):
        slimfx.verify(program)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_verify_rejects_a_changed_output_shape_naming_the_pass(frontend):
    program = slimfx.trace(Small(), torch.randn(2, 3, 8, 8), frontend=frontend)
    graph = program.graph
    output = next(n for n in graph.nodes if n.op == "output")
    (last,) = output.all_input_nodes
    with graph.inserting_before(output):
        sliced = graph.call_function(operator.getitem, (last, (slice(None), slice(0, 3))))
    sliced.meta[META_KEY] = TensorMeta((2, 3), torch.float32)
    last.replace_all_uses_with(sliced, delete_user_cb=lambda user: user is output)
    program.recompile()
    assert program(*program.example_inputs).shape == (2, 3)
    with pytest.raises(VerifyError, match=r"outputs changed after pass 'x'.*2, 5.*became.*2, 3"):
        slimfx.verify(program, after="x")


# ---------------------------------------------------------------- clone


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_clone_is_independent_of_the_original(frontend):
    original = slimfx.trace(Small(), torch.randn(2, 3, 8, 8), frontend=frontend)
    x = original.example_inputs[0]
    before = original(x)
    params_before = {k: v.clone() for k, v in original.module.state_dict().items()}
    nodes_before = [n.name for n in original.graph.nodes]

    copy = original.clone()
    assert copy.dialect == original.dialect and copy.output_spec == original.output_spec
    assert copy.example_inputs is original.example_inputs
    with torch.no_grad():
        for p in copy.module.parameters():
            p.add_(1.0)
    (conv,) = copy.nodes_of(slimfx.OpKind.CONV)
    with copy.graph.inserting_after(conv):
        neg = copy.graph.call_function(torch.neg, (conv,))
    conv.replace_all_uses_with(neg, delete_user_cb=lambda user: user is not neg)
    copy.recompile()
    copy.provenance.append(slimfx.ir.PassRecord("dce", {}, "dce"))

    assert not torch.allclose(copy(x), before)
    torch.testing.assert_close(original(x), before, rtol=0, atol=0)
    for k, v in original.module.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    assert [n.name for n in original.graph.nodes] == nodes_before
    assert original.provenance == [] and original.pipeline_text() == ""
    slimfx.verify(original)
    copy.propagate_meta()
    slimfx.verify(copy)
