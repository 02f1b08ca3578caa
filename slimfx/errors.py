"""The errors slimfx raises. Every message names the node/module/option at fault and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SlimfxError(Exception):
    """Base class of every error slimfx raises on purpose."""


class TraceError(SlimfxError):
    """A model could not be turned into a Program."""


class PipelineError(SlimfxError):
    """A pipeline text, pass name or pass option is invalid."""


class PassError(SlimfxError):
    """A pass could not apply to a program (names the pass, the node and the reason)."""


class ContractError(SlimfxError):
    """A pass broke its declared numerics contract or an invariant verify checks."""


class VerifyError(ContractError):
    """verify(program) found a broken IR invariant."""


class ArtifactError(SlimfxError):
    """A saved artifact is missing, truncated, corrupted or does not match the model."""


class KernelError(SlimfxError):
    """A kernel was asked for with inputs it does not support."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
