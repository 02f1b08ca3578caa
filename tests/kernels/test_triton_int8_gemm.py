"""Triton int8 GEMM vs :func:`reference.int8_gemm_ref`: hypothesis picks shapes, strides and values.

Runs the kernel in the Triton interpreter on CPU (``TRITON_INTERPRET=1``, set by tests/conftest.py),
or on CUDA tensors when the interpreter is off and a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.errors import KernelError
from slimfx.kernels import aot, reference, triton_int8_gemm
from slimfx.kernels.triton_int8_gemm import INT8_GEMM_CONFIGS, int8_gemm, runnable_device

DEVICE = runnable_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 or a CUDA GPU")

#: Relative error allowed on the epilogue's output, per out dtype, w.r.t. the reference's rounded value:
#: one unit in the last place. The fp32 math is the same, but the GPU may fuse the bias add into an FMA
#: and the interpreter converts fp32 -> bf16 by truncation instead of round-to-nearest-even, so the
#: final rounding may land on the neighbouring value.
OUT_ULP = reference.OUTPUT_ULP
#: Absolute slack, as a fraction of |acc * row * col| + |bias|: a few fp32 roundings of the terms, which
#: matter when the bias cancels the product (the result is then far smaller than its terms).
FP32_TERM_EPS = 4 * 2.0**-24

# Biased to small sizes (the interpreter is slow) but always reaching the ragged edges around tiles.
dims = st.one_of(st.integers(1, 40), st.sampled_from([1, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 300]))
layouts = st.sampled_from(["contiguous", "transposed", "sliced"])
value_modes = st.sampled_from(["full", "extremes", "small"])


def make_int8(rows: int, cols: int, layout: str, mode: str, seed: int) -> torch.Tensor:
    """An int8 [rows, cols] tensor with the given memory layout (a view for transposed/sliced)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "extremes":
        t = torch.tensor([-128, 127], dtype=torch.int8)[torch.randint(0, 2, (rows, cols), generator=g)]
    else:
        lo, hi = (-128, 128) if mode == "full" else (-3, 4)
        t = torch.randint(lo, hi, (rows, cols), dtype=torch.int8, generator=g)
        t.view(-1)[0], t.view(-1)[-1] = -128, 127
    if layout == "transposed":
        view = t.t().contiguous().t()
    elif layout == "sliced":
        big = torch.zeros(rows + 1, 2 * cols + 3, dtype=torch.int8)
        big[1:, 3::2] = t
        view = big[1:, 3::2]
    else:
        view = t
    assert torch.equal(view, t)
    return view.to(DEVICE)


