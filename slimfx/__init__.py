"""slimfx: a compiler for neural-network compression.

A model is traced (torch.fx or torch.export) into a Program; passes rewrite it (pruning, quantization,
distillation, cleanups), each with a numerics contract that the pass manager checks.
"""

from slimfx import errors
from slimfx.export.artifact import load, save
from slimfx.frontend.api import Compressed, compress
from slimfx.frontend.trace import trace
from slimfx.ir import OpKind, Program, verify
from slimfx.passes import (
    Contract,
    Pass,
    PassManager,
    PassResult,
    Pipeline,
    get_pass,
    list_passes,
    register_pass,
    run_pipeline,
)

__version__ = "0.1.0"

__all__ = [
    "Compressed", "compress", "Contract", "OpKind", "Pass", "PassManager", "PassResult", "Pipeline", "Program",
    "errors", "get_pass", "list_passes", "load", "register_pass", "run_pipeline", "save", "trace", "verify",
    "__version__",
]
