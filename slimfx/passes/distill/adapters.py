"""Adapters: learnable projections that map a student feature onto the shape of its paired teacher feature.

4-D [N, C, H, W]: a 1x1 conv from the student's to the teacher's channels, then adaptive average pooling
when the spatial sizes differ. 2-D [N, D] and 3-D [N, T, D]: a linear on the last dim. Equal shapes need
no adapter (identity). Other mismatches (different ranks, batch or token counts) raise PassError naming
the pair and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.errors import PassError


class ConvAdapter(nn.Module):
    """1x1 conv student channels -> teacher channels, resized to the teacher's spatial size if needed."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int]):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y if tuple(y.shape[2:]) == self.size else F.adaptive_avg_pool2d(y, self.size)


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], pair: str = "") -> nn.Module:
    """An adapter mapping features of ``student_shape`` to ``teacher_shape`` (nn.Identity when equal).

    ``pair`` names the feature pair for error messages. Shapes include the batch dim, which is ignored
    (it is the example inputs' batch, not the training batch).
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    where = f" for pair {pair}" if pair else ""
    if s[1:] == t[1:]:
        return nn.Identity()
    if len(s) != len(t):
        raise PassError(
            f"cannot adapt a rank-{len(s)} student feature {list(s)} to a rank-{len(t)} teacher feature "
            f"{list(t)}{where}: pair features of the same rank (e.g. both conv outputs, or both flattened)"
        )
    if len(s) == 4:
        return ConvAdapter(s[1], t[1], (t[2], t[3]))
    if len(s) in (2, 3) and s[1:-1] == t[1:-1]:
        return nn.Linear(s[-1], t[-1], bias=False)
    raise PassError(
        f"no adapter maps student feature {list(s)} to teacher feature {list(t)}{where}: adapters handle 4-D "
        "(channels, spatial size) and 2-D/3-D (last dim) differences; choose features with matching leading dims"
    )


def make_adapters(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], names: Sequence[str] = ()) -> nn.ModuleList:
    """One adapter per (student_shape, teacher_shape) pair, in order."""
    names = list(names) or [str(i) for i in range(len(pairs))]
    return nn.ModuleList(make_adapter(s, t, name) for (s, t), name in zip(pairs, names))
