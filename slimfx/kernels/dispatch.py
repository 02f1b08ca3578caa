"""Pick the fastest *correct* kernel for this machine and shape, measure once, remember on disk.

CUDA tensors always go to the Triton kernels (int8 convs, which have none, to ``dense``: cuDNN on the
dequantized weight). On CPU every available candidate of :mod:`slimfx.kernels.cpu_kernels` (linears) or
:mod:`slimfx.kernels.conv_kernels` (convs) is run on a probe input (random values plus worst-case rows /
images that make int8 instructions saturate if they can) and compared with the spec; a candidate outside
the tolerance is never chosen and the reason is recorded. The correct ones are timed (a warm run, then up to a few runs
within :data:`TIME_BUDGET_S`; the fastest run counts) and the fastest wins. The choice is cached in
memory (once per process per shape bucket) and in a JSON file (``$SLIMFX_CACHE_DIR/kernels.json`` or
``~/.cache/slimfx/kernels.json``) keyed by machine (CPU model + torch CPU capability + torch version),
kernel family and shape bucket (M rounded up to a power of two, N, K, dtype, mode / block and density;
for convs the input shape with the batch rounded up, the weight shape, the geometry, layout and mode).

``SLIMFX_KERNEL=<name>`` (or ``int8:<name>,bsr:<name>,conv:<name>``), or a module's ``kernel=`` option, forces a
candidate without measuring; ``triton`` on CPU tensors runs the Triton interpreter and needs
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimfx.errors import KernelError, did_you_mean
from slimfx.kernels import conv_kernels, cpu_kernels, native
from slimfx.kernels.conv_kernels import ConvGeometry
from slimfx.kernels.cpu_kernels import ActQuant

FAMILIES = ("int8", "bsr", "conv")
TIME_BUDGET_S = 0.3
MAX_TIMED_RUNS = 5
CHECK_ROWS = 16
#: A candidate whose small runs extrapolate to this many times the best time so far is not timed in full
#: (``torch._int_mm`` on AVX2 would take seconds per shape).
SLOW_FACTOR = 8.0
PILOT_ROWS = 16
#: Candidates first timed within this factor of the fastest are timed again in turns with it.
FINALIST_FACTOR = 2.0
CACHE_VERSION = 1

_memory: dict[str, Choice] = {}
#: How a choice records candidates it did not weigh (a cached choice is measured again once they are usable).
NOT_AVAILABLE, SKIPPED = "not available", "skipped"
#: Bumped by :func:`clear_memory_cache`; kernel modules key their per-module memo of choices on it.
generation = 0
_lock = threading.Lock()


@dataclass
class Choice:
    """The outcome of measuring one family at one shape bucket on one machine."""

    family: str
    machine: str
    bucket: str
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ machine, keys, cache file


@functools.cache
def cpu_model() -> str:
    """The CPU model string (``model name`` in /proc/cpuinfo, else platform.processor()); read once."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_id() -> str:
    """What a cached choice is valid for: CPU model, torch's CPU capability and the torch version."""
    return f"{cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def cache_path() -> Path:
    """``$SLIMFX_CACHE_DIR/kernels.json``, else ``~/.cache/slimfx/kernels.json``."""
    return native.cache_dir() / "kernels.json"


def _round_up_pow2(m: int) -> int:
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


def _density_bucket(density: float) -> float:
    """Density rounded to 5%, never 0 (speed depends on it smoothly; 5% steps keep the cache small)."""
    return max(0.05, round(density * 20) / 20)


def int8_bucket(m: int, n: int, k: int, act: ActQuant, dtype: torch.dtype) -> str:
    return f"M{_round_up_pow2(m)} N{n} K{k} {str(dtype).removeprefix('torch.')} {act.label}"


