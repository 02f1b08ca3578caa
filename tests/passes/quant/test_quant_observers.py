"""Observers and schemes: qparams, grids, clipping, did-you-mean errors, and distributed sync (2 gloo ranks)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimfx.errors import PipelineError
from slimfx.passes.quant.observers import HistogramObserver, make_observer
from slimfx.passes.quant.spec import error_bound, fake_quantize, parse_spec

W8 = parse_spec("int8-per-channel", "weight")
A8 = parse_spec("int8-per-tensor", "activation")


def test_weight_minmax_per_channel_matches_the_int8_kernel():
    from slimfx.kernels import Int8Linear

    linear = torch.nn.Linear(16, 8)
    obs = make_observer("minmax", W8)
    obs.observe(linear.weight)
    scale, zp = obs.qparams()
    kernel = Int8Linear.from_float(linear)
    assert torch.equal(scale, kernel.weight_scale) and not zp.any()
    assert torch.equal(fake_quantize(linear.weight.detach(), scale, zp, W8), kernel.dequantized_weight())


def test_asymmetric_activation_covers_the_range_and_zero():
    obs = make_observer("minmax", A8)
    x = torch.rand(64, 10) * 3 + 0.5  # all positive: zero must still be exact
    obs.observe(x)
    scale, zp = obs.qparams()
    assert -128 <= int(zp) <= 127
    assert fake_quantize(torch.zeros(1), scale, zp, A8).item() == 0.0
    assert (fake_quantize(x, scale, zp, A8) - x).abs().max() <= scale / 2 + 1e-7


@pytest.mark.parametrize("text", ["int4-group8", "int4-group5-asym", "int8-per-tensor-sym", "int4-per-channel"])
def test_weight_schemes_err_by_at_most_half_a_step(text):
    spec = parse_spec(text, "weight")
    w = torch.randn(6, 13, 3)  # a conv-shaped weight; groups run along the flattened input dims
    obs = make_observer("minmax", spec)
    obs.observe(w)
    scale, zp = obs.qparams()
    out = fake_quantize(w, scale, zp, spec)
    assert out.shape == w.shape
    assert ((out - w).abs() <= error_bound(w, scale, spec) * (1 + 1e-6) + 1e-7).all()
    if spec.granularity == "group":
        assert scale.numel() == 6 * -(-39 // spec.group_size)


def test_fp8_e4m3_rounds_onto_the_e4m3_grid():
    spec = parse_spec("fp8-e4m3", "weight")
    w = torch.randn(4, 32)
    obs = make_observer("minmax", spec)
    obs.observe(w)
    scale, zp = obs.qparams()
    out = fake_quantize(w, scale, zp, spec)
    grid = (out / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]
    assert torch.equal(out, grid)
    assert ((out - w).abs() <= error_bound(w, scale, spec) * (1 + 1e-6)).all()
    assert torch.allclose(out.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6)  # absmax maps to 448


def test_percentile_clips_an_outlier_that_minmax_keeps():
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[0] = 80.0  # one outlier
    ranges = {}
    for name in ("minmax", "percentile", "moving-average"):
        obs = make_observer(name, A8)
        for chunk in x.chunk(4):
            obs.observe(chunk)
        ranges[name] = obs.qparams()[0].item()
    assert ranges["percentile"] < ranges["minmax"] / 5
    assert ranges["moving-average"] < ranges["minmax"]  # the outlier's batch is averaged with the others


def test_mse_observer_clips_where_it_lowers_the_quantization_error():
    torch.manual_seed(0)
    x = torch.randn(20000)
    spec = parse_spec("int4-per-tensor", "activation")  # at 4 bits clipping a Gaussian's tails pays
    errors, scales = {}, {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, spec)
        obs.observe(x)
        s, z = obs.qparams()
        scales[name] = s.item()
        errors[name] = ((fake_quantize(x, s, z, spec) - x) ** 2).mean().item()
    assert scales["mse"] < scales["minmax"] * 0.8
    assert errors["mse"] < errors["minmax"] * 0.8


def test_histogram_is_independent_of_observation_order_and_chunking():
    torch.manual_seed(1)
    x = torch.randn(5000) * torch.logspace(-3, 2, 5000)
    one, many = HistogramObserver(A8), HistogramObserver(A8)
    one.observe(x)
    for chunk in x[torch.randperm(5000)].chunk(7):  # ranges grow chunk by chunk
        many.observe(chunk)
    assert one.exponent == many.exponent
    assert torch.equal(one.histogram, many.histogram)


@pytest.mark.parametrize("bad, hint", [("int8-per-chanel", "int8-per-channel"), ("fp8-e4m", "fp8-e4m3"),
                                       ("int8-pertensor", "int8-per-tensor")])
def test_bad_scheme_strings_get_a_did_you_mean(bad, hint):
    with pytest.raises(PipelineError, match=f"did you mean '{hint}'"):
        parse_spec(bad, "weight")


def test_bad_observer_and_role_mismatches_name_the_fix():
    with pytest.raises(PipelineError, match="did you mean 'minmax'"):
        make_observer("minmx", A8)
    with pytest.raises(PipelineError, match="for activations"):
        parse_spec("int8-per-token", "weight")
    with pytest.raises(PipelineError, match="for weights"):
        parse_spec("int4-group128", "activation")


# ----- distributed: 2 gloo ranks on halves == 1 process on everything -----------------------------------

def _data():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 12, generator=g) * (1 + i) for i in range(6)]


def _observe_all(name, spec, batches):
    obs = make_observer(name, spec)
    for batch in batches:
        obs.observe(batch)
    obs.sync()
    return obs.qparams()


def _rank_main(rank, world, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for name in ("minmax", "moving-average", "percentile", "mse"):
            halves = [b.chunk(world)[rank] for b in _data()]  # each rank sees half of every batch
            out[name] = _observe_all(name, A8, halves)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_on_halves_choose_the_qparams_of_one_process_on_everything():
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(2, _free_port(), results), nprocs=2, join=True)
    for name in ("minmax", "moving-average", "percentile", "mse"):
        expected = _observe_all(name, A8, _data())
        for rank in (0, 1):
            scale, zp = results[rank][name]
            assert torch.equal(scale, expected[0]), name
            assert torch.equal(zp, expected[1]), name
