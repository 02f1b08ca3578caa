"""The op table maps the torch (fx) and aten (export) dialects to the same canonical kinds."""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import slimfx
from slimfx.ir import ops
from slimfx.ir.layer import Layer
from slimfx.ir.ops import OpKind
from slimfx.ir.program import Program

aten = torch.ops.aten
FRONTENDS = ["fx", "export"]


def kinds_of(program: Program) -> Counter:
    return Counter(program.kind(n) for n in program.graph.nodes)


def unknown_nodes(program: Program) -> list[str]:
    return [f"{n.op} {n.target}" for n in program.graph.nodes if program.kind(n) is OpKind.UNKNOWN]


# ---------------------------------------------------------------- models using every op of the table


class Linears(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.w = nn.Parameter(torch.randn(4, 5))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.linear(self.lin(x), self.w, self.b)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.w1 = nn.Parameter(torch.randn(6, 3, 1))
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.w2 = nn.Parameter(torch.randn(8, 4, 1, 1))
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.wt = nn.Parameter(torch.randn(4, 2, 2, 2))

    def forward(self, x1, x2):
        a = self.c1(x1) + F.conv1d(x1, self.w1)
        y = self.depthwise(self.grouped(self.c2(x2)))
        y = F.conv2d(y, self.w2, groups=2)
        return a, F.conv_transpose2d(self.up(y), self.wt, stride=2)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(5)
        self.gn = nn.GroupNorm(2, 4)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.lw = nn.Parameter(torch.ones(5))
        self.gw = nn.Parameter(torch.ones(4))

    def forward(self, x3, x4):
        a = F.layer_norm(self.ln(self.bn1(x3)), (5,), self.lw)
        b = F.group_norm(self.gn(self.bn2(x4)), 2, self.gw)
        return a, F.batch_norm(b, self.rm, self.rv, training=False)


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.w = nn.Parameter(torch.randn(10, 4))

    def forward(self, idx):
        return self.emb(idx) + F.embedding(idx, self.w)


class MatMuls(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, a, b, m):
        x = torch.matmul(a, b) + torch.bmm(a, b) + a.bmm(b) + (a @ b)
        return x, torch.addmm(self.b, m, self.w)


class Arithmetic(nn.Module):
    def forward(self, x, y):
        a = x + y  # tensor operands
        b = x - 1.0  # scalar operands
        c = a * 2.0
        d = b / y
        e = torch.add(c, d)
        f = torch.sub(e, x)
        g = torch.mul(f, 3)
        h = torch.div(g, 2.0)
        return h.add(x).sub(y).mul(x).div(2)


class CatSplit(nn.Module):
    def forward(self, x):
        a, b = torch.split(x, 2, dim=1)
        c, d = x.chunk(2, dim=1)
        e, f, g, h = x.unbind(1)
        u = torch.unbind(x, 1)[0]
        p, q = torch.chunk(x, 2, 1)
        r = x.split([1, 3], dim=1)[1]
        return torch.cat([a, b, c, d, p, q, r], dim=1), torch.cat((e, f, g, h, u), 1)


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()

    def forward(self, x):
        a = x.view(2, -1).reshape(2, 4, 6)
        a = torch.reshape(a, (2, 24)).unsqueeze(1).squeeze(1)
        b = torch.flatten(x, 1) + x.flatten(1) + self.flat(x)
        c = torch.unsqueeze(a, 0).squeeze(0) + torch.squeeze(b.unsqueeze(-1), -1)
        p = x.permute(0, 2, 1).transpose(1, 2).contiguous()
        t = torch.transpose(torch.permute(x, (0, 2, 1)), 1, 2)
        return c, p + t


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU6(), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(),
                                   nn.Hardswish(), nn.Hardsigmoid()])

    def forward(self, x):
        for act in self.acts:
            x = act(x)
        x = F.silu(F.gelu(F.relu6(F.relu(x))))
        x = F.hardsigmoid(F.hardswish(torch.tanh(F.tanh(torch.sigmoid(F.sigmoid(x))))))
        return torch.relu(x.relu().sigmoid().tanh())


class Softmaxes(nn.Module):
    def __init__(self):
        super().__init__()
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x):
        return self.sm(x) + F.softmax(x, dim=-1) + x.softmax(-1) + torch.softmax(x, -1)


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.mp, self.ap = nn.MaxPool2d(2), nn.AvgPool2d(2)
        self.aap, self.amp = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.mp1, self.ap1, self.aap1 = nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1)

    def forward(self, x, x1):
        a = self.mp(x) + self.ap(x) + F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)
        b = self.aap(a) + self.amp(a) + F.adaptive_avg_pool2d(a, 1) + F.adaptive_max_pool2d(a, 1)
        c = self.mp1(x1) + self.ap1(x1) + F.max_pool1d(x1, 2) + F.avg_pool1d(x1, 2)
        return b, self.aap1(c) + F.adaptive_avg_pool1d(c, 1)


class DropoutIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(4, 4)
        self.idn = nn.Identity()

    def forward(self, x):
        return self.idn(F.dropout(self.drop(self.lin(x)), 0.5, training=self.training))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y, _ = self.mha(x, x, x)
        q = y.view(2, 5, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)


class Reductions(nn.Module):
    def forward(self, x):
        return x.mean(1) + torch.sum(x, 1) + x.sum(dim=1) + torch.mean(x, dim=1)


K = OpKind
# name: (model, inputs, kinds expected in both dialects, extra kinds for fx, extra kinds for export)
CASES = {
    "linear": (Linears, lambda: (torch.randn(2, 6),), {K.LINEAR: 2, K.INPUT: 1, K.OUTPUT: 1}, {K.PARAM: 2}, {}),
    "conv": (Convs, lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8, 8)),
             {K.CONV: 6, K.CONV_TRANSPOSE: 2, K.ADD: 1, K.INPUT: 2}, {K.PARAM: 3}, {K.PARAM: 12}),
    "norms": (Norms, lambda: (torch.randn(2, 4, 5), torch.randn(2, 4, 6, 6)),
              {K.BATCH_NORM: 3, K.LAYER_NORM: 2, K.GROUP_NORM: 2}, {K.PARAM: 4}, {}),
    "embedding": (Embeddings, lambda: (torch.tensor([[1, 2, 3], [4, 5, 9]]),), {K.EMBEDDING: 2, K.ADD: 1}, {}, {}),
    "matmul": (MatMuls, lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(6, 4)),
               {K.MATMUL: 4, K.ADDMM: 1, K.ADD: 3}, {}, {}),
    "arithmetic": (Arithmetic, lambda: (torch.randn(2, 3), torch.rand(2, 3) + 1),
                   {K.ADD: 3, K.SUB: 3, K.MUL: 3, K.DIV: 3}, {}, {}),
    "cat-split": (CatSplit, lambda: (torch.randn(2, 4, 3),), {K.SPLIT: 6, K.GETITEM: 12, K.CAT: 2}, {}, {}),
    "shapes": (Shapes, lambda: (torch.randn(2, 4, 6),), {K.RESHAPE: 12, K.PERMUTE: 4}, {K.CONTIGUOUS: 1}, {}),
    "activations": (Activations, lambda: (torch.randn(2, 5),), {K.ACTIVATION: 22}, {}, {}),
    "softmax": (Softmaxes, lambda: (torch.randn(2, 5),), {K.SOFTMAX: 4}, {}, {}),
    "pools": (Pools, lambda: (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8)),
              {K.POOL: 8, K.ADAPTIVE_POOL: 6}, {}, {}),
    "dropout-identity": (DropoutIdentity, lambda: (torch.randn(2, 4),), {K.LINEAR: 1, K.DROPOUT: 2},
                         {K.IDENTITY: 1}, {}),
    # torch.export decomposes nn.MultiheadAttention into linears, matmuls and a softmax
    "attention": (Attention, lambda: (torch.randn(2, 5, 8),), {K.SDPA: 1},
                  {K.MULTIHEAD_ATTENTION: 1, K.GETITEM: 2}, {K.LINEAR: 2, K.MATMUL: 2, K.SOFTMAX: 1}),
    "reductions": (Reductions, lambda: (torch.randn(2, 4, 3),), {K.REDUCE: 4}, {}, {}),
}


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_both_dialects_map_every_table_op_to_its_canonical_kind(case, frontend):
    model_cls, make_inputs, common, fx_only, export_only = CASES[case]
    torch.manual_seed(0)
    program = slimfx.trace(model_cls().eval(), make_inputs(), frontend=frontend)
    assert program.dialect == {"fx": "torch", "export": "aten"}[frontend]
    expected = Counter(common) + Counter(fx_only if frontend == "fx" else export_only)
    found = kinds_of(program)
    missing = expected - found
    assert not missing, f"missing kinds {dict(missing)}; found {dict(found)}\n{program}"
    assert not unknown_nodes(program), f"UNKNOWN nodes: {unknown_nodes(program)}\n{program}"
    assert found[K.OUTPUT] == 1


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_placeholder_get_attr_output_are_input_param_output(frontend):
    program = slimfx.trace(Linears(), torch.randn(2, 6), frontend=frontend)
    for node in program.graph.nodes:
        expected = {"placeholder": K.INPUT, "get_attr": K.PARAM, "output": K.OUTPUT}.get(node.op)
        if expected is not None:
            assert program.kind(node) is expected


