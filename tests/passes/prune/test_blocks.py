import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.errors import PipelineError
from slimfx.kernels.bsr import dense_to_bsr
from slimfx.kernels.modules import BlockSparseLinear
from slimfx.passes.prune import blocks  # noqa: F401  (registers prune-blocks)
from slimfx.passes.prune.blocks import block_norms
from slimfx.passes.prune.masks import dense_weight, mask_of, masked_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, 96)
        self.odd = nn.Linear(96, 10)  # 10 rows: not divisible by 16

    def forward(self, x):
        return self.odd(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_blocks_give_the_bsr_density_asked_for_and_block_sparse_linear_computes_the_layer(frontend, sparsity):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(3, 128)
    program = slimfx.trace(model, (x,), frontend=frontend)
    out = slimfx.run_pipeline(program, f"prune-blocks{{block=[16,32],sparsity={sparsity}}}")
    layers = {target: node for node, target in masked_layers(out)}
    assert set(layers) == {"fc1.weight_mask", "fc2.weight_mask"}
    assert any("odd.weight" in note and "not divisible" in note for note in out.log[-1].notes)
    for target, node in layers.items():
        weight, mask = dense_weight(out, node), mask_of(out, node)
        masked = (weight * mask).detach()
        total = (weight.shape[0] // 16) * (weight.shape[1] // 32)
        bsr = dense_to_bsr(masked, (16, 32))
        assert bsr.density == pytest.approx(1 - round(sparsity * total) / total)
        norms = block_norms(weight, (16, 32)).flatten()
        kept = block_norms(masked, (16, 32)).flatten() != 0
        assert norms[kept].min() >= norms[~kept].max()
        prefix = target[: -len(".weight_mask")]
        bias = out.module.get_parameter(f"{prefix}.bias").detach()
        sparse = BlockSparseLinear.from_bsr(bsr, bias, kernel="torch_csr")  # torch_bsr (MKL) needs square blocks
        probe = torch.randn(5, weight.shape[1])
        torch.testing.assert_close(sparse(probe), torch.nn.functional.linear(probe, masked, bias),
                                   rtol=1e-4, atol=1e-5)
    assert out(x).shape == program(x).shape


def test_re_pruning_blocks_ands_the_old_mask():
    torch.manual_seed(0)
    program = slimfx.trace(nn.Sequential(nn.Linear(64, 64)).eval(), (torch.randn(2, 64),))
    first = slimfx.run_pipeline(program, "prune-blocks{block=[8,8],sparsity=0.25}")
    old = mask_of(first, masked_layers(first)[0][0]).clone()
    with torch.no_grad():
        dense_weight(first, masked_layers(first)[0][0])[~old] = 50.0
    second = slimfx.run_pipeline(first, "prune-blocks{block=[8,8],sparsity=0.5}")
    node = masked_layers(second)[0][0]
    new = mask_of(second, node)
    assert not torch.any(new & ~old)
    assert dense_to_bsr((dense_weight(second, node) * new).detach(), (8, 8)).density == 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        ("block=[0,32]", r"'block' must be two positive sizes"),
        ("block=[32]", r"'block' must be two positive sizes"),
        ("sparsity=1", r"'sparsity' must be in \[0, 1\)"),
    ],
)
def test_invalid_options_raise_pipeline_errors(options, message):
    with pytest.raises(PipelineError, match=message):
        slimfx.Pipeline.parse(f"prune-blocks{{{options}}}").passes()
