"""README.md and docs/*.md: every command line shown for one of the product's programs (in a fenced code block,
or an inline code span that starts with the program) names sub-commands and flags that exist.

Each command is parsed, in-process, by the program's own argparse parser (``build_parser()`` of its cli
module), never run: no model is loaded, nothing is read or written. The copy of the parser that checks a
command refuses abbreviations (``--out`` for ``--output`` is an error here, as a reader would not guess it
works) and accepts placeholders (``DIR``, ``N``, ``AET@HOST:PORT``...) where a value of some type or choice is
expected; missing required arguments are not errors (a doc may show only the flag it is about).
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("xr-daemon", "xr-results", "xr-review", "xr-score", "xr-train")
PROGRAM_TOKEN = re.compile(r"^(?:\S*/)?(" + "|".join(PROGRAMS) + r")$")
# a value that stands for something the reader fills in: DIR, N, CKPT, AET@HOST:PORT, <file>, $VAR
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_@:.\-/]*$|^<[^>]+>$|\$|\.\.\.")
SEPARATORS = {";", "&", "&&", "|", "||", ">", ">>", "<", "(", ")", "2>", "2>&1"}


class CommandError(Exception):
    pass


@dataclass(frozen=True)
class Shown:
    where: str  # file:line
    argv: tuple[str, ...]  # program first

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


# ---------------------------------------------------------------------------------------------- extraction


def _segments(line: str) -> list[list[str]]:
    """A shell line's simple commands as token lists (comments dropped; cut at ; & | && || redirections, $(...))."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    segments, current = [], []
    try:
        tokens = list(lex)
    except ValueError:  # an unbalanced quote in prose-like code: not a command
        return []
    for tok in tokens:
        if tok in SEPARATORS or set(tok) <= set(";&|<>()"):
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    return [s for s in segments if s]


def _program_argv(tokens: list[str]) -> tuple[str, ...] | None:
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    m = PROGRAM_TOKEN.match(tokens[0])
    if not m:
        return None
    return (m.group(1), *tokens[1:])


def code_block_commands(path: Path) -> list[Shown]:
    shown, in_block, pending, start = [], False, "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if not any(p in line for p in PROGRAMS):
            continue
        for text in _alternatives(line):
            for seg in _segments(text):
                argv = _program_argv([t for t in seg if t != "..."])
                if argv:
                    shown.append(Shown(f"{path.name}:{start}", argv))
    return shown


def _alternatives(text: str) -> list[str]:
    """Synopses: `xr-results [list\\|stats] [--flagged]`, `--objective f1|youden|cost`: one command per
    alternative (a word joined by `|` without spaces, in a table cell escaped `\\|`), brackets gone."""
    text = re.sub(r"(^|\s)\[|\](?=\s|$)", " ", text.replace("\\|", "|"))
    m = re.search(r"(?<!\S)[\w.-]+(?:\|[\w.-]+)+(?!\S)", text)
    if m:
        return [
            alt
            for choice in m.group().split("|")
            for alt in _alternatives(text[: m.start()] + choice + text[m.end() :])
        ]
    return [text]


def inline_commands(path: Path) -> list[Shown]:
    shown, in_block = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if not PROGRAM_TOKEN.match(span.split(" ", 1)[0]) or " " not in span:
                continue
            for text in _alternatives(span):
                try:
                    tokens = shlex.split(text)
                except ValueError:
                    continue
                argv = _program_argv([t for t in tokens if t != "..."])
                if argv:
                    shown.append(Shown(f"{path.name}:{n}", argv))
    return shown


def shown_commands() -> list[Shown]:
    return [c for doc in DOCS for c in (*code_block_commands(doc), *inline_commands(doc))]


# ------------------------------------------------------------------------------------------------ checking


class _AnyPlaceholder:
    """An action's choices, plus any placeholder value."""

    def __init__(self, choices):
        self.choices = choices

    def __contains__(self, value) -> bool:
        return value in self.choices or (isinstance(value, str) and bool(PLACEHOLDER.search(value)))

    def __iter__(self):
        return iter(self.choices)


