import json

import pytest
import torch

import slimfx
from slimfx.datasets import load_digits, train_classifier
from slimfx.errors import SlimfxError
from slimfx.zoo import DigitsCNN, get_model


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


def test_compress_with_teacher_fine_tunes_by_distillation():
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
    with pytest.raises(SlimfxError, match="needs both train_data= and teacher="):
        slimfx.compress(model, "dce", inputs, teacher=model)
    with pytest.raises(slimfx.errors.PipelineError, match="did you mean 'fold-bn'"):
        slimfx.compress(model, "fold-nb", inputs)
