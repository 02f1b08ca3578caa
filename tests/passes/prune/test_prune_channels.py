"""prune-channels: removing channels that zero-channels already zeroed is exact; options do what they say."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings

import slimfx
from slimfx.errors import PassError, PipelineError
from slimfx.passes.manager import run_pipeline
from slimfx.passes.prune.channels import (
    MacCounter,
    PruneChannels,
    PruneChannelsOptions,
    plan_channels,
    remove_channels,
    zero_channels,
)
from slimfx.passes.prune.importance import CALIBRATION_KEY, IMPORTANCES
from slimfx.testing import strategies as sst
from slimfx.zoo import get_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs run fastest single-threaded (and do not fight other test processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_removal_is_exact(program, case, options=None):
    plan = plan_channels(program, options or PruneChannelsOptions(sparsity=0.5))
    zeroed = program.clone()
    zero_channels(zeroed, plan)
    pruned = zeroed.clone()
    remove_channels(pruned, plan)
    slimfx.verify(pruned)  # the metadata remove_channels resized itself == a fresh propagation
    for inputs in (case.example_inputs, case.fresh_inputs(seed=1)):
        expected, got = zeroed(*inputs), pruned(*inputs)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if plan.removed_units():
        assert pruned.num_params() < program.num_params()


@settings(max_examples=100, derandomize=True, deadline=None)
@given(pair=sst.programs_with_cases(sst.cnns(max_blocks=3, max_channels=12), frontend="fx"))
def test_removing_zeroed_channels_is_exact_on_random_cnns(pair):
    _assert_removal_is_exact(*pair)


@settings(max_examples=10, derandomize=True, deadline=None)
@given(pair=sst.programs_with_cases(sst.cnns(max_blocks=3, max_channels=12), frontend="export"))
def test_removing_zeroed_channels_is_exact_on_exported_cnns(pair):
    _assert_removal_is_exact(*pair)


@settings(max_examples=25, derandomize=True, deadline=None)
@given(pair=sst.programs_with_cases(sst.mlps(max_width=16), frontend="any"))
def test_removing_zeroed_channels_is_exact_on_random_mlps(pair):
    _assert_removal_is_exact(*pair, PruneChannelsOptions(sparsity=0.4, scope="global"))


@settings(max_examples=15, derandomize=True, deadline=None)
@given(pair=sst.programs_with_cases(sst.attention_models(max_dim=16), frontend="any"))
def test_removing_zeroed_channels_is_exact_on_random_attention_models(pair):
    _assert_removal_is_exact(*pair)


@pytest.fixture(scope="module")
def resnet():
    model, inputs = get_model("resnet-mini")
    return slimfx.trace(model, inputs)


def _run(program, **options):
    result = run_pipeline(program, [PruneChannels(**options)])
    return result, result.log[-1]


def test_physical_removal_reduces_params_and_reaches_the_sparsity(resnet):
    result, run = _run(resnet, sparsity=0.5)
    assert run.params_after < 0.5 * run.params_before  # the pass record of every pass carries both
    assert run.stats["macs_after"] < run.stats["macs_before"]
    assert abs(run.stats["sparsity"] - 0.5) < 0.02
    for kept, total in run.stats["layers"].values():
        assert kept == total - round(total * 0.5) or kept == total  # output heads keep everything
    conv = result.module.get_submodule("stem.0")
    assert conv.out_channels == conv.weight.shape[0] == 16


def test_round_to_keeps_multiples(resnet):
    _, run = _run(resnet, sparsity=0.3, round_to=8)
    pruned = [kept for kept, total in run.stats["layers"].values() if kept != total]
    assert pruned and all(kept % 8 == 0 for kept in pruned)


def test_ignore_patterns_skip_their_groups(resnet):
    result = run_pipeline(resnet, "prune-channels{ignore=[stem.*]}")
    run = result.log[-1]
    assert "stem.0" not in run.stats["layers"] and run.stats["units_removed"] > 0
    assert result.module.get_submodule("stem.0").out_channels == 32
    assert any("ignore pattern 'stem.*'" in note for note in run.notes)


def test_global_scope_reaches_the_overall_sparsity(resnet):
    _, run = _run(resnet, sparsity=0.4, scope="global")
    assert abs(run.stats["sparsity"] - 0.4) < 0.01
    ratios = {kept / total for kept, total in run.stats["layers"].values()}
    assert len(ratios) > 1  # layers are pruned unevenly


def test_target_macs_is_reached(resnet):
    _, run = _run(resnet, target_macs=0.5)
    assert run.stats["macs_after"] <= 0.5 * run.stats["macs_before"]
    assert run.stats["macs_after"] > 0.3 * run.stats["macs_before"]
    pruned = run_pipeline(resnet, "prune-channels{target_macs=0.5}")
    assert MacCounter(pruned).total({}) == pytest.approx(run.stats["macs_after"])


@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_every_importance_prunes(resnet, importance):
    program = resnet.clone()
    program.propagate_meta()
    if importance == "taylor":
        program.analyses[CALIBRATION_KEY] = [program.example_inputs]
    run = PruneChannels(importance=importance, sparsity=0.25).run(program)
    assert run.changed and abs(run.stats["sparsity"] - 0.25) < 0.02
    program.propagate_meta()
    slimfx.verify(program)


def test_importances_rank_differently(resnet):
    plans = {name: plan_channels(resnet.clone(), PruneChannelsOptions(importance=name))
             for name in ("l1", "bn-scale", "random")}
    masks = {name: torch.cat([m for _, m in sorted(p.keep.items())]) for name, p in plans.items()}
    assert not torch.equal(masks["l1"], masks["random"]) and not torch.equal(masks["l1"], masks["bn-scale"])


def test_taylor_without_calibration_data_says_what_to_pass(resnet):
    with pytest.raises(PassError, match="calibration data"):
        run_pipeline(resnet, "prune-channels{importance=taylor}")


@pytest.mark.parametrize(("text", "match"), [
    ("prune-channels{sparsity=1.5}", "sparsity=1.5 must be in"),
    ("prune-channels{target_macs=0}", "target_macs"),
    ("prune-channels{importance=l3}", "did you mean"),
    ("prune-channels{scope=everywhere}", "scope"),
    ("prune-channels{round_to=0}", "round_to"),
    ("prune-channels{sparsty=0.5}", "did you mean 'sparsity'"),
])
def test_bad_options_are_pipeline_errors(resnet, text, match):
    with pytest.raises(PipelineError, match=match):
        run_pipeline(resnet, text)


def test_zero_channels_pass_keeps_shapes_and_params(resnet):
    result = run_pipeline(resnet, "zero-channels{sparsity=0.5}")
    assert result.num_params() == resnet.num_params()
    assert result.log[-1].stats["units_removed"] > 0


@pytest.mark.parametrize("name", ["vit-mini", "digits-cnn"])
def test_zoo_models_prune_and_verify(name):
    model, inputs = get_model(name)
    for frontend in ("fx", "export"):
        program = slimfx.trace(model, inputs, frontend=frontend)
        result = run_pipeline(program, "prune-channels{sparsity=0.5}")
        assert result.num_params() < program.num_params()


class _CatTwice(nn.Module):
    """One tensor concatenated with itself: its channels are coupled to the cat's at two offsets."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.c2(torch.cat([y, y], 1))


def test_a_tensor_concatenated_with_itself_loses_its_channels_at_both_offsets():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    program = slimfx.trace(_CatTwice().eval(), x)
    _assert_removal_is_exact(program, SimpleNamespace(example_inputs=(x,), fresh_inputs=lambda seed: (x * 2,)))
    result = slimfx.compress(_CatTwice().eval(), "prune-channels{sparsity=0.5}", x)
    assert result.module.c1.out_channels == 4 and result.module.c2.in_channels == 8
    assert result.module(x).shape == (2, 4, 8, 8)


def test_shapes_from_a_real_run_are_re_propagated_after_pruning():
    class ValueDependent(nn.Module):  # z[z > 0]: fake tensors cannot size it, so shapes come from a real run
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 32), nn.Linear(32, 6)

        def forward(self, x):
            z = self.fc2(torch.relu(self.fc1(x)))
            return z[z > 0].sum() + z.mean()

    torch.manual_seed(0)
    x = torch.randn(8, 6)
    result = slimfx.compress(ValueDependent().eval(), "prune-channels{sparsity=0.5}", x)  # verify on: stale = error
    assert result.program.meta_mode.startswith("real")
    assert result.module.fc1.out_features == 16
