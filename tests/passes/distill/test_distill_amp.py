"""Mixed precision in the distill trainer: the forward passes run in the autocast dtype (seen by a forward hook on
the student's first layer), float16 steps go through a gradient scaler, the student still learns, and its weights
stay float32. bf16 and fp16 on CPU always; the CUDA default (fp16 with gradient scaling) where a GPU is present."""

import copy

import pytest
import torch

import slimfx
from slimfx.datasets import accuracy
from slimfx.errors import PassError
from slimfx.passes.distill.trainer import autocast_dtype, distill
from slimfx.zoo import DigitsMLP


def _student_with_dtype_probe() -> tuple[torch.nn.Module, list[torch.dtype]]:
    """A fresh DigitsMLP(hidden=32) whose first layer records its output dtypes (copies share the hook)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        student = DigitsMLP(hidden=32)
    seen: list[torch.dtype] = []
    student.fc1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return student, seen


@pytest.fixture
def scalers(monkeypatch) -> list[str]:
    """The device types of the GradScalers the trainer creates (and steps with)."""
    created: list[str] = []

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self, device: str = "cuda", *args, **kwargs):
            super().__init__(device, *args, **kwargs)
            created.append(device)

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    return created


def test_autocast_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device type is read: no GPU needed
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) is torch.float16
    assert autocast_dtype("off", cuda) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16
    with pytest.raises(PassError, match=r"amp must be one of auto, off, bf16, fp16, got 'half'"):
        autocast_dtype("half", cpu)


@pytest.mark.parametrize("amp, dtype, scaled", [
    ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True), ("off", torch.float32, False),
    ("auto", torch.float32, False),
], ids=["bf16", "fp16", "off", "auto"])
def test_cpu_training_under_autocast_learns_with_float32_weights(digits, scalers, amp, dtype, scaled):
    teacher, train, test = digits
    student, seen = _student_with_dtype_probe()
    history: list[dict[str, float]] = []
    trained = distill(student, teacher, train, epochs=5, lr=1e-2, alpha=0.9, amp=amp, progress=False,
                      history=history)
    assert set(seen) == {dtype}
    assert scalers == (["cpu"] if scaled else [])
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    losses = [record["loss"] for record in history]
    assert losses[-1] < losses[0] / 10, losses
    assert accuracy(trained, test) > 90.0


def test_the_pass_reports_the_autocast_it_used(digits):
    teacher, train, test = digits
    out = slimfx.compress(teacher, "prune-magnitude{sparsity=0.5},distill{epochs=2,amp=bf16}", (train.x[:8],),
                          train_data=train)
    stats = out.report["passes"][-1]["stats"]
    assert stats["amp"] == "bf16" and stats["loss_final"] < stats["loss_first"]
    assert {p.dtype for p in out.module.parameters()} == {torch.float32}
    assert accuracy(out.module, test) > 90.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_default_is_float16_autocast_with_gradient_scaling(digits, scalers):
    teacher, train, test = digits
    student, seen = _student_with_dtype_probe()
    history: list[dict[str, float]] = []
    trained = distill(student.cuda(), teacher, train, epochs=5, lr=1e-2, alpha=0.9, progress=False, history=history)
    assert set(seen) == {torch.float16}
    assert scalers == ["cuda"]
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert all(p.device.type == "cuda" for p in trained.parameters())
    assert history[-1]["loss"] < history[0]["loss"] / 10
    assert accuracy(trained.cpu(), test) > 90.0

    model = copy.deepcopy(teacher).cuda()
    out = slimfx.compress(model, "prune-magnitude{sparsity=0.5},distill{epochs=2}", (train.x[:8].cuda(),),
                          train_data=train)
    assert out.report["passes"][-1]["stats"]["amp"] == "fp16"
