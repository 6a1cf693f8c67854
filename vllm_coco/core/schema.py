"""Typed settings: a group of options is a pydantic model (a `Section`) whose fields declare each
option once, with its type, range, default and help; `parse` validates untrusted input (a config
file, a section of one) into it, and the first problem becomes one CocoError line naming the key
path, e.g. `sweep.ratio[1]: 0.01 is listed twice` (the CLI turns that into exit 2).

The field types below (`Int`, `Num`, `Choice`, ...) check a value the way every coco-tools option
is checked (core/checks.py's number rules; choices listed in the message), and carry what a command
line needs (`Spec`): `click_options` turns a section's fields into a command's flags of the same
names, defaults and help, so an option shared by a config file and a command is declared once.
"""

from __future__ import annotations

# Lazy imports: core/checks.py (numpy) loads inside the function that uses it, so the CLI's `--help`,
# which reads the sections' fields, stays light.
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import click
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from vllm_coco.core.errors import CocoError


class Invalid(ValueError):
    """A value's problem; `at` is a place inside the value (a key, a list index) the problem is at."""

    def __init__(self, message: str, at: tuple = ()):
        super().__init__(message)
        self.message, self.at = message, tuple(at)


class Section(BaseModel):
    """A group of settings. A key that is no field is refused, naming the valid ones (or, for a key
    of an earlier version listed in `renamed`, what replaced it); a section left out or null takes
    every default."""

    model_config = ConfigDict(extra="forbid", validate_default=False)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        if data is None:
            return {}
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise Invalid(f"expected a mapping of keys, got {type(data).__name__}")
        keys = [f.alias or name for name, f in cls.model_fields.items()]  # as written in a file
        for key in data:
            if key in cls.renamed:
                raise Invalid(f"was replaced by {cls.renamed[key]}", (key,))
            if key not in keys:
                raise Invalid(f"unknown key (valid keys{{in}}: {', '.join(keys)})", (key,))
        return data


def path_of(loc: Iterable) -> str:
    """('sweep', 'ratio', 1) -> 'sweep.ratio[1]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(model: type[BaseModel], raw, where: str = ""):
    """`raw` validated into `model`; CocoError `path: problem` (one line) at the first problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        cause = (err.get("ctx") or {}).get("error")
        loc = (*([where] if where else []), *err["loc"], *(cause.at if isinstance(cause, Invalid) else ()))
        path = path_of(loc)
        msg = cause.message if isinstance(cause, Invalid) else err["msg"]
        section = path_of(loc[:-1]) if isinstance(cause, Invalid) and cause.at else path
        raise CocoError(f"{path or 'config'}: {msg.replace('{in}', f' in {section}' if section else '')}") from None


# --------------------------------------------------------------------------- field types

@dataclass(frozen=True)
class Spec:
    """What a field type accepts, for the command line: "int" (>= lo), "num", "choice" or "text"."""

    kind: str
    lo: float | None = None
    choices: Any = None  # a sequence, or a function giving one


def _checked(check: Callable, py_type, spec: Spec | None = None) -> Any:
    return Annotated[(py_type, BeforeValidator(check)) + ((spec,) if spec else ())]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def Int(lo: int | None = None, *, null: bool = False) -> Any:  # noqa: N802 (a type, spelled as one)
    """An integer >= lo (or None, when `null`)."""
    def check(v):
        if v is None and null:
            return None
        if not _is_int(v):
            raise Invalid(f"{v!r} is not an integer" + (" (or null)" if null else ""))
        if lo is not None and v < lo:
            raise Invalid(f"{v} must be at least {lo}")
        return v
    return _checked(check, int | None if null else int, Spec("int", lo=lo))


def _number(v, lo=None, hi=None, lo_open=False) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise Invalid(f"{v!r} is not a number")
    from vllm_coco.core.checks import finite

    try:
        return finite(v, "", lo=lo, hi=hi, lo_open=lo_open)  # the one number validation (core/checks.py)
    except CocoError as exc:
        raise Invalid(str(exc).strip()) from None


