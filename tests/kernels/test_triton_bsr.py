"""Triton block-sparse linear vs :func:`reference.bsr_linear_ref`."""

from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.errors import KernelError
from slimfx.kernels import reference
from slimfx.kernels.bsr import dense_to_bsr
from slimfx.kernels.triton_bsr import BSR_CONFIGS, bsr_linear
from slimfx.kernels.triton_int8_gemm import runnable_device

DEVICE = runnable_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 or a CUDA GPU")

#: One ulp of the output dtype relative to the reference: both sum exact products in fp32, so only the
#: final rounding may differ (and the interpreter converts fp32 -> bf16 by truncation).
OUT_ULP = reference.OUTPUT_ULP
#: Slack for the fp32 summation order, as a fraction of sum_k |x||w| + |bias|: K terms of 2**-24 each,
#: K <= 320 here, so 2**-15 bounds it with margin.
SUM_ORDER_EPS = 2.0**-15


def block_sparse(n: int, k: int, block: tuple[int, int], density: float, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n // block[0], k // block[1], generator=g) < density
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (torch.randn(n, k, generator=g) * mask).to(dtype)


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w_dense: torch.Tensor, w, bias) -> None:
    ref = reference.bsr_linear_ref(x.cpu(), w.to("cpu"), None if bias is None else bias.cpu())
    assert y.shape == ref.shape and y.dtype == ref.dtype
    K = w_dense.shape[1]
    terms = x.cpu().reshape(-1, K).double().abs() @ w_dense.double().abs().t()
    terms = (terms + (0 if bias is None else bias.cpu().double().abs())).reshape(ref.shape)
    err = (y.cpu().double() - ref.double()).abs()
    bound = OUT_ULP[ref.dtype] * ref.double().abs() + SUM_ORDER_EPS * terms
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


@settings(derandomize=True, deadline=None, max_examples=30)
@given(M=st.one_of(st.integers(1, 40), st.sampled_from([1, 15, 17, 65, 129, 300])),
       bh=st.sampled_from([16, 32, 64]), bw=st.sampled_from([16, 32, 64]),
       rows=st.integers(1, 3), cols=st.integers(1, 5),
       density=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       has_bias=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_bsr_linear_matches_reference(M: int, bh: int, bw: int, rows: int, cols: int, density: float,
                                      dtype: torch.dtype, has_bias: bool, transposed: bool,
                                      seed: int) -> None:
    N, K = rows * bh, cols * bw
    w_dense = block_sparse(N, K, (bh, bw), density, dtype, seed)
    w = dense_to_bsr(w_dense, (bh, bw)).to(DEVICE)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    x = (x.t().contiguous().t() if transposed else x).to(DEVICE)
    bias = torch.randn(N, device=DEVICE) if has_bias else None
    assert_close_to_reference(bsr_linear(x, w, bias), x, w_dense, w, bias)


@pytest.mark.parametrize("config", BSR_CONFIGS, ids=lambda c: f"M{c.kwargs['BLOCK_M']}w{c.num_warps}")
def test_every_config_with_leading_dims(config: triton.Config) -> None:
    w_dense = block_sparse(96, 128, (32, 32), 0.4, torch.float16, 3)
    w = dense_to_bsr(w_dense, (32, 32)).to(DEVICE)
    x = torch.randn(2, 70, 128).half().to(DEVICE)
    bias = torch.randn(96).half().to(DEVICE)
    y = bsr_linear(x, w, bias, config=config)
    assert y.shape == (2, 70, 96)
    assert_close_to_reference(y, x, w_dense, w, bias)


def test_empty_row_blocks_give_bias_only() -> None:
    w_dense = torch.zeros(64, 64)
    w_dense[:16, 16:32] = 1.0
    w = dense_to_bsr(w_dense, (16, 16)).to(DEVICE)
    x, bias = torch.randn(5, 64, device=DEVICE), torch.randn(64, device=DEVICE)
    y = bsr_linear(x, w, bias)
    assert torch.equal(y[:, 16:].cpu(), bias[16:].cpu().expand(5, 48))
    assert_close_to_reference(y, x, w_dense, w, bias)


def test_bsr_linear_rejects_bad_arguments() -> None:
    w = dense_to_bsr(torch.randn(32, 32), (16, 16)).to(DEVICE)
    with pytest.raises(KernelError, match="dtype .* must equal the weight dtype"):
        bsr_linear(torch.randn(2, 32, dtype=torch.float16, device=DEVICE), w)
    with pytest.raises(KernelError, match="last dim must equal"):
        bsr_linear(torch.randn(2, 31, device=DEVICE), w)
    with pytest.raises(KernelError, match="block .* unsupported"):
        bsr_linear(torch.randn(2, 32, device=DEVICE), dense_to_bsr(torch.randn(32, 32), (8, 8)).to(DEVICE))
    with pytest.raises(KernelError, match="bias must be"):
        bsr_linear(torch.randn(2, 32, device=DEVICE), w, torch.randn(16, device=DEVICE))
    with pytest.raises(KernelError, match="BSRWeight"):
        bsr_linear(torch.randn(2, 32, device=DEVICE), torch.randn(32, 32, device=DEVICE))
