"""Observers: they watch tensors during calibration and choose quantization parameters.

Every observer has ``observe(tensor)``, ``qparams() -> (scale, zero_point)`` (one entry per slot: a
scalar's worth for per-tensor, one per channel, one per group) and ``state`` (a dict of tensors). Under
``torch.distributed`` (when initialised) ``sync()`` all-reduces the state so that N ranks that observed
N shards of the data choose exactly the qparams one process observing all of it would:

- ``minmax``: running min/max per slot; sync = all-reduce MIN / MAX.
- ``moving-average``: exponential moving average of each batch's min/max. An EMA of shards is not the
  EMA of the whole batches, so this observer all-reduces each batch's min/max (MIN / MAX) inside
  ``observe`` when distributed is initialised; ``sync`` has nothing left to do.
- ``percentile`` / ``mse``: a histogram of 2048 bins over ``(-R, R)`` with ``R`` a power of two above
  every |value| seen. Bin ``b`` holds ``floor(x * N / 2R) + N/2``: exact arithmetic, so when ``R`` doubles
  merging bin pairs gives the histogram the larger range would have produced; the histogram is a function
  of the multiset of values and ``R`` only. sync = all-reduce MAX of ``log2 R``, rescale, then SUM.
  ``percentile`` clips at the p-th / (100-p)-th percentile; ``mse`` searches the clipping range that
  minimises the expected squared quantization error over the histogram.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimfx.errors import PipelineError, did_you_mean
from slimfx.passes.quant.spec import QuantSpec, fake_quantize, qparams_from_range, rows_view

HISTOGRAM_BINS = 2048


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Observer:
    """Base class: per-slot running min/max (``minmax``)."""

    name = "minmax"

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    @property
    def observed(self) -> bool:
        return self.min_val is not None

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The tensors that define the observer (what ``sync`` all-reduces)."""
        return {} if self.min_val is None else {"min": self.min_val, "max": self.max_val}

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows_view(x.detach().float(), self.spec)
        return rows.amin(dim=1), rows.amax(dim=1)

    def observe(self, x: torch.Tensor) -> None:
        """Record a tensor (an activation batch, or a weight)."""
        lo, hi = self._batch_range(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def sync(self) -> None:
        """All-reduce the state across ranks (no-op without an initialised torch.distributed)."""
        dist = _dist()
        if dist is None:
            return
        self._require_observed()
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX)

    def clip(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-slot range [lo, hi] the qparams must cover."""
        self._require_observed()
        return self.min_val, self.max_val

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale fp32 [slots], zero_point int32 [slots]) for the observed data."""
        lo, hi = self.clip()
        return qparams_from_range(lo, hi, self.spec)

    def _require_observed(self) -> None:
        if self.min_val is None:
            raise ValueError(f"{self.name} observer has seen no data; run calibration batches through it first")


class MovingAverageObserver(Observer):
    """EMA of each batch's min/max: ``m <- m + c (batch - m)``, c = ``averaging_constant`` (0.01)."""

    name = "moving-average"

    def __init__(self, spec: QuantSpec, averaging_constant: float = 0.01):
        super().__init__(spec)
        self.averaging_constant = averaging_constant

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        dist = _dist()
        if dist is not None:  # the EMA must see the global batch's range (see the module docstring)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)

    def sync(self) -> None:
        self._require_observed()


class HistogramObserver(Observer):
    """Per-slot histogram with an exact, mergeable power-of-two range (base of percentile and mse)."""

    name = "histogram"

    def __init__(self, spec: QuantSpec, bins: int = HISTOGRAM_BINS):
        super().__init__(spec)
        if bins < 4 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 4, got {bins}")
        self.bins = bins
        self.histogram: torch.Tensor | None = None  # float64 counts [slots, bins]
        self.exponent: int = -1000  # R = 2**exponent

    @property
    def state(self) -> dict[str, torch.Tensor]:
        base = super().state
        if self.histogram is not None:
            base = {**base, "histogram": self.histogram, "exponent": torch.tensor(self.exponent)}
        return base

    def _grow(self, exponent: int) -> None:
        """Rescale the histogram to range 2**exponent (merging bin pairs once per doubling)."""
        half = self.bins // 2
        while self.exponent < exponent:
            if self.histogram is not None:
                index = (torch.arange(self.bins) + half) // 2
                merged = torch.zeros_like(self.histogram)
                merged.index_add_(1, index, self.histogram)
                self.histogram = merged
            self.exponent += 1

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        rows = rows_view(x.detach().double(), self.spec)
        amax = float(rows.abs().max()) if rows.numel() else 0.0
        if amax > 0:
            # R strictly above amax, so every value lands in [0, bins) without clamping
            self._grow(math.floor(math.log2(amax)) + 1)
        if self.histogram is None:
            self.histogram = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64)
        width = 2.0 ** (self.exponent - int(math.log2(self.bins)) + 1)  # 2R / bins, a power of two
        index = torch.floor(rows / width).long() + self.bins // 2
        offsets = torch.arange(rows.shape[0]).unsqueeze(1) * self.bins
        counts = torch.bincount((index + offsets).reshape(-1), minlength=rows.shape[0] * self.bins)
        self.histogram += counts.reshape(rows.shape[0], self.bins).double()

    def sync(self) -> None:
        dist = _dist()
        if dist is None:
            return
        super().sync()
        exponent = torch.tensor([self.exponent], dtype=torch.int64)
        dist.all_reduce(exponent, op=dist.ReduceOp.MAX)
        self._grow(int(exponent))
        dist.all_reduce(self.histogram, op=dist.ReduceOp.SUM)

    def bin_edges(self) -> torch.Tensor:
        """The ``bins + 1`` bin edges in float64."""
        width = 2.0 ** (self.exponent - int(math.log2(self.bins)) + 1)
        return (torch.arange(self.bins + 1, dtype=torch.float64) - self.bins // 2) * width


class PercentileObserver(HistogramObserver):
    """Clip each slot at its ``100 - percentile`` and ``percentile`` percentiles (default 99.99)."""

    name = "percentile"

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = HISTOGRAM_BINS):
        super().__init__(spec, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def clip(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_observed()
        edges = self.bin_edges()
        cdf = self.histogram.cumsum(dim=1)
        total = cdf[:, -1:].clamp_min(1)
        q = self.percentile / 100.0
        upper = torch.searchsorted(cdf / total, torch.full_like(total, q)).clamp_max(self.bins - 1)
        lower = torch.searchsorted(cdf / total, torch.full_like(total, 1.0 - q), right=True).clamp_max(self.bins - 1)
        hi = torch.minimum(edges[upper.squeeze(1) + 1].float(), self.max_val)
        lo = torch.maximum(edges[lower.squeeze(1)].float(), self.min_val)
        return lo, hi


class MSEObserver(HistogramObserver):
    """Search ``alpha`` in (0, 1] for the range ``alpha x [min, max]`` minimising the expected squared error.

    The error of a candidate is ``sum_bins count x (fake_quant(centre) - centre)^2``; ``steps`` candidates.
    """

    name = "mse"

    def __init__(self, spec: QuantSpec, steps: int = 64, bins: int = HISTOGRAM_BINS):
        super().__init__(spec, bins)
        self.steps = steps

    def clip(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_observed()
        edges = self.bin_edges()
        centres = ((edges[1:] + edges[:-1]) / 2).float()  # [bins]
        counts = self.histogram.float()  # [slots, bins]
        lo, hi = self.min_val, self.max_val
        tensor_spec = dataclasses.replace(self.spec, granularity="per-tensor")
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for step in range(self.steps, 0, -1):
            alpha = step / self.steps
            c_lo, c_hi = lo * alpha, hi * alpha
            scale, zp = qparams_from_range(c_lo, c_hi, tensor_spec)
            q = torch.stack([fake_quantize(centres, s, z, tensor_spec) for s, z in zip(scale, zp)])
            err = (counts * (q - centres) ** 2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        return best_lo, best_hi


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": Observer,
    "moving-average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, spec: QuantSpec, option: str = "observer") -> Observer:
    """An observer by name (``minmax``, ``moving-average``, ``percentile``, ``mse``); a percentile may be
    given inline (``percentile99.9``). PipelineError with a did-you-mean for unknown names."""
    text = str(name).strip().lower()
    if text.startswith("percentile") and text != "percentile":
        try:
            return PercentileObserver(spec, float(text[len("percentile"):]))
        except ValueError as exc:
            raise PipelineError(f"option {option!r}: {name!r}: {exc}; e.g. percentile99.9") from None
    if text not in OBSERVERS:
        raise PipelineError(f"option {option!r}: unknown observer {name!r}{did_you_mean(text, OBSERVERS)}; "
                            f"choose one of {', '.join(OBSERVERS)} (or percentileP, e.g. percentile99.9)")
    return OBSERVERS[text](spec)
