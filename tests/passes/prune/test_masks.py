import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

import slimfx
from slimfx.ir.ops import KIND_INFO, OpKind, is_pure
from slimfx.passes.prune import blocks, magnitude, nm  # noqa: F401  (registers the passes)
from slimfx.passes.prune.masks import apply_mask, dense_weight, mask_of, masked_layers
from slimfx.testing import check_contract
from slimfx.testing import strategies as sst


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return F.linear(F.relu(self.fc(y)), self.head)


def traced(frontend, model=None, x=None):
    torch.manual_seed(0)
    model = (model or Net()).eval()
    x = torch.randn(2, 3, 8, 8) if x is None else x
    return slimfx.trace(model, (x,), frontend=frontend), x


def test_the_mask_op_is_one_pure_kind_in_the_op_table():
    program, _ = traced("fx")
    out = slimfx.run_pipeline(program, "prune-magnitude")
    mask_nodes = out.nodes_of(OpKind.MASK)
    assert len(mask_nodes) == 3 and all(n.target is apply_mask for n in mask_nodes)
    assert KIND_INFO[OpKind.MASK].pure and all(is_pure(n, out.module) for n in mask_nodes)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_masks_are_graph_nodes_and_buffers_visible_in_the_ir(frontend):
    program, x = traced(frontend)
    out = slimfx.run_pipeline(program, "prune-magnitude")
    dump = str(out)
    assert "apply_mask" in out.module.code and "mask" in dump
    targets = [target for _, target in masked_layers(out)]
    assert sorted(targets) == ["conv.weight_mask", "fc.weight_mask", "head_mask"]
    state = out.module.state_dict()
    for node, target in masked_layers(out):
        mask = mask_of(out, node)
        assert mask.dtype == torch.bool and torch.equal(state[target], mask)
        assert mask.shape == dense_weight(out, node).shape
    assert out(x).shape == program(x).shape
    slimfx.verify(out)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_apply_masks_bakes_bit_exactly_and_restores_plain_layers(frontend):
    program, x = traced(frontend)
    masked = slimfx.run_pipeline(program, "prune-magnitude{sparsity=0.6}")
    baked = slimfx.run_pipeline(masked, "apply-masks")
    assert baked.log[-1].stats == {"baked": 3}
    assert torch.equal(baked(x), masked(x))
    assert not baked.nodes_of(OpKind.MASK) and not masked_layers(baked)
    assert not any(k.endswith("_mask") for k in baked.module.state_dict())
    assert sorted(program.module.state_dict()) == sorted(baked.module.state_dict())
    if frontend == "fx":  # the module calls the masking pass rewrote are module calls again
        called = {n.target for n in baked.graph.nodes if n.op == "call_module"}
        assert {"conv", "fc"} <= called
    for name in ("fc.weight", "conv.weight", "head"):
        weight = baked.module.get_parameter(name)
        assert (weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.02)


