"""Built-in example models, by name: small real architectures for examples, tests and benchmarks.

Every entry of :data:`MODELS` builds ``(model, example_inputs)`` deterministically (fixed seed, global RNG
untouched), in eval mode, with BatchNorm statistics that are not the identity, so folding them matters.
Every model traces with ``torch.fx.symbolic_trace`` and ``torch.export.export``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.errors import SlimfxError, did_you_mean

__all__ = [
    "MODELS",
    "DeepResidualCNN",
    "DigitsCNN",
    "DigitsMLP",
    "ResNetMini",
    "ViTMini",
    "deep_residual_cnn",
    "get_model",
    "list_models",
]

ZooEntry = tuple[nn.Module, tuple[torch.Tensor, ...]]
_SEED = 0


@contextmanager
def _seeded(seed: int = _SEED) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """Set BN running stats and affine params to values a trained network might have, and switch to eval."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn_like(module.running_mean) * 0.1)
            module.running_var.copy_(torch.rand_like(module.running_var) * 0.5 + 0.75)
            module.weight.copy_(torch.rand_like(module.weight) * 0.5 + 0.75)
            module.bias.copy_(torch.randn_like(module.bias) * 0.1)
    return model.eval()


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); a 1x1 strided conv + BN
    shortcut when the stride or the channel count changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class DigitsCNN(nn.Module):
    """CNN for scikit-learn's 8x8 digits ([N, 1, 8, 8], pixels scaled to [0, 1]; 10 classes), ~24k params."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(1, 16), conv_bn_relu(16, 32), BasicBlock(32, 32))
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class DigitsMLP(nn.Module):
    """MLP 64 -> hidden -> 10 for the flattened 8x8 digits ([N, 64], pixels scaled to [0, 1])."""

    def __init__(self, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ResNetMini(nn.Module):
    """CIFAR-style ResNet for [N, 3, 32, 32]: a 3x3 stem, three stages of basic blocks (the last two start
    with a stride-2 block and a projection shortcut), global average pool, linear. ~0.7M params."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks_per_stage: int = 2,
                 classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0])
        stages, cin = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(cin, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v linears and F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(self.q(x)), self._split_heads(self.k(x)), self._split_heads(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTMini(nn.Module):
    """ViT for [N, 3, 32, 32]: 4x4 patch-embedding conv (64 tokens), class token, learned positions,
    pre-norm transformer blocks, final LayerNorm, linear on the class token. ~0.8M params."""

    def __init__(self, dim: int = 128, depth: int = 6, heads: int = 4, patch: int = 4, image: int = 32,
                 classes: int = 10) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class DeepResidualCNN(nn.Module):
    """A stem conv, ``blocks`` residual blocks (conv-bn-relu-conv-bn + add, then relu) at constant width
    and a pool-linear head: a model whose graph size grows linearly in ``blocks``, for scaling benchmarks."""

    def __init__(self, blocks: int, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, channels)
        self.blocks = nn.Sequential(*(BasicBlock(channels, channels) for _ in range(blocks)))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def deep_residual_cnn(blocks: int, channels: int = 8) -> DeepResidualCNN:
    """A :class:`DeepResidualCNN` for [N, 3, 8, 8] inputs: deterministic weights, BN statistics set, eval."""
    if blocks < 0 or channels < 1:
        raise SlimfxError(f"deep_residual_cnn needs blocks >= 0 and channels >= 1, got {blocks}, {channels}")
    with _seeded():
        return _with_batchnorm_statistics(DeepResidualCNN(blocks, channels))


def _build(factory: Callable[[], nn.Module], *input_shape: int) -> ZooEntry:
    with _seeded():
        model = _with_batchnorm_statistics(factory())
        inputs = (torch.rand(input_shape),)
    return model, inputs


MODELS: dict[str, Callable[[], ZooEntry]] = {
    "digits-cnn": lambda: _build(DigitsCNN, 4, 1, 8, 8),
    "digits-mlp": lambda: _build(DigitsMLP, 4, 64),
    "resnet-mini": lambda: _build(ResNetMini, 2, 3, 32, 32),
    "vit-mini": lambda: _build(ViTMini, 2, 3, 32, 32),
    "deep-resnet": lambda: _build(lambda: DeepResidualCNN(16), 2, 3, 8, 8),
}
"""name -> factory returning ``(model, example_inputs)``; a new model and new inputs on every call."""


def list_models() -> list[str]:
    """The names :func:`get_model` accepts, sorted."""
    return sorted(MODELS)


def get_model(name: str) -> ZooEntry:
    """Build the zoo model ``name``: ``(model in eval mode, example_inputs)``, deterministic on every call.

    Raises SlimfxError naming the closest known model when ``name`` is unknown.
    """
    if name not in MODELS:
        raise SlimfxError(f"unknown model {name!r}{did_you_mean(name, MODELS)}; "
                          f"available: {', '.join(list_models())}")
    return MODELS[name]()
