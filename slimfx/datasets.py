"""Real data that ships inside packages (no downloads): scikit-learn's 8x8 digits, and a small trainer.

Used by tests, benchmarks and the demo to check that compression keeps accuracy on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.ir.modes import eval_mode


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Mini-batches in a shuffled (when ``generator`` is given) or fixed order."""
        order = torch.randperm(len(self.y), generator=generator) if generator is not None else torch.arange(len(self.y))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield self.x[index], self.y[index]


def load_digits(image: bool = True, test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 1,797 digits as (train, test); pixels scaled to [0, 1]; [N,1,8,8] or [N,64]."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # scikit-learn is a dev extra
        raise ImportError("load_digits needs scikit-learn: pip install 'slimfx[dev]'") from exc
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])


def train_classifier(model: nn.Module, data: Split, epochs: int = 10, lr: float = 3e-3, batch_size: int = 64,
                     seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; deterministic for a seed. Returns it in eval."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for x, y in data.batches(batch_size, generator):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    """Top-1 accuracy in percent."""
    with eval_mode(model):
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.batches(512))
    return 100.0 * correct / len(data.y)