def conv_bucket(x_shape: tuple[int, ...], w_shape: tuple[int, ...], geometry: ConvGeometry, act: ActQuant,
                dtype: torch.dtype, channels_last: bool) -> str:
    n, c, h, w = x_shape
    g = geometry
    return (f"N{_round_up_pow2(n)} C{c} H{h} W{w} O{w_shape[0]} k{w_shape[2]}x{w_shape[3]} "
            f"s{g.stride[0]}x{g.stride[1]} p{g.padding[0]}x{g.padding[1]} d{g.dilation[0]}x{g.dilation[1]} "
            f"g{g.groups} {str(dtype).removeprefix('torch.')} {'channels_last' if channels_last else 'nchw'} "
            f"{act.label}")


def bsr_bucket(m: int, n: int, k: int, block: tuple[int, int], density: float, dtype: torch.dtype) -> str:
    return (f"M{_round_up_pow2(m)} N{n} K{k} {str(dtype).removeprefix('torch.')} "
            f"block{block[0]}x{block[1]} density{_density_bucket(density):.2f}")


def _key(family: str, machine: str, bucket: str) -> str:
    return f"{family} || {machine} || {bucket}"


def _read_cache_file() -> dict[str, dict]:
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again and rewrite
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache_file(entries: dict[str, dict]) -> None:
    """Replace the cache file's entries (atomic: a concurrent reader sees the old or the new file, never half);
    OSError propagates."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _write_cache_entry(key: str, choice: Choice) -> None:
    try:
        _write_cache_file({**_read_cache_file(), key: asdict(choice)})
    except OSError:
        pass  # a read-only home must not break inference; the in-memory cache still holds the choice


def _choice_from_json(entry: dict) -> Choice | None:
    try:
        return Choice(family=entry["family"], machine=entry["machine"], bucket=entry["bucket"],
                      choice=entry["choice"], times_ms=dict(entry.get("times_ms", {})),
                      rejected=dict(entry.get("rejected", {})))
    except (KeyError, TypeError):
        return None


def forget_choices() -> int:
    """Drop this machine's cached choices, on disk and in memory, so the next use measures again (one
    measurement per bucket is kept forever otherwise: a load burst during it can cache a slower kernel).
    Returns how many disk entries were dropped; other machines' entries stay."""
    machine = machine_id()
    with _lock:
        entries = _read_cache_file()
        kept = {k: v for k, v in entries.items() if k.split(" || ")[1:2] != [machine]}
        if len(kept) != len(entries):
            try:
                _write_cache_file(kept)
            except OSError as e:
                raise KernelError(f"could not rewrite the kernel cache {cache_path()}: {e}") from e
    clear_memory_cache()
    return len(entries) - len(kept)


def clear_memory_cache() -> None:
    """Forget the choices made in this process (the disk cache is untouched), modules' memos included."""
    global generation
    with _lock:
        _memory.clear()
        generation += 1


# ------------------------------------------------------------------ forcing


def _candidates(family: str) -> dict:
    if family == "int8":
        return cpu_kernels.INT8_CANDIDATES
    if family == "bsr":
        return cpu_kernels.BSR_CANDIDATES
    if family == "conv":
        return conv_kernels.CONV_CANDIDATES
    raise KernelError(f"kernel family {family!r} is not one of {FAMILIES}")


def forced_kernel(family: str, kernel: str | None = None) -> str | None:
    """The candidate forced for ``family`` by ``kernel`` (a module option) or ``$SLIMFX_KERNEL``, or None.

    ``SLIMFX_KERNEL`` is a name (applies to every family) or ``family:name`` pairs joined by commas;
    ``auto`` or empty means measure.
    """
    name = kernel
    if name is None:
        spec = os.environ.get("SLIMFX_KERNEL", "").strip()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            fam, sep, value = part.partition(":")
            if not sep:
                name = part
            elif fam.strip() == family:
                name = value.strip()
            elif fam.strip() not in FAMILIES:
                raise KernelError(f"SLIMFX_KERNEL={spec!r}: family {fam.strip()!r} is not one of "
                                  f"{FAMILIES}{did_you_mean(fam.strip(), FAMILIES)}")
    if name is None or name in ("", "auto"):
        return None
    names = _candidates(family)
    if name not in names:
        raise KernelError(f"kernel {name!r} is not a {family} kernel; choose one of "
                          f"{sorted(names)} or 'auto'{did_you_mean(name, names)}")
    return name


