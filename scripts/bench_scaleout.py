#!/usr/bin/env python
"""Scale-out on this machine: 1, 2, 3 daemons on one PostgreSQL database vs 1 daemon on SQLite, same burst
(a benchmark, not a test).

For each set-up, a fresh results database and output folder; the workers start, wait until each is ready,
then the burst arrives at once (hard links into the inbox: an atomic arrival, like the rename an exporter
should do) and the clock runs until every file has its final row and has been moved. Prints, in one run:

* files/s end to end, and the workers' CPU time per file (all their processes and threads)
* the journal's own cost per file on each backend, measured in-process without a model: a file's claim
  transaction, its result's commit and its move's record, in batches as the daemon makes them

Files are distinct full-resolution JPEG variants (bench_daemon.py's), so none is a duplicate.

    python scripts/bench_scaleout.py --count 600 --pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import FIXTURE_FULLRES, SHARED_FULLRES, ensure_model, make_images


class PgDatabases:
    """Fresh databases on one server, dropped at the end."""

    def __init__(self, admin_url: str):
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.base = admin_url.rsplit("/", 1)[0]
        self.names: list[str] = []

    def new(self) -> str:
        name = f"xr_bench_{uuid.uuid4().hex[:10]}"
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return f"{self.base}/{name}"

    def drop_all(self) -> None:
        with self.admin.connect() as c:
            for name in self.names:
                c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        self.admin.dispose()


def run_burst(files: list[Path], ckpt: Path, db: str, workers: int, work: Path, extra: list[str]) -> dict:
    inbox, out = work / "inbox", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    inbox.mkdir(parents=True)
    procs, logs = [], []
    for i in range(workers):
        log = work / f"w{i + 1}.log"
        cmd = [
            sys.executable,
            "-m",
            "xr.daemon.cli",
            "--watch",
            str(inbox),
            "--output",
            str(out),
            "--db",
            db,
            "--model",
            str(ckpt),
            "--device",
            "cpu",
            "--worker-id",
            f"w{i + 1}",
            "--set",
            "daemon.heatmaps=none",
            *extra,
        ]
        procs.append(subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        for p, log in zip(procs, logs):
            while b"daemon_started" not in log.read_bytes():
                if p.poll() is not None:
                    raise SystemExit(f"worker failed to start:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        ps = [psutil.Process(p.pid) for p in procs]
        cpu0 = sum(sum(q.cpu_times()[:2]) for q in ps)
        engine = create_engine(db if "://" in db else f"sqlite:///{db}")
        t0 = time.perf_counter()
        for f in files:
            os.link(f, inbox / f.name)
        while True:
            with engine.connect() as c:
                done = c.execute(text("select count(*) from results where moved_at is not null")).scalar()
            if done >= len(files):
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a worker exited:\n{logs[0].read_text()[-2000:]}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        cpu = sum(sum(q.cpu_times()[:2]) for q in ps) - cpu0
        with engine.connect() as c:
            per_worker = dict(c.execute(text("select worker_id, count(*) from results group by worker_id")).all())
            rows = c.execute(text("select count(*), count(distinct filename) from results")).one()
        engine.dispose()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    moved = sorted(os.listdir(out / "processed"))
    assert rows == (len(files), len(files)) and len(moved) == len(files), (rows, len(moved))
    return {"files_s": len(files) / elapsed, "cpu_ms": 1000 * cpu / len(files), "per_worker": per_worker}


def journal_cost(db: str, n: int, batch: int) -> dict[str, float]:
    """ms per file of the daemon's three journal transactions, without a model: claim, commit, move."""
    from xr.results import journal, rows
    from xr.results.engine import make_engine, session_factory
    from xr.results.schema import Status, utcnow

    engine = make_engine(db)
    sessions = session_factory(engine)
    t = {"claim": 0.0, "commit": 0.0, "move": 0.0}
    for start in range(0, n, batch):
        now = utcnow()
        t0 = time.perf_counter()
        with sessions.begin() as s:
            journal.claim_fence(s)
            expires = journal.db_time(s) + 60
            ids = [
                journal.try_claim(
                    s,
                    {
                        "path": f"/inbox/f{i}.jpeg",
                        "filename": f"f{i}.jpeg",
                        "size_bytes": 1000 + i,
                        "mtime_ns": 1_700_000_000_000_000_000 + i,
                        "sha256": f"{i:064x}",
                        "status": Status.CLAIMED,
                        "received_at": now,
                        "claimed_at": now,
                        "lease_holder": "bench",
                        "lease_token": 0,
                        "lease_expires_at": expires,
                    },
                )
                for i in range(start, start + batch)
            ]
        t1 = time.perf_counter()
        with sessions.begin() as s:
            held = journal.still_held(s, dict.fromkeys(ids, 0), "bench")
            rows.first_ok_by_sha(s, [f"{i:064x}" for i in range(start, start + batch)])
            rows.update_rows(
                s,
                [
                    {
                        "id": r,
                        "status": Status.OK,
                        "probability": 0.5,
                        "logit": 0.0,
                        "flagged": False,
                        "processed_at": now,
                        "worker_id": "bench",
                        "moved_to": f"/out/processed/{r}.jpeg",
                    }
                    for r in held
                ],
            )
        t2 = time.perf_counter()
        with sessions.begin() as s:
            held = journal.still_held(s, dict.fromkeys(ids, 0), "bench")
            rows.update_rows(s, [{"id": r, "moved_at": dt.datetime.now()} for r in held])
        t3 = time.perf_counter()
        t["claim"] += t1 - t0
        t["commit"] += t2 - t1
        t["move"] += t3 - t2
    engine.dispose()
    out = {k: 1000 * v / n for k, v in t.items()}
    out["total"] = sum(out.values())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=600, help="files in the burst")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="PostgreSQL worker counts")
    ap.add_argument(
        "--pg",
        default=os.environ.get("XR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL server's URL (its maintenance database): fresh databases are made there and dropped",
    )
    ap.add_argument("--model", type=Path, help="checkpoint (default: models/xr_mvp_best.pt)")
    ap.add_argument("--journal-files", type=int, default=2000, help="files of the in-process journal measurement")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any daemon config override")
    args = ap.parse_args()

    extra = [a for kv in args.set for a in ("--set", kv)]
    work = Path(tempfile.mkdtemp(prefix="xr-bench-scaleout-"))
    pg = PgDatabases(args.pg)
    try:
        ckpt, note = ensure_model(args.model, work)
        src = SHARED_FULLRES if SHARED_FULLRES.is_dir() else FIXTURE_FULLRES
        files = make_images(sorted(src.glob("*/*.jpeg")), work / "staging", args.count, "burst-")
        print(f"model: {note}\nburst: {len(files)} distinct full-resolution JPEGs from {src}; {os.cpu_count()} CPUs")
        print("\njournal cost per file, in-process, batches of 8 (claim + commit + move record):")
        for name, db in (("sqlite", str(work / "journal.sqlite")), ("postgresql", pg.new())):
            c = journal_cost(db, args.journal_files, 8)
            print(
                f"  {name:<11} claim {c['claim']:.2f} ms, commit {c['commit']:.2f} ms, move {c['move']:.2f} ms: "
                f"{c['total']:.2f} ms/file"
            )
        print("\nend to end (files/s until every file has its row and is moved; CPU ms/file of all workers):")
        setups = [("sqlite", 1, str(work / "results.sqlite"))] + [("postgresql", k, None) for k in args.workers]
        for name, k, db in setups:
            r = run_burst(files, ckpt, db or pg.new(), k, work / f"{name}-{k}", extra)
            print(
                f"  {name:<11} {k} worker(s): {r['files_s']:6.1f} files/s, {r['cpu_ms']:6.1f} CPU ms/file, "
                f"files per worker {dict(sorted(r['per_worker'].items()))}",
                flush=True,
            )
    finally:
        pg.drop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
