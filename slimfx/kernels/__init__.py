"""Kernels: plain-torch references (the spec), Triton kernels, CPU candidates (linear, conv), the dispatcher,
modules.

Importing this package never imports Triton: the Triton launchers (``triton_int8_gemm``, ``triton_quant``,
``triton_bsr``) are imported inside the functions that run them, so it works without a GPU and with or
without ``TRITON_INTERPRET``.
"""

from slimfx.kernels.bsr import BSRWeight, bsr_to_dense, dense_to_bsr, to_torch_bsr
from slimfx.kernels.conv_kernels import CONV_CANDIDATES, ConvGeometry, int8_conv2d_spec
from slimfx.kernels.cpu_kernels import (
    ACT_MODES,
    BSR_CANDIDATES,
    CONV_ACT_MODES,
    INT8_CANDIDATES,
    INT8_TOLERANCE,
    ActQuant,
    int8_linear_spec,
    quantize_activation,
)
from slimfx.kernels.dispatch import (
    Choice,
    available_kernels,
    cache_path,
    choice_table,
    clear_memory_cache,
    forced_kernel,
    format_choice_table,
    machine_id,
    machine_summary,
    main_table,
    measure_bsr,
    measure_conv,
    measure_int8,
    select_bsr_kernel,
    select_conv_kernel,
    select_int8_kernel,
)
from slimfx.kernels.modules import KERNEL_MODULES, BlockSparseLinear, Int8Conv2d, Int8Linear
from slimfx.kernels.reference import (
    bsr_linear_ref,
    int8_gemm_ref,
    quantize_per_token_ref,
    w8a8_linear_ref,
)

__all__ = [
    "ACT_MODES", "BSR_CANDIDATES", "CONV_ACT_MODES", "CONV_CANDIDATES", "INT8_CANDIDATES", "INT8_TOLERANCE",
    "KERNEL_MODULES", "ActQuant", "BSRWeight", "BlockSparseLinear", "Choice", "ConvGeometry", "Int8Conv2d",
    "Int8Linear", "available_kernels", "bsr_linear_ref", "bsr_to_dense", "cache_path", "choice_table",
    "clear_memory_cache", "dense_to_bsr", "forced_kernel", "format_choice_table", "int8_conv2d_spec",
    "int8_gemm_ref", "int8_linear_spec", "machine_id", "machine_summary", "main_table", "measure_bsr",
    "measure_conv", "measure_int8", "quantize_activation", "quantize_per_token_ref", "select_bsr_kernel",
    "select_conv_kernel", "select_int8_kernel", "to_torch_bsr", "w8a8_linear_ref",
]
