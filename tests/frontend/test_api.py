import json

import pytest
import torch

import slimfx
from slimfx.datasets import accuracy, load_digits, train_classifier
from slimfx.errors import SlimfxError
from slimfx.zoo import DigitsCNN, DigitsMLP, get_model


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small, busy machine training is several times faster than with contended threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compress_never_mutates_the_model_and_reports_every_pass():
    model, inputs = get_model("resnet-mini")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs_before = inputs[0].clone()
    out = slimfx.compress(model, "fold-bn,prune-channels{sparsity=0.5},dce", inputs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(inputs[0], inputs_before)
    report = json.loads(json.dumps(out.report, default=str))
    assert report["pipeline"] == "fold-bn,prune-channels{sparsity=0.5},dce"
    assert [p["name"] for p in report["passes"]] == ["fold-bn", "prune-channels", "dce"]
    assert report["params_after"] < 0.35 * report["params_before"]
    assert out(*inputs).shape == model(*inputs).shape


def test_compress_with_calibration_data_quantizes_and_lowers():
    model, inputs = get_model("digits-mlp")
    calib = [torch.rand(16, 64) for _ in range(4)]
    out = slimfx.compress(model, "quant-insert,calibrate,lower-int8", inputs, calib_data=calib)
    assert out.report["passes"][-1]["name"] == "lower-int8"
    assert out.report["state_bytes_after"] < 0.4 * out.report["state_bytes_before"]
    torch.testing.assert_close(out(*inputs), model(*inputs), rtol=0.1, atol=0.1)


def test_compress_with_teacher_fine_tunes_by_distillation(one_thread):
    train, test = load_digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = train_classifier(DigitsCNN(), train, epochs=2, seed=0)
    out = slimfx.compress(model, "prune-channels{sparsity=0.5}", (train.x[:8],), train_data=train, teacher=model,
                          distill_epochs=1)
    assert out.report["distill_epochs"] == 1
    assert out.program.num_params() < slimfx.trace(model, (train.x[:8],)).num_params()


def test_compress_errors_name_the_argument():
    model, inputs = get_model("digits-mlp")
    with pytest.raises(SlimfxError, match="calib_data must be an iterable"):
        slimfx.compress(model, "calibrate", inputs, calib_data=torch.rand(4, 64))
    with pytest.raises(SlimfxError, match="teacher= is given but train_data= is not"):
        slimfx.compress(model, "dce", inputs, teacher=model)
    with pytest.raises(slimfx.errors.PipelineError, match="did you mean 'fold-bn'"):
        slimfx.compress(model, "fold-nb", inputs)


def test_train_data_reaches_the_distill_pass_with_a_frozen_copy_of_the_model_as_default_teacher(one_thread):
    from slimfx.passes.base import PassResult, register_pass, unregister_pass

    train, test = load_digits(image=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = train_classifier(DigitsMLP(), train, epochs=3, seed=0).train()  # a training-mode model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    @register_pass(name="test-record-distill-inputs", contract="exact")
    def record(program, options):
        """Records the teacher and training data a distill pass at this point would use."""
        seen.update(teacher=program.teacher, train_data=program.train_data)
        return PassResult(changed=False)

    try:
        out = slimfx.compress(model, "prune-magnitude{sparsity=0.5},test-record-distill-inputs,distill{epochs=2}",
                              (train.x[:8],), train_data=train)
    finally:
        unregister_pass("test-record-distill-inputs")
    teacher = seen["teacher"]
    assert seen["train_data"] is train
    assert teacher is not model and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the model before any pass
    # the pipeline distilled, so compress does not fine-tune again afterwards
    assert [p["name"] for p in out.report["passes"]][-1] == "distill" and out.report["distill_epochs"] is None
    assert out.report["passes"][-1]["stats"]["epochs"] == 2
    # the user's model: same weights, still in training mode, gradients still on
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and all(p.requires_grad for p in model.parameters())

    # without a distill pass the result is fine-tuned after the pipeline (as before distill was a pass)
    tuned = slimfx.compress(model, "prune-magnitude{sparsity=0.8}", (train.x[:8],), train_data=train,
                            distill_epochs=2)
    plain = slimfx.compress(model, "prune-magnitude{sparsity=0.8}", (train.x[:8],))
    assert tuned.report["distill_epochs"] == 2 and [p["name"] for p in tuned.report["passes"]] == ["prune-magnitude"]
    assert accuracy(tuned.module, test) > accuracy(plain.module, test)
