"""``xr-daemon install-units``: the service files for this installation, written with the operator's folders
and the programs of the environment that runs this command, so nothing is copied from a checkout.

systemd: ``xr-daemon.service`` and ``xr-review.service`` from the templates in ``unit_templates/`` (shipped in
the wheel), each with a ``<unit>.d/paths.conf`` drop-in holding the folders (``ReadWritePaths=``,
``RequiresMountsFor=`` and the paths ExecStart passes), so a change of folders is made in one place.
launchd: a LaunchAgent (the logged-in user's session), or with ``--user`` a LaunchDaemon (at boot, as that
user), built with plistlib.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shlex
import shutil
import sys
from importlib import resources
from pathlib import Path

from xr.core.errors import XRError

LABEL = "org.xr-triage.daemon"
DEFAULT_MEMORY_MAX = "3G"
DEFAULT_METRICS_PORT = 9109


def build_parser(prog: str = "xr-daemon install-units") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write the systemd units (xr-daemon, xr-review) or the launchd plist for this installation.",
    )
    p.add_argument("--watch", required=True, help="the inbox folder")
    p.add_argument("--output", required=True, help="the output folder (results.sqlite, processed/, failed/, csv/)")
    p.add_argument("--format", choices=("systemd", "launchd"), default="systemd")
    p.add_argument(
        "--user",
        help="the service account (systemd: default xr; launchd: writes a LaunchDaemon running as this user "
        "instead of a LaunchAgent)",
    )
    p.add_argument(
        "--dest",
        help="folder to write into (default: the current folder; then copy, e.g. to /etc/systemd/system or "
        "/Library/LaunchDaemons)",
    )
    p.add_argument("--config", help="config.yaml the services read (e.g. /etc/xr-triage/config.yaml); default none")
    p.add_argument(
        "--db",
        help="results database URL for several hosts (postgresql+psycopg://...; put a password in config.yaml, not here)",
    )
    p.add_argument("--poll", action="store_true", help="polling observer: the inbox is a network share")
    p.add_argument(
        "--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help=f"default {DEFAULT_METRICS_PORT}; 0 = none"
    )
    p.add_argument(
        "--memory-max", default=DEFAULT_MEMORY_MAX, help=f"systemd MemoryMax= (default {DEFAULT_MEMORY_MAX})"
    )
    p.add_argument("--gpu", action="store_true", help="systemd: keep /dev (PrivateDevices=no) so CUDA devices are seen")
    p.add_argument("--bin-dir", help="folder holding xr-daemon and xr-review (default: this environment's)")
    p.add_argument("--force", action="store_true", help="overwrite files already there")
    return p


def main(argv: list[str] | None = None, prog: str = "xr-daemon install-units") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        written = install_units(
            args.watch,
            args.output,
            fmt=args.format,
            user=args.user,
            dest=args.dest or ".",
            config=args.config,
            db=args.db,
            poll=args.poll,
            metrics_port=args.metrics_port,
            memory_max=args.memory_max,
            gpu=args.gpu,
            bin_dir=args.bin_dir,
            force=args.force,
        )
    except XRError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(next_steps(args.format, args.user, written), file=sys.stderr)
    return 0


def bin_dir_default() -> Path:
    """Where this environment's console scripts are: beside the interpreter (a venv's bin/), else on PATH."""
    here = Path(sys.executable).parent
    if (here / "xr-daemon").exists():
        return here
    found = shutil.which("xr-daemon")
    if found:
        return Path(found).resolve().parent
    raise XRError("cannot find the xr-daemon program: give --bin-dir")


def _absolute(path: str | os.PathLike, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    s = os.path.normpath(p)
    if any(c in s for c in '"\\\n\r\t') or "$" in s:
        raise XRError(f"{what} {s!r}: a path with quotes, backslashes, '$' or control characters cannot go in a unit")
    return s


def _sd_path(path: str) -> str:
    """A path as a word of a systemd list setting: '%' escaped (specifiers), quoted where it has spaces."""
    s = path.replace("%", "%%")
    return f'"{s}"' if " " in s else s


def _sd_arg(arg: str) -> str:
    """An ExecStart argument: '%' and '$' escaped, quoted where needed."""
    s = arg.replace("%", "%%").replace("$", "$$")
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _template(name: str) -> str:
    return resources.files("xr.daemon").joinpath("unit_templates", name).read_text(encoding="utf-8")


def _fill(text: str, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        return values[m.group(1)]

    return re.sub(r"@([A-Z_]+)@", sub, text)


def render_systemd(
    watch: str,
    output: str,
    *,
    user: str = "xr",
    bin_dir: str,
    config: str | None = None,
    db: str | None = None,
    poll: bool = False,
    metrics_port: int = DEFAULT_METRICS_PORT,
    memory_max: str = DEFAULT_MEMORY_MAX,
    gpu: bool = False,
) -> dict[str, str]:
    """The systemd files by their path relative to the destination folder."""
    if not re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", user, flags=re.IGNORECASE):
        raise XRError(f"--user {user!r} is not a user name")
    if not re.fullmatch(r"\d+(\.\d+)?[KMGT]?|\d+%|infinity", memory_max):
        raise XRError(f"--memory-max {memory_max!r}: expected e.g. 3G, 80% or infinity")
    common = []
    if config:
        common += ["--config", _absolute(config, "--config")]
    daemon_args = list(common)
    if db:
        daemon_args += ["--db", db]
    if poll:
        daemon_args.append("--poll")
    if metrics_port:
        daemon_args += ["--metrics-port", str(int(metrics_port))]
    review_args = list(common)
    if db:
        review_args += ["--db", db]
    bin_dir = _absolute(bin_dir, "--bin-dir")
    values = {
        "USER": user,
        "BIN": _sd_arg(os.path.join(bin_dir, "xr-daemon")),
        "REVIEW_BIN": _sd_arg(os.path.join(bin_dir, "xr-review")),
        "ARGS": "".join(" " + _sd_arg(a) for a in daemon_args),
        "REVIEW_ARGS": "".join(" " + _sd_arg(a) for a in review_args),
        "MEMORY_MAX": memory_max,
        "PRIVATE_DEVICES": "no" if gpu else "yes",
        "WATCH": watch.replace("%", "%%"),
        "OUTPUT": output.replace("%", "%%"),
        "WATCH_Q": _sd_path(watch),
        "OUTPUT_Q": _sd_path(output),
    }
    return {
        "xr-daemon.service": _fill(_template("xr-daemon.service"), values),
        "xr-daemon.service.d/paths.conf": _fill(_template("xr-daemon-paths.conf"), values),
        "xr-review.service": _fill(_template("xr-review.service"), values),
        "xr-review.service.d/paths.conf": _fill(_template("xr-review-paths.conf"), values),
    }


def render_launchd(
    watch: str,
    output: str,
    *,
    user: str | None = None,
    bin_dir: str,
    config: str | None = None,
    db: str | None = None,
    poll: bool = False,
    metrics_port: int = DEFAULT_METRICS_PORT,
) -> dict[str, bytes]:
    """The plist: a LaunchAgent without ``user``, else a LaunchDaemon that runs as ``user``."""
    argv = [os.path.join(_absolute(bin_dir, "--bin-dir"), "xr-daemon"), "--watch", watch, "--output", output]
    if config:
        argv += ["--config", _absolute(config, "--config")]
    if db:
        argv += ["--db", db]
    if poll:
        argv.append("--poll")
    if metrics_port:
        argv += ["--metrics-port", str(int(metrics_port))]
    # launchd creates the log file, not its folder: ~/Library/Logs exists; the daemon's account needs its own
    # folder in /Library/Logs (docs/operations.md, "Run as a service")
    log = "/Library/Logs/xr-triage/xr-daemon.log" if user else str(Path("~/Library/Logs/xr-daemon.log").expanduser())
    plist: dict = {
        "Label": LABEL,
        "ProgramArguments": argv,
        "RunAtLoad": True,
        # launchd cannot tell exit 2 (fix the configuration first) from exit 1: relaunch only after a
        # crash (a signal), so a configuration error is not retried every ThrottleInterval seconds
        "KeepAlive": {"Crashed": True},
        "ThrottleInterval": 10,
        "ExitTimeOut": 60,  # the first SIGTERM finishes the batch in flight
        "ProcessType": "Interactive",
        "Umask": 0o077,  # films and results hold patient data
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    if user:
        plist["UserName"] = user
    return {f"{LABEL}.plist": plistlib.dumps(plist)}


def install_units(
    watch: str,
    output: str,
    *,
    fmt: str = "systemd",
    user: str | None = None,
    dest: str | os.PathLike = ".",
    config: str | None = None,
    db: str | None = None,
    poll: bool = False,
    metrics_port: int = DEFAULT_METRICS_PORT,
    memory_max: str = DEFAULT_MEMORY_MAX,
    gpu: bool = False,
    bin_dir: str | None = None,
    force: bool = False,
) -> list[Path]:
    """Write the files for ``fmt`` into ``dest``; returns their paths. Existing files are refused unless ``force``."""
    watch, output = _absolute(watch, "--watch"), _absolute(output, "--output")
    userinfo, at, _ = (db or "").partition("://")[2].partition("@")
    if at and ":" in userinfo:
        raise XRError("--db: a URL with a password would be readable in the unit; put daemon.db in config.yaml")
    bdir = str(bin_dir or bin_dir_default())
    if fmt == "systemd":
        files: dict = render_systemd(
            watch,
            output,
            user=user or "xr",
            bin_dir=bdir,
            config=config,
            db=db,
            poll=poll,
            metrics_port=metrics_port,
            memory_max=memory_max,
            gpu=gpu,
        )
    elif fmt == "launchd":
        files = render_launchd(
            watch, output, user=user, bin_dir=bdir, config=config, db=db, poll=poll, metrics_port=metrics_port
        )
    else:
        raise XRError(f"--format {fmt!r}: systemd or launchd")
    dest = Path(dest).expanduser()
    targets = [dest / name for name in files]
    if not force:
        there = [str(t) for t in targets if t.exists()]
        if there:
            raise XRError(f"already there (--force to overwrite): {', '.join(there)}")
    for target, content in zip(targets, files.values()):
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o644)  # service managers read them; they hold no secret (the password stays in config.yaml)
        tmp.replace(target)
    return targets


def next_steps(fmt: str, user: str | None, written: list[Path]) -> str:
    folder = written[0].parent.resolve()
    if fmt == "systemd":
        steps = ["next (as root):"]
        if folder != Path("/etc/systemd/system"):
            here = shlex.quote(str(folder))
            steps.append(
                f"  cp -r {here}/xr-daemon.service {here}/xr-daemon.service.d {here}/xr-review.service "
                f"{here}/xr-review.service.d /etc/systemd/system/"
            )
        steps.append("  systemctl daemon-reload && systemctl enable --now xr-daemon xr-review")
        return "\n".join(steps)
    name = f"{LABEL}.plist"
    if user:
        steps = ["next (a LaunchDaemon, as root):", "  install -d -o " + shlex.quote(user) + " /Library/Logs/xr-triage"]
        if folder != Path("/Library/LaunchDaemons"):
            steps.append(f"  cp {shlex.quote(str(written[0]))} /Library/LaunchDaemons/")
        steps.append(f"  chown root:wheel /Library/LaunchDaemons/{name}")
        steps.append(f"  launchctl bootstrap system /Library/LaunchDaemons/{name}")
        return "\n".join(steps)
    steps = ["next (a LaunchAgent, as the user):"]
    agents = Path("~/Library/LaunchAgents").expanduser()
    if folder != agents:
        steps.append(f"  cp {shlex.quote(str(written[0]))} ~/Library/LaunchAgents/")
    steps.append(f'  launchctl bootstrap gui/"$(id -u)" ~/Library/LaunchAgents/{name}')
    return "\n".join(steps)


# -- reading a unit back: what systemd would run (tests, and a check an operator can script) -----------------


def read_unit(unit: Path) -> dict[str, list[str]]:
    """The settings of a systemd unit and its ``<unit>.d/*.conf`` drop-ins, key -> values in order
    (``[Section]Key``); an empty assignment resets a list as systemd does."""
    texts = [unit.read_text()]
    dropins = unit.with_name(unit.name + ".d")
    if dropins.is_dir():
        texts += [p.read_text() for p in sorted(dropins.glob("*.conf"))]
    settings: dict[str, list[str]] = {}
    for text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, _, value = line.partition("=")
            key = f"[{section}]{key.strip()}"
            value = value.strip()
            if value:
                settings.setdefault(key, []).append(value)
            else:
                settings[key] = []
    return settings


def unit_environment(settings: dict[str, list[str]], specifiers: dict[str, str] | None = None) -> dict[str, str]:
    """``Environment=`` assignments (quoted words as systemd reads them), with the specifiers given
    (e.g. ``{"C": "/var/cache"}``) resolved."""
    spec = {"%": "%", **(specifiers or {})}
    env: dict[str, str] = {}
    for value in settings.get("[Service]Environment", []):
        for word in shlex.split(value):
            k, _, v = word.partition("=")
            env[k] = re.sub(r"%(.)", lambda m: spec.get(m.group(1), m.group(0)), v)
    return env


def exec_start(settings: dict[str, list[str]], env: dict[str, str]) -> list[str]:
    """The ExecStart command line split into words, ``${VAR}`` (one word) and ``$VAR`` expanded from ``env``."""
    line = settings["[Service]ExecStart"][-1].lstrip("-@:+!")
    words = []
    for word in shlex.split(line.replace("%%", "%")):
        words.append(
            re.sub(
                r"\$\$|\$\{(\w+)\}|\$(\w+)",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1) or m.group(2), ""),
                word,
            )
        )
    return words


def list_setting(settings: dict[str, list[str]], key: str) -> list[str]:
    """A whitespace-separated list setting (ReadWritePaths=, RequiresMountsFor=) in words."""
    return [w.replace("%%", "%") for v in settings.get(key, []) for w in shlex.split(v)]


if __name__ == "__main__":
    sys.exit(main(prog="python -m xr.daemon.units"))
