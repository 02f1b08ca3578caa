"""Pass, its options, its numerics contract, and the registry.

A pass is a small class with a registered kebab-case ``name``, a typed ``Options`` dataclass, a docstring
whose first line is its one-line summary, and a ``contract``:

- ``exact``: outputs equal within float tolerance (``tolerance``: rtol, atol relative to output scale);
- ``bounded``: outputs within the bound the pass returns in ``PassResult.bound``;
- ``changes``: numerics change on purpose; only the structural invariants (verify) hold.

``run(program)`` rewrites the program in place and may return a PassResult with statistics and notes.
A function can be registered as a pass with ``@register_pass(name=..., contract=...)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from slimfx.errors import PipelineError, did_you_mean
from slimfx.ir.program import Program
from slimfx.passes.options import build_options, option_fields, raw_value
from slimfx.passes.pipeline import PassSpec


class Contract(str, Enum):
    """What a pass promises about the program's outputs."""

    EXACT = "exact"
    BOUNDED = "bounded"
    CHANGES = "changes"


@dataclass
class NoOptions:
    """The options of a pass that takes none."""


@dataclass
class PassResult:
    """What a pass reports: whether it changed the program, statistics, notes, and (bounded) its bound."""

    changed: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bound: float | None = None


_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_REGISTRY: dict[str, type[Pass]] = {}


class Pass:
    """Base class of all passes. Subclasses set name, contract, Options and implement run()."""

    name: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.CHANGES
    Options: ClassVar[type] = NoOptions
    preserves: ClassVar[frozenset[str]] = frozenset()
    tolerance: ClassVar[tuple[float, float]] = (1e-5, 1e-6)
    # True when the pass only changes tensor values, never the graph, shapes or module types (training):
    # rebuilding an artifact (slimfx.load) skips it, since the saved tensors hold its result
    values_only: ClassVar[bool] = False

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is not None and kwargs:
            raise PipelineError(f"pass {self.name!r}: give either an options object or keyword options")
        if options is None:
            options = self.make_options(kwargs)
        elif not isinstance(options, self.Options):
            raise PipelineError(f"pass {self.name!r} expects {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self._explicit = set(kwargs) if kwargs else None

    @classmethod
    def make_options(cls, raw: dict[str, Any]) -> Any:
        """Build (and validate) this pass's options from raw or typed values."""
        return build_options(cls.name, cls.Options, raw)

    @classmethod
    def from_raw(cls, raw: dict[str, Any], spec: PassSpec | None = None) -> Pass:
        instance = cls(cls.make_options(raw))
        instance._explicit = set(raw)
        instance._spec = spec
        return instance

    def spec(self) -> PassSpec:
        """This pass as a PassSpec: the options given explicitly, or those differing from the defaults."""
        spec = getattr(self, "_spec", None)
        if spec is not None:
            return spec
        defaults = self.Options()
        items = []
        for name in option_fields(self.Options):
            value = getattr(self.options, name)
            explicit = self._explicit is not None and name in self._explicit
            if explicit or value != getattr(defaults, name):
                items.append((name, raw_value(value)))
        return PassSpec(self.name, tuple(items))

    def text(self) -> str:
        """This pass as pipeline text."""
        return str(self.spec())

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def run(self, program: Program) -> PassResult | None:
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def comparable_outputs(self, reference: Any, outputs: Any) -> tuple[Any, Any]:
        """The parts of the outputs before and after run() that the contract covers: all of them, unless the
        pass changes the output structure on purpose (distill-taps adds features and compares the original)."""
        return reference, outputs

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def __repr__(self) -> str:
        return f"<pass {self.text()}>"


def register_pass(
    cls: type[Pass] | None = None,
    *,
    name: str | None = None,
    contract: Contract | str | None = None,
    options: type | None = None,
    preserves: tuple[str, ...] = (),
    tolerance: tuple[float, float] | None = None,
) -> Any:
    """Register a Pass subclass, or turn a function ``fn(program, options) -> PassResult|None`` into one.

    Class form: ``@register_pass`` on a subclass with ``name`` and ``contract`` set.
    Function form: ``@register_pass(name="my-pass", contract="exact", options=MyOptions)``.
    Names are kebab-case and unique; re-registering a name raises PipelineError.
    """
    if cls is not None:
        return _register_class(cls)

    def decorate(obj: Any) -> Any:
        if inspect.isclass(obj):
            if name is not None:
                obj.name = name
            if contract is not None:
                obj.contract = Contract(contract)
            return _register_class(obj)
        if contract is None:
            raise PipelineError(f"register_pass({name!r}): a function pass must declare contract=")
        fn = obj
        attrs = {
            "name": name or fn.__name__.replace("_", "-"),
            "contract": Contract(contract),
            "Options": options or NoOptions,
            "preserves": frozenset(preserves),
            "__doc__": fn.__doc__,
            "run": lambda self, program: fn(program, self.options),
            "__module__": fn.__module__,
        }
        if tolerance is not None:
            attrs["tolerance"] = tolerance
        pass_cls = type(f"{fn.__name__}_pass", (Pass,), attrs)
        _register_class(pass_cls)
        fn.pass_class = pass_cls
        return fn

    return decorate


def _register_class(cls: type[Pass]) -> type[Pass]:
    if not (inspect.isclass(cls) and issubclass(cls, Pass)):
        raise PipelineError(f"register_pass needs a Pass subclass, got {cls!r}")
    if not cls.name or not _KEBAB.match(cls.name):
        raise PipelineError(f"pass class {cls.__name__} needs a kebab-case name (e.g. 'fold-bn'), got {cls.name!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise PipelineError(f"pass {cls.name!r}: Options must be a dataclass")
    if not cls.summary():
        raise PipelineError(f"pass {cls.name!r} needs a docstring (its first line is shown by `slimfx passes`)")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PipelineError(f"a pass named {cls.name!r} is already registered ({existing.__module__})")
    cls.contract = Contract(cls.contract)
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass from the registry (for tests and plugins that replace a pass)."""
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Pass]]:
    """All registered passes by name (loads the built-in passes first)."""
    _load_builtin_passes()
    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``; PipelineError with a did-you-mean otherwise."""
    reg = registry()
    if name not in reg:
        raise PipelineError(f"unknown pass {name!r}{did_you_mean(name, reg)}; `slimfx passes` lists them")
    return reg[name]


def list_passes() -> list[type[Pass]]:
    """Every registered pass class, sorted by name."""
    return [cls for _, cls in sorted(registry().items())]


def _load_builtin_passes() -> None:
    import slimfx.passes.cleanup  # noqa: F401  (registers dce, canonicalize, fold-bn, verify)
    import slimfx.passes.distill  # noqa: F401
    import slimfx.passes.prune  # noqa: F401
    import slimfx.passes.quant  # noqa: F401
