"""slimfx's C kernels (``avx2_int8.c``), compiled with the machine's C compiler at first use and loaded with ctypes.

Why not ``torch.utils.cpp_extension``: it compiles against torch's C++ headers (a minute or more per build on two
cores, plus ninja); the kernels need no torch API, only pointers, so a plain C shared library builds in about a
second and needs only ``cc``. It links ``libgomp.so.1``, which torch has already loaded, so its parallel regions
run on torch's OpenMP pool (no second pool spin-waiting against the first, the trouble with onnxruntime's).

The library is cached as ``$SLIMFX_CACHE_DIR/native/avx2_int8-<hash>.so`` (else ``~/.cache/slimfx/native``), the
hash covering the source, the flags and the compiler. ``SLIMFX_NATIVE=0`` turns the native kernels off.
Without a C compiler, on a CPU without AVX2 or off x86-64, :func:`avx2_int8_unavailable` says why and the
dispatcher leaves the kernel out.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from slimfx.errors import KernelError

SOURCE = Path(__file__).with_name("avx2_int8.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
ABI_VERSION = 7

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "slimfx_abi_version": ([], _INT),
    "slimfx_packed_weight_bytes": ([_I64, _I64, _INT], _I64),
    "slimfx_pack_weights": ([_P, _I64, _I64, _P], None),
    "slimfx_pack_weights_split": ([_P, _I64, _I64, _P], None),
    "slimfx_quantize_u7": ([_P, _I64, _I64, _I64, _F32, _INT, _INT, _INT, _P, _I64, _INT], None),
    "slimfx_choose_qparams": ([ctypes.c_double, ctypes.c_double, _INT, _P, _P], None),
    "slimfx_linear_fused": ([_P, _I64, _I64, _I64, _INT, _F32, _INT, _INT, _INT, _P, _I64, _P, _P, _P, _P, _I64,
                             _INT, _P], _INT),
    "slimfx_conv2d": ([_P] + [_I64] * 14 + [_F32, _INT, _INT, _INT, _P, _I64, _P, _P, _P, _P, _INT], _INT),
}


def cache_dir() -> Path:
    """``$SLIMFX_CACHE_DIR``, else ``~/.cache/slimfx``: where slimfx keeps what it measured or built."""
    root = os.environ.get("SLIMFX_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "slimfx"


def avx2_int8_unavailable() -> str | None:
    """Why the AVX2 int8 kernel cannot run in this process, or None when it can (builds it if needed)."""
    try:
        avx2_int8()
    except KernelError as e:
        return str(e)
    return None


def avx2_int8() -> ctypes.CDLL:
    """The loaded AVX2 int8 library (see ``avx2_int8.c``); raises :class:`KernelError` saying why it can't be."""
    lib = _load_avx2_int8(os.environ.get("SLIMFX_NATIVE", "1").strip())
    if isinstance(lib, str):
        raise KernelError(lib)
    return lib


def compiler() -> str | None:
    """The C compiler slimfx builds with: ``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def _load_avx2_int8(switch: str) -> ctypes.CDLL | str:
    """The library, or why not (cached per value of ``SLIMFX_NATIVE``)."""
    if switch in ("0", "off", "false", "no"):
        return "the native kernels are turned off (SLIMFX_NATIVE=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the AVX2 int8 kernel is for x86-64 CPUs, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the AVX2 int8 kernel needs an AVX2 CPU; torch reports capability {capability!r}"
    cc = compiler()
    if cc is None:
        return "no C compiler found to build the AVX2 int8 kernel: install gcc (or set CC) to enable it"
    for attempt in range(2):
        try:
            path = _build(cc)
        except (OSError, subprocess.SubprocessError) as e:
            return f"building the AVX2 int8 kernel with {cc} failed: {_first_error(str(e))}"
        loaded = _bind(path)
        if not isinstance(loaded, str) or attempt:
            return loaded
        path.unlink(missing_ok=True)  # a damaged or foreign file under our name: build it again, once
    raise AssertionError("unreachable")


def _bind(path: Path) -> ctypes.CDLL | str:
    """The library at ``path`` with its signatures set, or why it cannot be used."""
    try:
        lib = ctypes.CDLL(str(path))
        version = lib.slimfx_abi_version
        version.argtypes, version.restype = [], _INT
        if version() != ABI_VERSION:
            return f"{path} is a stale build (ABI {version()}, expected {ABI_VERSION})"
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
    except (OSError, AttributeError) as e:
        return f"{path} cannot be loaded: {e}"
    return lib


def _first_error(message: str) -> str:
    """The compiler's first ``error:`` line (its last line is often a caret or a note), else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return ((errors or lines or ["no output"])[0])[:300]


def _build(cc: str) -> Path:
    """Compile ``SOURCE`` into the cache (atomically: parallel test workers may build at once) unless there."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, cc, version)).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "native"
    target = out_dir / f"avx2_int8-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise subprocess.SubprocessError((done.stderr or done.stdout or "no output").strip())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
