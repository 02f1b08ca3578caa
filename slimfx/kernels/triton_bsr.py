"""Block-sparse linear ``y = x @ W.T (+ bias)`` in Triton for a BSR weight, skipping zero blocks.

One program computes a ``[BLOCK_M, bh]`` tile of ``y``: the rows ``BLOCK_M`` of ``x`` times one
row-block of ``W``, looping only over that row-block's stored blocks (``crow``/``col`` indices), so the
work is proportional to the density. Accumulation is fp32. fp32 inputs use IEEE fp32 products
(``input_precision="ieee"``) rather than TF32, so results stay within fp32 summation-order error of
:func:`slimfx.kernels.reference.bsr_linear_ref`; fp16/bf16 use the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.errors import KernelError
from slimfx.kernels.bsr import BSRWeight
from slimfx.kernels.reference import flatten_activation
from slimfx.kernels.triton_int8_gemm import check_device, interpreting

#: Block sizes (bh and bw) the kernel supports; tl.dot needs every dimension >= 16.
SUPPORTED_BLOCKS = (16, 32, 64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(bm: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


#: Only the token tile is tuned; the weight tile is the BSR block itself.
BSR_CONFIGS: list[triton.Config] = [
    _config(128, 8, 3),
    _config(128, 4, 3),
    _config(64, 4, 3),
    _config(32, 4, 2),
    _config(16, 4, 2),
]
#: The config launched under the Triton interpreter.
INTERPRETER_CONFIG = _config(64, 4, 1)


@triton.jit
def bsr_linear_kernel(
    x_ptr, crow_ptr, col_ptr, values_ptr, bias_ptr, out_ptr,
    M, N,
    stride_xm, stride_xk, stride_vb, stride_vh, stride_vw, stride_om, stride_on,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    FP32_IEEE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[m-tile, row-block r] = sum over stored blocks j of row-block r: x[m-tile, col_j] @ values[j].T."""
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BH)
    offs_w = tl.arange(0, BW)
    # Rows past M are clamped (never stored) so the block loads carry no mask.
    safe_m = tl.where(offs_m < M, offs_m, 0)
    start = tl.load(crow_ptr + r)
    end = tl.load(crow_ptr + r + 1)
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    for j in range(start, end):
        c = tl.load(col_ptr + j)
        x = tl.load(x_ptr + safe_m[:, None] * stride_xm + (c * BW + offs_w)[None, :] * stride_xk)
        # Loaded as [BW, BH] (the block transposed) so the dot is x [BLOCK_M, BW] @ [BW, BH].
        wt = tl.load(values_ptr + j * stride_vb + offs_h[None, :] * stride_vh + offs_w[:, None] * stride_vw)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        if FP32_IEEE:
            acc = tl.dot(x, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc)
    offs_n = r * BH + offs_h
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


bsr_linear_autotuned = triton.autotune(configs=BSR_CONFIGS, key=["M_BUCKET", "N", "BH", "BW"])(
    bsr_linear_kernel)


def check_bsr_args(x: torch.Tensor, w: BSRWeight, bias: torch.Tensor | None) -> None:
    """Raise :class:`KernelError` unless the Triton BSR kernel supports these arguments."""
    if not isinstance(w, BSRWeight):
        raise KernelError(f"bsr_linear: w must be a BSRWeight, got {type(w).__name__}")
    if w.block[0] not in SUPPORTED_BLOCKS or w.block[1] not in SUPPORTED_BLOCKS:
        raise KernelError(f"bsr_linear: block {w.block} unsupported by the Triton kernel; both block dims "
                          f"must be one of {SUPPORTED_BLOCKS}")
    if w.values.dtype not in KERNEL_DTYPES:
        raise KernelError(f"bsr_linear: weight dtype {w.values.dtype} unsupported; use one of "
                          f"{[str(d) for d in KERNEL_DTYPES]}")
    if isinstance(x, torch.Tensor) and x.dtype != w.values.dtype:
        raise KernelError(f"bsr_linear: x dtype {x.dtype} must equal the weight dtype {w.values.dtype}; "
                          f"cast one of them")
    bad_bias = bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0]
                                     or not bias.dtype.is_floating_point)
    if bad_bias:
        raise KernelError(f"bsr_linear: bias must be a 1-D float tensor of length N={w.shape[0]}, got "
                          f"shape {tuple(bias.shape)} dtype {bias.dtype}")


def bsr_linear(
    x: torch.Tensor, w: BSRWeight, bias: torch.Tensor | None = None, *, config: triton.Config | None = None
) -> torch.Tensor:
    """Triton block-sparse linear; contract of :func:`slimfx.kernels.reference.bsr_linear_ref`.

    ``x`` [..., K] in the weight's dtype (fp16/bf16/fp32), any strides; ``w`` a :class:`BSRWeight`
    with blocks in {16, 32, 64}; ``bias`` [N] (any float dtype, added in fp32). Returns [..., N] in
    ``x.dtype``. ``config`` forces one launch config (skipping autotuning).
    """
    check_bsr_args(x, w, bias)
    N, K = w.shape
    x2d, lead = flatten_activation(x, torch.empty(N, K, device="meta"), "bsr_linear")
    check_device("bsr_linear", x2d, w.values, w.crow_indices, w.col_indices, bias)
    M = x2d.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*lead, N)
    v = w.values
    args = (x2d, w.crow_indices, w.col_indices, v, v if bias is None else bias, out, M, N,
            x2d.stride(0), x2d.stride(1), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
            triton.next_power_of_2(M))
    # The interpreter multiplies bf16 tiles as raw uint16 bit patterns, so there it upcasts them first.
    bf16_in_interpreter = x.dtype == torch.bfloat16 and interpreting()
    flags = dict(HAS_BIAS=bias is not None, BH=w.block[0], BW=w.block[1],
                 FP32_IEEE=x.dtype == torch.float32 or bf16_in_interpreter, DOT_IN_FP32=bf16_in_interpreter)
    if config is None and not interpreting():
        bsr_linear_autotuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), N // w.block[0])](*args, **flags)
    else:
        cfg = config or INTERPRETER_CONFIG
        bsr_linear_kernel[(triton.cdiv(M, cfg.kwargs["BLOCK_M"]), N // w.block[0])](
            *args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.reshape(*lead, N)
