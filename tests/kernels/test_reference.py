"""The plain-torch specs: checked against independent float math and their documented properties."""

from __future__ import annotations

import pytest
import torch

from slimfx.errors import KernelError
from slimfx.kernels import bsr, reference
from slimfx.kernels.bsr import BSRWeight, bsr_to_dense, dense_to_bsr, to_torch_bsr


def _int8(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def test_int8_gemm_ref_is_exact_integer_matmul() -> None:
    a, b = _int8(7, 300), _int8(5, 300, seed=1)
    a[0], b[0] = -128, -128  # the largest |product| sum: 300 * 16384
    acc = reference.int8_gemm_ref(a, b)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), a.double() @ b.double().t())
    assert acc[0, 0] == 300 * 128 * 128
    assert torch.equal(reference.int8_gemm_ref(a, b.t().contiguous(), b_layout="kn"), acc)


def test_int8_gemm_ref_epilogue_order_and_defaults() -> None:
    a, b = _int8(4, 9), _int8(6, 9, seed=1)
    rs, cs, bias = torch.rand(4), torch.rand(6), torch.randn(6)
    acc = reference.int8_gemm_ref(a, b)
    out = reference.int8_gemm_ref(a, b, row_scale=rs, col_scale=cs, bias=bias, out_dtype=torch.float32)
    assert torch.equal(out, acc.float() * rs[:, None] * cs[None, :] + bias)
    assert torch.equal(reference.int8_gemm_ref(a, b, out_dtype=torch.float32), acc.float())
    half = reference.int8_gemm_ref(a, b, col_scale=cs, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, (acc.float() * cs).bfloat16())


def test_int8_gemm_ref_overflow_is_an_error() -> None:
    k = 2**31 // (128 * 128) + 1
    a = torch.full((1, k), -128, dtype=torch.int8)
    with pytest.raises(KernelError, match="overflows int32"):
        reference.int8_gemm_ref(a, a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(a=torch.zeros(2, 3), b=torch.zeros(4, 3, dtype=torch.int8)), "a must be a 2-D int8"),
        (dict(a=torch.zeros(2, 3, dtype=torch.int8), b=torch.zeros(4, 5, dtype=torch.int8)), r"\[N, 3\]"),
        (dict(a=torch.zeros(2, 3, dtype=torch.int8), b=torch.zeros(4, 3, dtype=torch.int8), b_layout="kn"),
         r"\[3, N\]"),
        (dict(a=torch.zeros(2, 3, dtype=torch.int8), b=torch.zeros(4, 3, dtype=torch.int8), b_layout="nt"),
         "b_layout"),
        (dict(a=torch.zeros(2, 3, dtype=torch.int8), b=torch.zeros(4, 3, dtype=torch.int8),
              out_dtype=torch.int16), "out_dtype"),
        (dict(a=torch.zeros(2, 3, dtype=torch.int8), b=torch.zeros(4, 3, dtype=torch.int8),
              row_scale=torch.ones(2)), "out_dtype is None"),
        (dict(a=torch.zeros(2, 3, dtype=torch.int8), b=torch.zeros(4, 3, dtype=torch.int8),
              col_scale=torch.ones(3), out_dtype=torch.float16),
         "col_scale must be a 1-D fp32 tensor of length 4"),
        (dict(a=torch.zeros(2, 3, dtype=torch.int8), b=torch.zeros(4, 3, dtype=torch.int8),
              row_scale=torch.ones(2, dtype=torch.float16), out_dtype=torch.float16), "row_scale"),
        (dict(a=torch.zeros(0, 3, dtype=torch.int8), b=torch.zeros(4, 3, dtype=torch.int8)), ">= 1"),
    ],
)
def test_int8_gemm_ref_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    a, b = kwargs.pop("a"), kwargs.pop("b")
    with pytest.raises(KernelError, match=match):
        reference.int8_gemm_ref(a, b, **kwargs)


def test_quantize_per_token_ref_properties() -> None:
    x = torch.randn(6, 50) * torch.logspace(-3, 3, 6)[:, None]
    x[5] = 0
    q, scale = reference.quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[:5] == 127).all()
    assert scale[5] == reference.SCALE_FLOOR and (q[5] == 0).all()
    # Round to nearest: dequantization error at most half a step.
    assert ((q.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


def test_quantize_per_token_ref_rounds_half_to_even() -> None:
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])  # scale exactly 1
    q, scale = reference.quantize_per_token_ref(x)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantize_per_token_ref_computes_in_fp32(dtype: torch.dtype) -> None:
    x = torch.randn(3, 40).to(dtype)
    q, scale = reference.quantize_per_token_ref(x)
    q32, scale32 = reference.quantize_per_token_ref(x.float())
    assert torch.equal(q, q32) and torch.equal(scale, scale32)


