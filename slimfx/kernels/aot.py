"""Ahead-of-time GPU checks of every Triton kernel config, without a GPU.

For each kernel variant x autotune config x target (sm_90a, sm_80) this compiles the kernel with
``triton.compile(ASTSource(...), target=GPUTarget(...))``, assembles its PTX with the
``ptxas-blackwell`` shipped in the Triton wheel (``-v`` reports registers and spills; the older bundled
``ptxas`` rejects some PTX versions Triton 3.9 emits), reads the shared memory from the compiled
metadata and looks for tensor-core instructions in the PTX (``wgmma.mma_async`` / ``mma.sync``).

``@triton.jit`` functions are interpreter objects under ``TRITON_INTERPRET=1`` (how the tests run), so
:func:`run_aot` compiles in a child process (``python -m slimfx.kernels.aot --json``) whose
environment has ``TRITON_INTERPRET`` removed, and parses the JSON rows it prints.

sm_80 is compiled with the int8 GEMM configs the runtime autotuner keeps on Ampere
(:func:`slimfx.kernels.triton_int8_gemm.fits_ampere`): tiles whose int32 accumulator needs more than 64
registers per thread (128x128 with 4 warps, 128x256 / 256x128 with 8) are Hopper-only; with mma.sync
ptxas spills them by kilobytes.

Rules (:func:`violations`): no compile errors; no spills (on sm_90a for every variant, on sm_80 for the
variants slimfx's layers run: the "kn" GEMM is informational there, since int8 mma.sync needs its B tiles
transposed through registers and a 64x128 tile spills ~200 B); shared memory within the target's
per-block limit; a GEMM/BSR config with tensor-core-sized tiles (BLOCK_M >= 64) uses wgmma on sm_90a
and every half-precision/int8 one uses mma on sm_80 (smaller tiles on sm_90a may use mma: a warpgroup
MMA is at least 64 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

#: Targets: name -> (compute capability, shared memory a block may use, in bytes).
TARGETS: dict[str, tuple[int, int]] = {"sm_90a": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
#: Tensor-core instruction names as they appear in the PTX, best first.
TENSOR_CORE_PATTERNS = (("wgmma", re.compile(r"\bwgmma\.mma_async")), ("mma", re.compile(r"\bmma\.sync")))


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel to compile: fixed dtypes, layout and epilogue flags.

    ``types`` gives the Triton type of each non-constexpr argument (default ``i32``); ``constants``
    the constexpr arguments besides the config's own; ``aligned`` the arguments the JIT would see as
    divisible by 16 (pointers from the caching allocator, leading strides of typical shapes).
    ``tensor_core`` maps a target to the instructions a config must contain there; ``spill_checked`` the
    targets where a spill is a violation (elsewhere it is only reported).
    """

    name: str
    module: str
    kernel: str
    configs: str
    types: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, object], ...]
    aligned: tuple[str, ...]
    tensor_core: tuple[tuple[str, tuple[str, ...]], ...] = ()
    spill_checked: tuple[str, ...] = ("sm_90a", "sm_80")


_GEMM_PTRS = (("a_ptr", "*i8"), ("b_ptr", "*i8"), ("out_ptr", "*fp16"), ("row_scale_ptr", "*fp32"),
              ("col_scale_ptr", "*fp32"), ("bias_ptr", "*fp16"))
_GEMM_FLAGS = (("HAS_ROW_SCALE", True), ("HAS_COL_SCALE", True), ("HAS_BIAS", True), ("OUT_KIND", 1))
_GEMM_ALIGNED = ("a_ptr", "b_ptr", "out_ptr", "row_scale_ptr", "col_scale_ptr", "bias_ptr", "N", "K",
                 "stride_am", "stride_bk", "stride_bn", "stride_om")
_TC = (("sm_90a", ("wgmma",)), ("sm_80", ("mma",)))


def _bsr(dtype: str, block: int, tc: tuple) -> Variant:
    types = (("x_ptr", f"*{dtype}"), ("crow_ptr", "*i32"), ("col_ptr", "*i32"), ("values_ptr", f"*{dtype}"),
             ("bias_ptr", f"*{dtype}"), ("out_ptr", f"*{dtype}"))
    consts = (("stride_xk", 1), ("stride_vw", 1), ("stride_on", 1), ("HAS_BIAS", True), ("BH", block),
              ("BW", block), ("FP32_IEEE", dtype == "fp32"), ("DOT_IN_FP32", False))
    aligned = ("x_ptr", "values_ptr", "bias_ptr", "out_ptr", "N", "stride_xm", "stride_vb", "stride_vh",
               "stride_om")
    return Variant(f"bsr_linear[{dtype},b{block}]", "slimfx.kernels.triton_bsr", "bsr_linear_kernel",
                   "BSR_CONFIGS", types, consts, aligned, tc)


