"""deploy/: the systemd units and the launchd plist parse, name the installed commands and keep their promises."""

from __future__ import annotations

import configparser
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / name).read_text())
    return unit


def test_daemon_unit_is_notify_with_watchdog_restart_user_and_hardening():
    unit = _unit("xr-daemon.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure" and svc["RestartPreventExitStatus"] == "2"  # exit 2: fix the config first
    assert svc["User"] == "xr" and svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["KillSignal"] == "SIGTERM"
    paths = _unit("xr-daemon.service.d/paths.conf")  # the operator's folders, in one drop-in
    assert paths["Service"]["ReadWritePaths"].split() == paths["Unit"]["RequiresMountsFor"].split()
    argv = shlex.split(svc["ExecStart"])
    assert Path(argv[0]).name == "xr-daemon" and "--config" in argv and "--metrics-port" in argv
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    review = shlex.split(_unit("xr-review.service")["Service"]["ExecStart"])
    assert Path(review[0]).name == "xr-review" and review[review.index("--host") + 1] == "127.0.0.1"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_units(tmp_path):
    bin_ = Path(sys.executable).parent  # where this install's xr-daemon and xr-review are: ExecStart must exist
    for name in ("xr-daemon.service", "xr-review.service"):
        text = (DEPLOY / name).read_text().replace("/opt/xr-triage/bin/", f"{bin_}/")
        (tmp_path / name).write_text(text)
        (tmp_path / f"{name}.d").mkdir()  # its drop-in, which verify reads beside it
        (tmp_path / f"{name}.d" / "paths.conf").write_text((DEPLOY / f"{name}.d" / "paths.conf").read_text())
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
        # warnings systemd-analyze does not count as errors: a key it ignores, a value it cannot parse
        assert "Unknown key" not in r.stderr and "Invalid" not in r.stderr and "ignoring" not in r.stderr, r.stderr


def test_launchd_plist_keeps_the_daemon_alive_and_logs():
    plist = plistlib.loads((DEPLOY / "org.xr-triage.daemon.plist").read_bytes())
    assert plist["Label"] == "org.xr-triage.daemon"
    assert Path(plist["ProgramArguments"][0]).name == "xr-daemon" and "--config" in plist["ProgramArguments"]
    assert plist["KeepAlive"] == {"Crashed": True} and plist["RunAtLoad"] is True  # no relaunch after exit 2
    assert plist["StandardErrorPath"].endswith(".log") and plist["ExitTimeOut"] >= 30


def test_the_commands_the_files_name_are_installed():
    import importlib.metadata

    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts") if e.value.startswith("xr.")}
    assert {"xr-daemon", "xr-review"} <= scripts
