"""The `slimfx` command, run in-process through cli.main (and once as the installed console script)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slimfx.frontend.cli import main
from slimfx.passes.base import list_passes
from slimfx.zoo import get_model

MODEL_FILE = textwrap.dedent(
    """
    import torch
    import torch.nn as nn


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


    def with_inputs():
        return Tiny().eval(), torch.randn(2, 3, 8, 8)


    def bare():
        return Tiny().eval()


    def not_a_model():
        return 42
    """
)
TINY_PARAMS = (6 * 3 * 9 + 6) + (6 + 6) + (6 * 4 + 4)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(out: str) -> dict[str, list[str]]:
    """The per-layer table (after the header line 'node  kind ...'): first column -> the other columns."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^node\s+kind\s+target\s+params\s+output", line))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def as_int(text: str) -> int:
    return int(text.replace(",", ""))


def ir_kinds(out: str) -> list[str]:
    """The kind column of every IR line ('  %name  kind  shape  call')."""
    return [line.split()[1] for line in out.splitlines() if line.startswith("  %")]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_model.py"
    path.write_text(MODEL_FILE)
    return path


# ---------------------------------------------------------------- passes


def test_passes_lists_every_pass_with_contract_and_options(capsys):
    code, out, err = run(capsys, "passes")
    assert code == 0 and not err
    assert re.search(r"^fold-bn  \[exact\]  \S", out, flags=re.M)
    assert "    strict: bool = False" in out
    for cls in list_passes():
        assert re.search(rf"^{re.escape(cls.name)}  \[{cls.contract.value}\]  ", out, flags=re.M), cls.name
        for f in dataclasses.fields(cls.Options):
            assert re.search(rf"^    {f.name}: .+ = ", out, flags=re.M), f"{cls.name}.{f.name}"
        if cls.summary():
            assert cls.summary() in out


# ---------------------------------------------------------------- inspect


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_inspect_zoo_model_prints_ir_and_a_layer_table_with_the_parameter_total(capsys, frontend):
    code, out, err = run(capsys, "inspect", "digits-cnn", "--frontend", frontend)
    assert code == 0, err
    model, _ = get_model("digits-cnn")
    n_params = sum(p.numel() for p in model.parameters())
    assert out.startswith(f"program dialect={'torch' if frontend == 'fx' else 'aten'} ")
    assert f"params={n_params:,}" in out.splitlines()[0]
    assert {"input", "conv", "batch_norm", "linear", "output"} <= set(ir_kinds(out))
    rows = table_rows(out)
    assert as_int(rows["total"][0]) == n_params
    layer_params = [as_int(cells[2]) for name, cells in rows.items() if name != "total"]
    assert sum(layer_params) == n_params  # no shared parameters: the rows add up to the total
    assert any(cells[0] == "linear" and cells[-1] == "[4, 10] float32" for cells in rows.values())


def test_inspect_python_file_factory(capsys, model_file):
    code, out, err = run(capsys, "inspect", f"{model_file}:with_inputs")
    assert code == 0, err
    assert as_int(table_rows(out)["total"][0]) == TINY_PARAMS
    assert "[2, 3, 8, 8] float32" in out


def test_inspect_module_path_factory(capsys, monkeypatch, model_file):
    monkeypatch.syspath_prepend(str(model_file.parent))
    code, out, err = run(capsys, "inspect", "tiny_model:with_inputs", "--frontend", "export")
    assert code == 0, err
    assert out.startswith("program dialect=aten")
    assert as_int(table_rows(out)["total"][0]) == TINY_PARAMS


@pytest.mark.parametrize("shape", ["3,3,10,10", "3x3x10x10"])
def test_inspect_bare_module_factory_with_input_shape(capsys, model_file, shape):
    code, out, err = run(capsys, "inspect", f"{model_file}:bare", "--input-shape", shape)
    assert code == 0, err
    assert "[3, 3, 10, 10] float32" in out and "[3, 4] float32" in out


def test_inspect_package_factory_that_is_a_class(capsys):
    code, out, err = run(capsys, "inspect", "slimfx.zoo:DigitsMLP", "--input-shape", "5,64")
    assert code == 0, err
    rows = table_rows(out)
    assert as_int(rows["total"][0]) == 64 * 128 + 128 + 128 * 10 + 10
    assert rows["fc2"][-1] == "[5, 10] float32"


