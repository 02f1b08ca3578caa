"""`slimfx recipe check`, `slimfx run` and `slimfx report`, in-process through cli.main."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from slimfx.frontend.cli import main

RECIPE = str(Path(__file__).resolve().parents[1] / "examples" / "recipes" / "digits-prune-int8.yaml")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One `slimfx run digits-mlp --recipe ... --calib digits` shared by the tests below (it takes seconds)."""
    out = tmp_path_factory.mktemp("run")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["run", "digits-mlp", "--recipe", RECIPE, "--calib", "digits", "--out", str(out),
                     "--report", str(out / "r.json")])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_recipe_check_prints_pipeline(capsys):
    code, out, err = run(capsys, "recipe", "check", RECIPE)
    assert code == 0, err
    assert out.strip().startswith("canonicalize,fold-bn,prune-channels{sparsity=0.5,importance=l1}")
    assert out.strip().endswith("lower-int8")


def test_recipe_check_reports_errors(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - cleanup: [canonicalize]\n  - prune: {sparsty: 0.5}\n")
    code, out, err = run(capsys, "recipe", "check", str(bad))
    assert code == 2
    assert err.startswith("slimfx: error: stages[1].prune.sparsty:")
    assert "did you mean 'sparsity'" in err


def test_run_writes_artifact_and_report(digits_run):
    code, out, err, folder = digits_run
    assert code == 0, err
    assert "pipeline: canonicalize,fold-bn" in out
    assert {"manifest.json", "model.safetensors", "report.json", "r.json"} <= {p.name for p in folder.iterdir()}
    report = json.loads((folder / "r.json").read_text())
    assert report == json.loads((folder / "report.json").read_text())
    assert report["model"] == "digits-mlp"
    assert report["recipe"]["name"] == "digits-prune-int8"
    assert report["pipeline"].endswith("calibrate{batches=8,progress=false},lower-int8")
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "fold-bn", "prune-channels", "quant-insert",
                                                    "calibrate", "lower-int8"]
    assert report["params_before"] == 9610
    assert report["state_bytes_after"] < report["state_bytes_before"] / 4
    assert 0 < report["max_output_error"] < 1
    assert 0 <= report["accuracy_before"] <= 100 and 0 <= report["accuracy_after"] <= 100
    assert [s["stage"] for s in report["stages"]] == ["input", "0:cleanup", "1:prune", "2:quant", "3:lower"]
    assert report["stages"][2]["params"] == 4810
    assert sum(r["bytes_before"] for r in report["layers"]) == report["state_bytes_before"]
    assert sum(r["bytes_after"] for r in report["layers"]) == report["state_bytes_after"]
    assert report["checks"] == []


def test_run_artifact_reloads(digits_run):
    import torch

    import slimfx
    from slimfx.zoo import get_model

    folder = digits_run[3]
    loaded = slimfx.load(str(folder), lambda: get_model("digits-mlp")[0])
    x = get_model("digits-mlp")[1][0]
    assert loaded(x).shape == torch.Size([x.shape[0], 10])


def test_report_prints_table_and_writes_pngs(capsys, digits_run):
    folder = digits_run[3]
    code, out, err = run(capsys, "report", str(folder))
    assert code == 0, err
    assert "prune-channels{sparsity=0.5,importance=l1}" in out
    assert "max output error" in out
    for name in ("layers.png", "stages.png"):
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_max_output_error_bound_fails_with_exit_1(capsys, tmp_path):
    code, out, err = run(capsys, "run", "digits-mlp", "--pipeline", "prune-channels{sparsity=0.5}",
                         "--out", str(tmp_path), "--max-output-error", "1e-12")
    assert code == 1
    assert "max output error" in err and "exceeds the limit --max-output-error 1e-12" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checks"][0]["ok"] is False and report["checks"][0]["value"] > 1e-12


def test_min_accuracy_bound_fails_with_exit_1(capsys, tmp_path):
    code, out, err = run(capsys, "run", "digits-mlp", "--pipeline", "fold-bn", "--out", str(tmp_path),
                         "--min-accuracy", "101", "--max-output-error", "1e-5")
    assert code == 1
    assert "accuracy" in err and "is below the limit --min-accuracy 101" in err
    assert "--max-output-error" not in err  # the exact pipeline meets that bound


