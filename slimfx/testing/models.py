"""Hypothesis strategies that generate small, random, valid PyTorch models with matching example inputs.

Every generated model traces with ``torch.fx.symbolic_trace`` and ``torch.export.export`` and both agree
with eager execution. Weights depend only on the hypothesis draw (a drawn seed inside a forked torch RNG),
and BatchNorm / LayerNorm / GroupNorm get non-trivial statistics and affine parameters, so a pass such as
fold-bn is actually exercised. Ops are written as a mix of module calls (``nn.ReLU()``), functionals
(``F.relu``) and tensor methods (``x.relu()``, ``x.flatten(1)``) so canonicalization is exercised too.

The building blocks are plain ``nn.Module`` classes defined here, so generated models deep-copy and their
state_dicts round-trip.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from slimfx.errors import SlimfxError, did_you_mean

__all__ = [
    "ACTIVATIONS",
    "CHAINING_ACTIVATIONS",
    "Activation",
    "AttentionBlock",
    "CNN_FEATURES",
    "ChannelShuffle",
    "ConcatBlock",
    "ConvClassifierHead",
    "ConvNet",
    "ConvNormAct",
    "DepthwiseSeparable",
    "FeedForward",
    "FlattenLinearHead",
    "FunctionalLinear",
    "InputSpec",
    "MLP",
    "MLPLayer",
    "ModelCase",
    "MultiheadSelfAttention",
    "Pool",
    "PoolLinearHead",
    "ResidualBlock",
    "SelfAttention",
    "SqueezeExcite",
    "TransformerModel",
    "attention_models",
    "cnns",
    "inputs_like",
    "make_activation",
    "mlps",
    "models",
]

#: ``identity`` chains layers directly (functional style: no node at all); ``relu_`` writes in place
ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "identity", "relu_")
#: the activations after which a layer's output reaches the next layer unchanged or through an in-place op
CHAINING_ACTIVATIONS = ("identity", "relu_")
CALL_STYLES = ("module", "functional", "method")

CNN_BLOCKS = ("plain", "residual", "concat", "depthwise", "grouped", "se", "shuffle", "pool", "groupnorm")
CNN_FEATURES = frozenset((*CNN_BLOCKS, "conv1d"))
"""What ``cnns(features=...)`` may restrict to: the block kinds, plus ``conv1d`` (allow 1-d models)."""

_SEED = st.integers(0, 2**31 - 1)
_BATCH = 2


# ---------------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class InputSpec:
    """Shape and dtype of one model input; integer inputs (token ids) are drawn from [0, index_bound)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    index_bound: int | None = None

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        if self.index_bound is not None:
            return torch.randint(0, self.index_bound, self.shape, generator=generator, dtype=self.dtype)
        return torch.randn(self.shape, generator=generator, dtype=self.dtype)


@dataclass(repr=False)
class ModelCase:
    """A generated model, inputs it accepts, and a short recipe saying how it was built.

    ``input_specs`` defaults to the shapes/dtypes of ``example_inputs`` (integer inputs keep their range).
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    description: str
    input_specs: tuple[InputSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.input_specs:
            self.input_specs = tuple(_spec_of(t) for t in self.example_inputs)

    def fresh_inputs(self, seed: int) -> tuple[torch.Tensor, ...]:
        """New random inputs with the example inputs' shapes and dtypes; deterministic in ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        return tuple(spec.sample(generator) for spec in self.input_specs)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}"
                           for t in self.example_inputs)
        return f"ModelCase({self.description!r}, inputs=[{shapes}])"


def _spec_of(tensor: torch.Tensor) -> InputSpec:
    bound = None
    if not tensor.dtype.is_floating_point and not tensor.dtype.is_complex:
        bound = int(tensor.max()) + 1 if tensor.numel() else 1
    return InputSpec(tuple(tensor.shape), tensor.dtype, bound)


def inputs_like(case: ModelCase) -> st.SearchStrategy[tuple[torch.Tensor, ...]]:
    """Strategy for extra inputs of ``case`` (same shapes, dtypes and index ranges, new values)."""
    return _SEED.map(case.fresh_inputs)


def _finish(module: nn.Module, specs: tuple[InputSpec, ...], description: str, seed: int,
            training: bool) -> ModelCase:
    _randomize_norms(module)
    module.train(training)
    case = ModelCase(module, (), description, specs)
    case.example_inputs = case.fresh_inputs(seed)
    return case