def Num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:  # noqa: N802
    """A finite number within [lo, hi] ((lo, hi] when `lo_open`)."""
    return _checked(lambda v: _number(v, lo, hi, lo_open), float, Spec("num"))


def Nums(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:  # noqa: N802
    """A non-empty list of distinct finite numbers within the bounds."""
    return _checked(lambda v: nums(v, lo=lo, hi=hi, lo_open=lo_open), list[float])


def nums(v, **bounds) -> list[float]:
    """A non-empty list of distinct finite numbers within `bounds` (as Num's); Invalid at the bad item."""
    if not isinstance(v, list) or not v:
        raise Invalid(f"{v!r} is not a non-empty list of numbers")
    out = []
    for i, x in enumerate(v):
        try:
            out.append(_number(x, **bounds))
        except Invalid as exc:
            raise Invalid(exc.message, (i,)) from None
        if out[-1] in out[:-1]:
            raise Invalid(f"{out[-1]} is listed twice", (i,))
    return out


def _choices(choices) -> tuple:
    return tuple(choices() if callable(choices) else choices)


def choice(v, choices) -> str:
    """`v` if it is one of `choices` (a sequence, or a function giving one); Invalid naming them if not."""
    options = _choices(choices)
    if v not in options:
        raise Invalid(f"{v!r} is not one of {', '.join(options)}")
    return v


def Choice(choices, *, null: bool = False) -> Any:  # noqa: N802
    """One of `choices` (or None, when `null`); a function giving them is asked when validating
    (registries that plugins extend)."""
    return _checked(lambda v: None if v is None and null else choice(v, choices), str | None if null else str,
                    Spec("choice", choices=choices))


def Choices(choices, *, empty: bool = False, what: str = "") -> Any:  # noqa: N802
    """A list of distinct `choices` (non-empty unless `empty`); `what` names them in the message."""
    def check(v):
        if not isinstance(v, list) or (not v and not empty):
            kinds = what or ", ".join(_choices(choices))
            raise Invalid(f"{v!r} is not a {'' if empty else 'non-empty '}list of {kinds}")
        for i, x in enumerate(v):
            try:
                choice(x, choices)
            except Invalid as exc:
                raise Invalid(exc.message, (i,)) from None
            if x in v[:i]:
                raise Invalid(f"{x} is listed twice", (i,))
        return list(v)
    return _checked(check, list[str])


def Flag(*, null: bool = False) -> Any:  # noqa: N802
    """true or false (or null, when `null`)."""
    def check(v):
        if v is None and null:
            return None
        if not isinstance(v, bool):
            raise Invalid(f"{v!r} is not true" + (", false or null" if null else " or false"))
        return v
    return _checked(check, bool | None if null else bool)


def Text(what: str, *, null: bool = False) -> Any:  # noqa: N802
    """A non-empty string (or None, when `null`); `what` says what it names, for the message."""
    def check(v):
        if v is None and null:
            return None
        if not isinstance(v, str) or not v:
            raise Invalid(f"{v!r} is not {what}")
        return v
    return _checked(check, str | None if null else str, Spec("text"))


# --------------------------------------------------------------------------- the command line

def _click_type(spec: Spec):
    if spec.kind == "int":
        return click.IntRange(min=spec.lo) if spec.lo is not None else int
    if spec.kind == "choice":
        return click.Choice(_choices(spec.choices))
    return float if spec.kind == "num" else str


def click_options(model: type[BaseModel], only: Iterable[str] | None = None):
    """A decorator adding one flag per field of `model` (or of `only`): --name-with-dashes, the field's
    type (Spec), default and description as the help. The command receives them under the field names."""
    def decorate(command):
        for name in reversed(list(only or model.model_fields)):
            field = model.model_fields[name]
            spec = next(m for m in field.metadata if isinstance(m, Spec))
            command = click.option(f"--{name.replace('_', '-')}", name, type=_click_type(spec), default=field.default,
                                   show_default=field.default is not None, help=field.description)(command)
        return command
    return decorate
