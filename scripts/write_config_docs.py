"""Write the packaged defaults (core/config.yaml, train/recipe.yaml), the operator's example config.yaml
at the top of the checkout and docs/configuration.md from the definitions in core/config.py (kept in
core/config_settings.py and core/config_recipe.py). Run after changing a key; tests/test_config.py fails
while they differ.

    python scripts/write_config_docs.py
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from xr.core.config import FILES, RECIPE_PATH, SETTINGS_PATH, Recipe, Settings
from xr.core.config_base import _File, _num, _plain

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "configuration.md"
EXAMPLE = REPO / "config.yaml"
# What the example sets away from the defaults: the quick start's folders (`make run`), relative to
# the folder the daemon starts in.
EXAMPLE_VALUES = {"daemon.watch": "inbox", "daemon.output": "output"}


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip().removesuffix("\n...")


def _bounds(metadata) -> list[str]:
    signs = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    found = []
    for m in metadata:
        if hasattr(m, "metadata"):  # a Field(...) inside Annotated
            found += _bounds(m.metadata)
        found += [f"{sign} {_num(getattr(m, attr))}" for attr, sign in signs if getattr(m, attr, None) is not None]
    return found


def _kind(ann) -> str:
    """A type annotation in a reader's words."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is Annotated:
        kind = _kind(args[0])
        return " ".join([kind, *_bounds(args[1:])]) if _bounds(args[1:]) else kind
    if origin is tuple:
        return f"list of {len(args)}: {_kind(args[0])}"
    if origin is list:
        return f"list of {_kind(args[0])}"
    if type(None) in args:
        return f"{_kind(next(a for a in args if a is not type(None)))} or null"
    names = {bool: "true \\| false", int: "integer", float: "number", str: "text"}
    return next((name for tp, name in names.items() if ann is tp or getattr(ann, "__origin__", None) is tp), str(ann))


def _allowed(info) -> str:
    """The values a field admits, from its type and bounds."""
    return " ".join([_kind(info.annotation), *_bounds(info.metadata)])


def render_yaml(cls: type[_File], values: dict[str, Any] | None = None, header: list[str] | None = None) -> str:
    """A file of ``cls`` holding every key with its description as a comment: the defaults, or the
    defaults with the dotted keys of ``values`` set (each of those says its default)."""
    values = values or {}
    flag = "--recipe" if cls is Recipe else "--config (or $XR_CONFIG)"
    lines = header or [
        f"# {cls.FILE}: {cls.__doc__.split(':', 1)[1].strip()} Read by {cls.READERS}.",
        "# Generated from core/config.py by scripts/write_config_docs.py; docs/configuration.md explains each key.",
        f"# To change a value, copy this file, keep what you change, and pass it with {flag}.",
    ]
    for section, sinfo in cls.model_fields.items():
        lines += ["", f"{section}:"]
        for key, info in sinfo.annotation.model_fields.items():
            dotted = f"{section}.{key}"
            if dotted in values:
                note = f"{info.description} (default {_yaml_value(info.default)})"
                lines.append(f"  {key}: {_yaml_value(values[dotted])}  # {note}")
            else:
                lines.append(f"  {key}: {_yaml_value(info.default)}  # {info.description}")
    return "\n".join(lines) + "\n"


def render_example() -> str:
    """The top-level config.yaml: the operator's example, which `make run` passes to xr-daemon."""
    header = [
        "# config.yaml: an example of the operator's settings, for xr-daemon, xr-results, xr-review and xr-score",
        "# (--config FILE, or $XR_CONFIG); `make run` uses it as is. Every key holds its default except",
        f"# {' and '.join(EXAMPLE_VALUES)}: copy the file (e.g. to /etc/xr-triage/config.yaml), set those to the",
        "# site's folders and keep what you change.",
        "# Generated from core/config.py by scripts/write_config_docs.py; docs/configuration.md explains each key.",
    ]
    return render_yaml(Settings, EXAMPLE_VALUES, header)


def render_markdown() -> str:
    """docs/configuration.md: every key of both files with meaning, default, range and reader."""
    out = [
        "# Configuration",
        "",
        "Generated from `core/config.py` by `python scripts/write_config_docs.py`; `tests/test_config.py` fails when it is stale.",
        "",
        "Two files, each validated once at start-up: an unknown or misplaced key, a wrong type or a value out of",
        "range stops the program with an error naming the key. The last column says which programs read a key.",
        "",
        "- `config.yaml`: the operator's settings, read by `xr-daemon`, and in part by `xr-results` (where the",
        "  results are), `xr-review` (where the results and films are, the decode limits, its sign-in settings) and",
        "  `xr-score` (the model and the decode limits): `--config FILE`, else `$XR_CONFIG`, else the packaged",
        "  defaults `core/config.yaml`. The checkout's top-level `config.yaml` is an example with the quick",
        "  start's folders set (`make run` uses it). `xr-daemon --set section.key=VALUE` overrides one key (the",
        "  value parsed as YAML), and some keys have a flag of their own (docs/operations.md).",
        "- `recipe.yaml`: the training recipe, read by `xr-train` only: `--recipe FILE`, else the run folder's",
        "  saved `recipe.yaml`, else the packaged `train/recipe.yaml` (`xr-train evaluate`: `--recipe` or the",
        "  packaged one; `site-calibrate` reads none). Single keys are overridden by the flags of",
        "  `xr-train` (`--epochs`, `--objective`, ...); there is no `--set` for the recipe. The daemon never reads",
        "  it: preprocessing and the network travel inside the checkpoint, so a trained model always sees the",
        "  inputs it was trained on.",
        "",
        "Relative paths are taken from the current directory.",
    ]
    for cls in FILES:
        for section, sinfo in cls.model_fields.items():
            model = sinfo.annotation
            out += ["", f"## `{cls.FILE}`: `{section}`", ""]
            if model.__doc__ and "Usage docs" not in model.__doc__:
                out += [model.__doc__.strip(), ""]
            out += ["| key | meaning | default | allowed | read by |", "| --- | --- | --- | --- | --- |"]
            for key, info in model.model_fields.items():
                meaning = info.description.replace("|", "\\|")
                readers = model.READ_BY.get(key) or ", ".join(
                    [cls.READERS, *filter(None, [model.ALSO_READ_BY.get(key)])]
                )
                out.append(
                    f"| `{section}.{key}` | {meaning} | `{_yaml_value(info.default)}` | {_allowed(info)} | {readers} |"
                )
    return "\n".join(out) + "\n"


def generated() -> dict[Path, str]:
    return {
        SETTINGS_PATH: render_yaml(Settings),
        EXAMPLE: render_example(),
        RECIPE_PATH: render_yaml(Recipe),
        DOCS: render_markdown(),
    }


if __name__ == "__main__":
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path}")
