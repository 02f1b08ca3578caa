"""bench/kernels.py's CPU int8 table runs end to end on a tiny shape and reports the target as fastest vs fastest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import kernels as bench_kernels  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_kernel_cache")  # tests/conftest.py


def test_target_rows_compare_the_fastest_slimfx_mode_with_the_fastest_peer():
    rows = [["8x16x4", "slimfx a [dense]", 2.0, 1.0, 0.01], ["8x16x4", "slimfx b [onednn]", 1.0, 2.0, 0.02],
            ["8x16x4", "torch.ao dynamic", 1.5, 1.3, 0.03], ["8x16x4", "onnxruntime int8", 0.8, 2.5, 0.1],
            ["8x16x4", "fp32 nn.Linear", 2.0, 1.0, 0.0]]
    (row,) = bench_kernels.int8_target_rows(rows)
    assert row[:2] == ["8x16x4", "slimfx b [onednn]"] and row[4] == "onnxruntime int8"
    assert row[-1] == pytest.approx(0.8)


def test_cpu_int8_table_runs_on_a_tiny_shape():
    text = bench_kernels.bench_cpu_int8([(4, 16, 8)], budget_s=0.01)
    assert "| 4x16x8 | slimfx dynamic_per_tensor 8-bit codes, 7-bit weights [" in text
    assert "fp32 nn.Linear" in text and "The target, fastest against fastest" in text
