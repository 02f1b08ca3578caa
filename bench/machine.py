"""What machine a benchmark ran on: every result names the CPU model and its vector capability."""

from __future__ import annotations

import datetime
import os

from slimfx.kernels.dispatch import machine_summary


def machine_line() -> str:
    """One line: CPU model, cores, capability flags, torch version and capability, date, load, and the
    OpenMP wait policy (whether onnxruntime's kernel competes: see ``slimfx.kernels.cpu_kernels``)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"{machine_summary()} | {datetime.date.today().isoformat()} | load average {load:.2f} | "
            f"OMP_WAIT_POLICY={policy}")
