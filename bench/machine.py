"""What machine a benchmark ran on: every result names the CPU model and its vector capability."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def machine_line() -> str:
    """One line: CPU model, cores, capability flags, torch version and capability, date, load."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores) | flags: {' '.join(cpu_flags()) or 'none'} | "
        f"torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()} | "
        f"{datetime.date.today().isoformat()} | load average {load:.2f}"
    )