def _lenient_type(convert):
    def parse(text: str):
        if PLACEHOLDER.search(text):
            return text
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _strict_copy(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser (and its sub-parsers) made to check a shown command: no abbreviations, errors raised,
    placeholders accepted, nothing required."""

    def error(message: str):
        raise CommandError(f"{parser.prog}: {message}")

    parser.error = error
    parser.allow_abbrev = False
    for group in parser._mutually_exclusive_groups:
        group.required = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict_copy(sub)
            action.required = False
            continue
        action.required = False
        if action.type is not None and callable(action.type):
            action.type = _lenient_type(action.type)
        if action.choices is not None:
            action.choices = _AnyPlaceholder(action.choices)
    return parser


def _parser_for(program: str, args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    if program == "xr-daemon":
        if args[:1] == ["install-units"]:  # xr-daemon's one sub-command (test_install_units_is_xr_daemons)
            from xr.daemon import units

            return units.build_parser(), args[1:]
        from xr.daemon.cli import build_parser
    elif program == "xr-results":
        from xr.results.cli import build_parser
    elif program == "xr-review":
        from xr.review.cli import build_parser
    elif program == "xr-score":
        from xr.score.cli import build_parser
    else:
        from xr.train.cli import build_parser
    return build_parser(), args


def check(argv: tuple[str, ...] | list[str]) -> argparse.Namespace:
    """Parse a shown command with its program's parser; CommandError names what does not exist."""
    program, *args = argv
    args = [a for a in args if a not in ("-h", "--help")]
    parser, args = _parser_for(program, args)
    parser = _strict_copy(parser)
    try:
        return parser.parse_args(args)
    except CommandError as exc:
        if args and args[-1].startswith("-") and "expected one argument" in str(exc):
            return parser.parse_args([*args, "VALUE"])  # `xr-score --out` in prose: the flag, not a command
        raise


# ------------------------------------------------------------------------------------------------- tests

COMMANDS = shown_commands()


def test_programs_are_the_installed_ones():
    scripts = {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("xr.")}
    assert scripts == set(PROGRAMS), "a program was added or removed: teach this test its parser"


def test_every_program_is_shown():
    assert {c.argv[0] for c in COMMANDS} == set(PROGRAMS)
    assert len(COMMANDS) > 40, [str(c) for c in COMMANDS]


@pytest.mark.parametrize("shown", COMMANDS, ids=str)
def test_shown_command_parses(shown: Shown):
    try:
        check(shown.argv)
    except CommandError as exc:
        pytest.fail(f"{shown}\n  {exc}")


@pytest.mark.parametrize(
    "argv",
    [
        ("xr-daemon", "--watch", "inbox", "--no-such-flag"),
        ("xr-daemon", "--out", "output"),  # an abbreviation of --output: not accepted here
        ("xr-results", "--output", "o", "nonsense"),
        ("xr-results", "stats", "--flaged"),
        ("xr-review", "users", "remove", "rita"),
        ("xr-score", "--data", "d", "--out", "o", "--actors", "4"),
        ("xr-train", "evaluate", "--data", "d", "--set", "train.epochs=3"),
        ("xr-train", "all", "--objective", "accuracy"),
        ("xr-daemon", "install-units", "--watch", "i", "--output", "o", "--format", "upstart"),
    ],
)
def test_a_flag_that_does_not_exist_fails(argv):
    with pytest.raises(CommandError):
        check(argv)


def test_install_units_is_xr_daemons(capsys):
    from xr.daemon import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["install-units", "--help"])
    assert stop.value.code == 0 and "usage: xr-daemon install-units" in capsys.readouterr().out


def test_extraction():
    line = "sleep 2; .venv/bin/xr-results --output out list --flagged | head  # the reading list"
    assert [_program_argv(s) for s in _segments(line)] == [
        None,
        ("xr-results", "--output", "out", "list", "--flagged"),
        None,
    ]
    assert [a.split() for a in _alternatives("xr-results [list\\|stats] [--flagged]")] == [
        ["xr-results", "list", "--flagged"],
        ["xr-results", "stats", "--flagged"],
    ]
    assert len(_alternatives("xr-train calibrate [--objective f1|youden|cost]")) == 3
    check(("xr-train", "evaluate", "--data", "DIR", "--model", "CKPT"))  # placeholders pass
    check(("xr-results", "--since", "12h", "--format", "csv", "stats"))


# ------------------------------------------------------------------------------------------------ log events
LOG_CALL = re.compile(r"\.(?:info|warning|error|exception|critical)\(\s*\"([a-z][a-z0-9_]*)\"")


def logged_events() -> dict[str, str]:
    """Every structlog event name the programs log at info or above -> the file that logs it."""
    events = {}
    for folder in ("core", "daemon", "results", "review", "score", "train"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for name in LOG_CALL.findall(path.read_text()):
                events.setdefault(name, str(path.relative_to(REPO)))
    return events


def test_every_log_event_is_documented():
    documented = (REPO / "docs" / "operations.md").read_text() + (REPO / "docs" / "dicom.md").read_text()
    events = logged_events()
    assert {"daemon_started", "stage_failed", "config_error"} <= set(events)
    missing = {name: where for name, where in events.items() if f"`{name}`" not in documented}
    assert not missing, f"log events not in the events table of docs/operations.md (or docs/dicom.md): {missing}"


def test_results_md_gives_the_csv_columns_in_order():
    from xr.results.schema import EXPORT_COLUMNS

    text = (REPO / "docs" / "results.md").read_text()
    paragraph = text[text.index("Columns, in this order:") :].split("(`results.schema.EXPORT_COLUMNS`)")[0]
    assert tuple(re.findall(r"`([a-z_0-9]+)`", paragraph)) == EXPORT_COLUMNS


def test_shipped_model_card_names_the_package_version():
    import json
    from importlib.metadata import version

    card = json.loads((REPO / "models" / "model_card.json").read_text())
    assert card["version"] == version("xr-triage")
    assert (REPO / "models" / "MODEL_CARD.md").read_text().splitlines()[0].endswith(f" {version('xr-triage')}")


def test_config_keys_named_in_the_docs_exist():
    from xr.core.config import Recipe, Settings

    known = {
        f"{section}.{key}"
        for cls in (Settings, Recipe)
        for section, info in cls.model_fields.items()
        for key in info.annotation.model_fields
    }
    sections = {section for cls in (Settings, Recipe) for section in cls.model_fields}
    wrong = []
    for doc in [*DOCS, REPO / "CHANGELOG.md"]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for name in re.findall(r"`([a-z_]+\.[a-z_]+)(?:[:=][^`]*)?`", line):
                if name.split(".")[0] in sections and name not in known and not name.endswith((".py", ".md")):
                    wrong.append(f"{doc.name}:{n}: {name}")
    assert not wrong, wrong