def test_relu6_kind_agrees_across_dialects_and_forms():
    class Relu6s(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU6()

        def forward(self, x):
            return F.relu6(self.act(x))

    for frontend in FRONTENDS:
        program = slimfx.trace(Relu6s(), torch.randn(2, 3), frontend=frontend)
        assert kinds_of(program)[K.ACTIVATION] == 2, str(program)


def test_call_module_kind_needs_the_owning_module():
    program = slimfx.trace(Linears(), torch.randn(2, 6), frontend="fx")
    node = next(n for n in program.graph.nodes if n.op == "call_module")
    with pytest.raises(ValueError, match="owning module"):
        ops.kind(node)
    assert ops.kind(node, program.module) is K.LINEAR


# ---------------------------------------------------------------- ops not in the table are UNKNOWN


class NotInTable(nn.Module):
    def forward(self, x):
        return torch.erf(x) + x.cumsum(1)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_ops_not_in_the_table_are_unknown_and_impure(frontend):
    program = slimfx.trace(NotInTable(), torch.randn(2, 3), frontend=frontend)
    unknown = [n for n in program.graph.nodes if program.kind(n) is K.UNKNOWN]
    assert len(unknown) == 2
    names = {getattr(n.target, "__name__", n.target) for n in unknown}
    assert names in ({"erf", "cumsum"}, {"erf.default", "cumsum.default"})
    assert not any(ops.is_pure(n, program.module) for n in unknown)
    assert not ops.KIND_INFO[K.UNKNOWN].pure


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class UsesMyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = MyConv(3, 4, 3)
        self.plain = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.plain(self.conv(x))


def test_user_subclass_of_a_table_module_kept_as_leaf_is_unknown():
    program = slimfx.trace(UsesMyConv(), torch.randn(1, 3, 6, 6), frontend="fx", leaf_modules=["conv"])
    by_target = {n.target: n for n in program.graph.nodes if n.op == "call_module"}
    assert program.kind(by_target["conv"]) is K.UNKNOWN
    assert program.kind(by_target["plain"]) is K.CONV
    assert not ops.is_pure(by_target["conv"], program.module)


# ---------------------------------------------------------------- purity and in-place ops


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.relu = nn.ReLU()

    def forward(self, x):
        a = x * 1
        a.add_(1)
        b = F.relu(a, inplace=True)
        c = self.relu_inplace(b)
        d = torch.relu_(c * 1)
        return self.relu(F.relu(d))


def test_in_place_ops_are_impure_and_their_functional_twins_pure():
    program = slimfx.trace(InPlace(), torch.randn(2, 3), frontend="fx")
    gm = program.module
    nodes = {n.name: n for n in program.graph.nodes}
    impure = {name for name, n in nodes.items() if not ops.is_pure(n, gm)}
    inplace = {name for name, n in nodes.items() if ops.is_inplace(n, gm)}
    assert inplace == {"add_", "relu", "relu_inplace", "relu_"}, program
    assert impure == inplace | {"x", "output"}
    assert program.kind(nodes["relu"]) is K.ACTIVATION  # F.relu(inplace=True): known kind, still impure
    assert program.kind(nodes["relu_inplace"]) is K.ACTIVATION
    assert ops.is_pure(nodes["relu_1"], gm) and ops.is_pure(nodes["relu_2"], gm)


def test_aten_in_place_overloads_are_impure():
    graph = fx.Graph()
    x = graph.placeholder("x")
    pure = graph.call_function(aten.add.Tensor, (x, x))
    mutating = graph.call_function(aten.add_.Tensor, (pure, x))
    graph.output(mutating)
    assert ops.kind(pure) is K.ADD
    assert ops.is_pure(pure) and not ops.is_pure(mutating)
    assert ops.is_inplace(mutating) and not ops.is_inplace(pure)


def test_shape_queries_are_pure_and_their_kind_is_shape():
    graph = fx.Graph()
    x = graph.placeholder("x")
    size = graph.call_method("size", (x, 0))
    dims = graph.call_function(getattr, (x, "shape"))
    graph.output((size, dims, graph.call_function(operator.getitem, (dims, 0))))
    assert ops.kind(size) is K.SHAPE and ops.kind(dims) is K.SHAPE
    assert ops.is_pure(size) and ops.is_pure(dims)


# ---------------------------------------------------------------- Layer: one view of every conv form


def _conv_params(bias: bool = True):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 2, 3, 3, generator=g)
    return w, (torch.randn(8, generator=g) if bias else None)


