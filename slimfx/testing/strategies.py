"""Hypothesis strategies: random models (see :mod:`slimfx.testing.models`), programs and pipelines.

``programs()`` draws a random model and traces it; ``pipeline_specs()`` draws syntactically valid
pipelines with arbitrary names and option values (for grammar round-trip tests); ``registered_pipelines()``
draws pipelines of registered passes that take no required data.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from hypothesis import strategies as st

from slimfx.frontend.trace import trace
from slimfx.ir.program import Program
from slimfx.passes.pipeline import PassSpec, Pipeline
from slimfx.testing.models import ModelCase, attention_models, cnns, mlps, models

__all__ = [
    "ModelCase", "attention_models", "cnns", "mlps", "models", "pipeline_specs", "pipelines",
    "programs", "programs_with_cases", "registered_pipelines",
]


# Derandomized property tests draw the same models for every pass; tracing (torch.export above all)
# dominates an example's cost, so traced programs are shared. Programs are never mutated by passes
# (run_pipeline clones), which makes sharing safe.
_TRACED: OrderedDict[tuple, Program] = OrderedDict()
_TRACED_MAX = 512


def _fingerprint(case: ModelCase, frontend: str) -> tuple:
    digest = hashlib.sha1()
    for name, tensor in case.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    for tensor in case.example_inputs:
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return frontend, case.description, case.module.training, digest.hexdigest()


def trace_cached(case: ModelCase, frontend: str) -> Program:
    """trace(case.module, case.example_inputs, frontend), memoised on the model's content."""
    key = _fingerprint(case, frontend)
    program = _TRACED.get(key)
    if program is None:
        program = trace(case.module, case.example_inputs, frontend=frontend)
        _TRACED[key] = program
        if len(_TRACED) > _TRACED_MAX:
            _TRACED.popitem(last=False)
    return program


@st.composite
def programs_with_cases(draw, model_strategy=None, frontend: str = "fx") -> tuple[Program, ModelCase]:
    """A (Program, ModelCase) pair: a random model traced with ``frontend`` ("fx", "export" or "any").

    The Program is shared between draws of the same model: treat it as read-only (passes run on copies).
    """
    case = draw(model_strategy if model_strategy is not None else models())
    if frontend == "any":
        frontend = draw(st.sampled_from(["fx", "export"]))
    return trace_cached(case, frontend), case


def programs(model_strategy=None, frontend: str = "fx") -> st.SearchStrategy[Program]:
    """Random Programs (random models traced with ``frontend``)."""
    return programs_with_cases(model_strategy, frontend).map(lambda pair: pair[0])


_names = st.from_regex(r"[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,5}){0,2}", fullmatch=True)
_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
_scalars = st.one_of(
    st.from_regex(r"-?[0-9]{1,4}(\.[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"[a-z][a-z0-9_.*-]{0,8}", fullmatch=True),
    st.text(min_size=0, max_size=8),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)


@st.composite
def pass_specs(draw) -> PassSpec:
    """A PassSpec with an arbitrary kebab name and arbitrary raw option values."""
    keys = draw(st.lists(_keys, max_size=3, unique=True))
    return PassSpec(draw(_names), tuple((k, draw(_values)) for k in keys))


def pipeline_specs() -> st.SearchStrategy[Pipeline]:
    """Syntactically valid pipelines (names need not be registered)."""
    return st.lists(pass_specs(), min_size=1, max_size=4).map(Pipeline)


def registered_pipelines(names: list[str] | None = None) -> st.SearchStrategy[Pipeline]:
    """Pipelines of registered passes with default options (``names`` restricts which)."""
    from slimfx.passes.base import registry

    choices = sorted(names or registry())
    return st.lists(st.sampled_from(choices), min_size=1, max_size=5).map(Pipeline)


pipelines = registered_pipelines
