import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.passes.prune import magnitude  # noqa: F401  (registers prune-magnitude)
from slimfx.passes.prune.masks import dense_weight, mask_of, masked_layers
from slimfx.passes.prune.schedule import cubic_sparsity, gradual_prune, pruning_steps


def test_cubic_schedule_endpoints_monotonicity_and_plateaus():
    kw = dict(initial=0.1, final=0.8, begin_step=10, end_step=110, frequency=10)
    values = [cubic_sparsity(t, **kw) for t in range(0, 130)]
    assert values[0] == values[10] == 0.1
    assert values[110] == values[129] == 0.8
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert all(values[t] == values[t - 1] for t in range(11, 110) if (t - 10) % 10)  # constant between prunings
    assert values[20] - values[10] > values[110] - values[100]  # fast early, slow late


@pytest.mark.parametrize(
    "initial, final, t0, n, dt", [(0.0, 0.5, 0, 10, 1), (0.2, 0.9, 5, 4, 25), (0.0, 0.75, 3, 7, 3)]
)
def test_cubic_schedule_matches_the_closed_form_at_every_pruning_step(initial, final, t0, n, dt):
    for j in range(n + 1):
        t = t0 + j * dt
        expected = final + (initial - final) * (1 - (t - t0) / (n * dt)) ** 3
        assert cubic_sparsity(t, initial, final, t0, t0 + n * dt, dt) == pytest.approx(expected, abs=1e-12)
    assert pruning_steps(t0, t0 + n * dt, dt) == [t0 + j * dt for j in range(n + 1)]


@pytest.mark.parametrize(
    "kwargs", [dict(end_step=0, begin_step=0), dict(frequency=0), dict(final=1.0), dict(initial=-0.1)]
)
def test_cubic_schedule_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        cubic_sparsity(1, **kwargs)


def test_gradual_pruning_of_an_mlp_reaches_the_final_sparsity_and_keeps_early_prunings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    program = slimfx.trace(model, (x[:2],))
    snapshots, losses = [], []

    def train_step(current, step):
        optimizer = torch.optim.SGD(current.module.parameters(), lr=0.05)
        for _ in range(3):
            optimizer.zero_grad()
            loss = (current.module(x) - y).square().mean()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        snapshots.append({t: mask_of(current, n).clone() for n, t in masked_layers(current)})

    out = gradual_prune(program, "prune-magnitude{sparsity={s}}", train_step, steps=8, final=0.75,
                        begin_step=1, end_step=6, frequency=1)
    assert [r.name for r in out.log].count("prune-magnitude") == 5  # step 1 is at sparsity 0
    for node, _ in masked_layers(out):
        mask = mask_of(out, node)
        assert int((~mask).sum()) == round(0.75 * mask.numel())
        assert torch.all((dense_weight(out, node) * mask)[~mask] == 0)
    for before, after in zip(snapshots, snapshots[1:]):  # once pruned, always pruned
        for target, mask in before.items():
            assert not torch.any(after[target] & ~mask)
    sparsities = [float((~m).float().mean()) for s in snapshots if s for m in [s["0.weight_mask"]]]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.75, abs=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not masked_layers(program)  # the input program is untouched
    slimfx.verify(out)


def test_gradual_prune_needs_a_placeholder():
    program = slimfx.trace(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),))
    with pytest.raises(ValueError, match=r"\{s\}"):
        gradual_prune(program, "prune-magnitude{sparsity=0.5}", None, steps=4)
