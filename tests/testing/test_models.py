"""The random-model strategies generate valid models: fx and export trace them and agree with eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.errors import SlimfxError
from slimfx.testing.models import (
    ChannelShuffle,
    ModelCase,
    attention_models,
    cnns,
    inputs_like,
    mlps,
    models,
)

STRATEGIES = {"mlps": mlps(), "cnns": cnns(), "attention_models": attention_models()}


def assert_traces_and_matches_eager(case: ModelCase) -> None:
    with torch.no_grad():
        expected = case.module(*case.example_inputs)
        assert torch.isfinite(expected).all(), case
        traced = torch.fx.symbolic_trace(case.module)
        torch.testing.assert_close(traced(*case.example_inputs), expected)
        exported = torch.export.export(case.module, case.example_inputs)
        torch.testing.assert_close(exported.module()(*case.example_inputs), expected)


def assert_well_formed(case: ModelCase) -> None:
    assert case.description.strip()
    assert all(not m.training for m in case.module.modules())
    first, second = case.fresh_inputs(1), case.fresh_inputs(2)
    for example, a, b in zip(case.example_inputs, first, second, strict=True):
        assert a.shape == b.shape == example.shape
        assert a.dtype == b.dtype == example.dtype
        assert not torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(first, case.fresh_inputs(1)))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_generated_models_trace_export_and_match_eager(name):
    @settings(derandomize=True, deadline=None, max_examples=60, database=None)
    @given(STRATEGIES[name])
    def check(case):
        assert_well_formed(case)
        assert_traces_and_matches_eager(case)

    check()


@settings(derandomize=True, deadline=None, max_examples=30, database=None)
@given(models())
def test_models_copy_and_state_dict_round_trip(case):
    clone = copy.deepcopy(case.module)
    clone.load_state_dict(case.module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clone(*case.example_inputs), case.module(*case.example_inputs))


def _derandomized_run(strategy) -> list[tuple[str, dict, tuple]]:
    drawn = []

    @settings(derandomize=True, deadline=None, max_examples=10, database=None)
    @given(strategy)
    def collect(case):
        drawn.append((case.description, case.module.state_dict(), case.example_inputs))

    collect()
    return drawn


def test_weights_depend_only_on_the_draw_and_leave_global_rng_alone():
    saved = torch.get_rng_state()
    torch.manual_seed(1)
    first = _derandomized_run(models())
    torch.manual_seed(2)
    before = torch.get_rng_state()
    second = _derandomized_run(models())
    assert torch.equal(before, torch.get_rng_state())
    torch.set_rng_state(saved)
    assert len(first) == len(second)
    for (desc_a, state_a, inputs_a), (desc_b, state_b, inputs_b) in zip(first, second):
        assert desc_a == desc_b
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
        assert all(torch.equal(a, b) for a, b in zip(inputs_a, inputs_b))


@settings(derandomize=True, deadline=None, max_examples=30, database=None)
@given(cnns(features={"plain", "residual", "groupnorm"}))
def test_norm_layers_are_not_the_identity(case):
    for module in case.module.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            assert not torch.allclose(module.running_var, torch.ones_like(module.running_var))
            assert not torch.allclose(module.running_mean, torch.zeros_like(module.running_mean))
        if isinstance(module, nn.GroupNorm | nn.BatchNorm2d | nn.BatchNorm1d):
            assert not torch.allclose(module.weight, torch.ones_like(module.weight))


@settings(derandomize=True, deadline=None, max_examples=20, database=None)
@given(cnns(max_blocks=3, features={"shuffle"}))
def test_features_restrict_the_block_kinds(case):
    assert len(case.module.blocks) >= 1
    assert all(isinstance(block, ChannelShuffle) for block in case.module.blocks)
    assert case.module.stem.conv.out_channels % case.module.blocks[0].groups == 0


@settings(derandomize=True, deadline=None, max_examples=20, database=None)
@given(st.data())
def test_unknown_feature_names_the_closest(data):
    with pytest.raises(SlimfxError, match="did you mean 'shuffle'"):
        data.draw(cnns(features={"shufle"}))


@settings(derandomize=True, deadline=None, max_examples=20, database=None)
@given(models(training=True))
def test_training_flag_leaves_modules_in_train_mode(case):
    assert all(m.training for m in case.module.modules())


@settings(derandomize=True, deadline=None, max_examples=20, database=None)
@given(st.data())
def test_inputs_like_and_token_ids_stay_in_the_vocabulary(data):
    case = data.draw(attention_models())
    extra = data.draw(inputs_like(case))
    for spec, tensor in zip(case.input_specs, (*case.example_inputs, *extra)):
        assert tuple(tensor.shape) == spec.shape
        if spec.index_bound is not None:
            assert 0 <= int(tensor.min()) and int(tensor.max()) < spec.index_bound
    with torch.no_grad():
        case.module(*extra)


def test_model_case_derives_input_specs_from_example_inputs():
    case = ModelCase(nn.Embedding(5, 3), (torch.tensor([[0, 4, 2]]),), "embedding")
    assert case.input_specs[0].index_bound == 5
    assert int(case.fresh_inputs(0)[0].max()) < 5
    assert "embedding" in repr(case)