def test_inspect_pipeline_removes_batch_norm(capsys):
    code, out, err = run(capsys, "inspect", "digits-cnn", "--pipeline", "fold-bn,dce")
    assert code == 0, err
    kinds = ir_kinds(out)
    assert "batch_norm" not in kinds and "conv" in kinds
    assert "  pipeline: fold-bn,dce" in out
    rows = table_rows(out)
    assert all(cells[0] != "batch_norm" for cells in rows.values())
    model, _ = get_model("digits-cnn")
    bn_params = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                    for p in m.parameters())
    folded_biases = 16 + 32 + 32 + 32  # each bias-free conv gains a bias from its BN
    total = sum(p.numel() for p in model.parameters()) - bn_params + folded_biases
    assert as_int(rows["total"][0]) == total


def test_inspect_dot_writes_a_graphviz_file(capsys, tmp_path):
    dot = tmp_path / "out.dot"
    code, out, err = run(capsys, "inspect", "digits-mlp", "--dot", str(dot))
    assert code == 0, err
    assert f"wrote {dot}" in out
    text = dot.read_text()
    assert text.startswith("digraph")
    assert '"fc1" -> "act";' in text and '"act" -> "fc2";' in text


def test_demo_trains_distills_prunes_quantizes_and_reports(capsys, tmp_path):
    import json

    code, out, err = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 0, err
    stages = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in stages] == ["teacher", "distilled student", "pruned 50% + KD", "int8 (lowered)",
                                            "reloaded artifact"]
    assert all(s["accuracy"] > 90 for s in stages)
    assert stages[-1]["accuracy"] == stages[-2]["accuracy"] and (tmp_path / "artifact" / "manifest.json").is_file()
    sizes = [s["bytes_on_disk"] for s in stages[:-1]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.25 * sizes[0]
    assert stages[-1]["accuracy"] >= stages[0]["accuracy"] - 3.0
    assert "pruned 50% + KD" in out and (tmp_path / "teacher.safetensors").is_file()


# ---------------------------------------------------------------- errors: exit code 2 and a clear message


def test_unknown_zoo_name_suggests_the_closest(capsys):
    code, out, err = run(capsys, "inspect", "digits-cnm")
    assert code == 2 and not out
    assert err.startswith("slimfx: error: ")
    assert "did you mean 'digits-cnn'?" in err


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", f"{tmp_path}/nope.py:make")
    assert code == 2
    assert "does not exist" in err and "nope.py" in err


def test_bare_module_without_input_shape_asks_for_it(capsys, model_file):
    code, out, err = run(capsys, "inspect", f"{model_file}:bare")
    assert code == 2 and not out
    assert "--input-shape" in err


@pytest.mark.parametrize("factory, message", [
    ("not_a_model", "returned int"),
    ("missing", "has no callable 'missing'"),
])
def test_bad_factories_are_named(capsys, model_file, factory, message):
    code, _, err = run(capsys, "inspect", f"{model_file}:{factory}")
    assert code == 2 and message in err


def test_unimportable_module(capsys):
    code, _, err = run(capsys, "inspect", "no_such_package_for_slimfx:make")
    assert code == 2 and "cannot import module 'no_such_package_for_slimfx'" in err


def test_unknown_pass_in_pipeline(capsys):
    code, _, err = run(capsys, "inspect", "digits-mlp", "--pipeline", "fold-bm")
    assert code == 2 and "fold-bn" in err


def test_malformed_input_shape_is_an_argparse_error(capsys, model_file):
    with pytest.raises(SystemExit) as info:
        main(["inspect", f"{model_file}:bare", "--input-shape", "1,a"])
    assert info.value.code == 2
    assert "--input-shape expects integers" in capsys.readouterr().err


# ---------------------------------------------------------------- the installed command


def test_console_script_runs():
    script = Path(sys.executable).with_name("slimfx")
    cmd = [str(script), "passes"] if script.exists() else [sys.executable, "-m", "slimfx.frontend.cli", "passes"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fold-bn  [exact]" in result.stdout
