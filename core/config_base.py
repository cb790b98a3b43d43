"""What both configuration files are built from (core/config.py loads them): the value types, a
``Section``'s rules (unknown keys refused, frozen), the file model ``_File`` and the validation that turns
pydantic's errors into a :class:`ConfigError` naming the key."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
)

from xr.core.errors import ConfigError

Number = Annotated[float, Strict()]  # an int or a float; never a string or a bool


def _yaml_false_as(word: str) -> BeforeValidator:
    """YAML reads a bare ``off`` or ``no`` as false: take it as ``word`` where a choice means "off"."""
    return BeforeValidator(lambda v: word if v is False else v)


Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # docs/configuration.md's "read by": a key is read by its file's READERS, and also by ALSO_READ_BY[key];
    # READ_BY[key] names the readers of a key its file's READERS do not read.
    ALSO_READ_BY: ClassVar[dict[str, str]] = {}
    READ_BY: ClassVar[dict[str, str]] = {}


def _ordered(pair: tuple[Any, Any], name: str) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(pair)}")


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    FILE: ClassVar[str]
    READERS: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return _plain(self.model_dump())

    def replace(self, overrides: dict[str, Any]) -> _File:
        """A copy with dotted keys overridden (``{"train.epochs": 2}``; None sets null), re-validated."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in data or key not in data[section]:
                raise ConfigError(_unknown(type(self), section, key))
            data[section][key] = value
        return validate(type(self), data, "overrides")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _keys(cls: type[_File], section: str) -> list[str]:
    return list(cls.model_fields[section].annotation.model_fields)


def _unknown(cls: type[_File], section: str, key: str | None) -> str:
    dotted = f"{section}.{key}" if key else section
    sections = f"{cls.FILE} holds sections {', '.join(cls.model_fields)}"
    from xr.core.config import FILES  # the loader, which imports this module

    home = next((f for f in FILES if f is not cls and section in f.model_fields), None)
    if home is not None:  # a key of the other file: say where it belongs
        where = f"belongs in {home.FILE}, read by {home.READERS}; {sections}"
        if key is None:
            return f"config section {section} {where}"
        if key in _keys(home, section):
            return f"config key {dotted} {where}"
        return f"unknown config key {dotted}; section {section} {where}"
    if key is None or section not in cls.model_fields:
        return f"unknown config section {section!r}; {sections}"
    return f"unknown config key {dotted}; known keys of {section}: {', '.join(_keys(cls, section))}"


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _message(cls: type[_File], err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden":
        return _unknown(cls, loc[0], loc[1] if len(loc) > 1 else None)
    dotted = ".".join(loc[:2]) + "".join(f"[{p}]" for p in loc[2:])
    value = _plain(err.get("input"))
    ctx = err.get("ctx") or {}
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{sign} {_num(ctx[k])}" for k, sign in bounds.items() if k in ctx]
    if found:
        return f"{dotted}: {value!r} is out of range; must be {' and '.join(found)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # a section's own check: its message starts with the key
        return f"{dotted}.{msg}" if len(loc) == 1 else f"{dotted}: {msg}"
    if len(loc) == 1:
        return f"{dotted}: {msg}"
    return f"{dotted}: {msg}, got {value!r}"


def validate(cls: type[_File], data: Any, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections ({', '.join(cls.model_fields)}), got {type(data).__name__}"
        )
    for section, values in data.items():
        if values is not None and not isinstance(values, dict) and section in cls.model_fields:
            raise ConfigError(f"{source}: section {section} must be a mapping, got {values!r}")
    data = {k: ({} if v is None else v) for k, v in data.items()}
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"{_message(cls, first)} ({source})" if source != "overrides" else _message(cls, first)
        ) from None
