"""distill(): determinism, no mutation, evaluation and early stopping, features through taps and adapters,
and DDP on 2 gloo CPU processes matching 1 process on the same global batch. (AMP runs only on CUDA and is
not exercised here.)"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import slimfx
from slimfx.datasets import Split, load_digits
from slimfx.errors import PassError
from slimfx.passes.distill.adapters import ConvAdapter, make_adapter
from slimfx.passes.distill.taps import tap_record
from slimfx.passes.distill.trainer import distill
from slimfx.zoo import DigitsCNN, DigitsMLP


@pytest.fixture(scope="module")
def flat():
    train, test = load_digits(image=False)
    return Split(train.x[:203], train.y[:203]), Split(test.x[:100], test.y[:100])


@pytest.fixture(scope="module")
def images():
    train, _ = load_digits(image=True)
    return Split(train.x[:128], train.y[:128])


def _mlp(hidden, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DigitsMLP(hidden=hidden)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapters_project_student_features_to_teacher_shapes():
    assert isinstance(make_adapter((2, 8, 4, 4), (5, 8, 4, 4)), nn.Identity)  # batch sizes do not matter
    conv = make_adapter((2, 8, 4, 4), (2, 16, 4, 4))
    assert isinstance(conv, ConvAdapter) and conv.proj.kernel_size == (1, 1)
    assert conv(torch.randn(3, 8, 4, 4)).shape == (3, 16, 4, 4)
    assert make_adapter((2, 8, 8, 8), (2, 16, 4, 4))(torch.randn(3, 8, 8, 8)).shape == (3, 16, 4, 4)
    assert make_adapter((2, 12), (2, 48))(torch.randn(3, 12)).shape == (3, 48)
    assert make_adapter((2, 7, 12), (2, 7, 48))(torch.randn(3, 7, 12)).shape == (3, 7, 48)
    with pytest.raises(PassError, match="same rank"):
        make_adapter((2, 8, 4, 4), (2, 128), "relu_1->flatten")
    with pytest.raises(PassError, match="leading dims"):
        make_adapter((2, 7, 12), (2, 9, 48))


def test_logits_only_distill_is_deterministic_and_mutates_nothing(flat):
    train, _ = flat
    student, teacher = _mlp(16, 1), _mlp(64, 2).train()
    s_before, t_before = _state(student), _state(teacher)
    rng_before = torch.get_rng_state()
    first = distill(student, teacher, train, epochs=2, lr=1e-2, progress=False, seed=3)
    second = distill(student, teacher, train, epochs=2, lr=1e-2, progress=False, seed=3)
    other = distill(student, teacher, train, epochs=2, lr=1e-2, progress=False, seed=4)
    assert isinstance(first, DigitsMLP) and not first.training
    assert _equal(_state(first), _state(second)) and not _equal(_state(first), _state(other))
    assert not _equal(_state(first), s_before)
    assert _equal(_state(student), s_before) and _equal(_state(teacher), t_before)
    assert teacher.training and student.training  # modes of the caller's modules are untouched
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_eval_callback_every_epoch_and_early_stopping_restores_the_best_epoch(flat):
    train, test = flat
    scores, seen = iter([1.0, 3.0, 2.0, 2.5, 9.0, 9.0]), []

    def score(model, data):
        assert data is test and not model.training
        seen.append(_state(model.net))
        return next(scores)

    history = []
    result = distill(_mlp(16, 1), _mlp(64, 2), train, epochs=6, lr=1e-2, eval_data=test, eval_fn=score, patience=2,
                     progress=False, history=history)
    assert [h["score"] for h in history] == [1.0, 3.0, 2.0, 2.5]  # two epochs without a better score: stop
    assert all(h["loss"] > 0 for h in history)
    assert _equal(_state(result), seen[1])
    with pytest.raises(PassError, match="patience"):
        distill(_mlp(16, 1), _mlp(64, 2), train, epochs=1, patience=1, progress=False)


def test_default_eval_is_accuracy(flat):
    train, test = flat
    history = []
    distill(_mlp(16, 1), _mlp(64, 2), train, epochs=1, eval_data=test, progress=False, history=history)
    assert 0.0 <= history[0]["score"] <= 100.0


def test_program_student_with_auto_feature_pairs_and_attention(images):
    torch.manual_seed(0)
    teacher = slimfx.trace(DigitsCNN().eval(), (images.x[:4],))
    student = slimfx.run_pipeline(teacher, "prune-channels{sparsity=0.5}")
    before = _state(student.module)
    result = distill(student, teacher, images, epochs=1, feature_pairs="auto", attention_weight=1.0,
                     batch_size=32, progress=False)
    assert isinstance(result, slimfx.Program) and tap_record(result) is None
    assert result.module.code == student.module.code
    assert result(images.x[:4]).shape == (4, 10)
    assert not _equal(_state(result.module), before) and _equal(_state(student.module), before)
    assert tap_record(teacher) is None
    slimfx.verify(result)
    logits_only = distill(student, teacher.module, images, epochs=1, batch_size=64, progress=False)
    assert isinstance(logits_only, slimfx.Program) and logits_only.module.code == student.module.code
    assert not _equal(_state(logits_only.module), before) and _equal(_state(student.module), before)


def test_module_student_with_explicit_pairs(flat):
    train, _ = flat
    student = _mlp(16, 1)
    result = distill(student, _mlp(64, 2), train, epochs=1, feature_pairs=[("act", "act")], feature_loss="cosine",
                     progress=False)
    assert type(result) is DigitsMLP and not _equal(_state(result), _state(student))
    with pytest.raises(PassError, match=r"student pattern 'fc\*' matches 2 nodes"):
        distill(student, _mlp(64, 2), train, epochs=1, feature_pairs=[("fc*", "act")], progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, student, teacher, data, kwargs, path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = distill(student, teacher, data, **kwargs)
        if rank == 0:
            torch.save(result.state_dict(), path)
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_matches_one_process(flat, tmp_path):
    train, _ = flat  # 203 samples: the last global batch (11) splits unevenly into 6 + 5
    student, teacher = _mlp(16, 1), _mlp(64, 2)
    kwargs = dict(epochs=2, lr=0.05, optimizer="sgd", batch_size=32, feature_pairs="auto", progress=False, seed=5)
    single = distill(student, teacher, train, **kwargs)
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), student, teacher, train, kwargs, path), nprocs=2, join=True)
    parallel = torch.load(path)
    assert parallel.keys() == single.state_dict().keys()
    for name, value in single.state_dict().items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-5, atol=1e-6)
    assert not _equal(parallel, _state(student))
