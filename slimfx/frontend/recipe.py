"""Recipes: a compression pipeline written as YAML stages, validated with errors that name the key path.

Schema (every key other than ``stages`` is optional)::

    name: digits-prune-int8            # text, shown in reports
    description: ...                   # text
    stages:                            # a list; each item is a mapping with exactly one of these keys
      - cleanup: [canonicalize, fold-bn]          # pass names (or {name: {options}}) of *exact* passes only
      - prune: {pass: prune-channels, sparsity: 0.5, importance: l1}
                                                  # `pass` is prune-channels (default), prune-magnitude,
                                                  # prune-nm, prune-blocks or zero-channels; the other keys
                                                  # are that pass's options. `prune: prune-nm` uses defaults.
      - quant: {weights: int8-per-channel, activations: int8-per-tensor, calibrate: {batches: 8}}
                                                  # quant-insert options, plus `calibrate`: a mapping of
                                                  # calibrate options, true (default: calibrate with its
                                                  # defaults) or false (no calibrate pass)
      - distill: {epochs: 10, lr: 0.003, temperature: 4, alpha: 0.5}
                                                  # the distill pass's options (`distill: true` or an empty
                                                  # `distill:` uses its defaults): fine-tune against the
                                                  # teacher on the training data (`slimfx run --train`,
                                                  # compress(train_data=)); after prune or qat-prepare
      - lower: int8                               # or {target: int8, activations: dynamic-per-token|keep}
      - passes: "dce,verify"                      # raw pipeline text, or a list like cleanup's (any pass)

Each stage becomes pipeline text (``fold-bn``, ``prune-channels{sparsity=0.5}``...); ``Recipe.pipeline()``
joins them into one validated :class:`~slimfx.passes.pipeline.Pipeline`. Every error is a PipelineError that
starts with the key path at fault (``stages[1].prune.sparsty: ...``) and lists the allowed values or the
closest one (did you mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimfx.errors import PipelineError, did_you_mean
from slimfx.passes.pipeline import PassSpec, Pipeline

TOP_KEYS = ("name", "description", "stages")
STAGE_KINDS = ("cleanup", "prune", "quant", "distill", "lower", "passes")
PRUNE_PASSES = ("prune-channels", "prune-magnitude", "prune-nm", "prune-blocks", "zero-channels")
LOWER_TARGETS = {"int8": "lower-int8"}


@dataclass(frozen=True)
class Stage:
    """One recipe stage: its kind (cleanup, prune, ...) and the passes it expands to."""

    kind: str
    specs: tuple[PassSpec, ...]

    def text(self) -> str:
        return ",".join(str(s) for s in self.specs)


@dataclass
class Recipe:
    """A parsed recipe: a name, a description and its stages, in order."""

    name: str = ""
    description: str = ""
    stages: list[Stage] = field(default_factory=list)
    source: str = ""

    def pipeline(self) -> Pipeline:
        """All the stages' passes as one validated Pipeline."""
        pipeline = Pipeline([spec for stage in self.stages for spec in stage.specs])
        pipeline.validate()
        return pipeline

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "stages": [{"kind": s.kind, "pipeline": s.text(), "passes": len(s.specs)} for s in self.stages]}


def _err(path: str, message: str) -> PipelineError:
    return PipelineError(f"{path}: {message}")