def _check_forced_runnable(family: str, name: str, device: torch.device) -> None:
    if family == "conv" and device.type != "cpu" and name in ("onednn", "avx2"):
        raise KernelError(f"conv kernel {name!r} is a CPU kernel but the input is on {device}; "
                          "use 'dense' or unset SLIMFX_KERNEL / kernel=")
    if family != "conv" and device.type != "cpu" and name != "triton":
        raise KernelError(f"{family} kernel {name!r} is a CPU kernel but the input is on {device}; "
                          "CUDA tensors always use 'triton' (unset SLIMFX_KERNEL / kernel=)")
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelError(f"{family} kernel 'triton' on CPU tensors runs the Triton interpreter and needs "
                          "TRITON_INTERPRET=1 set before triton is imported; otherwise use a CPU kernel")
    candidate = _candidates(family)[name]
    if not candidate.is_available():
        raise KernelError(f"{family} kernel {name!r} is not available on this machine / torch build; "
                          f"choose one of {available_kernels(family)}")


def available_kernels(family: str) -> list[str]:
    """Names of the candidates of ``family`` usable on CPU tensors here (triton only when interpreted)."""
    return [n for n, c in _candidates(family).items() if c.is_available()]


# ------------------------------------------------------------------ measuring


def _best_ms(fn: Callable[[], object], budget_s: float) -> float:
    """The fastest of a few warm runs: other processes on the cores only ever add time, so the minimum
    is the steadiest estimate of a kernel's own speed on a shared machine (the median flips choices)."""
    start = time.perf_counter()
    fn()  # warm: first-call allocations, lazy prepacking inside the library
    first = time.perf_counter() - start
    if first >= budget_s:
        return first * 1e3
    times = []
    deadline = time.perf_counter() + budget_s - first
    while len(times) < MAX_TIMED_RUNS and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _extrapolate_ms(prepared, x_full: torch.Tensor, m_full: int) -> float | None:
    """Full-size time from two small runs (fixed cost + per-row cost), or None when M is small anyway.

    A negative or noisy slope under-estimates, which only means the candidate is timed in full.
    """
    if m_full < 4 * PILOT_ROWS:
        return None
    t_small = _best_ms(lambda: prepared.run(x_full[:PILOT_ROWS]), budget_s=0.03)
    t_large = _best_ms(lambda: prepared.run(x_full[: 2 * PILOT_ROWS]), budget_s=0.03)
    per_row = max(t_large - t_small, 0.0) / PILOT_ROWS
    return t_small + per_row * (m_full - PILOT_ROWS)


