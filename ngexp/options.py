"""Options of the configurable objects: each default and each check written once.

A class or function becomes configurable in two steps, both in the module that defines it:

- ``@checked(fn)``: ``fn(**arguments)`` validates the arguments (it takes the names it checks and
  ``**_`` for the rest) and raises a one-line ``ValueError`` (:func:`check`); it runs on every
  call, so Python users get the same errors as the command line. A parameter annotated
  ``Literal["a", "b"]`` is checked against its choices without a line in ``fn``.
- ``@configurable(group, name)``: the *signature* is the one source of the option names, types
  and defaults. :mod:`ngexp.config` builds the Hydra schema ``schema/<group>/<name>`` from it
  (so ``conf/<group>/<option>.yaml`` only selects and documents a preset), and validating a
  config runs the same checks, with the group prefixed to the key (``optimizer.damping``).

A class whose ``__init__`` takes ``**options`` and passes them on inherits its parents'
options (and checks). ``extends`` appends the options of another callable (a preconditioner's
base optimizer), with ``defaults`` overriding signature defaults. Config-only schemas that
are plain dataclasses register with :func:`schema` instead.

This module imports nothing but the standard library and :mod:`ngexp.errors`, so the
curvature, optimizer and model layers can declare options without depending on Hydra.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ngexp.errors import OptionError

T = TypeVar("T")
Check = Callable[..., None]

#: Parameters that are never options: what the caller supplies at build time.
BUILD_ARGUMENTS = frozenset({"self", "model", "spec", "task", "params", "grad_scaler",
                             "total_steps", "steps_per_epoch"})


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """Raise a one-line :class:`OptionError` (a ``ValueError``) naming ``key``, the bad
    ``value`` and what is valid."""
    if not condition:
        raise OptionError(f"{key}={value!r} is invalid: expected {expected}")


def check_choice(key: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> None:
    check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


def is_number(value: Any) -> bool:
    """A finite real number (bools excluded)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_positive(key: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` is a finite number > 0 (or ``None`` when allowed)."""
    if allow_none and value is None:
        return
    check(is_number(value) and value > 0, key, value,
          ("null or " if allow_none else "") + "a finite number > 0")


def check_nonnegative(key: str, value: Any) -> None:
    check(is_number(value) and value >= 0, key, value, "a finite number >= 0")


def check_range(key: str, value: Any, low: float, high: float, *, closed: str = "[]") -> None:
    """``value`` is a finite number in the interval ``low .. high``; ``closed`` says which ends
    are included: ``[]``, ``[)``, ``(]`` or ``()``."""
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    check(is_number(value) and above and below, key, value,
          f"a number in {closed[0]}{low}, {high}{closed[1]}")


def check_integer(key: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key,
          value, ("null or " if allow_none else "") + f"an integer >= {minimum}")


# --------------------------------------------------------------------------- registry
#: Checks by the callable (class or function) whose arguments they validate.
_CHECKS: dict[Callable[..., Any], Check] = {}


def checked(fn: Check | None = None) -> Callable[[T], T]:
    """Run the ``Literal`` choice checks of the signature and ``fn(**arguments)`` whenever the
    decorated function or class is called."""

    def decorate(target: T) -> T:
        function = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
        full = with_literal_checks(function, fn)
        _CHECKS[target] = full  # type: ignore[index]
        if isinstance(target, type):
            init = target.__init__

            @functools.wraps(init)
            def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
                # the defaults of options inherited through **options, then the call's own
                full(**{**inherited_defaults(target),
                        **bound_arguments(init, (self, *args), kwargs)})
                init(self, *args, **kwargs)

            target.__init__ = checked_init  # type: ignore[misc]
            return target

        @functools.wraps(target)  # type: ignore[arg-type]
        def checked_call(*args: Any, **kwargs: Any) -> Any:
            full(**bound_arguments(target, args, kwargs))  # type: ignore[arg-type]
            return target(*args, **kwargs)  # type: ignore[operator]

        _CHECKS[checked_call] = full
        return checked_call  # type: ignore[return-value]

    return decorate


def inherited_defaults(cls: type) -> dict[str, Any]:
    """The defaults of the parents' options that ``cls.__init__`` takes through ``**options``
    (:meth:`Spec.chain`), so that a subclass's check sees every option it may check."""
    found: dict[str, Any] = {}
    for owner in list(Spec(cls).chain())[1:]:
        for parameter in inspect.signature(inspect.unwrap(vars(owner)["__init__"])
                                           ).parameters.values():
            if parameter.default is not parameter.empty:
                found.setdefault(parameter.name, parameter.default)
    return found


def with_literal_checks(function: Callable[..., Any], fn: Check | None) -> Check:
    """``fn`` preceded by the choice checks of ``function``'s ``Literal`` parameters (their
    annotations are resolved at the first call, when every name they use exists)."""
    literals: dict[str, tuple[Any, ...]] | None = None

    def run(**arguments: Any) -> None:
        nonlocal literals
        if literals is None:
            hints = typing.get_type_hints(inspect.unwrap(function))
            literals = {name: values for name, hint in hints.items()
                        if (values := literal_values(hint)) is not None}
        for name, values in literals.items():
            if name in arguments and arguments[name] is not None:
                check_choice(name, arguments[name], values)
        if fn is not None:
            fn(**arguments)

    return run


def bound_arguments(function: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a call by name, defaults applied, ``**kwargs`` merged in."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    values: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
            values[name] = value
    return values


def literal_values(annotation: Any) -> tuple[Any, ...] | None:
    """The choices of a ``Literal[...]`` annotation (also inside ``X | None``), else ``None``."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            values = literal_values(arg)
            if values is not None:
                return values
    return None


def choice_field(default: Any, choices: Collection[Any]) -> Any:
    """A dataclass field with ``choices`` (read by :func:`check_choices` and by tools that
    enumerate settings, e.g. the option-matrix test); a live view such as a registry's
    ``keys()`` grows with the plugins' choices."""
    return field(default=default, metadata={"choices": choices})


def check_choices(instance: Any, prefix: str) -> None:
    """Check every :func:`choice_field` of a dataclass ``instance``; keys ``<prefix>.<name>``."""
    for item in dataclasses.fields(instance):
        if "choices" in item.metadata:
            check_choice(f"{prefix}.{item.name}", getattr(instance, item.name),
                         item.metadata["choices"])


@dataclass(frozen=True)
class Option:
    """One option: its name, type annotation (resolved), default (``inspect.Parameter.empty``
    when required) and fixed choices (a ``Literal`` annotation or a :func:`choice_field`; bools
    have two)."""

    name: str
    annotation: Any
    default: Any
    choices: tuple[Any, ...] | None = None

    @classmethod
    def of(cls, name: str, annotation: Any, default: Any) -> Option:
        choices = literal_values(annotation)
        if choices is None and annotation is bool:
            choices = (False, True)
        return cls(name, annotation, default, choices)


def is_missing(value: Any) -> bool:
    """Whether ``value`` is ``dataclasses.MISSING`` (also a copy: a dataclass made at run time
    and pickled by value to a worker process carries its own)."""
    return isinstance(value, type(dataclasses.MISSING))


def dataclass_options(cls: type) -> list[Option]:
    """The options of a config dataclass: its fields (``_target_`` left out), with choices from
    :func:`choice_field` metadata or ``Literal``/``bool`` types."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        if item.name.startswith("_"):
            continue
        default = item.default if is_missing(item.default_factory) else item.default_factory()
        option = Option.of(item.name, hints.get(item.name, Any), default)
        if "choices" in item.metadata:
            option = dataclasses.replace(option, choices=item.metadata["choices"])
        found.append(option)
    return found


@dataclass(frozen=True)
class Spec:
    """How the options of ``target`` are found; see the module docstring."""

    target: Callable[..., Any]
    extends: Spec | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: A config-only dataclass schema (``@schema``), used as it is.
    dataclass_schema: type | None = None

    def chain(self) -> Iterator[Callable[..., Any]]:
        """The callables whose signatures and checks make up the options: a class and, while
        its ``__init__`` takes ``**options``, its parents."""
        if not isinstance(self.target, type):
            yield self.target
            return
        for cls in self.target.__mro__:
            if "__init__" not in vars(cls) or cls is object:
                continue
            yield cls
            init = inspect.unwrap(vars(cls)["__init__"])
            kinds = [p.kind for p in inspect.signature(init).parameters.values()]
            if inspect.Parameter.VAR_KEYWORD not in kinds:
                return

    def options(self) -> list[Option]:
        """Options in order (own first, then inherited, then ``extends``), with ``defaults``
        applied; build arguments and ``*args``/``**kwargs`` left out. A ``@schema``
        dataclass's options are its fields."""
        if self.dataclass_schema is not None:
            return self._with_defaults(dataclass_options(self.dataclass_schema))
        seen: dict[str, Option] = {}
        for owner in self.chain():
            function = inspect.unwrap(vars(owner)["__init__"]) if isinstance(owner, type) \
                else inspect.unwrap(owner)
            hints = typing.get_type_hints(function)
            for parameter in inspect.signature(function).parameters.values():
                if (parameter.name in BUILD_ARGUMENTS or parameter.name in seen
                        or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)):
                    continue
                seen[parameter.name] = Option.of(parameter.name,
                                                 hints.get(parameter.name, Any),
                                                 parameter.default)
        options = list(seen.values())
        if self.extends is not None:
            options += [o for o in self.extends.options() if o.name not in seen]
        return self._with_defaults(options)

    def _with_defaults(self, options: list[Option]) -> list[Option]:
        return [dataclasses.replace(o, default=self.defaults[o.name])
                if o.name in self.defaults else o for o in options]

    def checks(self) -> list[Check]:
        found = [_CHECKS[owner] for owner in self.chain() if owner in _CHECKS]
        return found + (self.extends.checks() if self.extends is not None else [])


#: Config group -> option name -> spec (filled by ``@configurable`` / ``@schema`` at import).
REGISTRY: dict[str, dict[str, Spec]] = {}


def register_spec(group: str, name: str, spec: Spec) -> None:
    """Store ``spec`` as ``REGISTRY[group][name]``; a name taken by another target (a plugin's
    ``optimizer/kfac``) raises, so no registration replaces another silently."""
    taken = REGISTRY.get(group, {}).get(name)
    if taken is not None and full_name(taken.target) != full_name(spec.target):
        raise OptionError(f"{group}/{name} is registered already (by {full_name(taken.target)}); "
                          f"{full_name(spec.target)} needs another name")
    REGISTRY.setdefault(group, {})[name] = spec


def full_name(target: Any) -> str:
    """``module.QualName`` of a callable (decorators unwrapped)."""
    target = inspect.unwrap(target)
    return f"{target.__module__}.{target.__qualname__}"


def configurable(group: str, name: str, *, extends: Callable[..., Any] | None = None,
                 defaults: Mapping[str, Any] | None = None) -> Callable[[T], T]:
    """Register ``target``'s signature as the schema ``schema/<group>/<name>``."""

    def register(target: T) -> T:
        base = Spec(extends) if extends is not None else None
        register_spec(group, name, Spec(target, base, dict(defaults or {})))  # type: ignore
        return target

    return register


def schema(group: str, name: str) -> Callable[[type[T]], type[T]]:
    """Register a config-only dataclass (with ``_target_`` and ``__post_init__`` checks)."""

    def register(cls: type[T]) -> type[T]:
        register_spec(group, name, Spec(cls, dataclass_schema=cls))
        return cls

    return register


#: Callables a config may name in a ``_target_`` node inside a setting (a schedule of the
#: damping), besides the schemas' targets (:mod:`ngexp.targets`).
NESTED_TARGETS: set[str] = set()


def nested_target(target: T) -> T:
    """Allow configs to build ``target`` in a setting's ``_target_`` node."""
    NESTED_TARGETS.add(full_name(target))
    return target
