"""daemon/units.py (`xr-daemon install-units`): the units it writes carry the operator's paths, and the daemon
starts, scores a film and stops cleanly under the unit's own file-system restrictions, rebuilt in a mount
namespace (ProtectSystem=strict, ReadWritePaths=, PrivateTmp=, RuntimeDirectory=, CacheDirectory=, ProtectHome=).
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from xr.daemon import units
from xr.daemon.units import exec_start, install_units, list_setting, read_unit, unit_environment

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's xr-daemon and xr-review


def test_systemd_units_carry_the_operators_paths_in_one_drop_in(tmp_path):
    written = install_units(
        "/srv/x r/inbox",
        "/mnt/share/out%put",
        dest=tmp_path,
        user="radiology",
        config="/etc/xr-triage/config.yaml",
        bin_dir="/opt/xr-triage/bin",
        poll=True,
    )
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "xr-daemon.service",
        "xr-daemon.service.d/paths.conf",
        "xr-review.service",
        "xr-review.service.d/paths.conf",
    ]
    main = (tmp_path / "xr-daemon.service").read_text()
    assert "/srv" not in main and "/mnt" not in main  # the folders live in the drop-in only
    unit = read_unit(tmp_path / "xr-daemon.service")
    env = unit_environment(unit, {"C": "/var/cache"})
    argv = exec_start(unit, env)
    assert argv[:5] == ["/opt/xr-triage/bin/xr-daemon", "--watch", "/srv/x r/inbox", "--output", "/mnt/share/out%put"]
    assert argv[argv.index("--config") + 1] == "/etc/xr-triage/config.yaml" and "--poll" in argv
    assert list_setting(unit, "[Service]ReadWritePaths") == ["/srv/x r/inbox", "/mnt/share/out%put"]
    assert list_setting(unit, "[Unit]RequiresMountsFor") == ["/srv/x r/inbox", "/mnt/share/out%put"]
    svc = {k: v[-1] for k, v in unit.items() if v}
    assert svc["[Service]Type"] == "notify" and svc["[Service]User"] == "radiology"
    assert svc["[Service]PrivateTmp"] == "yes" and svc["[Service]ProtectSystem"] == "strict"
    assert svc["[Service]RuntimeDirectory"] == "xr-daemon" and svc["[Service]UMask"] == "0077"
    assert svc["[Service]RestartPreventExitStatus"] == "2" and svc["[Service]MemoryMax"] == "3G"
    assert svc["[Service]ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP: config.yaml read again
    assert "[Unit]Documentation" not in svc  # nothing installs a page for it to point at
    assert env["XDG_CACHE_HOME"] == "/var/cache/xr-daemon"

    review = read_unit(tmp_path / "xr-review.service")
    rargv = exec_start(review, unit_environment(review))
    assert review["[Service]Type"] == ["exec"] and rargv[0] == "/opt/xr-triage/bin/xr-review"
    assert (
        rargv[rargv.index("--output") + 1] == "/mnt/share/out%put" and rargv[rargv.index("--host") + 1] == "127.0.0.1"
    )
    assert list_setting(review, "[Service]ReadWritePaths") == ["/mnt/share/out%put"]

    with pytest.raises(units.XRError, match="already there"):
        install_units("/a", "/b", dest=tmp_path, bin_dir="/opt/xr-triage/bin")
    with pytest.raises(units.XRError, match="password"):
        install_units("/a", "/b", dest=tmp_path / "pw", bin_dir="/x", db="postgresql+psycopg://xr:secret@db/xr")


def test_launchd_agent_and_daemon(tmp_path):
    (agent,) = install_units("/Users/r/inbox", "/Users/r/xr", fmt="launchd", dest=tmp_path / "a", bin_dir="/opt/xr/bin")
    plist = plistlib.loads(agent.read_bytes())
    assert plist["ProgramArguments"][:5] == [
        "/opt/xr/bin/xr-daemon",
        "--watch",
        "/Users/r/inbox",
        "--output",
        "/Users/r/xr",
    ]
    assert plist["KeepAlive"] == {"Crashed": True}  # no relaunch after exit 2
    assert plist["Umask"] == 0o077 and "UserName" not in plist and plist["RunAtLoad"] is True
    (daemon,) = install_units("/in", "/out", fmt="launchd", user="_xr", dest=tmp_path / "d", bin_dir="/opt/xr/bin")
    plist = plistlib.loads(daemon.read_bytes())
    assert plist["UserName"] == "_xr" and plist["StandardErrorPath"] == "/Library/Logs/xr-triage/xr-daemon.log"


def test_the_shipped_examples_are_what_install_units_writes(tmp_path):
    """deploy/ holds the rendering for the documented example paths (deploy/README.md): it cannot drift."""
    install_units(
        "/srv/xr/inbox",
        "/srv/xr/output",
        dest=tmp_path,
        config="/etc/xr-triage/config.yaml",
        bin_dir="/opt/xr-triage/bin",
    )
    install_units(
        "/Users/Shared/xr/inbox",
        "/Users/Shared/xr/output",
        fmt="launchd",
        user="_xr",
        dest=tmp_path,
        config="/usr/local/etc/xr-triage/config.yaml",
        bin_dir="/opt/xr-triage/bin",
    )
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp_path)
        assert (REPO / "deploy" / rel).read_bytes() == path.read_bytes(), f"deploy/{rel}: regenerate (deploy/README.md)"


def test_the_command_line_writes_units(tmp_path):
    r = subprocess.run(
        [BIN / "xr-daemon", "install-units", "--watch", "in", "--output", "out", "--dest", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "systemctl daemon-reload" in r.stderr
    argv = exec_start(read_unit(tmp_path / "xr-daemon.service"), {"XR_WATCH": "W", "XR_OUTPUT": "O"})
    assert Path(argv[0]).parent == BIN
    conf = (tmp_path / "xr-daemon.service.d/paths.conf").read_text()
    assert f'"XR_WATCH={tmp_path / "in"}"' in conf


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_written_units(tmp_path):
    """Each unit with its drop-in appended (verify reads no drop-in beside a file), a path with a space and a
    '%' among them: systemd finds nothing to warn about."""
    install_units("/srv/x r/in%box", "/srv/xr/output", dest=tmp_path / "w", bin_dir=str(BIN))
    for name in ("xr-daemon.service", "xr-review.service"):
        text = (tmp_path / "w" / name).read_text() + (tmp_path / "w" / f"{name}.d" / "paths.conf").read_text()
        (tmp_path / name).write_text(text)
        r = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr


# -- the daemon under its unit's sandbox ------------------------------------------------------------------------

# Run by the python under `unshare --mount`: rebuild the unit's mounts, then exec the daemon (same pid, so the
# test's SIGTERM reaches it). Mount points are remounted read-only one by one, as ProtectSystem=strict does.
SANDBOX = r"""
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])
def sh(*a): subprocess.run(a, check=True)
def under(p, roots): return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)
api = ["/proc", "/sys", "/dev"]
for base, sub in spec["state_dirs"]:            # RuntimeDirectory=, CacheDirectory=: a fresh base, one writable folder
    sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", base)
    os.makedirs(os.path.join(base, sub), mode=0o755)