def _measure(family: str, machine: str, bucket: str, m_full: int,
             prepare: Callable[[object], object], x_full: torch.Tensor, x_check: torch.Tensor,
             ref_check: torch.Tensor, tolerance: float, candidates: Iterable[str]) -> Choice:
    times: dict[str, float] = {}
    rejected: dict[str, str] = {}
    runners: dict[str, object] = {}
    table = _candidates(family)
    candidates = [name for name in candidates if name != "triton"]  # on CPU a test mode, never a speed candidate
    # availability first, for all: it may build a native kernel, and the machine stays busy for a while after a
    # compile (seen: 2x slower runs for ~20 ms), which must not land on one candidate's timing window
    available = {name: table[name].is_available() for name in candidates}
    for name in candidates:
        cand = table[name]
        if not available[name]:
            why = getattr(cand, "unavailable_reason", lambda: None)()
            rejected[name] = f"{NOT_AVAILABLE}: {why}" if why else f"{NOT_AVAILABLE} in this torch build / on this CPU"
            continue
        skip = _skip_reason(cand)
        if skip:
            rejected[name] = f"{SKIPPED}: {skip}"
            continue
        try:
            prepared = prepare(cand)
            out = prepared.run(x_check)
        except Exception as e:  # a candidate that cannot run here is reported, never fatal
            rejected[name] = f"raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            continue
        err = cpu_kernels.relative_error(out, ref_check)
        if not err <= tolerance:
            rejected[name] = (f"wrong numbers on the probe: relative error {err:.3g} > "
                              f"tolerance {tolerance:g}"
                              " (e.g. int16 saturation of 8-bit int8 instructions without VNNI)")
            continue
        estimate = _extrapolate_ms(prepared, x_full, m_full) if times else None
        if estimate is not None and estimate > SLOW_FACTOR * min(times.values()):
            rejected[name] = (f"too slow: ~{estimate:.1f} ms extrapolated from {PILOT_ROWS}- and "
                              f"{2 * PILOT_ROWS}-row runs vs {min(times.values()):.2f} ms best")
            continue
        times[name] = round(_best_ms(lambda p=prepared: p.run(x_full), TIME_BUDGET_S), 4)
        runners[name] = prepared
    if not times:
        raise KernelError(f"no {family} kernel is correct on this machine for {bucket}: {rejected}")
    _confirm_finalists(times, runners, x_full)
    choice = min(times, key=times.__getitem__)
    return Choice(family=family, machine=machine, bucket=bucket, choice=choice, times_ms=times,
                  rejected=rejected)


def _confirm_finalists(times: dict[str, float], runners: dict[str, object], x_full: torch.Tensor) -> None:
    """Re-time the finalists in turns (a, b, c, a, b, c, ...) and keep each one's best time: the two fastest
    and any other within :data:`FINALIST_FACTOR` of the fastest.

    Each candidate was first timed in its own window, so a burst of load from another process could land
    on one of them only and flip the choice (seen: oneDNN picked at 146 ms over fbgemm's 109 ms; the avx2
    kernel timed at 2.5 ms, third, right after its build, 1.3 ms alone); runs in turns see the same load.
    Bounded by TIME_BUDGET_S after the first round.
    """
    if len(times) < 2:
        return
    ranked = sorted(times, key=times.__getitem__)
    finalists = ranked[:2] + [name for name in ranked[2:] if times[name] <= FINALIST_FACTOR * times[ranked[0]]]
    deadline = time.perf_counter() + TIME_BUDGET_S
    for _ in range(MAX_TIMED_RUNS):
        for name in finalists:
            t0 = time.perf_counter()
            runners[name].run(x_full)
            times[name] = round(min(times[name], (time.perf_counter() - t0) * 1e3), 4)
        if time.perf_counter() > deadline:
            return


def _lookup_or_measure(family: str, bucket: str, measure: Callable[[str], Choice],
                       is_current: Callable[[Choice], bool] | None = None) -> Choice:
    """The in-memory choice, else the disk cache's (if ``is_current`` accepts it), else a fresh measurement."""
    machine = machine_id()
    key = _key(family, machine, bucket)
    with _lock:
        hit = _memory.get(key)
        if hit is not None:
            return hit
        entry = _read_cache_file().get(key)
        choice = _choice_from_json(entry) if isinstance(entry, dict) else None
        if choice is None or choice.choice not in _candidates(family) or \
                not _candidates(family)[choice.choice].is_available() or \
                (is_current is not None and not is_current(choice)):
            choice = measure(machine)
            _write_cache_entry(key, choice)
        _memory[key] = choice
        return choice


def _probe_int8_weights(n: int, k: int, seed: int = 0, weight_bits: int = 8):
    g = torch.Generator().manual_seed(seed)
    top = 2 ** (weight_bits - 1) - 1
    w_q = torch.randint(-top, top + 1, (n, k), generator=g, dtype=torch.int8)
    w_q[0, : min(k, 2)] = top  # the worst case for int16 pair sums: same-sign full-range neighbours
    w_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    return w_q, w_scale, bias