@torch.no_grad()
def _randomize_norms(module: nn.Module) -> None:
    """Give every norm layer non-trivial statistics and affine parameters (default init makes BN a no-op)."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.running_mean.copy_(torch.randn_like(sub.running_mean) * 0.5)
            sub.running_var.copy_(torch.rand_like(sub.running_var) * 1.5 + 0.5)
        if isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            if sub.weight is not None:
                sub.weight.copy_(torch.rand_like(sub.weight) + 0.5)
            if sub.bias is not None:
                sub.bias.copy_(torch.randn_like(sub.bias) * 0.2)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """A forked torch RNG seeded with ``seed``: construction is deterministic, global state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------------
# Building blocks

_ACTIVATION_MODULES = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "identity": nn.Identity,
    "relu_": functools.partial(nn.ReLU, inplace=True),
}
_ACTIVATION_FUNCTIONS = {
    "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "identity": lambda x: x,
    "relu_": torch.relu_,
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "relu_": "relu_"}


class Activation(nn.Module):
    """An activation called as a functional or a tensor method (traced as call_function / call_method)."""

    def __init__(self, name: str, style: str) -> None:
        super().__init__()
        self.name = name
        self.style = style if name in _ACTIVATION_METHODS else "functional"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "method":
            return getattr(x, _ACTIVATION_METHODS[self.name])()
        return _ACTIVATION_FUNCTIONS[self.name](x)

    def extra_repr(self) -> str:
        return f"{self.name}, style={self.style}"


def make_activation(name: str, style: str) -> nn.Module:
    """``nn.ReLU()`` for style ``module``; otherwise an :class:`Activation` calling F.relu / x.relu()."""
    if style == "module":
        return _ACTIVATION_MODULES[name]()
    return Activation(name, style)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv1d if dims == 1 else nn.Conv2d


def _batch_norm(dims: int, channels: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)


def _add(a: torch.Tensor, b: torch.Tensor, style: str) -> torch.Tensor:
    if style == "functional":
        return torch.add(a, b)
    if style == "method":
        return a.add(b)
    return a + b


class ConvNormAct(nn.Module):
    """conv -> norm (batch / group / none) -> activation (optional)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 norm: str = "batch", norm_groups: int = 1, act: nn.Module | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        self.conv = _conv(dims)(cin, cout, kernel, stride, padding=kernel // 2, groups=groups,
                                bias=bias or norm == "none")
        if norm == "batch":
            self.norm = _batch_norm(dims, cout)
        elif norm == "group":
            self.norm = nn.GroupNorm(norm_groups, cout)
        else:
            self.norm = None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class ResidualBlock(nn.Module):
    """act(body(x) + shortcut(x)); the shortcut is a strided 1x1 conv + BN when shape changes."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int, act: nn.Module, out_act: nn.Module,
                 add_style: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(dims, cin, cout, 3, stride, act=act),
            ConvNormAct(dims, cout, cout, 3, 1),
        )
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = ConvNormAct(dims, cin, cout, 1, stride)
        self.out_act = out_act
        self.add_style = add_style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.out_act(_add(self.body(x), skip, self.add_style))