#: Every kernel specialisation the checks compile. int8_gemm[nk] is the W8A8 Linear (weight [N, K]).
VARIANTS: tuple[Variant, ...] = (
    Variant("int8_gemm[nk,fp16]", "slimfx.kernels.triton_int8_gemm", "int8_gemm_kernel", "INT8_GEMM_CONFIGS",
            _GEMM_PTRS, (("stride_ak", 1), ("stride_bk", 1), ("stride_on", 1), *_GEMM_FLAGS),
            _GEMM_ALIGNED, _TC),
    Variant("int8_gemm[kn,fp16]", "slimfx.kernels.triton_int8_gemm", "int8_gemm_kernel", "INT8_GEMM_CONFIGS",
            _GEMM_PTRS, (("stride_ak", 1), ("stride_bn", 1), ("stride_on", 1), *_GEMM_FLAGS),
            _GEMM_ALIGNED, _TC, spill_checked=("sm_90a",)),
    Variant("quantize_per_token[fp16]", "slimfx.kernels.triton_quant", "quantize_per_token_kernel",
            "QUANT_CONFIGS", (("x_ptr", "*fp16"), ("q_ptr", "*i8"), ("scale_ptr", "*fp32")),
            (("stride_xk", 1), ("stride_qk", 1)),
            ("x_ptr", "q_ptr", "scale_ptr", "K", "stride_xm", "stride_qm")),
    _bsr("fp16", 32, _TC),
    _bsr("bf16", 64, _TC),
    _bsr("fp16", 16, _TC),
    _bsr("fp32", 32, ()),
)
#: The representative subset the fast test compiles: (variant, config index).
QUICK: tuple[tuple[str, int], ...] = (
    ("int8_gemm[nk,fp16]", 0), ("int8_gemm[nk,fp16]", 2), ("int8_gemm[nk,fp16]", 8),
    ("quantize_per_token[fp16]", 0), ("bsr_linear[fp16,b32]", 0),
)


@dataclass(frozen=True)
class AotRow:
    """The compile result of one (variant, config, target). ``error`` is set when compilation failed."""

    kernel: str
    config: str
    config_index: int
    target: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_core: str
    expected_tensor_core: tuple[str, ...]
    spill_checked: bool
    error: str | None = None


def config_label(cfg) -> str:
    """A short name for a triton.Config: its constexprs then warps and stages."""
    kw = cfg.kwargs
    if {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= kw.keys():
        tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
    else:
        tile = "x".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in kw.items() if k.startswith("BLOCK_"))
    return f"{tile} w{cfg.num_warps} s{cfg.num_stages}"


def fits_sm80(cfg) -> bool:
    """Whether a config is compiled for sm_80: the int8 GEMM's Ampere filter; other kernels always."""
    if "BLOCK_N" not in cfg.kwargs:
        return True
    from slimfx.kernels.triton_int8_gemm import fits_ampere

    return fits_ampere(cfg)


def _load(variant: Variant):
    import importlib

    module = importlib.import_module(variant.module)
    return getattr(module, variant.kernel), getattr(module, variant.configs)


def jobs(quick: bool = False) -> list[tuple[str, int, str]]:
    """The (variant name, config index, target) triples to compile; ``quick`` = the :data:`QUICK` subset."""
    out = []
    for variant in VARIANTS:
        _, configs = _load(variant)
        for i, cfg in enumerate(configs):
            if quick and (variant.name, i) not in QUICK:
                continue
            out.extend((variant.name, i, t) for t in TARGETS if t != "sm_80" or fits_sm80(cfg))
    return out


def _tensor_core(ptx: str) -> str:
    for name, pattern in TENSOR_CORE_PATTERNS:
        if pattern.search(ptx):
            return name
    return "none"


