"""Every zoo model builds deterministically, fx-traces, exports and agrees with eager."""

from __future__ import annotations

import pytest
import torch

from slimfx import zoo
from slimfx.errors import SlimfxError


def assert_traces_and_matches_eager(model, inputs):
    with torch.no_grad():
        expected = model(*inputs)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(*inputs), expected)
        torch.testing.assert_close(torch.export.export(model, inputs).module()(*inputs), expected)


@pytest.mark.parametrize("name", zoo.list_models())
def test_zoo_model_traces_exports_and_matches_eager(name):
    model, inputs = zoo.get_model(name)
    assert not model.training
    assert_traces_and_matches_eager(model, inputs)


@pytest.mark.parametrize("name", zoo.list_models())
def test_zoo_model_is_deterministic_and_leaves_global_rng_alone(name):
    before = torch.get_rng_state()
    model_a, inputs_a = zoo.get_model(name)
    assert torch.equal(before, torch.get_rng_state())
    torch.manual_seed(123)
    model_b, inputs_b = zoo.get_model(name)
    assert all(torch.equal(a, b) for a, b in zip(inputs_a, inputs_b))
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    torch.set_rng_state(before)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("digits-cnn", 20_000, 50_000), ("resnet-mini", 500_000, 2_000_000), ("vit-mini", 500_000, 2_000_000)],
)
def test_zoo_model_sizes(name, low, high):
    model, _ = zoo.get_model(name)
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_digits_models_output_ten_classes():
    for name, shape in (("digits-cnn", (1, 8, 8)), ("digits-mlp", (64,))):
        model, (x,) = zoo.get_model(name)
        assert tuple(x.shape[1:]) == shape
        assert model(x).shape == (x.shape[0], 10)


@pytest.mark.parametrize("blocks", [0, 1, 5])
def test_deep_residual_cnn_traces_exports_and_grows_linearly(blocks):
    model = zoo.deep_residual_cnn(blocks, channels=4)
    assert len(model.blocks) == blocks
    assert_traces_and_matches_eager(model, (torch.randn(2, 3, 8, 8),))


def test_batchnorm_statistics_are_not_the_identity():
    model, _ = zoo.get_model("resnet-mini")
    bn = model.stem[1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_unknown_model_names_the_closest():
    with pytest.raises(SlimfxError, match="did you mean 'resnet-mini'"):
        zoo.get_model("resnet_mini")
    with pytest.raises(SlimfxError, match="available: .*vit-mini"):
        zoo.get_model("alexnet")