class ConcatBlock(nn.Module):
    """Two branches (1x1 and 3x3 conv) concatenated along channels."""

    def __init__(self, dims: int, cin: int, left: int, right: int, act: nn.Module) -> None:
        super().__init__()
        self.left = ConvNormAct(dims, cin, left, 1, act=act)
        self.right = ConvNormAct(dims, cin, right, 3, act=make_activation("relu", "functional"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class DepthwiseSeparable(nn.Module):
    """Depthwise conv (groups=C, optional channel multiplier) -> BN -> act -> pointwise conv -> BN."""

    def __init__(self, dims: int, cin: int, multiplier: int, cout: int, kernel: int, act: nn.Module) -> None:
        super().__init__()
        self.depthwise = ConvNormAct(dims, cin, cin * multiplier, kernel, groups=cin, act=act)
        self.pointwise = ConvNormAct(dims, cin * multiplier, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class SqueezeExcite(nn.Module):
    """x * gate(fc(pool(x))): a per-channel gate computed by 1x1 convs or by linears."""

    def __init__(self, dims: int, channels: int, reduced: int, fc: str, gate: str) -> None:
        super().__init__()
        self.dims = dims
        self.channels = channels
        self.fc = fc
        self.gate = gate
        if fc == "conv":
            self.reduce = _conv(dims)(channels, reduced, 1)
            self.expand = _conv(dims)(reduced, channels, 1)
        else:
            self.reduce = nn.Linear(channels, reduced)
            self.expand = nn.Linear(reduced, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc == "conv":
            pool = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
            s = self.expand(F.relu(self.reduce(pool(x, 1))))
        else:
            s = self.expand(self.reduce(x.mean(dim=tuple(range(2, 2 + self.dims)))).relu())
            if self.dims == 1:
                s = s.unsqueeze(-1)
            else:
                s = s.view(-1, self.channels, 1, 1)
        s = torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s)
        return x * s


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: split channels into groups, transpose the group axes, merge back."""

    def __init__(self, dims: int, channels: int, groups: int, style: str) -> None:
        super().__init__()
        self.dims = dims
        self.channels = channels
        self.groups = groups
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_group = self.channels // self.groups
        if self.style == "unflatten":
            return x.unflatten(1, (self.groups, per_group)).transpose(1, 2).flatten(1, 2)
        n = x.shape[0]
        if self.dims == 1:
            length = x.shape[2]
            x = x.view(n, self.groups, per_group, length).transpose(1, 2).contiguous()
            return x.view(n, -1, length)
        h, w = x.shape[2], x.shape[3]
        x = x.reshape(n, self.groups, per_group, h, w).transpose(1, 2)
        return x.reshape(n, -1, h, w)


class Pool(nn.Module):
    """2x downsampling by max or average pooling, as a module or a functional."""

    def __init__(self, dims: int, kind: str, style: str) -> None:
        super().__init__()
        self.dims = dims
        self.kind = kind
        self.style = style
        if style == "module":
            table = {(1, "max"): nn.MaxPool1d, (1, "avg"): nn.AvgPool1d,
                     (2, "max"): nn.MaxPool2d, (2, "avg"): nn.AvgPool2d}
            self.pool = table[dims, kind](2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "module":
            return self.pool(x)
        table = {(1, "max"): F.max_pool1d, (1, "avg"): F.avg_pool1d,
                 (2, "max"): F.max_pool2d, (2, "avg"): F.avg_pool2d}
        return table[self.dims, self.kind](x, 2)


class PoolLinearHead(nn.Module):
    """Global average pool -> flatten -> linear."""

    def __init__(self, dims: int, channels: int, classes: int, style: str) -> None:
        super().__init__()
        self.dims = dims
        self.style = style
        if style == "module":
            self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "module":
            x = self.flatten(self.pool(x))
        elif self.style == "mean":
            x = x.mean(dim=tuple(range(2, 2 + self.dims)))
        else:
            pool = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
            x = pool(x, 1).flatten(1)
        return self.fc(x)


class FlattenLinearHead(nn.Module):
    """Flatten channels x spatial -> linear (the linear's input expands each channel by the spatial size)."""

    def __init__(self, features: int, classes: int, style: str) -> None:
        super().__init__()
        self.style = style
        if style == "module":
            self.flatten = nn.Flatten()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "module":
            x = self.flatten(x)
        elif self.style == "method":
            x = x.flatten(1)
        elif self.style == "functional":
            x = torch.flatten(x, 1)
        else:
            x = x.view(x.size(0), -1)
        return self.fc(x)


class ConvClassifierHead(nn.Module):
    """1x1 conv to class channels -> global average pool -> flatten."""

    def __init__(self, dims: int, channels: int, classes: int) -> None:
        super().__init__()
        self.dims = dims
        self.classifier = _conv(dims)(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
        return pool(self.classifier(x), 1).flatten(1)


class ConvNet(nn.Module):
    """stem -> blocks -> head."""

    def __init__(self, stem: nn.Module, blocks: Iterable[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class FunctionalLinear(nn.Module):
    """A linear layer written as F.linear over its own parameters (traced as get_attr + call_function)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        reference = nn.Linear(cin, cout)
        self.weight = reference.weight
        self.bias = reference.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MLPLayer(nn.Module):
    """linear -> norm (batch / layer / none) -> act -> dropout, plus ``x +`` when residual."""

    def __init__(self, cin: int, cout: int, linear: str, norm: str, act: nn.Module, dropout: str,
                 residual: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout) if linear == "module" else FunctionalLinear(cin, cout)
        self.norm = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm](cout) if norm != "none" else None
        self.act = act
        self.dropout = nn.Dropout(0.1) if dropout == "module" else None
        self.functional_dropout = dropout == "functional"
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.norm is not None:
            h = self.norm(h)
        h = self.act(h)
        if self.dropout is not None:
            h = self.dropout(h)
        if self.functional_dropout:
            h = F.dropout(h, 0.1, self.training)
        return x + h if self.residual else h


class MLP(nn.Module):
    """hidden MLPLayers -> output linear."""

    def __init__(self, layers: Iterable[nn.Module], width: int, outputs: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.out = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(x))


class SelfAttention(nn.Module):
    """Separate q/k/v linears -> split heads -> F.scaled_dot_product_attention -> merge heads -> out."""

    def __init__(self, dim: int, heads: int, causal: bool, split: str) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.causal = causal
        self.split = split
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "unflatten":
            x = x.unflatten(-1, (self.heads, self.head_dim))
        else:
            x = x.view(x.shape[0], x.shape[1], self.heads, self.head_dim)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)
        o = o.flatten(2) if self.split == "unflatten" else o.reshape(x.shape[0], x.shape[1], -1)
        return self.out(o)


class MultiheadSelfAttention(nn.Module):
    """nn.MultiheadAttention (batch_first) used as self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class FeedForward(nn.Module):
    """linear -> GELU -> linear."""

    def __init__(self, dim: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionBlock(nn.Module):
    """A transformer block, pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x)))."""

    def __init__(self, attention: nn.Module, feed_forward: nn.Module, dim: int, pre_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = attention
        self.norm2 = nn.LayerNorm(dim)
        self.feed_forward = feed_forward
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.norm1(x))
            return x + self.feed_forward(self.norm2(x))
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.feed_forward(x))


class TransformerModel(nn.Module):
    """input projection (+ positions) -> blocks -> optional final norm -> mean over tokens -> linear."""

    def __init__(self, embed: nn.Module, positions: torch.Tensor | None, blocks: Iterable[nn.Module],
                 final_norm: nn.Module | None, dim: int, outputs: int, pool: str) -> None:
        super().__init__()
        self.embed = embed
        self.positions = nn.Parameter(positions) if positions is not None else None
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = final_norm
        self.pool = pool
        self.head = nn.Linear(dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.positions is not None:
            x = x + self.positions
        x = self.blocks(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        x = x.mean(dim=1) if self.pool == "method" else torch.mean(x, 1)
        return self.head(x)


# ---------------------------------------------------------------------------------------------------------
# Strategies


def _draw_activation(draw, names: tuple[str, ...] = ACTIVATIONS) -> tuple[nn.Module, str]:
    """An activation; a quarter of the draws are one that chains layers directly (``identity``, or ``relu_``
    in place), so passes meet layers feeding each other in most examples, not one in ten."""
    chaining = tuple(n for n in names if n in CHAINING_ACTIVATIONS)
    if chaining and draw(st.integers(0, 3)) == 0:
        names = chaining
    name = draw(st.sampled_from(names))
    return make_activation(name, draw(st.sampled_from(CALL_STYLES))), name


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def mlps(draw, max_depth: int = 4, max_width: int = 32, *, training: bool = False) -> ModelCase:
    """MLPs on [2, features] inputs: linears (module or F.linear), activations, optional BatchNorm1d /
    LayerNorm, dropout, and residual adds between equal widths; a quarter of the layers are bare (linear
    straight into the next, or through an in-place relu)."""
    if max_depth < 1 or max_width < 1:
        raise SlimfxError(f"mlps needs max_depth >= 1 and max_width >= 1, got {max_depth}, {max_width}")
    seed = draw(_SEED)
    with _seeded(seed):
        width = draw(st.integers(1, max_width))
        first = width
        layers, recipe = [], []
        for _ in range(draw(st.integers(1, max_depth))):
            cout = width if draw(st.booleans()) else draw(st.integers(1, max_width))
            linear = draw(st.sampled_from(("module", "module", "functional")))
            # a quarter of the layers are bare: linear straight into the next linear (or via an in-place relu)
            bare = draw(st.integers(0, 3)) == 0
            norm = "none" if bare else draw(st.sampled_from(("none", "batch", "layer")))
            act, act_name = _draw_activation(draw, CHAINING_ACTIVATIONS if bare else ACTIVATIONS)
            dropout = "none" if bare else draw(st.sampled_from(("none", "module", "functional")))
            residual = cout == width and draw(st.booleans())
            layers.append(MLPLayer(width, cout, linear, norm, act, dropout, residual))
            parts = [f"{'F.linear' if linear == 'functional' else 'linear'}({width}->{cout})"]
            parts += [f"{norm}norm"] if norm != "none" else []
            parts += [act_name] + (["dropout"] if dropout != "none" else [])
            recipe.append("-".join(parts) + ("+res" if residual else ""))
            width = cout
        outputs = draw(st.integers(1, 10))
        module = MLP(layers, width, outputs)
        description = f"mlp in={first}: " + " | ".join(recipe) + f" -> linear({width}->{outputs})"
        return _finish(module, (InputSpec((_BATCH, first)),), description, seed, training)


def _check_features(features: Iterable[str] | None) -> frozenset[str]:
    if features is None:
        return CNN_FEATURES
    chosen = frozenset(features)
    for name in chosen - CNN_FEATURES:
        raise SlimfxError(f"unknown cnn feature {name!r}{did_you_mean(name, CNN_FEATURES)}; "
                          f"choose from {', '.join(sorted(CNN_FEATURES))}")
    return chosen


@st.composite
def cnns(draw, max_blocks: int = 4, max_channels: int = 32, features: Iterable[str] | None = None, *,
         training: bool = False) -> ModelCase:
    """CNNs: a stem conv, up to ``max_blocks`` blocks and a classifier head.

    Blocks are drawn from ``features`` (default: all of :data:`CNN_FEATURES`): plain conv-bn-act,
    residual add (1x1 projection when channels or stride change), concat of two branches, depthwise
    separable (groups=C), grouped conv, squeeze-excite gate, channel shuffle, max/avg pooling, conv-GroupNorm.
    ``conv1d`` in features allows 1-d models. Heads: pool-linear, flatten-linear or a 1x1 conv classifier.
    """
    allowed = _check_features(features)
    if max_blocks < 0 or max_channels < 2:
        raise SlimfxError(
            f"cnns needs max_blocks >= 0 and max_channels >= 2, got {max_blocks}, {max_channels}")
    seed = draw(_SEED)
    with _seeded(seed):
        dims = draw(st.sampled_from((1, 2) if "conv1d" in allowed else (2,)))
        in_channels = draw(st.sampled_from((1, 3)) if dims == 2 else st.integers(1, 4))
        size = input_size = draw(st.integers(8, 16) if dims == 2 else st.integers(8, 32))
        kinds = [k for k in CNN_BLOCKS if k in allowed]
        needs_divisible = bool(kinds) and set(kinds) <= {"shuffle", "grouped"}
        channels = draw(st.integers(1, max_channels // 2).map(lambda k: 2 * k) if needs_divisible
                        else st.integers(1, max_channels))
        stride = 2 if size >= 12 and draw(st.booleans()) else 1
        act, act_name = _draw_activation(draw)
        stem = ConvNormAct(dims, in_channels, channels, 3, stride, act=act, bias=draw(st.booleans()))
        size = (size - 1) // stride + 1
        recipe = [f"stem conv3({in_channels}->{channels}{',s2' if stride == 2 else ''})-bn-{act_name}"]

        blocks = []
        for _ in range(draw(st.integers(min(1, len(kinds)), max_blocks))):
            feasible = [k for k in kinds if _block_feasible(k, channels, size, max_channels)]
            if not feasible:
                break
            kind = draw(st.sampled_from(feasible))
            block, channels, size, label = _draw_cnn_block(draw, kind, dims, channels, size, max_channels)
            blocks.append(block)
            recipe.append(label)

        classes = draw(st.integers(1, 10))
        heads = ["pool-linear", "conv-classifier"] + (["flatten-linear"] if size > 1 else [])
        head_kind = draw(st.sampled_from(heads))
        if head_kind == "pool-linear":
            style = draw(st.sampled_from(("module", "mean", "functional")))
            head = PoolLinearHead(dims, channels, classes, style)
        elif head_kind == "flatten-linear":
            head = FlattenLinearHead(channels * size**dims, classes,
                                     draw(st.sampled_from(("module", "method", "functional", "view"))))
        else:
            head = ConvClassifierHead(dims, channels, classes)
        module = ConvNet(stem, blocks, head)
        spatial = "x".join([str(input_size)] * dims)
        description = (f"cnn{dims}d {in_channels}x{spatial}: " + " | ".join(recipe)
                       + f" -> {head_kind}({classes})")
        input_shape = (_BATCH, in_channels) + (input_size,) * dims
        return _finish(module, (InputSpec(input_shape),), description, seed, training)


def _block_feasible(kind: str, channels: int, size: int, max_channels: int) -> bool:
    if kind in ("grouped", "shuffle"):
        return channels >= 2
    if kind == "pool":
        return size >= 4
    return True


def _group_choices(channels: int) -> list[int]:
    """Group counts > 1 dividing ``channels``, preferring ones that leave more than one channel per group."""
    proper = [d for d in _divisors(channels) if 1 < d < channels]
    return proper or [channels]


def _draw_stride(draw, size: int) -> int:
    return 2 if size >= 4 and draw(st.booleans()) else 1


def _draw_cnn_block(draw, kind: str, dims: int, c: int, size: int,
                    max_channels: int) -> tuple[nn.Module, int, int, str]:
    """Draw one block of ``kind`` on ``c`` channels at spatial ``size``; return it, its output channels,
    output size and a short label."""
    widths = st.integers(1, max_channels)
    if kind == "plain":
        cout, kernel, stride = draw(widths), draw(st.sampled_from((1, 3))), _draw_stride(draw, size)
        norm = draw(st.sampled_from(("batch", "batch", "none")))
        act, act_name = _draw_activation(draw)
        block = ConvNormAct(dims, c, cout, kernel, stride, norm=norm, act=act, bias=draw(st.booleans()))
        norm_label = "-bn" if norm == "batch" else ""
        label = f"conv{kernel}({c}->{cout}{',s2' if stride == 2 else ''}){norm_label}-{act_name}"
        return block, cout, (size - 1) // stride + 1, label
    if kind == "residual":
        cout = c if draw(st.booleans()) else draw(widths)
        stride = _draw_stride(draw, size)
        act, act_name = _draw_activation(draw)
        out_act, _ = _draw_activation(draw, ("relu", "relu6", "silu", "hardswish"))
        block = ResidualBlock(dims, c, cout, stride, act, out_act, draw(st.sampled_from(CALL_STYLES)))
        label = f"res({c}->{cout}{',s2' if stride == 2 else ''}{',proj' if block.shortcut else ''})"
        return block, cout, (size - 1) // stride + 1, label
    if kind == "concat":
        left = draw(st.integers(1, max_channels - 1))
        right = draw(st.integers(1, max_channels - left))
        act, _ = _draw_activation(draw)
        return ConcatBlock(dims, c, left, right, act), left + right, size, f"concat({c}->{left}+{right})"
    if kind == "depthwise":
        multiplier = draw(st.integers(1, max(1, min(2, max_channels // c))))
        kernel = draw(st.sampled_from((3, 5)))
        cout = draw(widths)
        act, _ = _draw_activation(draw)
        block = DepthwiseSeparable(dims, c, multiplier, cout, kernel, act)
        return block, cout, size, f"dw{kernel}({c}x{multiplier})-pw({c * multiplier}->{cout})"
    if kind == "grouped":
        groups = draw(st.sampled_from(_divisors(c)[1:]))
        cout = groups * draw(st.integers(1, max(1, max_channels // groups)))
        act, act_name = _draw_activation(draw)
        block = ConvNormAct(dims, c, cout, 3, groups=groups, act=act)
        return block, cout, size, f"gconv3({c}->{cout},g{groups})-bn-{act_name}"
    if kind == "se":
        reduced = draw(st.integers(1, max(1, c // 2)))
        fc = draw(st.sampled_from(("conv", "linear")))
        gate = draw(st.sampled_from(("sigmoid", "hardsigmoid")))
        return SqueezeExcite(dims, c, reduced, fc, gate), c, size, f"se({c}->{reduced},{fc},{gate})"
    if kind == "shuffle":
        groups = draw(st.sampled_from(_group_choices(c)))
        style = draw(st.sampled_from(("unflatten", "reshape")))
        return ChannelShuffle(dims, c, groups, style), c, size, f"shuffle(g{groups},{style})"
    if kind == "pool":
        pool_kind = draw(st.sampled_from(("max", "avg")))
        return Pool(dims, pool_kind, draw(st.sampled_from(("module", "functional")))), c, size // 2, \
            f"{pool_kind}pool2"
    if kind == "groupnorm":
        cout = draw(widths)
        groups = draw(st.sampled_from(_divisors(cout)))
        act, act_name = _draw_activation(draw)
        block = ConvNormAct(dims, c, cout, 3, norm="group", norm_groups=groups, act=act)
        return block, cout, size, f"conv3({c}->{cout})-gn{groups}-{act_name}"
    raise AssertionError(f"unhandled cnn block kind {kind!r}")


@st.composite
def attention_models(draw, max_dim: int = 32, *, training: bool = False) -> ModelCase:
    """Transformer-style models: token embedding or linear input projection, optional learned positions,
    1-2 blocks of self-attention (nn.MultiheadAttention, or q/k/v linears + F.scaled_dot_product_attention
    + output projection), LayerNorm, a GELU MLP and residual adds, then mean over tokens -> linear."""
    if max_dim < 2:
        raise SlimfxError(f"attention_models needs max_dim >= 2, got {max_dim}")
    seed = draw(_SEED)
    with _seeded(seed):
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if 2 * h <= max_dim]))
        head_dim = draw(st.sampled_from([d for d in (2, 4, 8) if heads * d <= max_dim]))
        dim = heads * head_dim
        tokens = draw(st.integers(4, 12))
        if draw(st.booleans()):
            vocab = draw(st.integers(8, 64))
            embed: nn.Module = nn.Embedding(vocab, dim)
            spec = InputSpec((_BATCH, tokens), torch.int64, vocab)
            recipe = [f"embed({vocab}->{dim})"]
        else:
            features = draw(st.integers(1, max_dim))
            embed = nn.Linear(features, dim)
            spec = InputSpec((_BATCH, tokens, features))
            recipe = [f"linear({features}->{dim})"]
        positions = torch.randn(1, tokens, dim) * 0.02 if draw(st.booleans()) else None
        if positions is not None:
            recipe[0] += "+pos"

        blocks = []
        for _ in range(draw(st.integers(1, 2))):
            if draw(st.booleans()):
                attention: nn.Module = MultiheadSelfAttention(dim, heads)
                attention_label = f"mha(h{heads})"
            else:
                causal = draw(st.booleans())
                split = draw(st.sampled_from(("unflatten", "view")))
                attention = SelfAttention(dim, heads, causal, split)
                attention_label = f"qkv-sdpa(h{heads}{',causal' if causal else ''},{split})"
            hidden = draw(st.integers(1, 2 * max_dim))
            act, act_name = _draw_activation(draw, ("gelu", "gelu", "silu", "relu"))
            pre_norm = draw(st.booleans())
            blocks.append(AttentionBlock(attention, FeedForward(dim, hidden, act), dim, pre_norm))
            recipe.append(f"{'pre' if pre_norm else 'post'}ln {attention_label} mlp({hidden},{act_name})")
        final_norm = nn.LayerNorm(dim) if draw(st.booleans()) else None
        outputs = draw(st.integers(1, 10))
        module = TransformerModel(embed, positions, blocks, final_norm, dim, outputs,
                                  draw(st.sampled_from(("method", "functional"))))
        tail = f"{'ln-' if final_norm is not None else ''}mean-linear({outputs})"
        description = f"transformer d{dim} t{tokens}: " + " | ".join(recipe) + f" -> {tail}"
        return _finish(module, (spec,), description, seed, training)


def models(*, training: bool = False) -> st.SearchStrategy[ModelCase]:
    """Any of :func:`mlps`, :func:`cnns` and :func:`attention_models` with their default sizes."""
    return st.one_of(mlps(training=training), cnns(training=training), attention_models(training=training))