def _probe_range(act: ActQuant) -> tuple[float, float]:
    """Inputs at ``hi`` / ``lo`` quantize to the largest / smallest code of ``act``."""
    if act.mode == "static_per_tensor":
        return (act.code_max - act.zero_point) * act.scale, -act.zero_point * act.scale
    return 3.0, -3.0


def _probe_activation(rows: int, k: int, w_first_row: torch.Tensor | None, seed: int = 1,
                      act: ActQuant | None = None) -> torch.Tensor:
    hi, lo = _probe_range(act or ActQuant())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * ((hi - lo) / 6) + (hi + lo) / 2
    if rows > 2 and w_first_row is not None:
        x[0] = hi  # all codes at the top of the range
        x[1] = torch.where(w_first_row >= 0, hi, lo)  # codes aligned with weight row 0: max |pair sum|
    if rows > 3 and act is not None and act.mode == "static_per_tensor":
        # exact ties x / s = c + 0.5 across the range: a kernel quantizing with another formula (fbgemm's own
        # round(fma(x, 1 / s, z)) rounds ties to even *codes*) picks the other neighbour on about half of them
        ties = torch.arange(k, dtype=torch.float32).remainder_(act.code_max) - act.zero_point + 0.5
        x[2] = ties * act.scale
    return x


def measure_int8(m: int, n: int, k: int, act: ActQuant | None = None,
                 dtype: torch.dtype = torch.float32, candidates: Iterable[str] | None = None) -> Choice:
    """Measure every int8 candidate at this shape on synthetic full-range weights (uncached)."""
    act = act or ActQuant()
    w_q, w_scale, bias = _probe_int8_weights(n, k, weight_bits=act.weight_bits)
    mm = _round_up_pow2(m)
    x_full = _probe_activation(mm, k, None, seed=2, act=act).to(dtype)
    x_check = _probe_activation(min(mm, CHECK_ROWS), k, w_q[0], act=act).to(dtype)
    ref = cpu_kernels.int8_linear_spec(x_check, w_q, w_scale, bias, act)
    names = [c for c in (candidates or _candidates("int8")) if _candidates("int8")[c].supports(act)]
    return _measure("int8", machine_id(), int8_bucket(m, n, k, act, dtype), mm,
                    lambda cand: cand.prepare(w_q, w_scale, bias, act), x_full, x_check, ref,
                    cpu_kernels.int8_tolerance(act.mode, act.bits), names)


def _probe_conv(x_shape: tuple[int, ...], w_shape: tuple[int, ...], geometry: ConvGeometry, act: ActQuant,
                channels_last: bool):
    """Synthetic full-range weights (of ``act.weight_bits``; filter 0 all at the top code, filter 1 all at the
    bottom: the largest int16 pair sums for any channel pairing a kernel uses), a timing input and a check
    input whose first image sits at the top code everywhere (spatially cropped: the fp64 spec of a large conv
    would take seconds)."""
    g = torch.Generator().manual_seed(0)
    top = 2 ** (act.weight_bits - 1) - 1
    w_q = torch.randint(-top, top + 1, w_shape, generator=g, dtype=torch.int8)
    w_q[0] = top
    if w_shape[0] > 1:
        w_q[1] = -top
    w_scale = torch.rand(w_shape[0], generator=g) * 0.02 + 1e-3
    bias = torch.randn(w_shape[0], generator=g)
    hi, lo = _probe_range(act)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    n = _round_up_pow2(x_shape[0])
    x_full = (torch.randn(n, *x_shape[1:], generator=g) * ((hi - lo) / 6) + (hi + lo) / 2)
    crop_h, crop_w = (min(size, 8 * s + (k - 1) * d)
                      for size, k, s, d in zip(x_shape[2:], w_shape[2:], geometry.stride, geometry.dilation))
    x_check = x_full[: min(n, 2), :, :crop_h, :crop_w].clone()
    if act.mode == "static_per_tensor":
        x_check[0] = hi
    return (w_q, w_scale, bias, x_full.contiguous(memory_format=layout),
            x_check.contiguous(memory_format=layout))


