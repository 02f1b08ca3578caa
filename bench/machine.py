"""What machine a benchmark ran on: every result names the CPU model and its vector capability."""

from __future__ import annotations

import datetime
import os

from slimfx.kernels.dispatch import machine_summary


def machine_line() -> str:
    """One line: CPU model, cores, capability flags, torch version and capability, date, load."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{machine_summary()} | {datetime.date.today().isoformat()} | load average {load:.2f}"
