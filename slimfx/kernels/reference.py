"""Plain-torch specifications of the kernels: what each Triton kernel must compute.

These are the contracts the Triton kernels (and every CPU candidate) are tested against. They favour
being obviously right over being fast: integer products are accumulated exactly in int64 and then
checked to fit the int32 accumulator the kernels use.

Quantization convention (symmetric, zero point 0, per token = per row of the 2-D activation)::

    scale[m] = max(absmax(x[m, :]).float() / 127, 1e-8)          # fp32
    q[m, k]  = clamp(round_half_even(x[m, k].float() / scale[m]), -127, 127)   # int8

The division is an IEEE fp32 division (not a multiply by 1/scale) so that every implementation can
reproduce it bit-exactly; -128 is never produced so the range is symmetric. The 1e-8 floor keeps an
all-zero row well defined (scale 1e-8, q all zeros).
"""

from __future__ import annotations

import torch

from slimfx.errors import KernelError
from slimfx.kernels.bsr import BSRWeight, bsr_to_dense

#: Smallest per-token scale; an all-zero row gets this scale and quantizes to zeros.
SCALE_FLOOR = 1e-8
#: int8 quantization bound: symmetric [-QMAX, QMAX] (-128 is never produced).
QMAX = 127
#: Output dtypes the int8 GEMM epilogue can produce.
EPILOGUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


OUTPUT_ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
"""One unit in the last place of each float output dtype: a fused epilogue may round once differently from the
reference (an FMA on GPU; the interpreter converts fp32 -> bf16 by truncation)."""

def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}"


