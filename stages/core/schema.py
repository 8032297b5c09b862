"""Declared parameter schemas: one frozen dataclass per params.yaml section or method block.

Every field is declared with `option(default, doc, ...)`: its type comes from the annotation, its
allowed values from the keyword checks, and its one-line doc feeds docs/reference/params.md. `parse(cls, mapping,
where)` is the one way params become objects: unknown keys are errors naming the closest known
key, wrong types and out-of-range values are errors naming `where.key`, what was given and what is
allowed. Nothing falls back to a default silently except a key that is simply absent.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from typing import Any, Callable

from stages.core.errors import PipelineError

# Every value an error message shows goes through `shown`: a YAML alias bomb (nine aliases of nine
# aliases ..., a few hundred bytes of params.yaml) is a small graph of shared lists, but its plain
# repr() spells out all 9**9 leaves, gigabytes and minutes. A bounded repr keeps every message one
# short line: two levels deep, six items per level, 80 characters per string or number (at most a
# few hundred characters in all).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 2
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxfrozenset = _SHOWN.maxdeque = 6
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 80


def shown(value: Any) -> str:
    """repr(value), bounded in depth, breadth and length (for error messages)."""
    return _SHOWN.repr(value)


def shown_key(key: Any) -> str:
    """A mapping key as a message names it: a string as it is (cut at 80 characters), anything else shown."""
    if isinstance(key, str):
        return key if len(key) <= 80 else key[:77] + "..."
    return shown(key)


class SchemaError(PipelineError):
    """A value that breaks its field's declaration; `key` is the field (None: the block itself)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.message = key, message


def option(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    check: Callable[[Any], bool] | None = None,
    allowed: str | None = None,
) -> Any:
    """A schema field. `check`/`allowed`: an extra rule and how to say it ("an odd integer")."""
    meta = dict(doc=doc, ge=ge, gt=gt, le=le, lt=lt, choices=choices, check=check, allowed=allowed)
    if isinstance(default, (list, dict)):  # a mutable default: each instance gets its own copy
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_NOUNS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "a mapping"}
_TESTS: dict[type, Callable[[Any], bool]] = {
    int: _is_int,
    float: _is_number,
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    dict: lambda v: isinstance(v, dict),
}


def _split_optional(annotation) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def number_text(value) -> str:
    """A number as params.yaml writes it: 4.0 -> 4, 1048576 -> 1048576 (never 1.04858e+06), 0.1 -> 0.1."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _range_text(meta: dict) -> str:
    n = number_text
    lo = f"[{n(meta['ge'])}" if meta["ge"] is not None else f"({n(meta['gt'])}" if meta["gt"] is not None else None
    hi = f"{n(meta['le'])}]" if meta["le"] is not None else f"{n(meta['lt'])})" if meta["lt"] is not None else None
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f" {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return ""


def describe(field: dataclasses.Field, annotation) -> str:
    """What a field accepts, in words: 'a finite number in (0, 1]', 'one of max, mean', ..."""
    meta = field.metadata
    base, optional = _split_optional(annotation)
    if meta.get("allowed"):
        text = meta["allowed"]
    elif meta.get("choices"):
        text = "one of " + ", ".join(str(c) for c in meta["choices"])
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        text = f"a non-empty list of {_NOUNS[item].split(' ', 1)[1]}s" + (
            _range_text(meta).replace(" in", " each in").replace(" >", " each >") if _range_text(meta) else ""
        )
    else:
        text = _NOUNS[base] + _range_text(meta)
    return text + (" or null" if optional else "")


def _in_range(value: Any, meta: dict) -> bool:
    return not (
        (meta["ge"] is not None and value < meta["ge"])
        or (meta["gt"] is not None and value <= meta["gt"])
        or (meta["le"] is not None and value > meta["le"])
        or (meta["lt"] is not None and value >= meta["lt"])
    )


def valid(field: dataclasses.Field, annotation, value: Any) -> bool:
    meta = field.metadata
    base, optional = _split_optional(annotation)
    if value is None:
        return optional
    if meta.get("choices") is not None and value not in meta["choices"]:
        return False
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        ok = isinstance(value, list) and len(value) > 0 and all(_TESTS[item](v) for v in value)
        ok = ok and all(_in_range(v, meta) for v in value) if item in (int, float) else ok
    else:
        ok = _TESTS[base](value) and (base not in (int, float) or _in_range(value, meta))
    return ok and (meta.get("check") is None or bool(meta["check"](value)))


class Schema:
    """Base of every params block: validates its fields (and `validate_block`) on construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not valid(field, hints[field.name], value):
                raise SchemaError(field.name, f"must be {describe(field, hints[field.name])}, got {shown(value)}")
        self.validate_block()

    def validate_block(self) -> None:
        """Rules across fields; raise SchemaError(field name, message)."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_docs(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, allowed values, default, doc) of every field, for generated documentation (default
    dataclasses.MISSING: the field is required)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING
        )  # MISSING: a required field
        rows.append((field.name, describe(field, hints[field.name]), default, field.metadata.get("doc", "")))
    return rows


def _dotted(where: str, key: Any) -> str:
    return f"{where}.{shown_key(key)}" if where else shown_key(key)


def unknown_key_error(where: str, key: str, known: list[str]) -> PipelineError:
    close = difflib.get_close_matches(shown_key(key), known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return PipelineError(f"{_dotted(where, key)}: unknown parameter ({hint}known: {', '.join(known) or 'none'})")


def check_keys(mapping: dict, known: list[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            raise unknown_key_error(where, key, known)


def parse(cls: type, mapping: Any, where: str):
    """params.yaml block -> validated `cls` instance; every error names `where.<key>` ('' = top level)."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise PipelineError(f"{where}: expected a mapping of parameters, got {shown(mapping)}")
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(mapping, names, where)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.name not in mapping:
            raise PipelineError(f"{_dotted(where, field.name)}: missing (must be {describe(field, hints[field.name])})")
    try:
        return cls(**mapping)
    except SchemaError as exc:
        raise PipelineError(f"{_dotted(where, exc.key) if exc.key else where}: {exc.message}") from exc
