"""The per-layer report (slimfx.frontend.layer_report) and its JSON, terminal and PNG renderings."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from slimfx.errors import SlimfxError
from slimfx.frontend.api import compress
from slimfx.frontend.layer_report import compare_layers, layer_report, sqnr_db
from slimfx.frontend.report import read_report, render, render_layers, write_plots, write_report
from slimfx.kernels import INT8_CANDIDATES, BlockSparseLinear


class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, groups=4)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(torch.relu(self.grouped(torch.relu(self.bn(self.conv(x))))))
        return self.head(y.flatten(1))


def _mlp() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return SmallMLP().eval(), (torch.randn(8, 64),)


def _cnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(2, 3, 9, 9),)


def _rows(original, compressed, inputs) -> dict[str, dict]:
    return {r.layer: r.as_dict() for r in compare_layers(original, compressed, inputs)}


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _calib(inputs: tuple) -> list[tuple]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(inputs[0].shape, generator=generator),) for _ in range(4)]


def test_sqnr_db_values():
    ref = torch.tensor([1.0, 1.0])
    assert sqnr_db(ref, torch.tensor([1.0, 0.0])) == pytest.approx(10 * math.log10(2))
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert math.isnan(sqnr_db(torch.zeros(2), torch.ones(2)))


def test_macs_counted_by_hand():
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    rows = _rows(model, copy.deepcopy(model), (torch.randn(1, 64),))
    assert rows["0"]["macs"] == 64 * 32 == 2048

    model, inputs = _cnn()
    rows = _rows(model, copy.deepcopy(model), inputs)
    # conv 3->8, 3x3, padding 1 on 9x9: 2 images x 8 channels x 81 outputs, each 3*3*3 MACs
    assert rows["conv"]["macs"] == 2 * 8 * 81 * 27
    # grouped 8->8 (4 groups), 3x3, stride 2 on 9x9 -> 4x4: each output reads 2 channels x 9 taps
    assert rows["grouped"]["macs"] == 2 * 8 * 16 * 18
    # transposed 8->6, 2x2, stride 2 on 4x4: every input element feeds 6 x 2 x 2 outputs
    assert rows["up"]["macs"] == 2 * 8 * 16 * 24
    assert rows["head"]["macs"] == 2 * 10 * 384
    assert [rows[n]["kind"] for n in ("conv", "grouped", "up", "head")] == ["conv", "conv", "conv_transpose",
                                                                          "linear"]


def test_plain_copy_is_exact_and_dense():
    model, inputs = _cnn()
    rows = _rows(model, copy.deepcopy(model), inputs)
    layers = [r for r in rows.values() if r["kind"] != "state"]
    assert len(layers) == 4
    for r in layers:
        assert r["sqnr_db"] == "inf" and r["sqnr_note"] == "identical outputs"
        assert r["sparsity"] == 0 and r["weight_bits"] == 32 and r["act_bits"] == 32
        assert r["kernel"] == "dense fp32"
        assert r["params"] == r["params_before"] and r["macs"] == r["macs_before"]
    assert rows["conv"]["params"] == 8 * 27 + 8
    assert rows["bn"]["kind"] == "state" and rows["bn"]["params"] == 16  # BN weight and bias; stats are buffers
    assert sum(r["bytes_before"] for r in rows.values()) == _state_bytes(model)


def test_pruned_layers_count_their_masks():
    model, inputs = _mlp()
    compressed = compress(model, "prune-magnitude{sparsity=0.5}", inputs)
    rows = _rows(model, compressed.program, inputs)
    for name in ("fc1", "fc2"):
        r = rows[name]
        assert r["sparsity"] == pytest.approx(0.5)
        assert r["kernel"] == "dense fp32 (masked)" and r["weight_bits"] == 32
        assert r["params"] == r["params_before"] == {"fc1": 64 * 32 + 32, "fc2": 32 * 16 + 16}[name]
        assert math.isfinite(r["sqnr_db"]) and r["sqnr_db"] < 30  # half the weights gone: far from exact
    assert sum(r["bytes_after"] for r in rows.values()) == _state_bytes(compressed.module)  # masks included
    assert rows["fc1"]["bytes_after"] == rows["fc1"]["bytes_before"] + 64 * 32  # one bool per weight


def test_fake_quant_bits_and_sqnr():
    model, inputs = _cnn()
    sqnr = {}
    for bits in (8, 4):
        pipeline = f"quant-insert{{weights=int{bits}-per-channel}},calibrate{{batches=4,progress=false}}"
        compressed = compress(model, pipeline, inputs, calib_data=_calib(inputs))
        rows = _rows(model, compressed.program, inputs)
        for name in ("conv", "head"):
            r = rows[name]
            assert (r["weight_bits"], r["act_bits"], r["kernel"]) == (bits, 8, "fake-quant (simulated)")
            assert isinstance(r["sqnr_db"], float) and math.isfinite(r["sqnr_db"])
            sqnr[bits, name] = r["sqnr_db"]
        assert sum(r["bytes_after"] for r in rows.values()) == _state_bytes(compressed.module)
    assert sqnr[8, "conv"] > 30 and sqnr[8, "head"] > 20
    assert sqnr[4, "conv"] < sqnr[8, "conv"] - 10  # 4-bit weights: over 10 dB more noise than 8-bit


@pytest.mark.parametrize("weight_bits", [8, 7])
def test_int8_lowered_rows_name_the_kernel(weight_bits):
    model, inputs = _mlp()
    pipeline = f"quant-insert{{weights=int{weight_bits}-per-channel}},calibrate{{batches=4,progress=false}},lower-int8"
    compressed = compress(model, pipeline, inputs, calib_data=_calib(inputs))
    rows = _rows(model, compressed.program, inputs)
    assert [r for r in rows if rows[r]["kind"] != "state"] == ["fc1", "fc2"]  # names of the original modules
    for r in (rows["fc1"], rows["fc2"]):
        family, _, name = r["kernel"].partition(":")
        assert family == "int8" and name in INT8_CANDIDATES
        assert r["weight_bits"] == weight_bits and r["act_bits"] == 8  # 7-bit codes are stored in int8
        assert r["params"] == r["params_before"]
        assert r["bytes_after"] < r["bytes_before"] / 3
        assert isinstance(r["sqnr_db"], float) and r["sqnr_db"] > 25


def test_block_sparse_module_reports_zero_blocks():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(64, 64)).eval()
    pruned = copy.deepcopy(original)
    with torch.no_grad():
        pruned[0].weight[:32, :32] = 0  # 4 of the 16 16x16 blocks
    compressed = nn.Sequential(BlockSparseLinear.from_dense(pruned[0], block=(16, 16))).eval()
    r = _rows(original, compressed, (torch.randn(4, 64),))["0"]
    assert r["sparsity"] == pytest.approx(0.25)
    assert r["kernel"].startswith("bsr:") and r["weight_bits"] == 32
    assert r["params"] == 64 * 64 + 64 and r["macs"] == 4 * 64 * 64


def test_folded_batch_norm_compared_after_the_norm():
    model, inputs = _cnn()
    compressed = compress(model, "fold-bn", inputs)
    r = _rows(model, compressed.program, inputs)["conv"]
    assert r["sqnr_db"] == "inf" or r["sqnr_db"] > 100
    assert "bn" in r["sqnr_note"] and "folded" in r["sqnr_note"]


def test_removed_channels_have_no_sqnr():
    model, inputs = _mlp()
    compressed = compress(model, "prune-channels{sparsity=0.5}", inputs)
    rows = _rows(model, compressed.program, inputs)
    assert rows["fc1"]["sqnr_db"] is None and "channels were removed" in rows["fc1"]["sqnr_note"]
    assert rows["fc1"]["params"] == 64 * 16 + 16 and rows["fc1"]["params_before"] == 64 * 32 + 32
    assert rows["fc1"]["macs"] == rows["fc1"]["macs_before"] // 2
    assert isinstance(rows["fc2"]["sqnr_db"], float)  # its outputs are all still there


def test_totals_use_the_artifact_and_survive_json(tmp_path):
    from slimfx.export.artifact import save

    model, inputs = _mlp()
    compressed = compress(model, "prune-channels{sparsity=0.5}", inputs)
    save(compressed, str(tmp_path))
    report = layer_report(model, compressed.program, inputs, artifact=str(tmp_path), repeats=2)
    totals = report["totals"]
    assert totals["bytes_on_disk_after"] == (tmp_path / "model.safetensors").stat().st_size
    assert totals["bytes_on_disk_before"] > 1.8 * totals["bytes_on_disk_after"]
    assert totals["params_before"] == 64 * 32 + 32 + 32 * 16 + 16
    assert totals["macs_before"] == 8 * (64 * 32 + 32 * 16) and totals["macs_after"] == totals["macs_before"] // 2
    assert totals["latency_ms_before"] > 0 and totals["latency_ms_after"] > 0
    assert totals["latency_input"] == [8, 64]
    text = json.dumps(report, allow_nan=False)  # strict JSON: "inf" is a string, n/a is null
    path = write_report(report, str(tmp_path / "report.json"))
    assert read_report(path) == json.loads(text)
    with pytest.raises(SlimfxError, match="model.safetensors is missing"):
        layer_report(model, compressed.program, inputs, artifact=str(tmp_path / "nowhere"))


def test_render_has_the_columns_and_totals():
    model, inputs = _cnn()
    report = layer_report(model, copy.deepcopy(model), inputs, repeats=1)
    text = render({"model": "small-cnn", "pipeline": "", **report})
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    for column in ("kind", "params", "sparsity", "bits w/a", "kernel", "MACs", "SQNR dB", "bytes before",
                   "bytes after"):
        assert column in header
    for label in ("bytes on disk", "MACs", "CPU latency (ms)"):
        assert any(line.startswith(label) for line in text.splitlines())
    assert "conv_transpose" in text and "inf" in text
    pruned = render_layers([{"layer": "fc1", "kind": "linear", "sqnr_db": None, "sqnr_note": "channels gone"}])
    assert "n/a" in pruned and "fc1: channels gone" in pruned


def test_plots_are_png_files(tmp_path):
    model, inputs = _mlp()
    compressed = compress(model, "prune-magnitude{sparsity=0.5}", inputs)
    report = layer_report(model, compressed.program, inputs, repeats=1)
    report["stages"] = [{"stage": "input", "params": 2600, "bytes": 10400, "accuracy": 90.0},
                        {"stage": "prune", "params": 2600, "bytes": 6000, "accuracy": 88.5}]
    written = write_plots(report, str(tmp_path))
    assert written == [str(tmp_path / "layers.png"), str(tmp_path / "stages.png")]
    for path in written:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert write_plots({"layers": [], "stages": []}, str(tmp_path / "empty")) == []
