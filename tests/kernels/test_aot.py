"""Ahead-of-time compile of the Triton kernels for sm_90a / sm_80 (no GPU needed).

The representative subset runs in the default suite (~1 min on 2 cores); the exhaustive check of every
kernel x config x target is marked slow (~4 min on 2 cores, still run in CI).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import triton

from slimfx.kernels import aot

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
needs_toolchain = pytest.mark.skipif(not PTXAS.exists() and shutil.which("ptxas") is None,
                                     reason="the triton wheel has no NVIDIA toolchain")


def _row(**kw) -> aot.AotRow:
    base = dict(kernel="k", config="c", config_index=0, target="sm_90a", registers=100, spill_bytes=0,
                shared_bytes=1024, tensor_core="wgmma", expected_tensor_core=("wgmma",), spill_checked=True)
    return aot.AotRow(**{**base, **kw})


def test_violations_name_each_broken_rule() -> None:
    assert aot.violations([_row()]) == []
    problems = aot.violations([
        _row(spill_bytes=8),
        _row(spill_bytes=8, spill_checked=False),
        _row(shared_bytes=228 * 1024),
        _row(target="sm_80", shared_bytes=164 * 1024, tensor_core="mma", expected_tensor_core=("mma",)),
        _row(tensor_core="mma"),
        _row(error="boom"),
    ])
    assert len(problems) == 5
    assert "spills 8 bytes" in problems[0]
    assert "shared memory" in problems[1] and "shared memory" in problems[2]
    assert "expected one of ('wgmma',)" in problems[3]
    assert "compile failed: boom" in problems[4]


def test_table_lists_every_column() -> None:
    table = aot.format_table([_row(kernel="int8_gemm[nk,fp16]", config="128x128x64 w4 s3")])
    header, line = table.splitlines()
    for column in ("kernel", "config", "target", "regs", "spills", "smem", "tensor core"):
        assert column in header
    assert "int8_gemm[nk,fp16]" in line and "wgmma" in line and "1.0" in line


def test_job_list_covers_every_variant_and_drops_ampere_spillers() -> None:
    jobs = aot.jobs()
    assert {name for name, _, _ in jobs} == {v.name for v in aot.VARIANTS}
    gemm = [(i, t) for name, i, t in jobs if name == "int8_gemm[nk,fp16]"]
    from slimfx.kernels.triton_int8_gemm import INT8_GEMM_CONFIGS, fits_ampere

    assert {i for i, t in gemm if t == "sm_90a"} == set(range(len(INT8_GEMM_CONFIGS)))
    ampere = {i for i, c in enumerate(INT8_GEMM_CONFIGS) if fits_ampere(c)}
    assert {i for i, t in gemm if t == "sm_80"} == ampere
    assert set(aot.QUICK) <= {(name, i) for name, i, _ in jobs}


def _check(rows: list[aot.AotRow], expected_jobs: list) -> None:
    assert sorted((r.kernel, r.config_index, r.target) for r in rows) == sorted(expected_jobs)
    problems = aot.violations(rows)
    assert not problems, "\n".join(problems) + "\n\n" + aot.format_table(rows)
    hopper_gemm = [r for r in rows if r.kernel == "int8_gemm[nk,fp16]" and r.target == "sm_90a"
                   and r.config.startswith("128x")]
    assert hopper_gemm and all(r.tensor_core == "wgmma" for r in hopper_gemm)


@needs_toolchain
def test_aot_representative_subset() -> None:
    _check(aot.run_aot(quick=True), aot.jobs(quick=True))


@needs_toolchain
@pytest.mark.slow
def test_aot_every_kernel_config_and_target() -> None:
    _check(aot.run_aot(), aot.jobs())