def test_run_with_random_calibration(capsys, tmp_path):
    code, out, err = run(capsys, "run", "digits-cnn", "--pipeline",
                         "quant-insert,calibrate{batches=2,progress=false}", "--calib", "random",
                         "--out", str(tmp_path))
    assert code == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["passes"][-1]["stats"]["batches"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "fold-bm"], "did you mean 'fold-bn'"),
    (["--recipe", "missing.yaml"], "does not exist"),
    (["--pipeline", "fold-bn", "--min-accuracy", "50", "--input-shape", "1,3,8,8"], "--min-accuracy"),
])
def test_run_usage_errors_exit_2(capsys, tmp_path, argv, message):
    model = "digits-mlp" if "--input-shape" not in argv else "digits-cnn"
    code, out, err = run(capsys, "run", model, *argv, "--out", str(tmp_path))
    assert code == 2
    assert err.startswith("slimfx: error:") and message in err


KD_RECIPE = str(Path(__file__).resolve().parents[1] / "examples" / "recipes" / "digits-prune-kd.yaml")


def test_run_prune_kd_recipe_with_digits_training_data(capsys, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # training on a busy 2-core machine is several times faster with one thread
    try:
        code, out, err = run(capsys, "run", "digits-mlp", "--recipe", KD_RECIPE, "--train", "digits",
                             "--out", str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert out.startswith("pipeline: canonicalize,prune-channels{sparsity=0.5,importance=l1},distill{epochs=10,")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "prune-channels", "distill"]
    assert report["train"] == "digits" and report["teacher"] == "digits-mlp"
    distill = report["passes"][-1]
    assert distill["stats"]["epochs"] == 10 and distill["stats"]["examples"] == 1348
    assert distill["stats"]["loss_final"] < distill["stats"]["loss_first"]
    assert report["distill_epochs"] is None
    # the zoo's digits-mlp is untrained (~10%); the labelled half of the loss (alpha=0.5) teaches the student
    assert report["accuracy_after"] > report["accuracy_before"] + 30


@pytest.mark.parametrize("argv, message", [
    (["--recipe", KD_RECIPE], "the recipe has a distill pass, which fine-tunes on labelled data: add --train digits"),
    (["--pipeline", "distill"], "the pipeline has a distill pass"),
    (["--pipeline", "dce", "--teacher", "digits-mlp"], "--teacher is the model to distill from"),
    (["--pipeline", "dce", "--train", "digits", "--input-shape", "1,3,8,8"], "--train digits needs a model input"),
    (["--pipeline", "dce", "--train", "digits", "--teacher", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_run_distillation_usage_errors_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, "run", "digits-mlp", *argv, "--out", str(tmp_path))
    assert code == 2
    assert err.startswith("slimfx: error:") and message in err, err


def test_run_report_has_layer_rows_and_totals(capsys, digits_run):
    code, out, err, folder = digits_run
    assert code == 0, err
    report = json.loads((folder / "report.json").read_text())
    layers = {r["layer"]: r for r in report["layers"]}
    assert set(layers) == {"fc1", "fc2"}  # digits-mlp after fold-bn: two linears, no other state
    for r in layers.values():
        assert r["kind"] == "linear" and r["weight_bits"] == 7 and r["act_bits"] == 8  # the recipe's int7 weights
        assert r["kernel"].startswith("int8:")
    assert layers["fc1"]["params"] == 64 * 64 + 64 and layers["fc1"]["params_before"] == 64 * 128 + 128
    assert layers["fc1"]["sqnr_db"] is None and "channels were removed" in layers["fc1"]["sqnr_note"]
    assert isinstance(layers["fc2"]["sqnr_db"], float)
    totals = report["totals"]
    assert totals["bytes_on_disk_after"] == (folder / "model.safetensors").stat().st_size
    assert totals["macs_before"] == 4 * (64 * 128 + 128 * 10) and totals["macs_after"] == 4 * (64 * 64 + 64 * 10)
    assert totals["latency_ms_before"] > 0 and totals["latency_ms_after"] > 0
    assert f"MACs {totals['macs_before']:,} -> {totals['macs_after']:,}" in out
    assert report["stages"][0]["accuracy"] == report["accuracy_before"]
    assert report["stages"][-1]["accuracy"] == report["accuracy_after"]
    code, text, err = run(capsys, "report", str(folder))
    assert code == 0, err
    assert "SQNR dB" in text and "bytes on disk" in text and "int8:" in text
