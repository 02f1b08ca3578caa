import json
import os

import pytest
import torch

import slimfx
from slimfx.errors import ArtifactError
from slimfx.zoo import get_model


@pytest.mark.parametrize(
    ("name", "pipeline", "calib"),
    [
        ("resnet-mini", "fold-bn,prune-channels{sparsity=0.5},dce", None),
        ("digits-mlp", "quant-insert,calibrate,lower-int8", [torch.rand(16, 64)]),
        ("digits-cnn", "prune-magnitude{sparsity=0.5},quant-insert,calibrate", [torch.rand(8, 1, 8, 8)]),
    ],
)
def test_saved_artifacts_reload_bit_for_bit(tmp_path, name, pipeline, calib):
    model, inputs = get_model(name)
    out = slimfx.compress(model, pipeline, inputs, calib_data=calib)
    slimfx.save(out, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["pipeline"] == pipeline and manifest["torch_version"] == torch.__version__
    back = slimfx.load(str(tmp_path), lambda: get_model(name)[0])
    fresh = torch.rand_like(inputs[0])
    assert torch.equal(out(*inputs), back(*inputs)) and torch.equal(out(fresh), back(fresh))


def test_a_pipeline_with_training_reloads_without_training_again(tmp_path):
    # distill only changes values (values_only): load() rebuilds the structure without it, then loads the
    # trained tensors, so no training data is needed to reload
    model, inputs = get_model("digits-mlp")
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    out = slimfx.compress(model, "prune-channels{sparsity=0.5},distill{epochs=1,batch_size=32}", inputs,
                          train_data=(x, y))
    assert [r.name for r in out.program.log] == ["prune-channels", "distill"]
    slimfx.save(out, str(tmp_path))
    back = slimfx.load(str(tmp_path), lambda: get_model("digits-mlp")[0])
    assert torch.equal(out(x), back(x))


@pytest.fixture
def saved(tmp_path):
    model, inputs = get_model("digits-mlp")
    slimfx.save(slimfx.compress(model, "prune-channels{sparsity=0.5}", inputs), str(tmp_path))
    return tmp_path


def test_truncated_weights_are_refused(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated or modified"):
        slimfx.load(str(saved), lambda: get_model("digits-mlp")[0])


def test_corrupted_manifest_and_missing_files_are_refused(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        slimfx.load(str(saved), lambda: get_model("digits-mlp")[0])
    os.remove(saved / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        slimfx.load(str(saved), lambda: get_model("digits-mlp")[0])


def test_a_different_architecture_is_refused(saved):
    from slimfx.zoo import DigitsMLP

    with pytest.raises(ArtifactError, match="when rebuilt|does not rebuild|graph differs"):
        slimfx.load(str(saved), lambda: DigitsMLP(hidden=64))


def test_a_factory_returning_a_training_mode_model_still_reloads_exactly(tmp_path):
    from slimfx.zoo import DigitsCNN

    model, inputs = get_model("digits-cnn")  # eval mode, BatchNorm statistics set
    out = slimfx.compress(model, "prune-channels{sparsity=0.5}", inputs)
    slimfx.save(out, str(tmp_path))
    back = slimfx.load(str(tmp_path), DigitsCNN)  # a fresh DigitsCNN() is in training mode
    assert torch.equal(out(*inputs), back(*inputs))
