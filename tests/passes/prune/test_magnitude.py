import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx.errors import PipelineError
from slimfx.passes.prune.magnitude import PruneMagnitude
from slimfx.passes.prune.masks import dense_weight, mask_of, masked_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc1 = nn.Linear(6, 13)
        self.fc2 = nn.Linear(13, 5, bias=False)

    def forward(self, x):
        y = F.relu(self.conv(x)).mean((2, 3))
        return self.fc2(torch.tanh(self.fc1(y)))


def traced(frontend="fx", model=None):
    torch.manual_seed(0)
    model = (model or Net()).eval()
    x = torch.randn(2, 3, 6, 6)
    return slimfx.trace(model, (x,), frontend=frontend), x


def effective(program):
    """{weight path: masked weight} of every masked layer."""
    out = {}
    for node, target in masked_layers(program):
        out[target[: -len("_mask")]] = dense_weight(program, node) * mask_of(program, node)
    return out


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("sparsity", [0.1, 1 / 3, 0.5, 0.9])
def test_local_scope_zeroes_exactly_round_sparsity_times_numel_smallest_weights(frontend, sparsity):
    program, x = traced(frontend)
    out = slimfx.run_pipeline(program, f"prune-magnitude{{sparsity={sparsity}}}")
    weights = effective(out)
    assert sorted(weights) == ["conv.weight", "fc1.weight", "fc2.weight"]
    for name, w in weights.items():
        dense = program.module.get_parameter(name)
        k = round(sparsity * dense.numel())
        assert int((w == 0).sum()) == k
        kept, pruned = dense[w != 0].abs(), dense[w == 0].abs()
        assert kept.min() >= pruned.max()
        assert out.log[-1].stats["sparsity"][name] == pytest.approx(k / dense.numel(), abs=1e-4)
    assert out.log[-1].stats["layers"] == 3
    assert out(x).shape == program(x).shape


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_global_scope_uses_one_threshold_over_all_layers(frontend):
    program, _ = traced(frontend)
    with torch.no_grad():  # make fc1 much larger so a global threshold prunes it less
        program.module.get_parameter("fc1.weight").mul_(10)
    out = slimfx.run_pipeline(program, "prune-magnitude{sparsity=0.6,scope=global}")
    weights = effective(out)
    dense = {name: program.module.get_parameter(name) for name in weights}
    total = sum(w.numel() for w in weights.values())
    assert sum(int((w == 0).sum()) for w in weights.values()) == round(0.6 * total)
    kept = torch.cat([dense[n][w != 0].abs() for n, w in weights.items()])
    pruned = torch.cat([dense[n][w == 0].abs() for n, w in weights.items()])
    assert kept.min() >= pruned.max()
    stats = out.log[-1].stats
    assert stats["sparsity"]["fc1.weight"] < 0.6 < stats["sparsity"]["conv.weight"]
    assert stats["overall_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_l2_importance_ranks_like_l1_for_unstructured_pruning():
    program, _ = traced()
    l1 = effective(slimfx.run_pipeline(program, "prune-magnitude{importance=l1}"))
    l2 = effective(slimfx.run_pipeline(program, "prune-magnitude{importance=l2}"))
    assert all(torch.equal(l1[k] == 0, l2[k] == 0) for k in l1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_re_pruning_ands_the_old_mask_and_previously_pruned_weights_stay_pruned(frontend):
    program, _ = traced(frontend)
    first = slimfx.run_pipeline(program, "prune-magnitude{sparsity=0.4}")
    old = {t: mask_of(first, n).clone() for n, t in masked_layers(first)}
    with torch.no_grad():  # fine-tuning could make pruned weights large: they must stay pruned
        for node, target in masked_layers(first):
            weight = dense_weight(first, node)
            weight[~old[target]] = 100.0
    second = slimfx.run_pipeline(first, "prune-magnitude{sparsity=0.7}")
    for node, target in masked_layers(second):
        new = mask_of(second, node)
        assert not torch.any(new & ~old[target])
        assert int((~new).sum()) == round(0.7 * new.numel())
    lower = slimfx.run_pipeline(second, "prune-magnitude{sparsity=0.2}")
    assert lower.log[-1].changed is False
    for node, _ in masked_layers(lower):
        assert int((~mask_of(lower, node)).sum()) == round(0.7 * dense_weight(lower, node).numel())


def test_ignore_and_include_kinds_select_layers():
    program, _ = traced()
    out = slimfx.run_pipeline(program, "prune-magnitude{ignore=[fc2],include_kinds=[linear]}")
    assert [t for _, t in masked_layers(out)] == ["fc1.weight_mask"]
    out = slimfx.run_pipeline(program, "prune-magnitude{ignore=[fc*.weight]}")
    assert [t for _, t in masked_layers(out)] == ["conv.weight_mask"]


def test_zero_sparsity_changes_nothing():
    program, x = traced()
    out = slimfx.run_pipeline(program, "prune-magnitude{sparsity=0}")
    assert out.log[-1].changed is False and masked_layers(out) == []
    assert torch.equal(out(x), program(x))


@pytest.mark.parametrize(
    "options, message",
    [
        ("sparsity=1.0", r"'sparsity' must be in \[0, 1\)"),
        ("sparsity=-0.1", r"'sparsity' must be in \[0, 1\)"),
        ("scope=layer", r"'scope'.*local\|global"),
        ("importance=l3", r"'importance'.*l1\|l2"),
        ("include_kinds=[embedding]", r"'include_kinds'.*\['conv', 'linear'\]"),
        ("sparsty=0.5", r"did you mean 'sparsity'"),
    ],
)
def test_invalid_options_raise_pipeline_errors_naming_the_option(options, message):
    with pytest.raises(PipelineError, match=message):
        slimfx.Pipeline.parse(f"prune-magnitude{{{options}}}").passes()
    if options.startswith("sparsity="):
        with pytest.raises(PipelineError, match=message):
            PruneMagnitude(sparsity=float(options.split("=")[1]))