def _ptxas_usage(ptx: str, target: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) reported by ``ptxas-blackwell -v`` for the PTX."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        # Same register-allocator flag Triton itself passes (a ptxas 13.x workaround).
        cmd = [str(ptxas), "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", str(src),
               "-o", str(Path(tmp) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_job(job: tuple[str, int, str]) -> AotRow:
    """Compile one (variant, config index, target) in this process (needs TRITON_INTERPRET unset)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, index, target = job
    variant = next(v for v in VARIANTS if v.name == name)
    kernel, configs = _load(variant)
    cfg = configs[index]
    expected = dict(variant.tensor_core).get(target, ())
    if target == "sm_90a" and expected and cfg.kwargs.get("BLOCK_M", 0) < 64:
        expected = ("wgmma", "mma")
    base = dict(kernel=name, config=config_label(cfg), config_index=index, target=target,
                expected_tensor_core=expected, spill_checked=target in variant.spill_checked)
    constants = {**dict(variant.constants), **cfg.kwargs}
    types = dict(variant.types)
    signature = {a: "constexpr" if a in constants else types.get(a, "i32") for a in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if a in variant.aligned}
    capability, _ = TARGETS[target]
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True),
        )
        ptx = compiled.asm["ptx"]
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        registers, spills = _ptxas_usage(ptx, target)
    except Exception as e:  # a failed compile is a reported row, not a crash of the whole table
        return AotRow(**base, registers=-1, spill_bytes=-1, shared_bytes=-1, tensor_core="none",
                      error=f"{type(e).__name__}: {e}"[:500])
    return AotRow(**base, registers=registers, spill_bytes=spills, shared_bytes=int(compiled.metadata.shared),
                  tensor_core=_tensor_core(ptx))


def compile_all(job_list: Sequence[tuple[str, int, str]], workers: int | None = None) -> list[AotRow]:
    """Compile jobs in parallel processes of this interpreter (TRITON_INTERPRET must be unset)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset; use run_aot() from interpreted code")
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(job_list) <= 1:
        return [compile_job(j) for j in job_list]
    # spawn: fresh interpreters, so no process inherits triton/LLVM state mid-compilation.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(compile_job, job_list))


def run_aot(quick: bool = False, workers: int | None = None, timeout: float = 900) -> list[AotRow]:
    """Compile in a child process with ``TRITON_INTERPRET`` removed and return its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "slimfx.kernels.aot", "--json"]
    cmd += ["--quick"] if quick else []
    cmd += [f"--workers={workers}"] if workers else []
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [AotRow(**{**r, "expected_tensor_core": tuple(r["expected_tensor_core"])})
            for r in json.loads(proc.stdout)]


def violations(rows: Sequence[AotRow]) -> list[str]:
    """Every broken rule: compile errors, spills, shared memory over the limit, missing tensor cores."""
    problems = []
    for r in rows:
        where = f"{r.kernel} {r.config} on {r.target}"
        if r.error:
            problems.append(f"{where}: compile failed: {r.error}")
            continue
        if r.spill_bytes > 0 and r.spill_checked:
            problems.append(f"{where}: spills {r.spill_bytes} bytes ({r.registers} registers)")
        limit = TARGETS[r.target][1]
        if r.shared_bytes > limit:
            problems.append(f"{where}: shared memory {r.shared_bytes} B > {limit} B per block")
        if r.expected_tensor_core and r.tensor_core not in r.expected_tensor_core:
            problems.append(f"{where}: PTX uses {r.tensor_core!r}, expected one of {r.expected_tensor_core}")
    return problems


def format_table(rows: Sequence[AotRow]) -> str:
    """Rows as an aligned text table."""
    header = ("kernel", "config", "target", "regs", "spills B", "smem KiB", "tensor core", "expected")
    lines = [header] + [
        (r.kernel, r.config, r.target, str(r.registers),
         f"{r.spill_bytes}{'' if r.spill_checked else ' (info)'}",
         f"{r.shared_bytes / 1024:.1f}" if r.shared_bytes >= 0 else "-",
         r.tensor_core if not r.error else "ERROR", "/".join(r.expected_tensor_core) or "-")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="AOT-compile every slimfx Triton kernel config.")
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.add_argument("--quick", action="store_true", help="compile only the representative subset")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: cores)")
    args = parser.parse_args(argv)
    rows = compile_all(jobs(args.quick), args.workers)
    print(json.dumps([asdict(r) for r in rows]) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
