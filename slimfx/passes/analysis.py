"""Analyses: facts computed from a program, cached on it, invalidated by passes that don't preserve them.

``get_analysis(program, "name")`` computes once and caches in ``program.analyses``; the PassManager drops
every cached analysis a pass does not list in its ``preserves``. The node metadata (shapes/dtypes) is the
analysis named ``meta``; it lives on the nodes and is re-propagated instead of dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slimfx.errors import PassError, did_you_mean
from slimfx.ir.program import Program

META = "meta"
_ANALYSES: dict[str, Callable[[Program], Any]] = {}


def register_analysis(name: str) -> Callable[[Callable[[Program], Any]], Callable[[Program], Any]]:
    """Register ``fn(program) -> value`` as the analysis ``name``."""

    def decorate(fn: Callable[[Program], Any]) -> Callable[[Program], Any]:
        _ANALYSES[name] = fn
        return fn

    return decorate


def get_analysis(program: Program, name: str) -> Any:
    """The analysis ``name`` of ``program``, computed on first use and cached until invalidated."""
    if name not in program.analyses:
        if name not in _ANALYSES:
            raise PassError(f"unknown analysis {name!r}{did_you_mean(name, _ANALYSES)}")
        program.analyses[name] = _ANALYSES[name](program)
    return program.analyses[name]


def invalidate(program: Program, preserved: frozenset[str]) -> None:
    """Drop cached analyses not in ``preserved``; re-propagate metadata unless ``meta`` is preserved."""
    if "*" in preserved:
        return
    for name in list(program.analyses):
        if name not in preserved:
            del program.analyses[name]
    if META not in preserved:
        program.propagate_meta()