def _kind_of(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _unknown_key(path: str, key: Any, allowed: Any, what: str = "unknown key {key!r}") -> PipelineError:
    allowed = list(allowed)
    hint = did_you_mean(str(key), allowed)
    return _err(f"{path}.{key}", f"{what.format(key=key)}{hint}; allowed: {', '.join(allowed) or '(none)'}")


def _pass_spec(path: str, name: Any, options: Any, allowed: Any = None, exact_only: bool = False) -> PassSpec:
    """Validate one pass (name + typed options from YAML) and return its PassSpec with raw option values."""
    from slimfx.passes.base import Contract, registry
    from slimfx.passes.options import convert, option_fields, option_types, raw_value, type_name

    reg = registry()
    if not isinstance(name, str):
        raise _err(path, f"expected a pass name, got {_kind_of(name)} {name!r}")
    choices = list(allowed) if allowed is not None else sorted(
        n for n, c in reg.items() if not exact_only or c.contract == Contract.EXACT)
    if exact_only and name in reg and reg[name].contract != Contract.EXACT:
        raise _err(path, f"pass {name!r} is not an exact pass (contract {reg[name].contract.value}); cleanup "
                         f"stages take only exact passes ({', '.join(choices)}); put it under a `passes:` stage")
    if name not in choices or name not in reg:
        extra = "" if allowed is not None else "; `slimfx passes` lists them"
        raise _err(path, f"unknown pass {name!r}{did_you_mean(name, choices)}; allowed: {', '.join(choices)}{extra}")
    cls = reg[name]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _err(path, f"options of pass {name!r} must be a mapping, got {_kind_of(options)} {options!r}")
    fields = option_fields(cls.Options)
    hints = option_types(cls.Options)
    items = []
    for key, value in options.items():
        if key not in fields:
            raise _unknown_key(path, key, fields, f"pass {name!r} has no option {{key!r}}")
        try:
            typed = convert(value, hints[key])
        except ValueError as exc:
            raise _err(f"{path}.{key}", f"expects {type_name(hints[key])}: {exc}") from None
        items.append((key, raw_value(typed)))
    try:
        cls.make_options(dict(items))
    except PipelineError as exc:
        key = next((k for k, _ in items if f"option {k!r}" in str(exc) or f"{k}=" in str(exc)), None)
        raise _err(path if key is None else f"{path}.{key}", str(exc)) from None
    return PassSpec(name, tuple(items))


def _pass_list(path: str, value: Any, exact_only: bool) -> list[PassSpec]:
    """A pass name, or a list of pass names / single-key mappings {name: {options}}."""
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _err(path, f"expected a pass name or a non-empty list of them, got {_kind_of(value)} {value!r}")
    specs = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if isinstance(item, dict):
            if len(item) != 1:
                raise _err(item_path, f"write one pass per item as {{name: {{options}}}}, got keys {list(item)}")
            (name, options), = item.items()
            specs.append(_pass_spec(item_path, name, options, exact_only=exact_only))
        else:
            specs.append(_pass_spec(item_path, item, None, exact_only=exact_only))
    return specs


def _stage_prune(path: str, value: Any) -> list[PassSpec]:
    if isinstance(value, str):
        return [_pass_spec(f"{path}.pass", value, None, allowed=PRUNE_PASSES)]
    if not isinstance(value, dict):
        raise _err(path, f"expected a mapping like {{pass: prune-channels, sparsity: 0.5}}, got {_kind_of(value)}")
    options = dict(value)
    name = options.pop("pass", "prune-channels")
    _pass_spec(f"{path}.pass", name, None, allowed=PRUNE_PASSES)
    return [_pass_spec(path, name, options, allowed=PRUNE_PASSES)]


def _stage_quant(path: str, value: Any) -> list[PassSpec]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _err(path, f"expected a mapping of quant-insert options (+ calibrate), got {_kind_of(value)}")
    options = dict(value)
    calibrate = options.pop("calibrate", True)
    try:
        specs = [_pass_spec(path, "quant-insert", options)]
    except PipelineError as exc:
        if "has no option" in str(exc):  # mention calibrate among the allowed keys
            raise PipelineError(f"{exc}, calibrate") from None
        raise
    if calibrate is True:
        specs.append(PassSpec("calibrate"))
    elif isinstance(calibrate, dict):
        specs.append(_pass_spec(f"{path}.calibrate", "calibrate", calibrate))
    elif calibrate is not False:
        raise _err(f"{path}.calibrate", f"expected true, false or a mapping of calibrate options "
                                        f"(e.g. {{batches: 8}}), got {_kind_of(calibrate)} {calibrate!r}")
    return specs


def _stage_distill(path: str, value: Any) -> list[PassSpec]:
    if value is None or value is True:
        return [PassSpec("distill")]
    if not isinstance(value, dict):
        raise _err(path, f"expected a mapping of distill options (e.g. {{epochs: 10, temperature: 4}}) or true "
                         f"for the defaults, got {_kind_of(value)} {value!r}; to skip distillation remove the stage")
    return [_pass_spec(path, "distill", value)]


def _stage_lower(path: str, value: Any) -> list[PassSpec]:
    if isinstance(value, str):
        value = {"target": value}
    if not isinstance(value, dict):
        raise _err(path, f"expected a target ({', '.join(LOWER_TARGETS)}) or {{target: ..., options}}, "
                         f"got {_kind_of(value)}")
    options = dict(value)
    target = options.pop("target", None)
    if target not in LOWER_TARGETS:
        raise _err(f"{path}.target", f"unknown target {target!r}{did_you_mean(str(target), LOWER_TARGETS)}; "
                                     f"allowed: {', '.join(LOWER_TARGETS)}")
    return [_pass_spec(path, LOWER_TARGETS[target], options)]


def _stage_passes(path: str, value: Any) -> list[PassSpec]:
    if isinstance(value, str) and ("," in value or "{" in value):
        try:
            return Pipeline.parse(value).specs
        except PipelineError as exc:
            raise _err(path, str(exc)) from None
    return _pass_list(path, value, exact_only=False)


_STAGES = {
    "cleanup": lambda path, value: _pass_list(path, value, exact_only=True),
    "prune": _stage_prune,
    "quant": _stage_quant,
    "distill": _stage_distill,
    "lower": _stage_lower,
    "passes": _stage_passes,
}


def parse_recipe(data: Any, source: str = "") -> Recipe:
    """Validate a recipe already read from YAML (a mapping) and return it."""
    if not isinstance(data, dict):
        raise _err("recipe", f"expected a mapping with a `stages:` list, got {_kind_of(data)}")
    for key in data:
        if key not in TOP_KEYS:
            raise _err(str(key), f"unknown key {key!r}{did_you_mean(str(key), TOP_KEYS)}; "
                                 f"allowed: {', '.join(TOP_KEYS)}")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise _err(key, f"expected text, got {_kind_of(data[key])}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise _err("stages", f"expected a non-empty list of stages ({', '.join(STAGE_KINDS)}), "
                             f"got {_kind_of(stages_raw)}")
    stages = []
    for i, item in enumerate(stages_raw):
        path = f"stages[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise _err(path, f"each stage is a mapping with exactly one of {', '.join(STAGE_KINDS)}, got {item!r}")
        (kind, value), = item.items()
        if kind not in _STAGES:
            raise _unknown_key(path, kind, STAGE_KINDS, "unknown stage {key!r}")
        stages.append(Stage(kind, tuple(_STAGES[kind](f"{path}.{kind}", value))))
    return Recipe(data.get("name", ""), data.get("description", ""), stages, source)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the YAML recipe at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    return parse_recipe(data, str(path))