class _TransposedInputLinear(nn.Module):
    """A linear on a non-contiguous 3-D input (as attention's in-projection reads [T, B, D] transposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(0, 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_baking_is_exact_where_matmul_picks_its_algorithm_by_requires_grad(frontend, mode):
    """torch's matmul folds a 3-D input times a weight that requires grad into one GEMM, and batches it
    otherwise (another summation order). The baked weight is a parameter that requires grad; the masked
    weight must take the same path, with and without autograd recording (found by the random models)."""
    torch.manual_seed(0)
    model = _TransposedInputLinear().eval()
    x = torch.randn(2, 4, 16)
    program = slimfx.trace(model, (x,), frontend=frontend)
    masked = slimfx.run_pipeline(program, "prune-magnitude{sparsity=0.5}")
    baked = slimfx.run_pipeline(masked, "apply-masks")  # the manager compares them under no_grad
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "grad": torch.enable_grad}[mode]
    with context():
        assert torch.equal(baked.module(x), masked.module(x))


def test_a_masked_program_compiles_with_fullgraph_under_no_grad():
    """apply_mask's requires_grad bookkeeping stays out of dynamo's way (it would break the graph)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16)
    masked = slimfx.run_pipeline(slimfx.trace(_TransposedInputLinear().eval(), (x,)), "prune-magnitude{sparsity=0.5}")
    compiled = torch.compile(masked.module, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), masked.module(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_masks_survive_later_passes(frontend):
    program, x = traced(frontend)
    out = slimfx.run_pipeline(program, "prune-magnitude,fold-bn,canonicalize,dce")
    assert len(masked_layers(out)) == 3
    for node, _ in masked_layers(out):
        assert (mask_of(out, node) == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    baked = slimfx.run_pipeline(out, "apply-masks")
    assert torch.equal(baked(x), out(x))


class Shared(nn.Module):
    """A module called twice, and tied weights under two names."""

    def __init__(self):
        super().__init__()
        self.twice = nn.Linear(8, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.alone = nn.Linear(8, 8)

    def forward(self, x):
        x = self.twice(self.twice(x))
        return self.alone(self.b(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_shared_weights_are_left_alone(frontend):
    program, x = traced(frontend, Shared(), torch.randn(2, 8))
    out = slimfx.run_pipeline(program, "prune-magnitude")
    assert [t for _, t in masked_layers(out)] == ["alone.weight_mask"]
    assert "shared" in " ".join(out.log[-1].notes)
    for name in ("twice.weight", "a.weight"):
        assert torch.equal(out.module.get_parameter(name), program.module.get_parameter(name))
    baked = slimfx.run_pipeline(out, "apply-masks")
    assert torch.equal(baked(x), out(x))


class DataDependent(nn.Linear):
    """fx cannot trace its forward, so the frontend keeps it as a leaf: an UNKNOWN op."""

    def forward(self, x):
        return super().forward(x) if x.sum() > 0 else -super().forward(x)


class WithUnknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.leaf = DataDependent(8, 8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.leaf.weight  # read by the UNKNOWN leaf too
        self.alone = nn.Linear(8, 8)

    def forward(self, x):
        return self.alone(self.tied(self.leaf(x)))


def test_unknown_ops_and_the_weights_they_read_are_left_alone():
    program, x = traced("fx", WithUnknown(), torch.randn(2, 8))
    assert program.leaves, "the data-dependent module should be a leaf"
    out = slimfx.run_pipeline(program, "prune-magnitude")
    assert [t for _, t in masked_layers(out)] == ["alone.weight_mask"]
    assert torch.equal(out.module.get_parameter("leaf.weight"), program.module.get_parameter("leaf.weight"))
    assert any(n.op == "call_module" and n.target == "leaf" for n in out.graph.nodes)


def test_apply_masks_keeps_a_weight_read_elsewhere_dense():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) + self.fc.weight.sum()

    program, x = traced("fx", ReadsWeight(), torch.randn(2, 8))
    masked = slimfx.run_pipeline(program, "prune-magnitude")
    assert masked_layers(masked) == []  # the weight is read by another node: shared
    # mask it by hand through the API, then check apply-masks leaves the other reader dense
    from slimfx.passes.prune.masks import set_mask

    fc = next(n for n in masked.graph.nodes if n.op == "call_module")
    set_mask(masked, fc, torch.rand(8, 8) > 0.5)
    masked.recompile()
    masked.propagate_meta()
    baked = slimfx.run_pipeline(masked, "apply-masks")
    assert torch.equal(baked(x), masked(x))
    assert torch.equal(baked.module.fc.weight, program.module.fc.weight)


def test_fine_tuning_a_masked_program_keeps_pruned_weights_at_zero():
    program, x = traced("fx")
    out = slimfx.run_pipeline(program, "prune-magnitude{sparsity=0.7}")
    out.module.train()
    optimizer = torch.optim.SGD(out.module.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        out.module(x).square().mean().backward()
        optimizer.step()
    for node, _ in masked_layers(out):
        mask = mask_of(out, node)
        weight = dense_weight(out, node)
        assert torch.all(weight.grad[~mask] == 0)
        assert torch.all(apply_mask(weight, mask)[~mask] == 0)


@settings(max_examples=8, derandomize=True, deadline=None)
@given(pair=sst.programs_with_cases(frontend="any"))
def test_prune_then_apply_masks_keeps_every_contract_on_random_models(pair):
    program, case = pair
    report = check_contract("prune-magnitude{sparsity=0.3},prune-nm,prune-blocks{block=[4,4]},apply-masks", program)
    masked, baked = report.runs[-2], report.runs[-1]
    assert baked.max_abs_diff == 0.0
    assert not report.result.nodes_of(OpKind.MASK)
    assert masked.contract == "changes" and baked.contract == "exact"
