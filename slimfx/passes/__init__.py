"""What can be done to a program: the pass API, the pipeline grammar, the pass manager, and the passes."""

from slimfx.passes.analysis import get_analysis, register_analysis
from slimfx.passes.base import (
    Contract,
    NoOptions,
    Pass,
    PassResult,
    get_pass,
    list_passes,
    register_pass,
    registry,
    unregister_pass,
)
from slimfx.passes.manager import PassManager, PassRun, run_pipeline
from slimfx.passes.pipeline import PassSpec, Pipeline

__all__ = [
    "Contract", "NoOptions", "Pass", "PassManager", "PassResult", "PassRun", "PassSpec", "Pipeline",
    "get_analysis", "get_pass", "list_passes", "register_analysis", "register_pass", "registry",
    "run_pipeline", "unregister_pass",
]
