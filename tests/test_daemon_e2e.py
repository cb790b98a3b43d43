"""End-to-end: the real ``xr-daemon`` process on a temporary inbox; checks the DB, the CSVs and the folders."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

_SCRIPT = Path(sys.executable).parent / "xr-daemon"  # the installed entry point; the module where absent
DAEMON = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "xr.daemon.cli"]


# -- helpers -------------------------------------------------------------------------------------------
# What every test daemon runs with unless its test is about it: no Grad-CAM heatmaps (--once would wait for
# them) and no TorchScript trace of the CPU forward (seconds at each start; tests/test_predict.py and
# tests/test_daemon_service.py test the trace, the heatmap tests here turn heatmaps on).
QUICK = ("--set", "daemon.heatmaps=none", "--set", "daemon.cpu_trace=false")


def start_daemon(
    tmp: Path, model: Path, *extra: str, log_name: str = "daemon.log", quick: tuple[str, ...] = QUICK
) -> tuple[subprocess.Popen, Path]:
    """The real xr-daemon on tmp/inbox -> tmp/out; ``extra`` flags come after ``quick`` and win over it."""
    log = tmp / log_name
    cmd = [
        *DAEMON,
        "--watch",
        str(tmp / "inbox"),
        "--output",
        str(tmp / "out"),
        "--model",
        str(model),
        "--stable-ms",
        "300",
        "--rescan-s",
        "0.5",
        "--max-wait-ms",
        "50",
        "--device",
        "cpu",
        *quick,
        *extra,
    ]
    fh = open(log, "ab")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, cwd=tmp)
    fh.close()
    return proc, log


def run_once(tmp: Path, model: Path, capsys, *extra: str, log_name: str = "daemon.log") -> tuple[int, Path]:
    """``xr-daemon --once`` in this process, where no process boundary is under test (no kill, no signal):
    the same flags as ``start_daemon``, its JSON log written to ``tmp/log_name``. Returns (exit code, log)."""
    from xr.daemon.cli import main

    capsys.readouterr()
    argv = [
        *("--watch", str(tmp / "inbox"), "--output", str(tmp / "out"), "--model", str(model), "--once"),
        *("--stable-ms", "300", "--rescan-s", "0.5", "--max-wait-ms", "50", "--device", "cpu"),
        *QUICK,
        *extra,
    ]
    from unittest import mock

    switch = sys.getswitchinterval()
    try:  # the daemon tunes malloc and the switch interval for its own process: not for this test process
        with mock.patch("xr.core.predict.tune_malloc", lambda: False):
            rc = main(argv)
    finally:
        sys.setswitchinterval(switch)
    log = tmp / log_name
    with open(log, "a") as fh:
        fh.write(capsys.readouterr().err)
    return rc, log


def log_events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Poll ``pred``; the timeout is a hang guard, not a performance check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what} (daemon rc={proc.poll() if proc else None})")


def wait_started(proc: subprocess.Popen, log: Path, n: int = 1) -> None:
    wait_for(lambda: sum(e["event"] == "daemon_started" for e in log_events(log)) >= n, 240, proc, "daemon_started")


def db_rows(tmp: Path) -> list[dict]:
    db = tmp / "out" / "results.sqlite"
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("select * from results order by id")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def csv_rows(tmp: Path, name: str = "results-*.csv") -> list[dict]:
    rows = []
    for f in sorted((tmp / "out" / "csv").glob(name)):
        with open(f, newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def distinct_copy(src: Path, dst: Path, tag: int) -> None:
    """The same image with distinct bytes (a tag after the JPEG end marker; decoders ignore it)."""
    dst.write_bytes(src.read_bytes() + f"xr-tag-{tag}".encode())


def drop(src_bytes: bytes, inbox: Path, name: str) -> None:
    """How exporters should deliver: write under a temporary name, then rename into place."""
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(src_bytes)
    os.rename(tmp, inbox / name)


def png16_bytes(src: Path) -> bytes:
    """A 12-bit detector image stored in a 16-bit PNG, made from an 8-bit fixture."""
    arr8 = np.asarray(Image.open(src).convert("L"), dtype=np.uint16)
    arr12 = (arr8 * 4095 // 255).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr12).save(buf, format="PNG")
    return buf.getvalue()


def xr_results(capsys, *argv: str):
    """xr-results in this process (no process boundary is under test here): its JSON output."""
    from xr.results.cli import main

    capsys.readouterr()
    assert main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


# -- tests -----------------------------------------------------------------------------------------------
def test_once_good_16bit_bad_inputs_duplicates(tmp_path, tiny_checkpoint, xray_paths, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = xray_paths[:4]
    for p in good:
        shutil.copy(p, inbox / p.name)
    (inbox / "sub").mkdir()
    shutil.copy(good[0], inbox / "sub" / good[0].name)  # same name in a subfolder, same content
    shutil.copy(good[1], inbox / "COPY.JPG")  # identical content under another name, upper-case suffix
    png16 = png16_bytes(xray_paths[-1])
    (inbox / "detector16.png").write_bytes(png16)
    (inbox / "zero.png").write_bytes(b"")
    (inbox / "truncated.jpeg").write_bytes(good[2].read_bytes()[:2000])
    for cut_short in ("zero.png", "truncated.jpeg"):  # unchanged for longer than the grace period: errors now
        os.utime(inbox / cut_short, (1, 1))
    (inbox / "notes.png").write_text("this is not an image\n")
    Image.new("L", (400, 400), 128).save(inbox / "huge.png")  # over the pixel limit set below
    outside = tmp_path / "outside.jpeg"
    shutil.copy(good[3], outside)
    (inbox / "link.jpeg").symlink_to(outside)
    for ignored in (".hidden.png", "x.png.part", "y.jpg.tmp", "z.jpeg.crdownload", "w.png~", "readme.txt"):
        (inbox / ignored).write_bytes(good[0].read_bytes())

    rc, log = run_once(tmp_path, tiny_checkpoint, capsys, "--set", "daemon.max_pixels=100000")
    assert rc == 0, log.read_text()[-3000:]

    rows = {r["filename"] if "sub" not in r["path"] else "sub/" + r["filename"]: r for r in db_rows(tmp_path)}
    assert len(rows) == 12, sorted(rows)
    for p in good:
        assert rows[p.name]["status"] in ("ok", "duplicate")
        assert rows[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert 0.0 <= rows[p.name]["probability"] <= 1.0
        assert rows[p.name]["label"] in ("NORMAL", "PNEUMONIA")
        assert rows[p.name]["threshold"] == 0.5 and rows[p.name]["temperature"] == 1.5
        assert rows[p.name]["model_id"].startswith("efficientnet_lite0-")
        assert rows[p.name]["batch_id"] is not None and rows[p.name]["latency_ms"] >= 0
    assert rows["detector16.png"]["status"] == "ok"
    # identical content: whichever came first is scored, the other is a duplicate pointing at it
    for a, b in [("COPY.JPG", good[1].name), ("sub/" + good[0].name, good[0].name)]:
        first, dup = sorted((rows[a], rows[b]), key=lambda r: r["status"] != "ok")
        assert (first["status"], dup["status"]) == ("ok", "duplicate")
        assert dup["duplicate_of"] == first["id"] and dup["id"] > first["id"]
        assert dup["probability"] == first["probability"] and dup["sha256"] == first["sha256"]
    for p in good[2:]:
        assert rows[p.name]["status"] == "ok"
    reasons = {
        "zero.png": "empty",
        "truncated.jpeg": "truncated",
        "notes.png": "not a PNG or JPEG",
        "huge.png": "over the limit",
        "link.jpeg": "outside the inbox",
    }
    for name, reason in reasons.items():
        assert rows[name]["status"] == "error", name
        assert reason in rows[name]["error"], (name, rows[name]["error"])
    assert rows["truncated.jpeg"]["error"].endswith("; the file stayed unchanged for 60 s")

    out = tmp_path / "out"
    processed = {p.relative_to(out / "processed").as_posix() for p in (out / "processed").rglob("*") if p.is_file()}
    failed = {p.name for p in (out / "failed").iterdir()}
    assert processed == {p.name for p in good} | {"sub/" + good[0].name, "COPY.JPG", "detector16.png"}
    assert failed == set(reasons)
    assert (out / "failed" / "link.jpeg").is_symlink() and outside.exists()  # the link moved, target untouched
    left = sorted(p.name for p in inbox.iterdir() if p.is_file() or p.is_symlink())
    assert left == sorted([".hidden.png", "x.png.part", "y.jpg.tmp", "z.jpeg.crdownload", "w.png~", "readme.txt"])

    # CSVs: every DB row exactly once, in id order; flagged.csv holds the flagged rows, duplicates too
    exported = csv_rows(tmp_path)
    assert [int(r["id"]) for r in exported] == [r["id"] for r in db_rows(tmp_path)]
    flagged_db = [r["id"] for r in db_rows(tmp_path) if r["status"] in ("ok", "duplicate") and r["flagged"]]
    assert [int(r["id"]) for r in csv_rows(tmp_path, "flagged.csv")] == flagged_db

    events = log_events(log)
    assert any(e["event"] == "batch" and e["size"] >= 1 and "model_ms" in e for e in events)
    errors = [e for e in events if e["event"] == "file_error"]
    assert {Path(e["file"]).name for e in errors} == set(reasons) and all(e["reason"] for e in errors)
    ignored = [e for e in events if e["event"] == "file_ignored"]  # said once, left in place
    assert [(Path(e["file"]).name, e["level"]) for e in ignored] == [("readme.txt", "warning")]
    assert "extension .txt is not read" in ignored[0]["reason"]
    # one warning per flagged row, none for any other; the fixtures hold films on both sides of the threshold
    by_id = {r["id"]: r for r in db_rows(tmp_path)}
    assert 0 < len(flagged_db) < sum(r["status"] in ("ok", "duplicate") for r in by_id.values())
    warned = sorted(Path(e["file"]).name for e in events if e["event"] == "flagged" and e["level"] == "warning")
    assert warned == sorted(by_id[i]["filename"] for i in flagged_db)
    assert not [e for e in events if e["event"] == "flagged" and e["level"] != "warning"]

    # xr-results reads the same database
    st = xr_results(capsys, "--output", str(out), "stats")
    assert st["by_status"] == {"claimed": 0, "ok": 5, "error": 5, "duplicate": 2, "skipped": 0}
    assert st["total"] == 12 and st["latency_ms_p50"] is not None


def test_watch_slow_writer_moves_and_sigterm(tmp_path, tiny_checkpoint, xray_paths, fullres_paths, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc, log = start_daemon(tmp_path, tiny_checkpoint, "--set", "csv.rotation=rows", "--set", "csv.max_rows=3")
    try:
        wait_started(proc, log)
        # a slow writer: the full-res JPEG written in place in chunks over ~1.2 s (> stable_ms = 300)
        payload = fullres_paths[0].read_bytes()
        chunks = 12
        step = len(payload) // chunks + 1

        def slow_write():
            with open(inbox / "slow.jpeg", "wb") as f:
                for i in range(0, len(payload), step):
                    f.write(payload[i : i + step])
                    f.flush()
                    time.sleep(0.1)

        writer = threading.Thread(target=slow_write, name="slow-writer")
        writer.start()
        for i, p in enumerate(xray_paths[:6]):
            drop(p.read_bytes(), inbox, f"moved-{i}.jpeg")
        writer.join()
        wait_for(lambda: len([r for r in db_rows(tmp_path) if r["status"] != "claimed"]) == 7, 120, proc, "7 rows")
        rows = {r["filename"]: r for r in db_rows(tmp_path)}
        assert rows["slow.jpeg"]["status"] == "ok", rows["slow.jpeg"]["error"]
        assert rows["slow.jpeg"]["sha256"] == hashlib.sha256(payload).hexdigest()  # never read half-written
        assert rows["slow.jpeg"]["size_bytes"] == len(payload)

        # a name collision in processed/ never overwrites: same name, new content
        drop(xray_paths[7].read_bytes(), inbox, "moved-0.jpeg")
        wait_for(
            lambda: len(db_rows(tmp_path)) == 8 and (tmp_path / "out/processed/moved-0-1.jpeg").exists(),
            60,
            proc,
            "collision",
        )
        assert (tmp_path / "out/processed/moved-0.jpeg").read_bytes() == xray_paths[0].read_bytes()
        assert (tmp_path / "out/processed/moved-0-1.jpeg").read_bytes() == xray_paths[7].read_bytes()

        # SIGTERM during a burst: exits 0, the batch in flight is committed and exported
        for i, p in enumerate(xray_paths[8:24]):
            drop(p.read_bytes(), inbox, f"burst-{i}.jpeg")
        n_batches = sum(e["event"] == "batch" for e in log_events(log))
        wait_for(lambda: sum(e["event"] == "batch" for e in log_events(log)) > n_batches, 60, proc, "a burst batch")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        shutdown_s = time.monotonic() - t0
    finally:
        stop(proc)
    assert rc == 0, log.read_text()[-3000:]
    events = log_events(log)
    assert events[-1]["event"] == "daemon_stopped" and events[-1]["exit_code"] == 0
    assert shutdown_s < 30  # hang guard only
    rows = db_rows(tmp_path)
    final = [r for r in rows if r["status"] != "claimed"]
    # every committed row reached the CSVs (rotated by rows: at most 3 a file) and its file was moved
    exported = csv_rows(tmp_path)
    assert [int(r["id"]) for r in exported] == [r["id"] for r in final]
    assert all(len(list(csv.DictReader(open(f)))) <= 3 for f in (tmp_path / "out/csv").glob("results-*.csv"))
    for r in final:
        assert r["moved_at"] is not None and Path(r["moved_to"]).exists() and not Path(r["path"]).exists()
    # files not committed are still in the inbox (claimed or never claimed) and will be done on restart
    in_inbox = {p.name for p in inbox.iterdir() if not p.name.startswith(".")}
    assert in_inbox == {r["filename"] for r in rows if r["status"] == "claimed"} | (
        {f"burst-{i}.jpeg" for i in range(16)} - {r["filename"] for r in rows}
    )

    # restart with --once: the rest is processed, nothing twice
    assert run_once(tmp_path, tiny_checkpoint, capsys, log_name="daemon2.log")[0] == 0
    rows = db_rows(tmp_path)
    assert sorted(r["filename"] for r in rows) == sorted(
        ["slow.jpeg", "moved-0.jpeg"] + [f"moved-{i}.jpeg" for i in range(6)] + [f"burst-{i}.jpeg" for i in range(16)]
    )
    assert all(r["status"] == "ok" for r in rows)
    assert [int(r["id"]) for r in csv_rows(tmp_path)] == [r["id"] for r in rows]


def test_kill9_restart_accounting(tmp_path, tiny_checkpoint, xray_paths, capsys):
    """kill -9 the real process at random moments of a burst, twice, then a double SIGTERM: every file
    exactly once."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = random.Random(int(os.environ.get("XR_KILL_SEED", "4")))  # vary it to stress other instants
    n_files = 0

    def add_files(n: int) -> None:
        nonlocal n_files
        for _ in range(n):
            src = xray_paths[n_files % len(xray_paths)]
            drop(src.read_bytes() + f"xr-tag-{n_files}".encode(), inbox, f"f{n_files:03d}.jpeg")
            n_files += 1
        # plus one duplicate of an earlier file, so dedupe is part of the accounting
        drop(src.read_bytes() + f"xr-tag-{n_files - 1}".encode(), inbox, f"dup{n_files:03d}.jpeg")
        n_files += 1

    add_files(40)
    kills = 0
    for round_ in range(3):
        proc, log = start_daemon(tmp_path, tiny_checkpoint, "--batch-size", "8", log_name=f"kill{round_}.log")
        try:
            wait_started(proc, log)
            if round_ == 1:
                add_files(20)  # files arriving while it works
            time.sleep(rng.uniform(0.3, 2.0))
            if proc.poll() is None and round_ == 2:
                # a second signal exits at once, mid-shutdown: as abrupt as a kill for the journal
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 128 + signal.SIGTERM
            elif proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(30)
        finally:
            stop(proc)
    assert kills >= 2
    rc, log = run_once(tmp_path, tiny_checkpoint, capsys, "--batch-size", "8", log_name="final.log")
    assert rc == 0, log.read_text()[-3000:]

    rows = db_rows(tmp_path)
    names = [r["filename"] for r in rows]
    expected = sorted(p.name for p in (tmp_path / "out" / "processed").iterdir())
    assert len(names) == len(set(names)) == n_files, (len(names), len(set(names)), n_files)
    assert sorted(names) == expected  # every file moved exactly once, no -1 suffix copies
    assert not [p for p in inbox.iterdir() if not p.name.startswith(".")]
    statuses = {r["status"] for r in rows}
    assert statuses <= {"ok", "duplicate"}, statuses
    assert sum(r["status"] == "duplicate" for r in rows) >= 2
    exported = [int(r["id"]) for r in csv_rows(tmp_path)]
    assert exported == [r["id"] for r in rows]  # the CSVs hold each row exactly once
    con = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    try:  # three abrupt ends left a sound database (scripts/soak_daemon.py runs this at 1,000 files, 10 kills)
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has installed a handler for ``signum`` (``SigCgt`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_sigterm_while_starting_exits_0_without_a_traceback(tmp_path, tiny_checkpoint):
    (tmp_path / "inbox").mkdir()
    proc, log = start_daemon(tmp_path, tiny_checkpoint)
    try:
        wait_for(lambda: _catches(proc.pid, signal.SIGTERM), 60, proc, "the SIGTERM handler")
        proc.send_signal(signal.SIGTERM)  # most likely while torch is still importing
        assert proc.wait(120) == 0
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        stop(proc)


# -- writers that pause, files cut short for good, duplicates of flagged films --------------------------
def _paused_write(path: Path, payload: bytes, pause_s: float) -> None:
    """A writer that stops mid-file (a network share, a slow exporter), then finishes the file."""
    with open(path, "wb") as f:
        f.write(payload[: len(payload) // 2])
        f.flush()
        time.sleep(pause_s)
        f.write(payload[len(payload) // 2 :])


def test_writers_that_pause_mid_file_end_as_one_ok_row_each(tmp_path, tiny_checkpoint, xray_paths, fullres_paths):
    """Pauses of 2x, 5x and 12x stable_ms: each file is read once complete, nothing goes to failed/."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc, log = start_daemon(tmp_path, tiny_checkpoint, "--set", "daemon.heartbeat_s=0.5")  # stable_ms 300
    payloads = {
        f"paused-{k}x.jpeg": fullres_paths[i % len(fullres_paths)].read_bytes() + f"xr-tag-{k}".encode()
        for i, k in enumerate((2, 5, 12))
    }
    try:
        wait_started(proc, log)
        writers = [
            threading.Thread(target=_paused_write, args=(inbox / name, data, 0.3 * k), name=f"writer-{k}x")
            for (name, data), k in zip(payloads.items(), (2, 5, 12))
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        wait_for(lambda: len([r for r in db_rows(tmp_path) if r["status"] != "claimed"]) == 3, 120, proc, "3 rows")
        time.sleep(1.0)  # a second row for any of them would come now
        wait_for(lambda: any(e["event"] == "heartbeat" for e in log_events(log)), 30, proc, "a heartbeat")
    finally:
        stop(proc)
    rows = db_rows(tmp_path)
    assert sorted(r["filename"] for r in rows) == sorted(payloads)
    for r in rows:
        assert r["status"] == "ok", (r["filename"], r["error"])
        assert r["sha256"] == hashlib.sha256(payloads[r["filename"]]).hexdigest()  # the whole file was scored
    assert not (tmp_path / "out" / "failed").exists() or not list((tmp_path / "out" / "failed").iterdir())
    events = log_events(log)
    waited = {Path(e["file"]).name for e in events if e["event"] == "file_incomplete"}
    assert "paused-12x.jpeg" in waited  # read half-written, watched, read again when it was complete
    assert not [e for e in events if e["event"] == "file_error"]
    beat = next(e for e in events if e["event"] == "heartbeat")
    assert {"backlog", "rows", "interval_s", "uptime_s", "waiting_incomplete"} <= set(beat)


GRACE_S = 1.5  # a file cut short is watched this long (the default is a minute): long enough to see it wait


def test_a_file_cut_short_for_good_is_one_error_row_after_its_grace_period(tmp_path, tiny_checkpoint, xray_paths):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc, log = start_daemon(tmp_path, tiny_checkpoint, "--set", f"daemon.incomplete_grace_s={GRACE_S}")
    try:
        wait_started(proc, log)
        t0 = time.monotonic()
        (inbox / "cut.jpeg").write_bytes(xray_paths[0].read_bytes()[:3000])
        wait_for(lambda: any(e["event"] == "file_incomplete" for e in log_events(log)), 60, proc, "file_incomplete")
        assert not [r for r in db_rows(tmp_path) if r["status"] == "error"] and (inbox / "cut.jpeg").exists()
        wait_for(lambda: [r for r in db_rows(tmp_path) if r["status"] == "error"], 60, proc, "the error row")
        waited_s = time.monotonic() - t0
        # the move follows the row: waited for while the daemon still runs
        wait_for(lambda: (tmp_path / "out" / "failed" / "cut.jpeg").exists(), 30, proc, "the move to failed/")
    finally:
        stop(proc)
    rows = db_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["status"] == "error"
    assert "truncated" in rows[0]["error"] and rows[0]["error"].endswith(f"the file stayed unchanged for {GRACE_S:g} s")
    assert waited_s >= GRACE_S  # not failed before its grace period ran out
    assert not (inbox / "cut.jpeg").exists()


def test_kill9_during_the_grace_period_loses_nothing(tmp_path, tiny_checkpoint, xray_paths, capsys):
    """Killed while two cut-short files wait: one stays cut (an error after its grace period), the other is
    finished by its writer while the daemon is down (scored). One final row each, no claim left."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    full = {
        name: xray_paths[i].read_bytes() + f"xr-tag-{i}".encode()
        for i, name in enumerate(("stays-cut.jpeg", "finished.jpeg"))
    }
    proc, log = start_daemon(tmp_path, tiny_checkpoint, "--set", "daemon.incomplete_grace_s=3")
    try:
        wait_started(proc, log)
        for name, data in full.items():
            (inbox / name).write_bytes(data[:3000])
        wait_for(
            lambda: len({e["file"] for e in log_events(log) if e["event"] == "file_incomplete"}) == 2,
            60,
            proc,
            "two waits",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc)
    assert not [r for r in db_rows(tmp_path) if r["status"] != "claimed"]
    with open(inbox / "finished.jpeg", "ab") as f:  # the writer goes on while the daemon is down
        f.write(full["finished.jpeg"][3000:])
    rc, log = run_once(
        tmp_path, tiny_checkpoint, capsys, "--set", f"daemon.incomplete_grace_s={GRACE_S}", log_name="restart.log"
    )
    assert rc == 0, log.read_text()[-3000:]
    rows = {r["filename"]: r for r in db_rows(tmp_path)}
    assert len(db_rows(tmp_path)) == 2 and set(rows) == set(full)
    assert rows["finished.jpeg"]["status"] == "ok"
    assert rows["finished.jpeg"]["sha256"] == hashlib.sha256(full["finished.jpeg"]).hexdigest()
    assert rows["stays-cut.jpeg"]["status"] == "error" and "truncated" in rows["stays-cut.jpeg"]["error"]
    assert (tmp_path / "out" / "failed" / "stays-cut.jpeg").exists() and (
        tmp_path / "out" / "processed" / "finished.jpeg"
    ).exists()
    assert [int(r["id"]) for r in csv_rows(tmp_path)] == [r["id"] for r in db_rows(tmp_path)]


def test_a_duplicate_of_a_flagged_film_is_flagged_everywhere(tmp_path, tiny_model_dir, xray_paths, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    # a threshold every film passes: each one is flagged
    (model_dir / "calibration_threshold.json").write_text(json.dumps({"T": 1.5, "threshold": 0.001}))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc, log = start_daemon(tmp_path, model_dir / "xr_mvp_best.pt", "--set", "daemon.heatmaps=flagged")
    try:
        wait_started(proc, log)
        drop(xray_paths[5].read_bytes(), inbox, "first.jpeg")
        wait_for(lambda: [r for r in db_rows(tmp_path) if r["status"] == "ok"], 60, proc, "the first row")
        drop(xray_paths[5].read_bytes(), inbox, "re-export.jpeg")  # the same film under another name
        wait_for(
            lambda: len([r for r in db_rows(tmp_path) if r["status"] == "duplicate"]) == 1, 60, proc, "the duplicate"
        )
        wait_for(lambda: len(csv_rows(tmp_path, "flagged.csv")) == 2, 30, proc, "flagged.csv")
        wait_for(lambda: all(r["heatmap_path"] for r in db_rows(tmp_path)), 120, proc, "the heatmaps")
    finally:
        stop(proc)
    first, dup = db_rows(tmp_path)
    assert first["flagged"] == 1 and dup["flagged"] == 1 and dup["duplicate_of"] == first["id"]
    assert [r["filename"] for r in csv_rows(tmp_path, "flagged.csv")] == ["first.jpeg", "re-export.jpeg"]
    flagged = [e for e in log_events(log) if e["event"] == "flagged"]
    assert [(Path(e["file"]).name, e["level"], e.get("duplicate_of")) for e in flagged] == [
        ("first.jpeg", "warning", None),
        ("re-export.jpeg", "warning", first["id"]),
    ]
    flagged_rows = xr_results(capsys, "--output", str(tmp_path / "out"), "--flagged")
    assert [r["filename"] for r in flagged_rows] == ["first.jpeg", "re-export.jpeg"]
    # heatmaps: drawn off the scoring path for the flagged film; its re-export shares it
    first, dup = db_rows(tmp_path)
    assert first["heatmap_path"] == str(tmp_path / "out" / "heatmaps" / f"{first['id']}.png") == dup["heatmap_path"]
    assert (
        Path(first["heatmap_path"]).is_file() and (tmp_path / "out" / "heatmaps" / f"{first['id']}.map.png").is_file()
    )
    assert any(e["event"] == "heatmap" and e["id"] == first["id"] for e in log_events(log))


# -- calibration and model reloads ---------------------------------------------------------------------
def _ids(tmp: Path) -> list[tuple[str, str, float, str]]:
    return [(r["filename"], r["calibration_id"], r["threshold"], r["model_id"]) for r in db_rows(tmp)]


def test_a_new_calibration_or_model_is_picked_up_between_batches(tmp_path, tiny_model_dir, xray_paths):
    """Rows before and after a reload carry the two ids; no file is lost or scored twice; a calibration
    fitted for another model is refused and the current one stays."""
    import torch

    from xr.core.calibration import Calibration
    from xr.core.model import file_sha256

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    ckpt, cal_file = model_dir / "xr_mvp_best.pt", model_dir / "calibration_threshold.json"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc, log = start_daemon(tmp_path, ckpt, "--set", "daemon.reload_s=0.3")
    n = 0

    def drop_films(k: int) -> None:
        nonlocal n
        for _ in range(k):
            drop(xray_paths[n % len(xray_paths)].read_bytes() + f"xr-tag-{n}".encode(), inbox, f"f{n:02d}.jpeg")
            n += 1
        wait_for(lambda: len([r for r in db_rows(tmp_path) if r["status"] == "ok"]) == n, 120, proc, f"{n} rows")

    def wait_event(name: str, count: int = 1) -> None:
        wait_for(lambda: sum(e["event"] == name for e in log_events(log)) >= count, 60, proc, name)

    try:
        wait_started(proc, log)
        drop_films(4)
        Calibration(temperature=1.0, threshold=0.001, kind="site", model_sha256=file_sha256(ckpt)).write(cal_file)
        wait_event("calibration_reloaded")
        drop_films(4)
        # fitted for another model: refused, the calibration in use stays
        Calibration(temperature=2.0, threshold=0.9, kind="site", model_sha256="0" * 64).write(cal_file)
        wait_event("reload_failed")
        drop_films(2)
        # a retrained model with the calibration that goes with it
        raw = torch.load(ckpt, weights_only=True)
        raw["model"]["classifier.bias"] += 3.0
        torch.save(raw, model_dir / ".new.pt")
        Calibration(temperature=1.0, threshold=0.6).write(cal_file)
        os.replace(model_dir / ".new.pt", ckpt)
        wait_event("model_reloaded")
        drop_films(3)
    finally:
        stop(proc)
    rows = sorted(
        _ids(tmp_path)
    )  # by file name: f00-f03, then f04-f09 after the new calibration, f10-f12 after the model
    assert [r[0] for r in rows] == [f"f{i:02d}.jpeg" for i in range(13)]  # each file once
    cal_ids = [r[1] for r in rows]
    assert len(set(cal_ids[:4])) == 1 and len(set(cal_ids[4:10])) == 1 and len(set(cal_ids[10:])) == 1
    assert (
        cal_ids[0].startswith("validation-")
        and cal_ids[4].startswith("site-")
        and cal_ids[0] != cal_ids[4] != cal_ids[10]
    )
    assert (
        {r[2] for r in rows[:4]} == {0.5}
        and {r[2] for r in rows[4:10]} == {0.001}
        and {r[2] for r in rows[10:]} == {0.6}
    )
    assert len({r[3] for r in rows[:10]}) == 1 and rows[10][3] != rows[0][3]  # the new weights have a new id
    assert all(r["flagged"] for r in db_rows(tmp_path) if r["filename"] in {f"f{i:02d}.jpeg" for i in range(4, 10)})
    con = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    known = {r[0] for r in con.execute("select id from calibrations")}
    con.close()
    assert set(cal_ids) <= known
    failed = next(e for e in log_events(log) if e["event"] == "reload_failed")
    assert "was fitted for model 000000000000" in failed["reason"]


def test_calibration_flag_scores_with_a_sites_file(tmp_path, tiny_checkpoint, xray_paths, capsys):
    from xr.core.calibration import Calibration
    from xr.core.model import file_sha256

    site = Calibration(
        temperature=0.8, shift=-0.5, threshold=0.3, kind="site", model_sha256=file_sha256(tiny_checkpoint)
    )
    site.write(tmp_path / "site.json")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(xray_paths[0].read_bytes(), inbox, "a.jpeg")
    rc, log = run_once(tmp_path, tiny_checkpoint, capsys, "--calibration", str(tmp_path / "site.json"))
    assert rc == 0, log.read_text()[-2000:]
    (row,) = db_rows(tmp_path)
    assert row["calibration_id"] == site.id and row["threshold"] == 0.3 and row["temperature"] == 0.8
    assert row["probability"] == pytest.approx(1 / (1 + np.exp(-(row["logit"] / 0.8 - 0.5))), abs=1e-6)
    ready = next(e for e in log_events(log) if e["event"] == "model_ready")
    assert ready["calibration_id"] == site.id and ready["calibration"] == str((tmp_path / "site.json").resolve())
    # with another model the file is refused at start: exit 2, the reason in the log
    other = tmp_path / "other.pt"
    import torch

    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["model"]["classifier.bias"] += 1.0
    torch.save(raw, other)
    rc, log = run_once(tmp_path, other, capsys, "--calibration", str(tmp_path / "site.json"), log_name="other.log")
    assert rc == 2
    assert any(e["event"] == "daemon_error" and "was fitted for model" in e["reason"] for e in log_events(log))


# -- DICOM -------------------------------------------------------------------------------------------------
def test_a_dicom_inbox_end_to_end(tmp_path, tiny_checkpoint, dicom_dir, capsys):
    import dicom_films

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    put = {
        "chest.dcm": dicom_dir["native"],
        "chest-j2k.dcm": dicom_dir["j2k"],
        "FILM.DICOM": dicom_dir["jpeg_lossless"],
        "IMG00001": dicom_dir["jpegls"],
        "rg1.dcm": dicom_films.rg1("RG1_UNCI.dcm"),
        "rg1-reexport.dcm": dicom_films.rg1("RG1_J2KI.dcm"),  # the same SOPInstanceUID in another syntax
        "knee.dcm": dicom_dir["knee"],
        "report.dcm": dicom_dir["sr"],
        "nopixels.dcm": dicom_dir["no_pixels"],
        "frames.dcm": dicom_dir["two_frames"],
        "colour.dcm": dicom_dir["colour"],
    }
    for name, src in put.items():
        shutil.copy(src, inbox / name)
    dicom_films.with_modality(
        dicom_films.PYDICOM_FILES / "JPGExtended.dcm", inbox / "jpeg12.dcm", Modality="CR", BodyPartExamined="CHEST"
    )
    (inbox / "notadicom.dcm").write_text("no marker here\n" * 20)
    for p in inbox.iterdir():
        os.utime(p, (1, 1))  # long settled: an image without pixels is not waited for
    rc, log = run_once(tmp_path, tiny_checkpoint, capsys)
    assert rc == 0, log.read_text()[-3000:]
    rows = {r["filename"]: r for r in db_rows(tmp_path)}
    assert len(rows) == 13, sorted(rows)
    for name in ("chest.dcm", "chest-j2k.dcm", "FILM.DICOM", "IMG00001", "frames.dcm", "colour.dcm"):
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
    # the same DICOM instance in two syntaxes: whichever came first is scored, the other is its duplicate
    first, dup = sorted((rows["rg1.dcm"], rows["rg1-reexport.dcm"]), key=lambda r: r["status"] != "ok")
    assert (first["status"], dup["status"], dup["duplicate_of"]) == ("ok", "duplicate", first["id"])
    assert first["sha256"] != dup["sha256"] and first["sop_instance_uid"] == dup["sop_instance_uid"]
    skipped = {n: r["error"] for n, r in rows.items() if r["status"] == "skipped"}
    assert skipped == {
        "knee.dcm": "BodyPartExamined KNEE: not one of CHEST",
        "report.dcm": "Modality SR: not one of CR, DX",
        "nopixels.dcm": "no pixel data",
    }
    assert "decoder not installed" in rows["jpeg12.dcm"]["error"] and rows["jpeg12.dcm"]["status"] == "error"
    assert "not a DICOM file" in rows["notadicom.dcm"]["error"]
    chest = rows["chest.dcm"]
    assert (
        chest["patient_id"],
        chest["accession_number"],
        chest["modality"],
        chest["body_part"],
        chest["view_position"],
    ) == ("PID-0001", "ACC-0001", "CR", "CHEST", "PA")
    assert (
        chest["study_instance_uid"]
        and chest["series_instance_uid"]
        and chest["sop_instance_uid"]
        and chest["study_date"]
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "skipped").iterdir()) == ["knee.dcm", "nopixels.dcm", "report.dcm"]
    assert sorted(p.name for p in (out / "failed").iterdir()) == ["jpeg12.dcm", "notadicom.dcm"]
    exported = csv_rows(tmp_path)
    by_name = {r["filename"]: r for r in exported}
    assert by_name["chest.dcm"]["accession_number"] == "ACC-0001" and by_name["IMG00001"]["patient_id"] == "PID-0001"
    for text in [log.read_text(), *(p.read_text() for p in (out / "csv").glob("*.csv"))]:
        assert "Doe" not in text and "CompressedSamples" not in text  # no patient's name leaves the daemon
    by_accession = xr_results(capsys, "--output", str(out), "--accession", "ACC-0001")
    assert {r["filename"] for r in by_accession} == {"chest.dcm", "chest-j2k.dcm", "FILM.DICOM", "IMG00001"}
    assert len(xr_results(capsys, "--output", str(out), "--patient", "PID-0001", "--status", "ok")) == 4


def test_dicom_identifiers_can_be_left_out_of_the_csvs(tmp_path, tiny_checkpoint, dicom_dir, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(dicom_dir["native"], inbox / "chest.dcm")
    assert run_once(tmp_path, tiny_checkpoint, capsys, "--set", "csv.dicom_identifiers=false")[0] == 0
    (row,) = csv_rows(tmp_path)
    assert "accession_number" not in row and "patient_id" not in row and row["filename"] == "chest.dcm"
    assert db_rows(tmp_path)[0]["accession_number"] == "ACC-0001"  # the database keeps them


def test_kill9_during_a_dicom_burst_loses_and_doubles_nothing(tmp_path, tiny_checkpoint, xray_paths, capsys):
    import dicom_films

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = []
    for i in range(30):
        ds = dicom_films.cr_from_picture(xray_paths[i % len(xray_paths)], AccessionNumber=f"ACC-{i:03d}")
        tmp = inbox / f".f{i:03d}.part"
        dicom_films.write(ds, tmp)
        name = f"f{i:03d}.dcm" if i % 3 else f"F{i:03d}"  # a third of them without an extension
        os.rename(tmp, inbox / name)
        names.append(name)
    rng = random.Random(int(os.environ.get("XR_KILL_SEED", "5")))
    for round_ in range(2):
        proc, log = start_daemon(tmp_path, tiny_checkpoint, "--batch-size", "4", log_name=f"kill{round_}.log")
        try:
            wait_started(proc, log)
            time.sleep(rng.uniform(0.3, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            stop(proc)
    assert run_once(tmp_path, tiny_checkpoint, capsys, log_name="final.log")[0] == 0
    rows = db_rows(tmp_path)
    assert sorted(r["filename"] for r in rows) == sorted(names) and all(r["status"] == "ok" for r in rows)
    assert sorted(r["accession_number"] for r in rows) == [f"ACC-{i:03d}" for i in range(30)]
    assert sorted(p.name for p in (tmp_path / "out" / "processed").iterdir()) == sorted(names)
    assert [int(r["id"]) for r in csv_rows(tmp_path)] == [r["id"] for r in rows]


# -- the operator's side: metrics, health, systemd notify -------------------------------------------------
def test_metrics_health_and_systemd_notify(tmp_path, tiny_checkpoint, xray_paths):
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    log = tmp_path / "daemon.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [
                *DAEMON,
                "--watch",
                str(inbox),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--metrics-port",
                str(port),
                "--stable-ms",
                "300",
                *QUICK,
            ],
            stdout=fh,
            stderr=fh,
            env=os.environ | env,
        )
    messages: list[str] = []

    def heard(word: str) -> bool:
        try:
            while True:
                messages.append(notify.recv(1024).decode())
        except OSError:
            pass
        return any(word in m for m in messages)

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        wait_started(proc, log)
        wait_for(lambda: heard("READY=1"), 60, proc, "READY=1")
        wait_for(lambda: heard("WATCHDOG=1"), 60, proc, "WATCHDOG=1")
        for i, p in enumerate(xray_paths[:3]):
            drop(p.read_bytes(), inbox, f"m{i}.jpeg")
        (inbox / "bad.png").write_text("not an image")
        os.utime(inbox / "bad.png", (1, 1))
        wait_for(lambda: len([r for r in db_rows(tmp_path) if r["status"] != "claimed"]) == 4, 120, proc, "4 rows")
        status, body = get("/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok", body
        status, text = get("/metrics")
        assert status == 200
        metrics = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert metrics['xr_files_total{status="ok"}'] == 3 and metrics['xr_files_total{status="error"}'] == 1
        assert metrics["xr_batch_seconds_count"] >= 1 and metrics["xr_inbox_backlog"] == 0
        flagged_rows = sum(bool(r["flagged"]) for r in db_rows(tmp_path))
        assert metrics["xr_flagged_total"] == flagged_rows
        model_line = next(line for line in text.splitlines() if line.startswith("xr_model_info{"))
        assert 'model_id="efficientnet_lite0-' in model_line and 'calibration_id="validation-' in model_line
        assert get("/nothing")[0] == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert heard("STOPPING=1")
    finally:
        stop(proc)
        notify.close()


def test_a_share_that_goes_away_and_comes_back_is_survived(tmp_path, tiny_checkpoint, xray_paths):
    """The watch folder disappears (an unmounted share) and comes back: logged both ways, no crash, and
    what arrived while it was away is scored."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc, log = start_daemon(tmp_path, tiny_checkpoint, "--poll", "--set", "daemon.heatmaps=none")
    try:
        wait_started(proc, log)
        drop(xray_paths[0].read_bytes(), inbox, "before.jpeg")
        wait_for(lambda: len(db_rows(tmp_path)) == 1 and db_rows(tmp_path)[0]["moved_at"], 120, proc, "the first film")
        away = tmp_path / "share-away"
        os.rename(inbox, away)  # the share is unmounted
        wait_for(lambda: any(e["event"] == "inbox_unavailable" for e in log_events(log)), 60, proc, "inbox_unavailable")
        drop(xray_paths[1].read_bytes(), away, "meanwhile.jpeg")  # written to the share while this host lost it
        time.sleep(1.0)  # a few rescans with the folder gone
        os.rename(away, inbox)  # mounted again
        wait_for(lambda: any(e["event"] == "inbox_available" for e in log_events(log)), 60, proc, "inbox_available")
        drop(xray_paths[2].read_bytes(), inbox, "after.jpeg")
        wait_for(lambda: sum(bool(r["moved_at"]) for r in db_rows(tmp_path)) == 3, 120, proc, "the films after")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        stop(proc)
    assert sorted(r["filename"] for r in db_rows(tmp_path)) == ["after.jpeg", "before.jpeg", "meanwhile.jpeg"]
    assert {r["status"] for r in db_rows(tmp_path)} == {"ok"}
    assert not any(e["event"] == "stage_failed" for e in log_events(log))


# -- hostile inbox files --------------------------------------------------------------------------------
def _run_measured(cmd: list[str], cwd: Path, log: Path, timeout: float = 300) -> tuple[int, float]:
    """Run ``cmd`` to its end: (exit code, its peak resident memory in MB, from wait4's rusage)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, cwd=cwd)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{cmd[:3]} did not finish in {timeout} s")
        time.sleep(0.05)


def _once_cmd(tmp: Path, model: Path, *extra: str, argv0: list[str] = DAEMON) -> list[str]:
    return [
        *argv0,
        *("--watch", str(tmp / "inbox"), "--output", str(tmp / "out"), "--model", str(model), "--once"),
        *("--stable-ms", "100", "--max-wait-ms", "50", "--device", "cpu", *QUICK, *extra),
    ]


def test_a_deflate_bomb_is_one_error_row_in_bounded_memory(tmp_path, tiny_checkpoint, xray_paths):
    """A 3 MB Deflated Explicit VR Little Endian file that inflates to 3 GB: refused under a hard cap (the
    daemon's peak memory a few hundred MB over a run without it, where inflating it whole took 15.8 GB),
    one error row naming it, and the film beside it scored."""
    import dicom_films

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    dicom_films.write(dicom_films.cr_from_picture(xray_paths[1]), inbox / "good.dcm")
    (inbox / "deflated.dcm").write_bytes(dicom_films.deflated(dicom_films.cr_from_picture(xray_paths[2])))
    cmd = _once_cmd(tmp_path, tiny_checkpoint)
    rc, baseline_mb = _run_measured(cmd, tmp_path, tmp_path / "baseline.log")  # the same daemon, no bomb
    assert rc == 0, (tmp_path / "baseline.log").read_text()[-3000:]
    bomb = dicom_films.deflate_bomb(xray_paths[0], 3 * 2**30)
    assert len(bomb) < 4 * 2**20
    (inbox / "bomb.dcm").write_bytes(bomb)
    dicom_films.write(dicom_films.cr_from_picture(xray_paths[3]), inbox / "next.dcm")
    rc, peak_mb = _run_measured(cmd, tmp_path, tmp_path / "daemon.log")
    assert rc == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert peak_mb - baseline_mb < 512, f"peak {peak_mb:.0f} MB, {baseline_mb:.0f} MB without the bomb"
    rows = {r["filename"]: r for r in db_rows(tmp_path)}
    assert sorted(rows) == ["bomb.dcm", "deflated.dcm", "good.dcm", "next.dcm"]
    assert rows["bomb.dcm"]["status"] == "error" and "Deflated" in rows["bomb.dcm"]["error"]
    assert "daemon.max_pixels" in rows["bomb.dcm"]["error"]
    assert all(rows[n]["status"] == "ok" for n in ("deflated.dcm", "good.dcm", "next.dcm"))  # real deflated: read
    assert (tmp_path / "out" / "failed" / "bomb.dcm").exists()


CRASH_HOOK = """
import os, sys
from xr.daemon import claim
_decode = claim.decode
def decode(f, predictor, limits):
    if os.path.basename(f.item.path) == os.environ["XR_TEST_CRASH_NAME"]:
        os._exit(139)  # as a decoder's segfault or the kernel's OOM kill ends the process: no cleanup
    _decode(f, predictor, limits)
claim.decode = decode
from xr.daemon.cli import main
sys.exit(main())
"""


def test_a_file_that_kills_the_daemon_twice_is_set_aside(tmp_path, tiny_checkpoint, xray_paths, monkeypatch):
    """A film whose decode ends the process (here a hook that exits as a segfault would): the first two
    starts die on it, the third sets it aside in failed/ with an error row instead of reading it again
    (a service manager's restarts no longer loop), and the other films are scored."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, name in enumerate(("a.jpeg", "b.jpeg", "crash.jpeg", "d.jpeg")):
        distinct_copy(xray_paths[i], inbox / name, i)
    monkeypatch.setenv("XR_TEST_CRASH_NAME", "crash.jpeg")
    cmd = _once_cmd(
        tmp_path,
        tiny_checkpoint,
        "--batch-size",
        "1",
        "--set",
        "daemon.decode_workers=1",
        argv0=[sys.executable, "-c", CRASH_HOOK],
    )
    codes = [_run_measured(cmd, tmp_path, tmp_path / f"run{i}.log")[0] for i in range(3)]
    assert codes == [139, 139, 0], [(tmp_path / f"run{i}.log").read_text()[-2000:] for i in range(3)]
    rows = {r["filename"]: r for r in db_rows(tmp_path)}
    assert sorted(rows) == ["a.jpeg", "b.jpeg", "crash.jpeg", "d.jpeg"]
    assert rows["crash.jpeg"]["status"] == "error" and "stopped twice" in rows["crash.jpeg"]["error"]
    assert all(rows[n]["status"] == "ok" for n in ("a.jpeg", "b.jpeg", "d.jpeg")), rows
    assert sorted(p.name for p in (tmp_path / "out" / "failed").iterdir()) == ["crash.jpeg"]
    assert sorted(p.name for p in (tmp_path / "out" / "processed").iterdir()) == ["a.jpeg", "b.jpeg", "d.jpeg"]
    assert not list(inbox.iterdir())
    events = log_events(tmp_path / "run2.log")
    assert [e["file"] for e in events if e["event"] == "file_set_aside"] == [str(inbox / "crash.jpeg")]
    assert [e["id"] for e in log_events(tmp_path / "run1.log") if e["event"] == "read_crashed"] == [
        rows["crash.jpeg"]["id"]
    ]


def _modes(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` (``root`` included) -> its permission bits."""
    out = {".": root.stat().st_mode & 0o777}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.lstat().st_mode & 0o777
    return out


@pytest.mark.parametrize("group", [False, True])
def test_output_is_private_whatever_the_umask(tmp_path, tiny_checkpoint, xray_paths, dicom_dir, capsys, group):
    """Under umask 022 (files 0644, folders 0755 by default) everything a run creates under the output
    folder, films moved in with the exporter's 0644 and a heatmap included, is private to the service
    account (0600/0700); with ``output.group`` readable by that group too (0640/0750), never by others."""
    import grp

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    distinct_copy(xray_paths[0], inbox / "a.jpeg", 0)
    distinct_copy(xray_paths[-1], inbox / "p.jpeg", 1)  # PNEUMONIA: flagged, so it gets a heatmap
    (inbox / "bad.png").write_text("not an image")
    shutil.copy(dicom_dir["knee"], inbox / "knee.dcm")  # out of scope: skipped/
    for p in inbox.iterdir():
        p.chmod(0o644)
    extra = ("--set", f"output.group={grp.getgrgid(os.getegid()).gr_name}") if group else ()
    from xr.core.files import use_group

    old = os.umask(0o022)
    try:
        rc, log = run_once(tmp_path, tiny_checkpoint, capsys, "--set", "daemon.heatmaps=all", *extra)
    finally:
        os.umask(old)
        use_group(None)  # the run set it for this process
    assert rc == 0, log.read_text()[-3000:]
    modes = _modes(tmp_path / "out")
    for sub in ("processed/a.jpeg", "failed/bad.png", "skipped/knee.dcm", "results.sqlite", "csv", "heatmaps"):
        assert sub in modes, sorted(modes)
    assert any(k.startswith("heatmaps/") and k.endswith(".png") for k in modes)
    assert any(k.startswith("csv/results-") for k in modes)
    folders = {k for k in modes if (tmp_path / "out" / k).is_dir()}
    want_dir, want_file = (0o750, 0o640) if group else (0o700, 0o600)
    wrong = {k: oct(m) for k, m in modes.items() if m != (want_dir if k in folders else want_file)}
    # lock files are the daemon's own (0600 whatever output.group says); never anyone else's
    assert all(k.endswith(".lock") and m == "0o600" for k, m in wrong.items()), wrong