def measure_conv(x_shape: tuple[int, ...], w_shape: tuple[int, ...], geometry: ConvGeometry,
                 act: ActQuant, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 candidates: Iterable[str] | None = None) -> Choice:
    """Measure every int8 conv candidate for this input / weight shape on synthetic weights (uncached)."""
    w_q, w_scale, bias, x_full, x_check = _probe_conv(tuple(x_shape), tuple(w_shape), geometry, act, channels_last)
    x_full, x_check = x_full.to(dtype), x_check.to(dtype)
    ref = conv_kernels.int8_conv2d_spec(x_check, w_q, w_scale, bias, geometry, act)
    table = _candidates("conv")
    names = [c for c in (candidates or table) if table[c].supports(act, geometry)]
    return _measure("conv", machine_id(),
                    conv_bucket(tuple(x_shape), tuple(w_shape), geometry, act, dtype, channels_last), 0,
                    lambda cand: cand.prepare(w_q, w_scale, bias, geometry, act), x_full, x_check, ref,
                    cpu_kernels.INT8_TOLERANCE[act.mode], names)


def _probe_bsr_weight(n: int, k: int, block: tuple[int, int], density: float, dtype: torch.dtype):
    from slimfx.kernels import bsr

    bh, bw = block
    g = torch.Generator().manual_seed(0)
    grid = (-(-n // bh), -(-k // bw))
    keep = torch.rand(grid, generator=g) < density
    keep.view(-1)[0] = True
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    w = (torch.randn(n, k, generator=g) * mask).to(dtype)
    return bsr.dense_to_bsr(w, block), torch.randn(n, generator=g).to(dtype)


def measure_bsr(m: int, n: int, k: int, block: tuple[int, int], density: float,
                dtype: torch.dtype = torch.float32, candidates: Iterable[str] | None = None) -> Choice:
    """Measure every block-sparse candidate at this shape and density on a synthetic weight (uncached)."""
    w, bias = _probe_bsr_weight(n, k, block, _density_bucket(density), dtype)
    mm = _round_up_pow2(m)
    x_full = _probe_activation(mm, k, None, seed=2).to(dtype)
    x_check = _probe_activation(min(mm, CHECK_ROWS), k, None).to(dtype)
    ref = cpu_kernels.bsr_linear_spec(x_check, w, bias)
    return _measure("bsr", machine_id(), bsr_bucket(m, n, k, block, density, dtype), mm,
                    lambda cand: cand.prepare(w, bias), x_full, x_check, ref,
                    cpu_kernels.BSR_TOLERANCE.get(dtype, 1e-2), candidates or list(_candidates("bsr")))


def select_int8_kernel(m: int, n: int, k: int, act: ActQuant | None = None, *,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       kernel: str | None = None) -> str:
    """The int8 linear candidate to run for an ``[m, k]`` input and an ``[n, k]`` weight.

    CUDA → ``triton``; a forced kernel (``kernel`` or ``$SLIMFX_KERNEL``) as is; else the cached or
    freshly measured fastest correct CPU candidate.
    """
    act = act or ActQuant()
    device = torch.device(device)
    forced = forced_kernel("int8", kernel)
    if forced is not None:
        _check_forced_runnable("int8", forced, device)
        if not _candidates("int8")[forced].supports(act):
            raise KernelError(f"int8 kernel {forced!r} does not implement activation mode {act.label!r} "
                              f"({act.bits}-bit codes); its modes: {_candidates('int8')[forced].modes} (not every "
                              "code width of each); run without forcing to let the dispatcher pick")
        return forced
    if device.type != "cpu":
        return "triton"
    bucket = int8_bucket(m, n, k, act, dtype)
    return _lookup_or_measure("int8", bucket, lambda _machine: measure_int8(m, n, k, act, dtype),
                              _weighed_every_candidate(lambda cand: cand.supports(act))).choice


def select_bsr_kernel(m: int, n: int, k: int, block: tuple[int, int], density: float, *,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      kernel: str | None = None) -> str:
    """The block-sparse linear candidate to run (same rules as :func:`select_int8_kernel`)."""
    device = torch.device(device)
    forced = forced_kernel("bsr", kernel)
    if forced is not None:
        _check_forced_runnable("bsr", forced, device)
        return forced
    if device.type != "cpu":
        return "triton"
    bucket = bsr_bucket(m, n, k, block, density, dtype)
    return _lookup_or_measure("bsr", bucket, lambda _machine: measure_bsr(m, n, k, block, density, dtype),
                              _weighed_every_candidate(lambda cand: True)).choice


def _skip_reason(candidate) -> str | None:
    return getattr(candidate, "skip_reason", lambda: None)()


def _weighed_every_candidate(applies: Callable[[object], bool]) -> Callable[[Choice], bool]:
    """Whether a cached choice stands: its winner must not be skipped now, and every CPU candidate usable now
    that ``applies`` to the bucket (supports its activation mode / geometry) must have been timed or found
    wrong / slow for it. A cache written before a candidate existed (``grouped_gemm``), or while it was
    unavailable or skipped (onnxruntime without ``OMP_WAIT_POLICY=PASSIVE``), is measured again; a choice of
    onnxruntime cached under PASSIVE is measured again without it."""
    def check(choice: Choice) -> bool:
        table = _candidates(choice.family)
        if _skip_reason(table[choice.choice]):
            return False
        considered = set(choice.times_ms) | {name for name, why in choice.rejected.items()
                                             if not why.startswith((NOT_AVAILABLE, SKIPPED))}
        return all(name in considered for name in available_kernels(choice.family)
                   if name != "triton" and applies(table[name]) and not _skip_reason(table[name]))
    return check


def select_conv_kernel(x_shape: tuple[int, ...], w_shape: tuple[int, ...], geometry: ConvGeometry,
                       act: ActQuant, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       channels_last: bool = False, kernel: str | None = None) -> str:
    """The int8 conv candidate to run for a 4-D input of ``x_shape`` and an int8 weight of ``w_shape``.

    CUDA → ``dense`` (cuDNN on the dequantized weight; there is no Triton conv); a forced kernel as is;
    else the cached or freshly measured fastest correct CPU candidate.
    """
    device = torch.device(device)
    forced = forced_kernel("conv", kernel)
    if forced is not None:
        _check_forced_runnable("conv", forced, device)
        if not _candidates("conv")[forced].supports(act, geometry):
            raise KernelError(f"conv kernel {forced!r} does not implement activation mode {act.mode!r}; "
                              f"it supports {_candidates('conv')[forced].modes}")
        return forced
    if device.type != "cpu":
        return "dense"
    bucket = conv_bucket(tuple(x_shape), tuple(w_shape), geometry, act, dtype, channels_last)
    return _lookup_or_measure("conv", bucket, lambda _machine: measure_conv(
        x_shape, w_shape, geometry, act, dtype, channels_last),
        _weighed_every_candidate(lambda cand: cand.supports(act, geometry))).choice


# ------------------------------------------------------------------ the `slimfx kernels` table


def choice_table() -> list[dict]:
    """Every choice known for this machine (this process's and the disk cache's), as plain dicts."""
    machine = machine_id()
    rows: dict[str, dict] = {}
    for key, entry in _read_cache_file().items():
        choice = _choice_from_json(entry) if isinstance(entry, dict) else None
        if choice is not None and choice.machine == machine:
            rows[key] = asdict(choice)
    with _lock:
        for key, choice in _memory.items():
            rows[key] = asdict(choice)
    return sorted(rows.values(), key=lambda r: (r["family"], r["bucket"]))


def format_choice_table(rows: list[dict]) -> str:
    """A markdown table of ``rows`` (from :func:`choice_table`): the choice, every time, every rejection."""
    lines = ["| family | shape bucket | chosen | times (ms) | rejected / skipped |",
             "|---|---|---|---|---|"]
    for r in rows:
        times = ", ".join(f"{n} {t:.3g}" for n, t in sorted(r["times_ms"].items(), key=lambda kv: kv[1]))
        rejected = "; ".join(f"{n}: {why}" for n, why in r["rejected"].items()) or "-"
        lines.append(f"| {r['family']} | {r['bucket']} | **{r['choice']}** | {times} | {rejected} |")
    return "\n".join(lines)


DEFAULT_INT8_SHAPES = ((64, 1024, 1024), (256, 1024, 4096), (1024, 4096, 4096))
#: 7-bit static activations (torch.ao's reduce_range): the format int8 instructions compute exactly on AVX2.
PROBE_STATIC_U7 = ActQuant("static_per_tensor", 0.05, 64, bits=7)
#: ONNX's 8-bit dynamic quantization with 7-bit weights (exact on AVX2 CPUs without VNNI).
PROBE_DYNAMIC_U8_W7 = ActQuant("dynamic_per_tensor", bits=8, weight_bits=7)
#: 7-bit codes with 7-bit weights: slimfx's avx2 kernel's fast path.
PROBE_DYNAMIC_W7 = ActQuant("dynamic_per_tensor", weight_bits=7)
#: (input NCHW, weight OIHW, geometry) of the int8 conv rows of the `slimfx kernels` table.
DEFAULT_CONV_SHAPES = (((8, 64, 28, 28), (64, 64, 3, 3), ConvGeometry.of(padding=1)),)
DEFAULT_BSR_SHAPES = ((256, 1024, 1024, (32, 32), 0.5), (256, 1024, 1024, (32, 32), 0.25),
                      (256, 1024, 1024, (32, 32), 0.1), (256, 4096, 4096, (64, 64), 0.1))


def machine_summary() -> str:
    """One line naming the CPU, its SIMD features and torch's capability (every CPU result carries it)."""
    flags = cpu_flags()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores) | "
            f"flags: {' '.join(simd) or 'none found'} | "
            f"torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}")


