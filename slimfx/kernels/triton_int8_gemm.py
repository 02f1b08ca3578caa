"""int8 x int8 -> int32 GEMM in Triton with a fused epilogue (row/column scales, bias, output dtype).

Computes what :func:`slimfx.kernels.reference.int8_gemm_ref` specifies. The kernel takes arbitrary
strides for every operand, so transposed or sliced views need no copy; the "nk"/"kn" layout of ``b``
is only a choice of which stride walks K. Ragged edges (any M, N, K >= 1) are masked.

On CUDA tensors the kernel is autotuned over :data:`INT8_GEMM_CONFIGS`, keyed on power-of-two buckets
of M, N and K (so a new batch size within a bucket does not re-tune). Under ``TRITON_INTERPRET=1``
(CPU tensors, used by the tests) autotuning is skipped - the interpreter cannot time anything - and
one config (:data:`INTERPRETER_CONFIG`, or the ``config`` argument) is launched directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.errors import KernelError
from slimfx.kernels.reference import check_int8_gemm_args


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


#: Hopper-sized tiles (wgmma wants >= 64 rows per warpgroup; 128x256 fills 4 warpgroups' registers)
#: first, then smaller generic tiles for skinny problems (decode: M of 1..16) and for sm_80.
#: Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K bytes, so every config fits sm_80's 163 KiB.
INT8_GEMM_CONFIGS: list[triton.Config] = [
    _config(128, 128, 64, 4, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 256, 64, 8, 3),
    _config(128, 256, 64, 8, 4),
    _config(256, 128, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(16, 64, 128, 4, 4),
]
#: The config launched under the Triton interpreter (small tiles keep the emulation fast).
INTERPRETER_CONFIG = _config(32, 32, 32, 4, 1)

_OUT_KIND = {None: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


@triton.jit
def int8_gemm_kernel(
    a_ptr, b_ptr, out_ptr, row_scale_ptr, col_scale_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    M_BUCKET, N_BUCKET, K_BUCKET,
    HAS_ROW_SCALE: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[m, n] = epilogue(sum_k a[m, k] * b[k, n]); OUT_KIND 0 stores the raw int32 accumulator."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles share each column-tile of b while it is hot in L2.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols are clamped to a valid index (and never stored) instead of masked, so the
    # only mask in the K loop is the K tail: keeps the loads vectorisable.
    safe_m = tl.where(offs_m < M, offs_m, 0)
    safe_n = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + safe_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + safe_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT_KIND == 0:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        # Same order as the reference: ((acc * row) * col) + bias, all in fp32.
        y = acc.to(tl.float32)
        if HAS_ROW_SCALE:
            y = y * tl.load(row_scale_ptr + safe_m)[:, None]
        if HAS_COL_SCALE:
            y = y * tl.load(col_scale_ptr + safe_n)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(n)


def fits_ampere(cfg: triton.Config) -> bool:
    """Whether a config is used before Hopper: its int32 accumulator needs <= 64 registers per thread.

    Without wgmma the accumulator of a 128x256 (8 warps) or 128x128 (4 warps) tile, 128 registers per
    thread, plus the mma.sync operands exceed 255 registers and ptxas spills heavily (see aot.py).
    """
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps) <= 64


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles that spill on this GPU, and tiles far larger than the problem (a 4-token decode step)."""
    M, N, a = named_args["M"], named_args["N"], named_args["a_ptr"]
    if torch.cuda.get_device_capability(a.device)[0] < 9:
        configs = [c for c in configs if fits_ampere(c)] or configs
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * _bucket(M))
               and c.kwargs["BLOCK_N"] <= max(64, 2 * _bucket(N))]
    return fitting or configs


int8_gemm_autotuned = triton.autotune(
    configs=INT8_GEMM_CONFIGS, key=["M_BUCKET", "N_BUCKET", "K_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(int8_gemm_kernel)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def runnable_device() -> str | None:
    """Where the Triton kernels can run now: "cpu" under the interpreter, "cuda" on a GPU, else None."""
    if interpreting():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter; all on one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise KernelError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type != "cuda" and not interpreting():
        raise KernelError(f"{op}: the Triton kernel needs CUDA tensors (got {device}); on CPU use the "
                          f"reference / CPU kernels, or set TRITON_INTERPRET=1 before importing triton")


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    b_layout: str = "nk",
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Triton int8 GEMM; same contract as :func:`slimfx.kernels.reference.int8_gemm_ref`.

    ``a`` int8 [M, K], ``b`` int8 [N, K] ("nk") or [K, N] ("kn"), any strides. Returns int32 [M, N]
    when ``out_dtype`` is None, else the fused epilogue in ``out_dtype``. ``config`` forces one tile
    config (skipping autotuning); the accumulator is int32 and wraps if K * 127 * 128 overflows it.
    """
    M, N, K = check_int8_gemm_args(a, b, b_layout, row_scale, col_scale, bias, out_dtype)
    check_device("int8_gemm", a, b, row_scale, col_scale, bias)
    if b_layout == "nk":
        stride_bk, stride_bn = b.stride(1), b.stride(0)
    else:
        stride_bk, stride_bn = b.stride(0), b.stride(1)
    out = torch.empty(M, N, device=a.device, dtype=torch.int32 if out_dtype is None else out_dtype)
    # Unused pointers are passed as `a` (never dereferenced: their HAS_* flag is False).
    args = (a, b, out, a if row_scale is None else row_scale, a if col_scale is None else col_scale,
            a if bias is None else bias, M, N, K, a.stride(0), a.stride(1), stride_bk, stride_bn,
            out.stride(0), out.stride(1), _bucket(M), _bucket(N), _bucket(K))
    flags = dict(HAS_ROW_SCALE=row_scale is not None, HAS_COL_SCALE=col_scale is not None,
                 HAS_BIAS=bias is not None, OUT_KIND=_OUT_KIND[out_dtype])

    if config is None and not interpreting():
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        int8_gemm_autotuned[grid](*args, **flags)
        return out
    cfg = config or INTERPRETER_CONFIG
    grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
    int8_gemm_kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
