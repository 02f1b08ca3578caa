"""Train/eval mode switches that also work on torch.export's modules (whose .train()/.eval() raise).

An exported graph has its mode baked into its ops; its submodules (fake-quant nodes slimfx inserted, leaf
modules) still read ``self.training``. Setting the flag on every submodule is what ``Module.train`` does,
without the override that refuses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn


def set_training(module: nn.Module, training: bool) -> nn.Module:
    """``module.train(training)`` for any module, including torch.export's; returns the module."""
    try:
        return module.train(training)
    except NotImplementedError:  # torch.export: "Calling train() or eval() is not supported yet."
        for m in module.modules():
            m.training = training
        return module


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block; restore each one's own flag after."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
