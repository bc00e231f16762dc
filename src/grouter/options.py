"""Typed options and inputs of every command: the one place where a default, a range and a help line live.

A stage declares two dataclasses: its **inputs** (paths it reads, :func:`path_input` fields) and its
**options** (:func:`option` fields, possibly nested dataclasses such as a model's sizes and a training
schedule). Each field's metadata says what the command line needs: its flag, help, range
(:class:`Range`) or choices. ``grouter.cli`` makes every command's flags from these dataclasses, and
:func:`check` applies the same ranges to values from anywhere (the command line, an experiment's
config file, Python), so a bad value is one ``error:`` line before any work starts.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import GrouterError


@dataclass(frozen=True)
class Range:
    """Finite numbers of ``kind`` from ``low`` (included when ``low_ok``) to below ``high``."""

    kind: type
    low: float
    low_ok: bool = True
    high: float | None = None

    def describe(self) -> str:
        show = (lambda v: f"{int(v)}") if self.kind is int else (lambda v: f"{v:g}")
        bound = f"{'at least' if self.low_ok else 'greater than'} {show(self.low)}"
        return bound + (f" and below {show(self.high)}" if self.high is not None else "")

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and
                                                                               not float(value).is_integer()):
            return False
        return (math.isfinite(value) and (value > self.low or (value == self.low and self.low_ok))
                and (self.high is None or value < self.high))

    def parse(self, text: str):
        """``text`` as a number in range, or ValueError with the message the command line shows."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if self.kind is int else 'a number'}, got {text!r}") from None
        if not self.accepts(value):
            raise ValueError(f"expected a number {self.describe()}, got {text}")
        return value


POSITIVE_INT = Range(int, 1)
COUNT = Range(int, 0)  # seeds, warm-up steps, layer indices
POSITIVE = Range(float, 0, False)  # learning rates, temperatures, sizes
NON_NEGATIVE = Range(float, 0)
FRACTION = Range(float, 0, True, 1)
SEED = Range(int, 0, True, 2**32)  # what numpy and torch accept as a seed
LEARNING_RATE = Range(float, 0, False, 10)  # beyond any that trains: a typo, or an overflow to come
LAYERS = Range(int, 1, True, 1025)  # a model's layers


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, range: Range | None = None,
           choices: tuple | None = None, parse=None, metavar: str | None = None, how: bool = False,
           exclusive: str | None = None, cli: bool = True, file: bool = False, memory: bool = False,
           default_factory=MISSING) -> Any:
    """An option field. ``flag``: its command-line name (default ``--field-name``; a boolean whose
    default is True gets a ``--no-...`` flag); ``parse``: a text -> value function (ValueError on bad
    text); ``how``: it says how the command runs (device), not what it makes, so it is left out of the
    command's identity; ``exclusive``: the fields with the same name are alternatives; ``cli``:
    settable from Python and config files only; ``file``: a name or a file, an input when it names an
    existing file (a hardware profile); ``memory``: what the command's memory grows with (an
    out-of-memory error names these)."""
    meta = {"help": help, "flag": flag, "range": range, "choices": choices, "parse": parse, "metavar": metavar,
            "how": how, "exclusive": exclusive, "cli": cli, "file": file, "memory": memory}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def path_input(help: str = "", *, required: bool = True, many: bool = False, positional: bool = False,
               flag: str | None = None, exclusive: str | None = None, metavar: str | None = None) -> Any:
    """An input field: a path the command reads (a directory artifact or a file). ``many``: a list of
    them. Inputs are what ``--out`` may never be, contain or lie inside, and their content is part of
    the command's identity (grouter.runner)."""
    meta = {"help": help, "flag": flag, "input": True, "required": required, "many": many,
            "positional": positional, "exclusive": exclusive, "metavar": metavar, "cli": True}
    return field(default_factory=list, metadata=meta) if many else field(default=None, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def types_of(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def nested(cls, f) -> type | None:
    """The dataclass a field holds, when it holds one (a group of options)."""
    t = types_of(cls)[f.name]
    return t if isinstance(t, type) and is_dataclass(t) else None


def walk(obj, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted name, field, value)`` of every leaf field of an options dataclass, nested ones included."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            yield from walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def check(obj):
    """``obj`` after checking every field against its range and choices (None passes where it is the
    default); GrouterError naming the flag otherwise."""
    for _, f, value in walk(obj):
        meta = f.metadata
        if value is None and f.default is None:
            continue
        if meta.get("range") is not None and not meta["range"].accepts(value):
            raise GrouterError(f"{flag_of(f)} must be a number {meta['range'].describe()}, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise GrouterError(f"{flag_of(f)} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    return obj


def memory_flags(obj) -> list[str]:
    """``--flag value`` of every option marked as what memory grows with."""
    return [f"{flag_of(f)} {value}" for _, f, value in walk(obj) if f.metadata.get("memory") and value is not None]


def identity(obj) -> dict:
    """What an options dataclass says of the result: every field but those that say how it runs."""
    how = {name for name, f, _ in walk(obj) if f.metadata.get("how")}
    return _without(asdict(obj), how)


def _without(d: dict, names: set[str], prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = prefix + key
        if name in names:
            continue
        out[key] = _without(value, names, name + ".") if isinstance(value, dict) and any(
            n.startswith(name + ".") for n in names) else value
    return out


def defaults(cls) -> dict:
    """Every field's default by name, a nested group's as a dict of its default instance's values,
    MISSING for a required field."""
    out = {}
    for f in fields(cls):
        value = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        out[f.name] = {g.name: getattr(value, g.name) for g in fields(value)} if is_dataclass(value) else value
    return out


def merged(cls, given: dict) -> dict:
    """:func:`defaults` with the ``given`` values (nested groups as dicts) in place."""
    out = defaults(cls)
    for key, value in given.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(cls, values: dict):
    """An instance of ``cls`` from ``values`` keyed by field name; nested dataclasses from dicts (or
    from the flat names of their own fields, as the command line gives them)."""
    kw = {}
    for f in fields(cls):
        sub = nested(cls, f)
        if sub is not None:
            given = values.get(f.name)
            if is_dataclass(given):
                kw[f.name] = given
            else:
                inner = given if isinstance(given, dict) else {g.name: values[g.name] for g in fields(sub)
                                                               if g.name in values}
                kw[f.name] = build(sub, inner)
        elif f.name in values:
            kw[f.name] = values[f.name]
    return cls(**kw)


def input_paths(inputs, options=None) -> list[tuple[str, Path]]:
    """``(field, path)`` of everything a command reads: every given input, and every ``file`` option
    that names an existing file."""
    out = []
    for f in fields(inputs):
        value = getattr(inputs, f.name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None:
                out.append((f.name, Path(v)))
    for name, f, value in walk(options) if options is not None else ():
        if f.metadata.get("file") and value is not None and Path(value).exists():
            out.append((name, Path(value)))
    return out


def as_path(value):
    """A path from a path, a string or an opened artifact (anything with ``.path``)."""
    if value is None or isinstance(value, Path):
        return value
    return Path(getattr(value, "path", value))