def main_table(shapes: Iterable[tuple[int, int, int]] | None = None) -> str:
    """Select (measuring where not cached) the kernels for default shapes; return the table as text.

    ``shapes`` are int8 ``(M, K, N)`` triples (each in dynamic per-token, dynamic per-tensor with 7-bit codes,
    with 8-bit codes and 7-bit weights and with 7-bit codes and weights, and 7-bit static modes); without them
    block-sparse and conv rows are added (:data:`DEFAULT_BSR_SHAPES`, :data:`DEFAULT_CONV_SHAPES`).
    """
    for m, k, n in shapes or DEFAULT_INT8_SHAPES:
        for act in (ActQuant("dynamic_per_token"), ActQuant("dynamic_per_tensor"), PROBE_DYNAMIC_U8_W7,
                    PROBE_DYNAMIC_W7, PROBE_STATIC_U7):
            select_int8_kernel(m, n, k, act)
    if shapes is None:
        for m, k, n, block, density in DEFAULT_BSR_SHAPES:
            select_bsr_kernel(m, n, k, block, density)
        for x_shape, w_shape, geometry in DEFAULT_CONV_SHAPES:
            select_conv_kernel(x_shape, w_shape, geometry, PROBE_STATIC_U7)
    why_not = native.avx2_int8_unavailable()
    built = "avx2 kernel: built" if why_not is None else f"avx2 kernel: not available ({why_not})"
    return f"{machine_summary()}\ncache: {cache_path()}\n{built}\n\n{format_choice_table(choice_table())}"
