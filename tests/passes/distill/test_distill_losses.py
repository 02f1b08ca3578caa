"""Distillation losses against hand computations (plain Python math, no torch in the expected values)."""

import math

import pytest
import torch

from slimfx.errors import PassError
from slimfx.passes.distill.losses import (
    LossWeights,
    attention_map,
    attention_transfer,
    distill_loss,
    feature_cosine,
    feature_mse,
    kd_loss,
    soft_kl,
)


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


S, T, Y = [1.0, 2.0, 3.0], [3.0, 2.0, 0.5], 2


def test_soft_kl_is_t_squared_times_kl_of_tempered_softmaxes():
    for temperature in (1.0, 2.0, 4.0):
        p_t = _softmax([v / temperature for v in T])
        p_s = _softmax([v / temperature for v in S])
        expected = temperature**2 * _kl(p_t, p_s)
        got = soft_kl(torch.tensor([S]), torch.tensor([T]), temperature)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_kl_averages_over_the_batch_and_is_zero_for_equal_logits():
    s = torch.tensor([S, T])
    t = torch.tensor([T, T])
    assert soft_kl(s, t, 2.0).item() == pytest.approx(soft_kl(s[:1], t[:1], 2.0).item() / 2, rel=1e-6)
    assert soft_kl(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_mixes_soft_and_hard_terms_with_alpha():
    temperature, alpha = 4.0, 0.3
    soft = temperature**2 * _kl(_softmax([v / temperature for v in T]), _softmax([v / temperature for v in S]))
    hard = -math.log(_softmax(S)[Y])
    got = kd_loss(torch.tensor([S]), torch.tensor([T]), torch.tensor([Y]), temperature, alpha)
    assert got.item() == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-5)
    only_soft = kd_loss(torch.tensor([S]), torch.tensor([T]), None, temperature, alpha)
    assert only_soft.item() == pytest.approx(soft, rel=1e-5)
    only_hard = kd_loss(torch.tensor([S]), torch.tensor([T]), torch.tensor([Y]), temperature, 0.0)
    assert only_hard.item() == pytest.approx(hard, rel=1e-5)


def test_feature_mse_and_cosine_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert feature_mse(s, torch.zeros(2, 2)).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    # per sample 1 - cos: orthogonal 1, parallel 0, opposite 2
    assert feature_cosine(a, b).item() == pytest.approx((1 + 0 + 2) / 3, abs=1e-6)


def test_attention_map_sums_powered_magnitudes_over_channels_and_normalises():
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # [1, 2 channels, 1, 2]
    norm = math.sqrt(10**2 + 4**2)
    assert attention_map(f, p=2)[0].tolist() == pytest.approx([10 / norm, 4 / norm])
    norm1 = math.sqrt(4**2 + 2**2)
    assert attention_map(f, p=1)[0].tolist() == pytest.approx([4 / norm1, 2 / norm1])


def test_attention_transfer_by_hand_and_channel_counts_may_differ():
    student = torch.tensor([[[[1.0, 0.0]]]])  # map [1, 0]
    teacher = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])  # map [0, 2] -> normalised [0, 1]
    assert attention_transfer(student, teacher).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert attention_transfer(teacher * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(PassError, match="spatial"):
        attention_transfer(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2))


def test_distill_loss_adds_weighted_parts():
    torch.manual_seed(0)
    s_logits, t_logits, labels = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    s_feat, t_feat = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    weights = LossWeights(temperature=2.0, alpha=0.7, feature=0.5, feature_loss="cosine", attention=10.0)
    total, parts = distill_loss(s_logits, t_logits, labels, [(s_feat, t_feat)], [(s_feat, t_feat)], weights)
    expected = (kd_loss(s_logits, t_logits, labels, 2.0, 0.7) + 0.5 * feature_cosine(s_feat, t_feat)
                + 10.0 * attention_transfer(s_feat, t_feat))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"kd", "feature", "attention"}
    plain, parts = distill_loss(s_logits, t_logits, labels)
    assert set(parts) == {"kd"} and plain.item() == pytest.approx(kd_loss(s_logits, t_logits, labels).item())


def test_invalid_settings_name_the_option():
    logits = torch.zeros(1, 3)
    with pytest.raises(PassError, match="temperature"):
        soft_kl(logits, logits, 0.0)
    with pytest.raises(PassError, match="alpha"):
        kd_loss(logits, logits, torch.tensor([0]), alpha=1.5)
    with pytest.raises(PassError, match="feature_loss"):
        LossWeights(feature_loss="l1")
    with pytest.raises(PassError, match="adapt the student"):
        feature_mse(torch.zeros(1, 2), torch.zeros(1, 3))