def check_int8_gemm_args(
    a: torch.Tensor,
    b: torch.Tensor,
    b_layout: str,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> tuple[int, int, int]:
    """Validate the arguments of an int8 GEMM (shared by the reference and the Triton launcher).

    Returns ``(M, N, K)``; raises :class:`KernelError` naming the bad argument otherwise.
    """
    if b_layout not in ("nk", "kn"):
        raise KernelError(f"int8_gemm: b_layout must be 'nk' (b is [N, K]) or 'kn' (b is [K, N]), "
                          f"got {b_layout!r}")
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise KernelError(f"int8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8 or t.dim() != 2:
            raise KernelError(f"int8_gemm: {name} must be a 2-D int8 tensor, got {_describe(t)}")
    M, K = a.shape
    N, Kb = (b.shape if b_layout == "nk" else (b.shape[1], b.shape[0]))
    if Kb != K:
        want = f"[N, {K}]" if b_layout == "nk" else f"[{K}, N]"
        raise KernelError(f"int8_gemm: b with b_layout={b_layout!r} must be {want} to match a "
                          f"{tuple(a.shape)}, got {_describe(b)}")
    if min(M, N, K) < 1:
        raise KernelError(f"int8_gemm: M, N, K must all be >= 1, got M={M} N={N} K={K}")
    if out_dtype is not None and out_dtype not in EPILOGUE_DTYPES:
        raise KernelError(f"int8_gemm: out_dtype must be None (raw int32) or one of "
                          f"{[str(d) for d in EPILOGUE_DTYPES]}, got {out_dtype}")
    epilogue = (("row_scale", row_scale, M), ("col_scale", col_scale, N), ("bias", bias, N))
    for name, t, n in epilogue:
        if t is None:
            continue
        if out_dtype is None:
            raise KernelError(f"int8_gemm: {name} given but out_dtype is None (the raw int32 accumulator "
                              f"has no epilogue); pass out_dtype=torch.float16/bfloat16/float32")
        want_float = (torch.float32,) if name != "bias" else FLOAT_DTYPES
        if t.dim() != 1 or t.shape[0] != n or t.dtype not in want_float:
            kinds = "fp32" if name != "bias" else "float"
            raise KernelError(f"int8_gemm: {name} must be a 1-D {kinds} tensor of length {n}, "
                              f"got {_describe(t)}")
    return M, N, K


def int8_gemm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    b_layout: str = "nk",
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``a @ b.T`` (b_layout "nk") or ``a @ b`` ("kn") of int8 matrices with an int32 accumulator.

    ``a`` int8 [M, K]; ``b`` int8 [N, K] ("nk", a Linear weight) or [K, N] ("kn").
    With ``out_dtype=None`` returns the exact int32 accumulator [M, N] (a :class:`KernelError` if it
    would overflow int32). Otherwise applies the epilogue in fp32, in this order::

        out = ((acc.float() * row_scale[:, None]) * col_scale[None, :] + bias.float()).to(out_dtype)

    where a missing ``row_scale`` / ``col_scale`` / ``bias`` is 1 / 1 / 0 (the term is skipped).
    """
    M, N, K = check_int8_gemm_args(a, b, b_layout, row_scale, col_scale, bias, out_dtype)
    bk = b.t() if b_layout == "nk" else b
    # int64 on CPU is exact and supported by matmul for every shape; int32 matmul is not on all devices.
    acc64 = a.cpu().long() @ bk.cpu().long()
    if acc64.numel() and (acc64.min() < _INT32_MIN or acc64.max() > _INT32_MAX):
        raise KernelError(f"int8_gemm: the accumulator overflows int32 (K={K} too large for these values)")
    acc = acc64.to(device=a.device, dtype=torch.int32)
    if out_dtype is None:
        return acc
    out = acc.float()
    if row_scale is not None:
        out = out * row_scale.float()[:, None]
    if col_scale is not None:
        out = out * col_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(out_dtype)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-row int8 quantization of a 2-D float tensor.

    ``x`` float [M, K] (any float dtype). Returns ``(q, scale)``: ``scale`` fp32 [M] equal to
    ``max(absmax(x[m]).float() / 127, 1e-8)`` and ``q`` int8 [M, K] equal to
    ``clamp(round_half_even(x.float() / scale[:, None]), -127, 127)`` (an fp32 division).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        got = _describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"quantize_per_token: x must be a 2-D float tensor [M, K], got {got}")
    if x.shape[1] < 1:
        raise KernelError(f"quantize_per_token: x must have K >= 1 columns, got shape {tuple(x.shape)}")
    xf = x.float()
    scale = (xf.abs().amax(dim=1) / QMAX).clamp_min(SCALE_FLOOR)
    q = torch.round(xf / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def w8a8_linear_ref(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """An int8 Linear with dynamic per-token activations: ``x [..., K] -> [..., N]``.

    ``w_q`` int8 [N, K] with per-output-channel scale ``w_scale`` fp32 [N]. Quantizes the flattened
    ``x`` with :func:`quantize_per_token_ref`, then :func:`int8_gemm_ref` with ``row_scale`` = the
    activation scales, ``col_scale=w_scale`` and ``bias``. ``out_dtype`` defaults to ``x.dtype``.
    """
    x2d, lead = flatten_activation(x, w_q, "w8a8_linear")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    q, s = quantize_per_token_ref(x2d)
    y = int8_gemm_ref(q, w_q, row_scale=s, col_scale=w_scale, bias=bias, out_dtype=out_dtype)
    return y.reshape(*lead, w_q.shape[0])


def flatten_activation(x: torch.Tensor, w: torch.Tensor, op: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Check ``x [..., K]`` against a weight ``[N, K]`` and return ``(x as [M, K], leading dims)``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        got = _describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"{op}: x must be a float tensor [..., K], got {got}")
    if w.dim() != 2:
        raise KernelError(f"{op}: the weight must be 2-D [N, K], got {_describe(w)}")
    K = w.shape[1]
    if x.shape[-1] != K:
        raise KernelError(f"{op}: x's last dim must equal the weight's K={K}, got x {_describe(x)}")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, K), lead


def bsr_linear_ref(x: torch.Tensor, w: BSRWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ dense(w).T (+ bias)`` for ``x [..., K]`` and a block-sparse weight of shape (N, K).

    Computed in fp32 (fp64 for fp64 inputs) and returned in ``x.dtype``.
    """
    if not isinstance(w, BSRWeight):
        raise KernelError(f"bsr_linear: w must be a BSRWeight, got {type(w).__name__}")
    N, K = w.shape
    x2d, lead = flatten_activation(x, torch.empty(N, K, device="meta"), "bsr_linear")
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x2d.to(acc_dtype) @ bsr_to_dense(w).to(device=x.device, dtype=acc_dtype).t()
    if bias is not None:
        if bias.shape != (N,):
            raise KernelError(f"bsr_linear: bias must be [N]={N}, got {_describe(bias)}")
        y = y + bias.to(acc_dtype)
    return y.to(x.dtype).reshape(*lead, N)
