"""Soak the daemon's crash safety: kill -9 at random moments of a burst, restart, and count every file.

    python scripts/soak_daemon.py --files 1000 --kills 10 [--model CKPT] [--seed N] [--keep]

A feeder drops distinct films into the inbox while `xr-daemon` runs (most renamed in, some written in
place by a writer that pauses mid-file, some duplicates of earlier content). The daemon is killed with
SIGKILL at a random moment after each start and restarted at once; after the last kill a final
`--once` run finishes the inbox. Then every file must be in the database exactly once with a final
status, in processed/ exactly once, in the CSVs exactly once and in id order, and SQLite's
`pragma integrity_check` must say ok. Prints one summary line (kills, files, rows, lost, doubled) and
exits 1 if anything is off. tests/test_daemon_e2e.py runs a small version of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "xr-daemon"
DAEMON = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "xr.daemon.cli"]


def _events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Feeder(threading.Thread):
    """Drops ``n`` distinct films over ``seconds``: renamed in, written in place with a pause, duplicates."""

    def __init__(self, inbox: Path, sources: list[Path], n: int, seconds: float, rng: random.Random):
        super().__init__(name="soak-feeder", daemon=True)
        self.inbox, self.sources, self.n, self.seconds, self.rng = inbox, sources, n, seconds, rng
        self.names: list[str] = []

    def film(self, i: int) -> bytes:
        return self.sources[i % len(self.sources)].read_bytes() + f"xr-soak-{i}".encode()  # distinct bytes

    def run(self) -> None:
        for i in range(self.n):
            kind = self.rng.random()
            if kind < 0.05 and i > 0:  # the same content as an earlier film, under a new name
                name, data = f"dup{i:05d}.jpeg", self.film(self.rng.randrange(i))
            else:
                name, data = f"f{i:05d}.jpeg", self.film(i)
            if kind > 0.97:  # written in place by a writer that stops mid-file for a while
                with open(self.inbox / name, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    time.sleep(self.rng.uniform(0.5, 2.0))
                    f.write(data[len(data) // 2 :])
            else:
                tmp = self.inbox / f".{name}.part"
                tmp.write_bytes(data)
                os.rename(tmp, self.inbox / name)
            self.names.append(name)
            time.sleep(self.seconds / self.n)


def start(work: Path, model: Path, log_name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = work / log_name
    cmd = [
        *DAEMON,
        "--watch",
        str(work / "inbox"),
        "--output",
        str(work / "out"),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--stable-ms",
        "300",
        "--rescan-s",
        "1",
        "--set",
        "daemon.incomplete_grace_s=2",
        *extra,
    ]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=fh), log


def soak(
    work: Path,
    model: Path,
    files: int,
    kills: int,
    seed: int = 0,
    feed_seconds: float | None = None,
    sources: list[Path] | None = None,
) -> dict:
    """Run the soak in ``work`` and return its accounting (``problems`` lists what is off, empty when none)."""
    rng = random.Random(seed)
    inbox = work / "inbox"
    inbox.mkdir(parents=True)
    sources = sources or sorted((REPO / "tests" / "fixtures" / "chest_xray").rglob("*.jpeg"))
    feeder = Feeder(inbox, sources, files, feed_seconds if feed_seconds is not None else files / 40, rng)
    t0 = time.monotonic()
    done_kills = 0
    for k in range(kills):
        proc, log = start(work, model, f"run{k}.log")
        try:
            while proc.poll() is None and not any(e.get("event") == "daemon_started" for e in _events(log)):
                time.sleep(0.1)
            if k == 0:
                feeder.start()
            time.sleep(rng.uniform(0.2, 4.0))  # a random moment of the burst
            if proc.poll() is None:
                proc.kill()
                done_kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
    if not feeder.is_alive() and not feeder.names:
        feeder.start()
    feeder.join()
    proc, log = start(work, model, "final.log", "--once")
    rc = proc.wait(3600)
    seconds = time.monotonic() - t0
    return account(work, feeder.names, done_kills, rc, seconds)


def account(work: Path, names: list[str], kills: int, final_rc: int, seconds: float) -> dict:
    db = work / "out" / "results.sqlite"
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [
        dict(r)
        for r in con.execute("select id, filename, status, error, moved_to, latency_ms from results order by id")
    ]
    integrity = con.execute("pragma integrity_check").fetchone()[0]
    con.close()
    by_name: dict[str, int] = {}
    for r in rows:
        by_name[r["filename"]] = by_name.get(r["filename"], 0) + 1
    processed = sorted(p.name for p in (work / "out" / "processed").rglob("*") if p.is_file())
    failed = (
        sorted(p.name for p in (work / "out" / "failed").rglob("*") if p.is_file())
        if (work / "out" / "failed").exists()
        else []
    )
    exported = []
    for f in sorted((work / "out" / "csv").glob("results-*.csv")):
        with open(f, newline="") as fh:
            exported += [int(r["id"]) for r in csv.DictReader(fh)]
    left = [p.name for p in (work / "inbox").iterdir() if not p.name.startswith(".")]
    waited = {
        Path(e["file"]).name for log in work.glob("*.log") for e in _events(log) if e.get("event") == "file_incomplete"
    }
    waited_latency = [r["latency_ms"] for r in rows if r["filename"] in waited and r["latency_ms"] is not None]
    lost = sorted(set(names) - set(by_name))
    doubled = sorted(n for n, c in by_name.items() if c > 1)
    problems = []
    if final_rc != 0:
        problems.append(f"final --once run exited {final_rc}")
    if lost:
        problems.append(f"{len(lost)} files without a row: {lost[:5]}")
    if doubled:
        problems.append(f"{len(doubled)} files with more than one row: {doubled[:5]}")
    if set(by_name) != set(names):
        problems.append(f"rows for files never dropped: {sorted(set(by_name) - set(names))[:5]}")
    not_final = [r["filename"] for r in rows if r["status"] not in ("ok", "duplicate")]
    if not_final:
        problems.append(
            f"{len(not_final)} rows not ok/duplicate: {[(r['filename'], r['status'], r['error']) for r in rows if r['status'] not in ('ok', 'duplicate')][:5]}"
        )
    if processed != sorted(names) or failed:
        problems.append(
            f"processed/ holds {len(processed)} files for {len(names)} dropped (failed/: {len(failed)}); "
            f"extra {sorted(set(processed) - set(names))[:5]}"
        )
    if exported != [r["id"] for r in rows]:
        problems.append(
            f"CSVs hold {len(exported)} rows, {len(set(exported))} distinct, for {len(rows)} in the database"
        )
    if left:
        problems.append(f"{len(left)} files left in the inbox: {left[:5]}")
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    return {
        "kills": kills,
        "files": len(names),
        "rows": len(rows),
        "lost": len(lost),
        "doubled": len(doubled),
        "duplicates": sum(r["status"] == "duplicate" for r in rows),
        "csv_rows": len(exported),
        "integrity": integrity,
        "seconds": round(seconds, 1),
        "read_cut_short": len(waited),
        "slowest_cut_short_s": round(max(waited_latency) / 1000, 1) if waited_latency else None,
        "problems": problems,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "xr_mvp_best.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feed-seconds", type=float, default=None, help="how long the feeder takes (default files/40)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xr-soak-"))
    try:
        result = soak(work, args.model, args.files, args.kills, args.seed, args.feed_seconds)
        print(json.dumps(result))
        return 1 if result["problems"] else 0
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
