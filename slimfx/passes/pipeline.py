"""The textual pipeline: ``fold-bn,prune-channels{sparsity=0.5,importance=l1},quant-int8``.

Grammar (whitespace between tokens is ignored)::

    pipeline := pass ("," pass)*
    pass     := NAME ("{" [option ("," option)*] "}")?
    option   := KEY "=" value
    value    := "[" [value ("," value)*] "]" | '"' chars '"' | BARE

NAME is kebab-case, KEY an identifier, BARE any run of characters other than ``,{}[]="`` and whitespace;
quoted strings use backslash escapes. ``Pipeline.parse(text)`` and ``str(pipeline)`` round-trip:
``Pipeline.parse(str(p)) == p``. Syntax errors show the text with a caret under the bad position.
A hand-written recursive-descent parser: the grammar is tiny and errors need exact positions, which
a parser library would make harder, not easier.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from slimfx.errors import PipelineError, did_you_mean

RawValue = Union[str, tuple["RawValue", ...]]  # noqa: UP007  (a recursive alias needs Union)

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE = re.compile(r'[^,{}\[\]="\s\\]+')


def caret_message(message: str, text: str, position: int) -> str:
    """``message`` followed by the text and a caret under ``position``."""
    return f"{message}\n  {text}\n  {' ' * max(position, 0)}^"


@dataclass(frozen=True)
class PassSpec:
    """One pass of a pipeline as written: its name and raw option values (text or lists of text)."""

    name: str
    options: tuple[tuple[str, RawValue], ...] = ()
    position: int = field(default=-1, compare=False, repr=False)
    option_positions: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def option_dict(self) -> dict[str, RawValue]:
        return dict(self.options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        inner = ",".join(f"{k}={format_raw(v)}" for k, v in self.options)
        return f"{self.name}{{{inner}}}"


def format_raw(value: RawValue) -> str:
    """Render a raw value so that the parser reads it back unchanged."""
    if isinstance(value, tuple):
        return "[" + ",".join(format_raw(v) for v in value) + "]"
    if _BARE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, message: str, position: int | None = None) -> PipelineError:
        return PipelineError(caret_message(message, self.text, self.pos if position is None else position))

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "the end of the text"
            raise self.error(f"expected {char!r} {what}, found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> tuple[str, int]:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end of the text"
            raise self.error(f"expected {what}, found {found}")
        start = self.pos
        self.pos = m.end()
        return m.group(0), start

    def pipeline(self) -> list[PassSpec]:
        specs = []
        if not self.peek():
            return specs
        while True:
            specs.append(self.pass_spec())
            char = self.peek()
            if not char:
                return specs
            if char != ",":
                raise self.error(f"expected ',' between passes or the end of the pipeline, found {char!r}")
            self.pos += 1

    def pass_spec(self) -> PassSpec:
        name, start = self.match(_NAME, "a pass name (kebab-case, e.g. fold-bn)")
        options: list[tuple[str, RawValue]] = []
        positions: list[int] = []
        if self.peek() == "{":
            self.pos += 1
            if self.peek() != "}":
                while True:
                    key, key_pos = self.match(_KEY, "an option name")
                    if key in dict(options):
                        raise self.error(f"option {key!r} given twice", key_pos)
                    self.expect("=", f"after option name {key!r}")
                    options.append((key, self.value()))
                    positions.append(key_pos)
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect("}", f"to close the options of {name!r}")
        return PassSpec(name, tuple(options), start, tuple(positions))

    def value(self) -> RawValue:
        char = self.peek()
        if char == "[":
            self.pos += 1
            items: list[RawValue] = []
            if self.peek() != "]":
                while True:
                    items.append(self.value())
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect("]", "to close the list")
            return tuple(items)
        if char == '"':
            return self.quoted()
        token, _ = self.match(_BARE, "a value")
        return token

    def quoted(self) -> str:
        start = self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if char == '"':
                self.pos += 1
                return "".join(out)
            out.append(char)
            self.pos += 1
        raise self.error("unterminated string", start)


class Pipeline:
    """An ordered list of PassSpecs; parse it from text, print it back, build its passes."""

    def __init__(self, specs: Iterable[PassSpec | str] = ()):
        self.specs: list[PassSpec] = [PassSpec(s) if isinstance(s, str) else s for s in specs]

    @classmethod
    def parse(cls, text: str, validate: bool = True) -> Pipeline:
        """Parse pipeline text. With ``validate``, pass names and options are checked against the registry."""
        if not isinstance(text, str):
            raise PipelineError(f"a pipeline must be text, got {type(text).__name__}")
        pipeline = cls(_Parser(text).pipeline())
        if validate:
            pipeline.validate(text)
        return pipeline

    @classmethod
    def coerce(cls, value: Pipeline | str | Iterable[Any]) -> Pipeline:
        """Accept a Pipeline, pipeline text, or a list of pass instances / pass names."""
        if isinstance(value, Pipeline):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        from slimfx.passes.base import Pass

        specs = []
        for item in value:
            if isinstance(item, Pass):
                specs.append(item.spec())
            elif isinstance(item, (str, PassSpec)):
                specs.append(item)
            else:
                raise PipelineError(f"cannot use {item!r} as a pipeline element; give pass names or Pass objects")
        return cls(specs)

    def validate(self, text: str | None = None) -> None:
        """Check every pass exists and its options are valid; errors point into ``text`` when given."""
        from slimfx.passes.base import registry

        reg = registry()
        text = text if text is not None else str(self)
        for spec in self.specs:
            if spec.name not in reg:
                message = f"unknown pass {spec.name!r}{did_you_mean(spec.name, reg)}; `slimfx passes` lists them"
                if spec.position >= 0:
                    raise PipelineError(caret_message(message, text, spec.position))
                raise PipelineError(message)
            try:
                reg[spec.name].make_options(spec.option_dict())
            except PipelineError as exc:
                position = _position_of_bad_option(spec, str(exc))
                if position is not None:
                    raise PipelineError(caret_message(str(exc), text, position)) from None
                raise

    def passes(self) -> list[Any]:
        """Instantiate the passes (validating names and options)."""
        from slimfx.passes.base import get_pass

        return [get_pass(s.name).from_raw(s.option_dict(), spec=s) for s in self.specs]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.specs)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.specs == other.specs

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return iter(self.specs)

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.specs + Pipeline.coerce(other).specs)


def _position_of_bad_option(spec: PassSpec, message: str) -> int | None:
    for (key, _), pos in zip(spec.options, spec.option_positions):
        if f"option {key!r}" in message:
            return pos
    return spec.position if spec.position >= 0 else None