class ModuleConv(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=bias)
        w, b = _conv_params(bias)
        with torch.no_grad():
            self.conv.weight.copy_(w)
            if b is not None:
                self.conv.bias.copy_(b)

    def forward(self, x):
        return self.conv(x)


class FunctionalConv(nn.Module):
    """F.conv2d with get_attr weights; ``style`` picks positional or keyword options."""

    def __init__(self, bias: bool = True, style: str = "kwargs"):
        super().__init__()
        w, b = _conv_params(bias)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b) if b is not None else None
        self.style = style

    def forward(self, x):
        if self.style == "positional":
            return F.conv2d(x, self.weight, self.bias, 1, 1, 1, 2)
        if self.bias is None:
            return F.conv2d(x, self.weight, padding=1, groups=2)
        return F.conv2d(x, self.weight, self.bias, padding=1, groups=2)


LAYER_FORMS = [
    ("module", "fx", ModuleConv),
    ("module", "export", ModuleConv),  # aten.conv2d
    ("functional-kwargs", "fx", lambda bias=True: FunctionalConv(bias, "kwargs")),
    ("functional-positional", "fx", lambda bias=True: FunctionalConv(bias, "positional")),
    ("functional", "export", lambda bias=True: FunctionalConv(bias, "kwargs")),
]
LAYER_IDS = [f"{form}-{frontend}" for form, frontend, _ in LAYER_FORMS]


def _only_conv(program: Program) -> Layer:
    (node,) = program.nodes_of(K.CONV)
    return Layer(program, node)


@pytest.mark.parametrize("form, frontend, make", LAYER_FORMS, ids=LAYER_IDS)
def test_layer_reads_weight_bias_and_groups_of_every_conv_form(form, frontend, make):
    program = slimfx.trace(make(), torch.randn(1, 4, 6, 6), frontend=frontend)
    layer = _only_conv(program)
    w, b = _conv_params()
    assert layer.kind is K.CONV
    torch.testing.assert_close(layer.tensor("weight"), w)
    torch.testing.assert_close(layer.tensor("bias"), b)
    assert layer.get("groups") == 2
    assert layer.param_target("weight") is not None
    if form == "module" and frontend == "fx":
        assert layer.module is not None and layer.name == "conv"
    else:
        assert layer.module is None and layer.slots is ops.FUNCTION_SLOTS[F.conv2d]


@pytest.mark.parametrize("form, frontend, make", LAYER_FORMS, ids=LAYER_IDS)
def test_layer_set_adds_a_missing_bias_and_the_program_still_runs(form, frontend, make):
    program = slimfx.trace(make(bias=False), torch.randn(1, 4, 6, 6), frontend=frontend)
    layer = _only_conv(program)
    assert layer.tensor("bias") is None and layer.param_target("bias") is None
    params_before = program.num_params()
    new_bias = torch.arange(8, dtype=torch.float32)
    layer.set("bias", new_bias)
    program.recompile()
    program.propagate_meta()
    slimfx.verify(program)

    layer = _only_conv(program)
    torch.testing.assert_close(layer.tensor("bias"), new_bias)
    assert layer.param_target("bias") is not None
    assert program.num_params() == params_before + 8
    x = torch.randn(1, 4, 6, 6)
    w, _ = _conv_params(bias=False)
    torch.testing.assert_close(program(x), F.conv2d(x, w, new_bias, padding=1, groups=2))


@pytest.mark.parametrize("form, frontend, make", LAYER_FORMS, ids=LAYER_IDS)
def test_layer_set_replaces_an_existing_weight_in_place_of_the_old(form, frontend, make):
    program = slimfx.trace(make(), torch.randn(1, 4, 6, 6), frontend=frontend)
    layer = _only_conv(program)
    target = layer.param_target("weight")
    layer.set("weight", torch.zeros(8, 2, 3, 3))
    assert layer.param_target("weight") == target  # replaced at the same attribute, no new node
    assert isinstance(program.module.get_parameter(target), nn.Parameter)
    x = torch.randn(1, 4, 6, 6)
    _, b = _conv_params()
    torch.testing.assert_close(program(x), b.view(1, 8, 1, 1).expand(1, 8, 6, 6))


def test_layer_rejects_non_parametrised_nodes_and_non_tensor_roles():
    program = slimfx.trace(Activations(), torch.randn(2, 5), frontend="fx")
    with pytest.raises(ValueError, match="not a parametrised layer"):
        Layer(program, program.nodes_of(K.ACTIVATION)[-1])
    conv = _only_conv(slimfx.trace(ModuleConv(), torch.randn(1, 4, 6, 6), frontend="fx"))
    with pytest.raises(ValueError, match="not a tensor role"):
        conv.set("groups", torch.tensor(1))
