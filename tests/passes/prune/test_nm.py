import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx.errors import PipelineError
from slimfx.passes.prune import nm  # noqa: F401  (registers prune-nm)
from slimfx.passes.prune.masks import dense_weight, mask_of, masked_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)  # reduction 4*3*3 = 36
        self.odd = nn.Conv2d(8, 8, 1, groups=8)  # reduction 1: skipped
        self.fc = nn.Linear(8, 16)
        self.tail = nn.Linear(16, 6)

    def forward(self, x):
        y = F.relu(self.odd(self.conv(x))).mean((2, 3))
        return self.tail(F.relu(self.fc(y)))


def check_nm(weight, mask, n, m):
    rows = weight.shape[0]
    kept = mask.reshape(rows, -1, m)
    assert torch.all(kept.sum(-1) == n)
    groups = weight.detach().abs().reshape(rows, -1, m)
    smallest_kept = groups.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = groups.masked_fill(kept, float("-inf")).max(-1).values
    assert torch.all(smallest_kept >= largest_dropped)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_keeps_the_n_largest_of_every_m_along_the_reduction_dim(frontend, n, m):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 4, 6, 6)
    program = slimfx.trace(model, (x,), frontend=frontend)
    out = slimfx.run_pipeline(program, f"prune-nm{{n={n},m={m}}}")
    layers = {target: node for node, target in masked_layers(out)}
    expected = {"conv.weight_mask", "fc.weight_mask", "tail.weight_mask"} if m == 4 else {"fc.weight_mask",
                                                                                           "tail.weight_mask"}
    assert set(layers) == expected
    for node in layers.values():
        check_nm(dense_weight(out, node), mask_of(out, node), n, m)
    stats = out.log[-1].stats
    assert all(v == pytest.approx(1 - n / m) for v in stats["sparsity"].values())
    assert any("odd.weight" in note and f"not a multiple of m={m}" in note for note in out.log[-1].notes)
    assert out(x).shape == program(x).shape


def test_re_pruning_with_nm_after_magnitude_keeps_old_zeros_and_at_most_n_per_group():
    from slimfx.passes.prune import magnitude  # noqa: F401

    torch.manual_seed(0)
    program = slimfx.trace(nn.Sequential(nn.Linear(16, 8)).eval(), (torch.randn(2, 16),))
    first = slimfx.run_pipeline(program, "prune-magnitude{sparsity=0.6}")
    old = mask_of(first, masked_layers(first)[0][0]).clone()
    out = slimfx.run_pipeline(first, "prune-nm")
    new = mask_of(out, masked_layers(out)[0][0])
    assert not torch.any(new & ~old)
    assert torch.all(new.reshape(8, -1, 4).sum(-1) <= 2)


def test_a_pruned_fp16_linear_is_accepted_by_semi_structured_sparsity():
    torch.manual_seed(0)
    linear = nn.Linear(128, 128).half().eval()
    program = slimfx.trace(nn.Sequential(linear), (torch.randn(4, 128, dtype=torch.float16),))
    out = slimfx.run_pipeline(program, "prune-nm,apply-masks")
    weight = out.module.get_parameter("0.weight").detach()
    assert weight.dtype == torch.float16
    # The 2:4 pattern itself, checked directly: at most 2 nonzeros in every 4 consecutive inputs.
    assert torch.all((weight.reshape(128, -1, 4) != 0).sum(-1) <= 2)
    try:
        sparse = torch.sparse.to_sparse_semi_structured(weight)
    except RuntimeError as exc:  # CPU builds: "Only CUDA tensors are currently supported"
        assert "CUDA" in str(exc)
        if torch.cuda.is_available():
            sparse = torch.sparse.to_sparse_semi_structured(weight.cuda())
            torch.testing.assert_close(sparse.to_dense().cpu(), weight)
        return
    torch.testing.assert_close(sparse.to_dense(), weight)


@pytest.mark.parametrize(
    "options, message",
    [("n=5,m=4", r"'n' \(5\) must not exceed 'm' \(4\)"), ("n=0", r"must be positive"), ("m=-4", r"must be positive")],
)
def test_invalid_options_raise_pipeline_errors(options, message):
    with pytest.raises(PipelineError, match=message):
        slimfx.Pipeline.parse(f"prune-nm{{{options}}}").passes()