def test_quantize_per_token_ref_rejects_bad_input() -> None:
    with pytest.raises(KernelError, match="2-D float"):
        reference.quantize_per_token_ref(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(KernelError, match="2-D float"):
        reference.quantize_per_token_ref(torch.zeros(2, 3, 4))


def test_w8a8_linear_ref_matches_dequantized_float_math() -> None:
    x = torch.randn(2, 3, 32)
    w_q, w_scale, bias = _int8(16, 32), torch.rand(16) / 100, torch.randn(16)
    y = reference.w8a8_linear_ref(x, w_q, w_scale, bias)
    assert y.shape == (2, 3, 16) and y.dtype == torch.float32
    q, s = reference.quantize_per_token_ref(x.reshape(6, 32))
    w = w_q.double() * w_scale.double()[:, None]
    expect = (q.double() * s.double()[:, None]) @ w.t() + bias.double()
    torch.testing.assert_close(y.reshape(6, 16).double(), expect, rtol=1e-5, atol=1e-5)
    assert reference.w8a8_linear_ref(x.half(), w_q, w_scale).dtype == torch.float16
    assert reference.w8a8_linear_ref(x, w_q, w_scale, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(KernelError, match="last dim"):
        reference.w8a8_linear_ref(torch.randn(3, 31), w_q, w_scale)


def _block_sparse(n: int, k: int, block: tuple[int, int], density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n // block[0], k // block[1], generator=g) < density
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return torch.randn(n, k, generator=g) * mask


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 16), (1, 1), (3, 5)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bsr_round_trip(block: tuple[int, int], density: float) -> None:
    w = _block_sparse(192, 320 if block != (3, 5) else 300, block, density)
    b = dense_to_bsr(w, block)
    assert b.crow_indices.dtype == b.col_indices.dtype == torch.int32
    assert b.values.shape == (b.nnz_blocks, *block)
    grid = (w.shape[0] // block[0]) * (w.shape[1] // block[1])
    assert b.density == pytest.approx(b.nnz_blocks / grid)
    assert torch.equal(bsr_to_dense(b), w)
    assert torch.equal(to_torch_bsr(b).to_dense(), w)
    if density == 1.0:
        assert b.density == 1.0


def test_bsr_keeps_blocks_with_any_nonzero_and_sorts_columns() -> None:
    w = torch.zeros(32, 48)
    w[20, 47] = 1.0  # row-block 1, col-block 2
    w[0, 17] = -2.0  # row-block 0, col-block 1
    w[31, 0] = 3.0  # row-block 1, col-block 0
    b = dense_to_bsr(w, (16, 16))
    assert b.crow_indices.tolist() == [0, 1, 3] and b.col_indices.tolist() == [1, 0, 2]
    assert b.to("cpu").shape == (32, 48)


def test_bsr_rejects_indivisible_shapes_and_bad_arrays() -> None:
    with pytest.raises(KernelError, match="not divisible by block"):
        dense_to_bsr(torch.randn(30, 32), (16, 16))
    with pytest.raises(KernelError, match="2-D float"):
        dense_to_bsr(torch.zeros(32, 32, dtype=torch.int8), (16, 16))
    with pytest.raises(KernelError, match="crow_indices"):
        BSRWeight((32, 32), (16, 16), torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int32),
                  torch.zeros(0, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bsr_linear_ref_equals_dense_linear(dtype: torch.dtype) -> None:
    w = _block_sparse(64, 96, (32, 32), 0.5).to(dtype)
    b = bsr.dense_to_bsr(w, (32, 32))
    x, bias = torch.randn(2, 5, 96).to(dtype), torch.randn(64)
    y = reference.bsr_linear_ref(x, b, bias)
    assert y.shape == (2, 5, 64) and y.dtype == dtype
    expect = (x.float() @ w.float().t() + bias).to(dtype)
    torch.testing.assert_close(y, expect)
    with pytest.raises(KernelError, match="BSRWeight"):
        reference.bsr_linear_ref(x, w)
