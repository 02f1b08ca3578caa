"""Dynamic per-token int8 quantization in Triton, and the W8A8 linear built from it.

:func:`quantize_per_token` reproduces :func:`slimfx.kernels.reference.quantize_per_token_ref`
bit-exactly: the scale and ``x / scale`` are IEEE fp32 divisions (``tl.math.div_rn``; Triton's ``/``
is an approximate division on NVIDIA GPUs), and rounding is round-half-to-even done with the
``(v + 1.5 * 2**23) - 1.5 * 2**23`` identity, which is exact in fp32 for ``|v| < 2**22`` (here
``|v| <= 127``) and, unlike libdevice ``rint``, also runs in the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.errors import KernelError
from slimfx.kernels.reference import FLOAT_DTYPES, QMAX, SCALE_FLOOR, flatten_activation
from slimfx.kernels.triton_int8_gemm import check_device, int8_gemm, interpreting

#: Adding then subtracting 1.5 * 2**23 leaves an fp32 with no fraction bits, rounded half-to-even.
_RNE_MAGIC = 12582912.0


def _config(bm: int, bk: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=1)


#: Wide rows (LLM hidden sizes, 4k-16k) want one row per program with long vectors; narrow rows want
#: several rows per program so a program still moves a few KiB.
QUANT_CONFIGS: list[triton.Config] = [
    _config(1, 4096, 8),
    _config(1, 2048, 4),
    _config(4, 1024, 4),
    _config(16, 256, 4),
]
#: The config launched under the Triton interpreter; tests also force tiny BLOCK_K to hit the K loop.
INTERPRETER_CONFIG = _config(16, 128, 4)


@triton.jit
def quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    K_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Two passes over each row block: absmax, then quantize (rows longer than BLOCK_K loop)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (offs_k[None, :] + k0 < K)
        x = tl.load(x_rows + (offs_k[None, :] + k0) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = tl.maximum(tl.math.div_rn(absmax, 127.0), 1e-8)
    tl.store(scale_ptr + offs_m, scale, mask=row_ok)

    q_rows = q_ptr + offs_m[:, None] * stride_qm
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (offs_k[None, :] + k0 < K)
        x = tl.load(x_rows + (offs_k[None, :] + k0) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale[:, None])
        v = (v + 12582912.0) - 12582912.0
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        tl.store(q_rows + (offs_k[None, :] + k0) * stride_qk, v.to(tl.int8), mask=mask)


quantize_per_token_autotuned = triton.autotune(configs=QUANT_CONFIGS, key=["K_BUCKET"])(
    quantize_per_token_kernel)

assert QMAX == 127 and SCALE_FLOOR == 1e-8, "the kernel hard-codes the reference's constants"


def quantize_per_token(
    x: torch.Tensor, *, config: triton.Config | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token quantization; bit-exact with :func:`reference.quantize_per_token_ref`.

    ``x`` float [M, K], any strides. Returns ``(q int8 [M, K], scale fp32 [M])``. ``config`` forces
    one launch config (skipping autotuning).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        got = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"quantize_per_token: x must be a 2-D float tensor [M, K], got {got}")
    M, K = x.shape
    if M < 1 or K < 1:
        raise KernelError(f"quantize_per_token: x must have M >= 1 rows and K >= 1 columns, "
                          f"got {tuple(x.shape)}")
    check_device("quantize_per_token", x)
    q = torch.empty(M, K, device=x.device, dtype=torch.int8)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    args = (x, q, scale, M, K, x.stride(0), x.stride(1), q.stride(0), q.stride(1), triton.next_power_of_2(K))
    if config is None and not interpreting():
        quantize_per_token_autotuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](*args)
        return q, scale
    cfg = config or INTERPRETER_CONFIG
    quantize_per_token_kernel[(triton.cdiv(M, cfg.kwargs["BLOCK_M"]),)](
        *args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return q, scale


def w8a8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """int8 Linear with dynamic per-token activations; contract of :func:`reference.w8a8_linear_ref`.

    ``x`` float [..., K] (fp16/bf16/fp32; fp64 needs an explicit ``out_dtype``), ``w_q`` int8 [N, K],
    ``w_scale`` fp32 [N]. Two launches: :func:`quantize_per_token`, then the int8 GEMM with the
    activation and weight scales and the bias fused in its epilogue. Returns [..., N].
    """
    x2d, lead = flatten_activation(x, w_q, "w8a8_linear")
    q, s = quantize_per_token(x2d)
    y = int8_gemm(q, w_q, row_scale=s, col_scale=w_scale, bias=bias,
                  out_dtype=x.dtype if out_dtype is None else out_dtype)
    return y.reshape(*lead, w_q.shape[0])
