"""Suite-wide settings: Triton kernels run in the interpreter on CPU; hypothesis is derandomized."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# The kernel dispatcher caches its timing choices on disk; tests must never write to the user's cache.
os.environ.setdefault("SLIMFX_CACHE_DIR", tempfile.mkdtemp(prefix="slimfx-test-cache-"))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture
def private_kernel_cache(tmp_path, monkeypatch):
    """An empty kernel-dispatcher disk cache in a temp dir, an empty memory cache and no forcing (SLIMFX_KERNEL)."""
    from slimfx.kernels import dispatch

    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMFX_KERNEL", raising=False)
    dispatch.clear_memory_cache()
    yield
    dispatch.clear_memory_cache()

