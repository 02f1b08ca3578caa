"""The distill pass: fine-tunes the program in place against program.teacher on program.train_data, keeps mask
and fake-quant nodes, refuses what it cannot train with errors that say what to do."""

import pytest
import torch

import slimfx
from slimfx.datasets import accuracy
from slimfx.errors import PassError, PipelineError
from slimfx.ir.ops import OpKind
from slimfx.passes.prune.masks import MASK_SUFFIX


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_masked_weights_stay_zero_and_the_graph_keeps_its_mask_nodes(digits):
    teacher, train, test = digits
    teacher_state = _state(teacher)
    pruned = slimfx.run_pipeline(slimfx.trace(teacher, (train.x[:8],)), "prune-magnitude{sparsity=0.8}")
    pruned.train_data, pruned.teacher = train, teacher
    pruned_state, pruned_acc = _state(pruned.module), accuracy(pruned.module, test)

    tuned = slimfx.run_pipeline(pruned, "distill{epochs=3,lr=3e-3}")

    assert [n.name for n in tuned.nodes_of(OpKind.MASK)] == [n.name for n in pruned.nodes_of(OpKind.MASK)]
    assert len(tuned.nodes_of(OpKind.MASK)) == 2
    state = tuned.module.state_dict()
    for name, mask in ((k, v) for k, v in state.items() if k.endswith(MASK_SUFFIX)):
        weight = name.removesuffix(MASK_SUFFIX)
        assert torch.equal(mask, pruned_state[name])
        # pruned entries get zero gradient, so Adam never moves them; the kept ones are trained
        assert torch.equal(state[weight][~mask], pruned_state[weight][~mask])
        assert not torch.equal(state[weight][mask], pruned_state[weight][mask])
    baked = slimfx.run_pipeline(tuned, "apply-masks")
    for name, mask in ((k, v) for k, v in state.items() if k.endswith(MASK_SUFFIX)):
        assert int((baked.module.state_dict()[name.removesuffix(MASK_SUFFIX)] == 0).sum()) >= int((~mask).sum())

    run = tuned.log[-1]
    assert run.name == "distill" and run.contract == "changes"
    assert run.stats["epochs"] == 3 and run.stats["examples"] == len(train.y) and run.stats["amp"] == "off"
    assert run.stats["loss_final"] < run.stats["loss_first"]
    assert accuracy(tuned.module, test) > pruned_acc
    assert all(torch.equal(v, pruned_state[k]) for k, v in pruned.module.state_dict().items())  # input untouched
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_missing_data_or_teacher_says_how_to_provide_them(digits):
    teacher, train, _ = digits
    program = slimfx.trace(teacher, (train.x[:8],))
    with pytest.raises(PassError, match=r"distill: the program carries no training data") as info:
        slimfx.run_pipeline(program, "distill")
    assert "compress(model, pipeline, example_inputs, train_data=" in str(info.value)
    assert "--train digits" in str(info.value) and "program.train_data" in str(info.value)

    program.train_data = train
    with pytest.raises(PassError, match=r"distill: the program has training data but no teacher") as info:
        slimfx.run_pipeline(program, "distill")
    assert "teacher=model" in str(info.value) and "--teacher" in str(info.value)

    program.teacher, program.train_data = teacher, torch.rand(8, 64)
    with pytest.raises(PassError, match=r"distill: program.train_data must be a Split .* or an \(inputs, labels\)"):
        slimfx.run_pipeline(program, "distill")

    program.train_data = (train.x.reshape(-1, 1, 8, 8), train.y)
    with pytest.raises(PassError, match=r"inputs are \[1348, 1, 8, 8\] but the program takes \[8, 64\]"):
        slimfx.run_pipeline(program, "distill")


def test_fake_quant_nodes_must_be_prepared_for_training(digits):
    teacher, train, _ = digits
    program = slimfx.trace(teacher, (train.x[:8],))
    program.train_data, program.teacher = train, teacher
    program.calibration_data = [(train.x[:64],)]
    with pytest.raises(PassError, match=r"fake-quant node\(s\) \(%fq_.*\) are not trainable.*qat-prepare"):
        slimfx.run_pipeline(program, "quant-insert,calibrate{progress=false},distill")
    tuned = slimfx.run_pipeline(program, "quant-insert,calibrate{progress=false},qat-prepare,distill,qat-freeze")
    assert len(tuned.nodes_of(OpKind.FAKE_QUANT)) == 4
    assert tuned.log[-2].stats["loss_final"] < tuned.log[-2].stats["loss_first"]


@pytest.mark.parametrize("text, message", [
    ("distill{alpha=1.5}", r"option 'alpha' .* must be in \[0, 1\], got 1.5"),
    ("distill{epochs=0}", r"option 'epochs' must be >= 1"),
    ("distill{amp=bf15}", r"option 'amp' of pass 'distill' expects one of auto\|off\|bf16\|fp16.*did you mean 'bf16'"),
    ("distill{features=all}", r"option 'features' of pass 'distill' expects one of none\|auto"),
    ("distill{epoch=3}", r"pass 'distill' has no option 'epoch' \(did you mean 'epochs'\?\)"),
])
def test_options_are_validated(text, message):
    with pytest.raises(PipelineError, match=message):
        slimfx.Pipeline.parse(text).validate()


def test_torch_export_programs_are_fine_tuned_too(digits):
    teacher, train, test = digits
    out = slimfx.compress(teacher, "prune-magnitude{sparsity=0.8},distill{epochs=2,lr=3e-3}", (train.x[:8],),
                          train_data=train, frontend="export")
    assert out.program.dialect == "aten"
    stats = out.report["passes"][-1]["stats"]
    assert stats["loss_final"] < stats["loss_first"]
    assert len(out.program.nodes_of(OpKind.MASK)) == 2
    with torch.no_grad():  # the exported graph is specialised to the example batch of 8
        predicted = torch.cat([out.module(x).argmax(1) for x in test.x[:448].split(8)])
    assert 100.0 * float((predicted == test.y[:448]).float().mean()) > 85.0
