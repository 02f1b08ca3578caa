"""Triton per-token quantization (bit-exact) and W8A8 linear vs the references."""

from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.errors import KernelError
from slimfx.kernels import reference
from slimfx.kernels.triton_int8_gemm import runnable_device
from slimfx.kernels.triton_quant import QUANT_CONFIGS, quantize_per_token, w8a8_linear

DEVICE = runnable_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 or a CUDA GPU")

#: One unit in the last place of the output dtype, relative to the reference's value. Quantization is
#: bit-exact and the int32 GEMM exact, so only the fp32 epilogue's last rounding may differ (FMA on GPU,
#: fp32 -> bf16 by truncation in the interpreter).
OUT_ULP = reference.OUTPUT_ULP
#: Absolute slack as a fraction of |acc * row * col| + |bias| (fp32 roundings of the epilogue's terms).
FP32_TERM_EPS = 4 * 2.0**-24

dims = st.one_of(st.integers(1, 40), st.sampled_from([1, 15, 16, 17, 127, 128, 129, 300]))
float_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def make_float(rows: int, cols: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    """Random rows of very different magnitudes, with exact quantization ties and an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-4, 4, rows)[torch.randperm(rows, generator=g)]
    x = torch.randn(rows, cols, generator=g) * magnitudes[:, None]
    if cols >= 4:
        # Row 0 gets absmax 127 (scale exactly 1) and the ties .5 / 1.5 / -2.5.
        x[0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])
        x[0, 4:] = x[0, 4:].clamp(-100, 100)
    if rows >= 3:
        x[rows // 2] = 0.0
    x = x.to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "sliced":
        big = torch.zeros(rows, 2 * cols + 1, dtype=dtype)
        big[:, 1::2] = x
        x = big[:, 1::2]
    return x.to(DEVICE)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(M=dims, K=dims, dtype=float_dtypes, layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       seed=st.integers(0, 2**16))
def test_quantize_per_token_is_bit_exact(M: int, K: int, dtype: torch.dtype, layout: str, seed: int) -> None:
    x = make_float(M, K, dtype, layout, seed)
    q, scale = quantize_per_token(x)
    q_ref, scale_ref = reference.quantize_per_token_ref(x.cpu())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale.cpu(), scale_ref)
    assert torch.equal(q.cpu(), q_ref)


@pytest.mark.parametrize("config", [*QUANT_CONFIGS, triton.Config({"BLOCK_M": 2, "BLOCK_K": 16})],
                         ids=lambda c: f"M{c.kwargs['BLOCK_M']}K{c.kwargs['BLOCK_K']}")
def test_every_config_including_the_k_loop(config: triton.Config) -> None:
    # K spans several BLOCK_K chunks for the small config and a masked tail for the big ones.
    x = make_float(5, 37 if config.kwargs["BLOCK_K"] <= 16 else 1100, torch.float16, "contiguous", 7)
    q, scale = quantize_per_token(x, config=config)
    q_ref, scale_ref = reference.quantize_per_token_ref(x.cpu())
    assert torch.equal(scale.cpu(), scale_ref) and torch.equal(q.cpu(), q_ref)


def test_quantize_per_token_ties_round_half_to_even() -> None:
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.5]], device=DEVICE)
    q, scale = quantize_per_token(x)
    assert scale.item() == 1.0
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, 4]]


@settings(derandomize=True, deadline=None, max_examples=20)
@given(lead=st.lists(st.integers(1, 5), min_size=0, max_size=2), K=dims, N=dims, dtype=float_dtypes,
       has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_w8a8_linear_matches_reference(lead: list[int], K: int, N: int, dtype: torch.dtype, has_bias: bool,
                                       seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, K, generator=g) * 4).to(dtype).to(DEVICE)
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    w_scale = torch.rand(N, generator=g) / 127
    bias = torch.randn(N, generator=g).to(dtype) if has_bias else None
    y = w8a8_linear(x, w_q.to(DEVICE), w_scale.to(DEVICE), None if bias is None else bias.to(DEVICE))
    ref = reference.w8a8_linear_ref(x.cpu(), w_q, w_scale, bias)
    assert y.shape == (*lead, N) and y.dtype == dtype
    q, s = reference.quantize_per_token_ref(x.cpu().reshape(-1, K))
    terms = reference.int8_gemm_ref(q, w_q).double().abs() * s.double()[:, None] * w_scale.double()[None, :]
    terms = (terms + (0 if bias is None else bias.double().abs())).reshape(ref.shape)
    err = (y.cpu().double() - ref.double()).abs()
    assert (err <= OUT_ULP[dtype] * ref.double().abs() + FP32_TERM_EPS * terms).all()


def test_w8a8_linear_out_dtype_override() -> None:
    x = torch.randn(3, 32, device=DEVICE)
    w_q = torch.randint(-127, 128, (16, 32), dtype=torch.int8, device=DEVICE)
    y = w8a8_linear(x, w_q, torch.rand(16, device=DEVICE) / 127, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)


def test_quantize_and_linear_reject_bad_input() -> None:
    with pytest.raises(KernelError, match="2-D float tensor"):
        quantize_per_token(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(KernelError, match="2-D float tensor"):
        quantize_per_token(torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(KernelError, match=">= 1"):
        quantize_per_token(torch.zeros(2, 0, device=DEVICE))
    w_q = torch.zeros(4, 8, dtype=torch.int8, device=DEVICE)
    with pytest.raises(KernelError, match="last dim must equal the weight's K=8"):
        w8a8_linear(torch.zeros(2, 7, device=DEVICE), w_q, torch.ones(4, device=DEVICE))
    with pytest.raises(KernelError, match="col_scale"):
        w8a8_linear(torch.zeros(2, 8, device=DEVICE), w_q, torch.ones(5, device=DEVICE))