rw = spec["rw"] + [os.path.join(b, s) for b, s in spec["state_dirs"]]
for p in rw:
    sh("mount", "--bind", p, p)
points = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        mp = line.split()[4].encode().decode("unicode_escape")
        if not under(mp, api) and not under(mp, rw):
            points.append(mp)
if spec["protect_system"] == "strict":
    for mp in sorted(set(points), key=len):
        subprocess.run(["mount", "-o", "remount,bind,ro", mp], stderr=subprocess.DEVNULL)
if spec["private_tmp"]:
    for d in ("/tmp", "/var/tmp"):
        sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", d)
for d in spec["hide"]:                          # ProtectHome=yes
    sh("mount", "-t", "tmpfs", "-o", "ro,mode=000", "tmpfs", d)
os.umask(int(spec["umask"], 8))
os.chdir("/")
os.execve(spec["argv"][0], spec["argv"], spec["env"])
"""


def _sandbox_usable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to build a mount namespace"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount not installed"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"no mount namespaces here: {r.stderr.strip()}"
    if Path(sys.base_prefix).resolve().is_relative_to("/tmp") or REPO.is_relative_to("/tmp"):
        return "the interpreter or checkout lives in /tmp, which PrivateTmp hides"
    return None


def _start_under_unit(unit_file: Path, scratch: Path, extra: list[str]) -> subprocess.Popen:
    """Start the unit's ExecStart (plus ``extra``) in a mount namespace built from the unit's settings."""
    unit = read_unit(unit_file)
    svc = {k: v[-1] for k, v in unit.items() if v}
    state_dirs = []
    spec_dirs = {}
    if svc.get("[Service]RuntimeDirectory"):
        state_dirs.append(("/run", svc["[Service]RuntimeDirectory"]))
        spec_dirs["RUNTIME_DIRECTORY"] = f"/run/{svc['[Service]RuntimeDirectory']}"
    if svc.get("[Service]CacheDirectory"):
        state_dirs.append(("/var/cache", svc["[Service]CacheDirectory"]))
        spec_dirs["CACHE_DIRECTORY"] = f"/var/cache/{svc['[Service]CacheDirectory']}"
    # what systemd passes a system service: a clean environment, the unit's Environment=, the directories
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    env["HOME"] = str(scratch / "home")  # the service account's home: read-only under ProtectSystem=strict
    env.update(spec_dirs)
    env.update(unit_environment(unit, {"C": "/var/cache", "t": "/run", "S": "/var/lib"}))
    argv = exec_start(unit, env) + extra
    # ProtectHome=yes, except where this machine's interpreter lives (a real install has it in /opt)
    keep = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), REPO]
    hide = (
        [d for d in ("/home", "/root") if Path(d).is_dir() and not any(k.is_relative_to(d) for k in keep)]
        if svc.get("[Service]ProtectHome") == "yes"
        else []
    )
    spec = {
        "rw": list_setting(unit, "[Service]ReadWritePaths"),
        "protect_system": svc.get("[Service]ProtectSystem", "no"),
        "private_tmp": svc.get("[Service]PrivateTmp") == "yes",
        "state_dirs": state_dirs,
        "hide": hide,
        "umask": svc.get("[Service]UMask", "0022"),
        "argv": argv,
        "env": env,
    }
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SANDBOX, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until(proc: subprocess.Popen, done, timeout: float) -> tuple[bool, int, str]:
    """Wait for ``done()`` while ``proc`` runs, then SIGTERM it; (done, exit code, stderr)."""
    ok = False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if done():
                ok = True
                break
            time.sleep(0.5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return ok, proc.returncode, err


def _run_under_unit(unit_dir: Path, scratch: Path, extra: list[str], film: Path, timeout: float = 240):
    """Start the daemon as its unit would, with ``film`` in the inbox; (scored, exit code, stderr)."""
    unit = read_unit(unit_dir / "xr-daemon.service")
    inbox, output = (Path(p) for p in list_setting(unit, "[Service]ReadWritePaths"))
    shutil.copy(film, inbox / film.name)
    proc = _start_under_unit(unit_dir / "xr-daemon.service", scratch, extra)

    def scored() -> bool:
        return (output / "processed" / film.name).exists() and _row_status(output / "results.sqlite", film.name) == "ok"

    return _until(proc, scored, timeout)


def _row_status(db: Path, name: str) -> str | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT status FROM results WHERE filename = ?", (name,)).fetchone()
    except sqlite3.Error:
        return None
    return row and row[0]


@pytest.fixture()
def sandbox_scratch(tiny_model_dir, xray_paths):
    """Folders outside /tmp (which PrivateTmp replaces): inbox, output, a read-only home, the model, a PNG."""
    reason = _sandbox_usable()
    if reason:
        pytest.skip(reason)
    from PIL import Image

    scratch = Path(tempfile.mkdtemp(prefix="xr-units-test-", dir="/var/lib"))
    try:
        for d in ("inbox", "output", "home", "units"):
            (scratch / d).mkdir()
        model = shutil.copytree(tiny_model_dir, scratch / "model")
        film = scratch / "IM-film.png"
        Image.open(xray_paths[0]).convert("L").resize((256, 256)).save(film)
        yield scratch, model / "xr_mvp_best.pt", film
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.slow
def test_daemon_scores_and_stops_under_its_units_sandbox(sandbox_scratch):
    scratch, model, film = sandbox_scratch
    install_units(scratch / "inbox", scratch / "output", dest=scratch / "units", bin_dir=str(BIN), metrics_port=0)
    extra = ["--model", str(model), "--set", "daemon.heatmaps=none", "--log-format", "console"]
    scored, rc, err = _run_under_unit(scratch / "units", scratch, extra, film)
    assert scored, f"the film was not scored under the unit's sandbox (exit {rc}):\n{err[-3000:]}"
    assert rc == 0, f"exit {rc} after SIGTERM:\n{err[-3000:]}"
    assert not (scratch / "inbox" / film.name).exists()
    assert (scratch / "output" / "processed" / film.name).exists()
    assert (scratch / "output" / "results.sqlite").stat().st_mode & 0o077 == 0  # UMask and the private modes


@pytest.mark.slow
def test_the_0_2_0_units_settings_could_not_start(sandbox_scratch):
    """The shipped 0.2.0 unit: ProtectSystem=strict with PrivateTmp=no and no state directories leaves no
    writable temp folder, and the daemon never scores. Kept so that a return to those settings fails here."""
    scratch, model, film = sandbox_scratch
    install_units(scratch / "inbox", scratch / "output", dest=scratch / "units", bin_dir=str(BIN), metrics_port=0)
    path = scratch / "units" / "xr-daemon.service"
    old = [
        line.replace("PrivateTmp=yes", "PrivateTmp=no")
        for line in path.read_text().splitlines()
        if not line.startswith(("RuntimeDirectory=", "CacheDirectory=", "Environment=XDG_CACHE_HOME"))
    ]
    path.write_text("\n".join(old) + "\n")
    extra = ["--model", str(model), "--set", "daemon.heatmaps=none", "--log-format", "console"]
    scored, rc, err = _run_under_unit(scratch / "units", scratch, extra, film, timeout=180)
    assert not scored and rc != 0, err[-3000:]
    assert "temporary directory" in err, err[-3000:]


@pytest.mark.slow
def test_review_serves_under_its_units_sandbox(sandbox_scratch):
    import socket
    import urllib.request

    from xr.results.engine import make_engine

    scratch, _, _ = sandbox_scratch
    install_units(scratch / "inbox", scratch / "output", dest=scratch / "units", bin_dir=str(BIN), metrics_port=0)
    make_engine(scratch / "output" / "results.sqlite").dispose()  # the daemon's database, which xr-review opens
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _start_under_unit(scratch / "units" / "xr-review.service", scratch, ["--port", str(port)])

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    ok, rc, err = _until(proc, healthy, 120)
    assert ok, f"xr-review did not answer under its unit's sandbox (exit {rc}):\n{err[-3000:]}"
    # uvicorn re-raises SIGTERM after its graceful shutdown; systemd counts death by SIGTERM as a clean stop
    assert rc in (0, -signal.SIGTERM), f"exit {rc} after SIGTERM:\n{err[-3000:]}"