def assert_epilogue_close(out: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor) -> None:
    """|out - ref| <= one ulp of the out dtype * |ref| + FP32_TERM_EPS * terms (elementwise)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.double().cpu() - ref.double()).abs()
    bound = OUT_ULP[ref.dtype] * ref.double().abs() + FP32_TERM_EPS * terms
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()} at {(err - bound).argmax().item()}"


@settings(derandomize=True, deadline=None, max_examples=40)
@given(M=dims, N=dims, K=dims, a_layout=layouts, b_layout_kind=layouts,
       b_layout=st.sampled_from(["nk", "kn"]), mode=value_modes, seed=st.integers(0, 2**16))
def test_int8_gemm_raw_accumulator_is_bit_exact(M: int, N: int, K: int, a_layout: str, b_layout_kind: str,
                                                 b_layout: str, mode: str, seed: int) -> None:
    a = make_int8(M, K, a_layout, mode, seed)
    b = make_int8(*((N, K) if b_layout == "nk" else (K, N)), b_layout_kind, mode, seed + 1)
    out = int8_gemm(a, b, b_layout=b_layout)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    assert torch.equal(out.cpu(), reference.int8_gemm_ref(a.cpu(), b.cpu(), b_layout=b_layout))


@settings(derandomize=True, deadline=None, max_examples=30)
@given(M=dims, N=dims, K=dims, b_layout=st.sampled_from(["nk", "kn"]),
       out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       has=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       bias_dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_int8_gemm_fused_epilogue(M: int, N: int, K: int, b_layout: str, out_dtype: torch.dtype,
                                  has: tuple[bool, bool, bool], bias_dtype: torch.dtype, seed: int) -> None:
    a = make_int8(M, K, "contiguous", "full", seed)
    b = make_int8(*((N, K) if b_layout == "nk" else (K, N)), "contiguous", "full", seed + 1)
    g = torch.Generator().manual_seed(seed)
    # Scales like a W8A8 layer's (absmax / 127), so even fp16 outputs stay finite.
    row_scale = torch.rand(M, generator=g) / 127 / 16 if has[0] else None
    col_scale = torch.rand(N, generator=g) / 127 / 16 if has[1] else None
    bias = (torch.randn(N, generator=g) * 100).to(bias_dtype) if has[2] else None
    if out_dtype == torch.float16 and not (has[0] and has[1]):
        out_dtype = torch.float32  # unscaled accumulators (up to 4.9e6) overflow fp16
    kwargs = dict(b_layout=b_layout, row_scale=row_scale, col_scale=col_scale, bias=bias, out_dtype=out_dtype)
    on_device = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = int8_gemm(a, b, **on_device)
    ref = reference.int8_gemm_ref(a.cpu(), b.cpu(), **kwargs)
    terms = reference.int8_gemm_ref(a.cpu(), b.cpu(), b_layout=b_layout).double().abs()
    terms = terms * (1 if row_scale is None else row_scale.double()[:, None])
    terms = terms * (1 if col_scale is None else col_scale.double()[None, :])
    terms = terms + (0 if bias is None else bias.double().abs()[None, :])
    assert_epilogue_close(out, ref, terms)


@pytest.mark.parametrize("config", INT8_GEMM_CONFIGS, ids=lambda c: aot.config_label(c).replace(" ", "-"))
def test_every_autotune_config_is_correct(config: triton.Config) -> None:
    # Shapes ragged against every tile size, with a K tail; one run per real GPU config.
    M, N, K = 37, 70, 129
    a, b = make_int8(M, K, "sliced", "full", 1), make_int8(N, K, "transposed", "full", 2)
    out = int8_gemm(a, b, config=config)
    assert torch.equal(out.cpu(), reference.int8_gemm_ref(a.cpu(), b.cpu()))


def test_largest_shape_with_extreme_values() -> None:
    a, b = make_int8(300, 300, "transposed", "extremes", 3), make_int8(300, 300, "sliced", "extremes", 4)
    a[:, :] = -128
    b[0, :] = -128  # acc[:, 0] = 300 * 16384, the largest magnitude these shapes can reach
    out = int8_gemm(a, b)
    assert out[0, 0].item() == 300 * 128 * 128
    assert torch.equal(out.cpu(), reference.int8_gemm_ref(a.cpu(), b.cpu()))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.zeros(2, 3, dtype=torch.float16), torch.zeros(4, 3, dtype=torch.int8), {}),
         "a must be"),
        (lambda: (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8), {}), "b with"),
        (lambda: (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.int8),
                  {"out_dtype": torch.float64}), "out_dtype"),
        (lambda: (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.int8),
                  {"bias": torch.zeros(5), "out_dtype": torch.float32}), "bias must be"),
    ],
)
def test_int8_gemm_rejects_bad_arguments(make, match: str) -> None:
    a, b, kwargs = make()
    with pytest.raises(KernelError, match=match):
        int8_gemm(a.to(DEVICE), b.to(DEVICE), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_int8_gemm_rejects_mixed_devices() -> None:
    a = torch.zeros(2, 3, dtype=torch.int8, device="cuda")
    with pytest.raises(KernelError, match="one device"):
        int8_gemm(a, a.cpu())


def test_interpreter_flag_matches_environment() -> None:
    assert triton_int8_gemm.interpreting() == (DEVICE == "cpu")
