"""SIGHUP: the daemon reads config.yaml again, applies what can change while it runs, names the keys that
need a restart, survives a bad file and a signal during start-up (a real xr-daemon process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


class Log:
    """The daemon's JSON log lines, read as they come."""

    def __init__(self, proc: subprocess.Popen):
        self.events: list[dict] = []
        self.text: list[str] = []
        self._t = threading.Thread(target=self._read, args=(proc.stderr,))
        self._t.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.text.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def wait(self, event: str, n: int = 1, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e.get("event") == event]
            if len(found) >= n:
                return found[n - 1]
            time.sleep(0.1)
        raise AssertionError(f"no {event} #{n} in the log:\n{''.join(self.text)[-4000:]}")

    def join(self) -> None:
        self._t.join(timeout=30)


@pytest.mark.slow
def test_sighup_reloads_what_it_can_and_names_what_needs_a_restart(tmp_path, tiny_model_dir, xray_paths):
    inbox, out, cfg = tmp_path / "inbox", tmp_path / "out", tmp_path / "config.yaml"
    inbox.mkdir()
    cfg.write_text(yaml.safe_dump({"daemon": {"heartbeat_s": 60}}))
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"kind": "site", "T": 1.0, "shift": -5.0, "threshold": 0.5}))
    argv = [str(BIN / "xr-daemon"), "--watch", str(inbox), "--output", str(out), "--config", str(cfg)]
    argv += ["--model", str(tiny_model_dir / "xr_mvp_best.pt"), "--set", "daemon.heatmaps=none"]
    argv += ["--set", "daemon.reload_s=0.2", "--log-format", "json"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = Log(proc)
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)  # during start-up (torch importing): kept for later, not fatal
        log.wait("daemon_started")
        first = log.wait("config_reloaded")
        assert first["applied"] == [] and first["restart_needed"] == []

        cfg.write_text(
            yaml.safe_dump({"daemon": {"heartbeat_s": 5, "calibration": str(site)}, "csv": {"rotation": "rows"}})
        )
        proc.send_signal(signal.SIGHUP)
        second = log.wait("config_reloaded", 2)
        assert second["applied"] == ["daemon.calibration", "daemon.heartbeat_s"]
        assert second["restart_needed"] == ["csv.rotation"]

        cfg.write_text(yaml.safe_dump({"daemon": {"batch_size": -1}}))
        proc.send_signal(signal.SIGHUP)
        failed = log.wait("config_reload_failed")
        assert "batch_size" in failed["reason"] and proc.poll() is None  # the running settings stay

        # the new calibration scores the next film: the reloader has it ready after two checks 0.2 s apart,
        # and the inferer takes it before its next batch
        time.sleep(3)
        (inbox / "a.jpeg").write_bytes(xray_paths[0].read_bytes())
        deadline = time.monotonic() + 120
        row = None
        while time.monotonic() < deadline and row is None:
            row = _row(out / "results.sqlite", "a.jpeg")
            time.sleep(0.3)
        assert row is not None and row[0].startswith("site-"), (row, "".join(log.text)[-3000:])
        assert log.wait("calibration_reloaded")["calibration_id"] == row[0]
        assert not [e for e in log.events if e.get("event") in ("reload_failed", "model_reloaded")]
        assert log.wait("heartbeat", timeout=30)["interval_s"] < 30  # every 5 s now, not 60
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.join()


def _row(db: Path, name: str):
    import sqlite3

    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(
                "SELECT calibration_id FROM results WHERE filename = ? AND status = 'ok'", (name,)
            ).fetchone()
    except sqlite3.Error:
        return None


def test_sighup_before_the_service_is_up_does_not_kill(monkeypatch):
    """The handler main() installs first only records the signal, and main() puts the previous one back."""
    from xr.daemon import cli

    before = signal.getsignal(signal.SIGHUP)
    seen = []

    def fake_main(argv):
        os.kill(os.getpid(), signal.SIGHUP)
        seen.append(cli.pending_reload())
        return 0

    monkeypatch.setattr(cli, "_main", fake_main)
    assert cli.main([]) == 0 and seen == [True]
    assert signal.getsignal(signal.SIGHUP) == before
