"""The DICOM round trip under load (a benchmark, not a test): storescu -> xr-daemon's node -> scored -> SR
(and SC for flagged films) C-STOREd into Orthanc.

    python scripts/bench_dicom_net.py [--films 200] [--kind fullres|small] [--rate R] [--db URL] [--workers 1]

Needs Orthanc and dcmtk (apt-get install orthanc dcmtk). Films: CR chest films made from the picture
fixtures (``fullres``: tests/fixtures/fullres, 8-bit, about 1-2k pixels a side; ``small``: the 224-pixel
training fixtures), each its own study and SOP Instance UID, sent in one storescu association.

Reports: films/s received (the node's first to last ``dicom_received``), films/s through to the PACS
(first received to last SR stored), and per film the seconds from its C-STORE (``dicom_received``) to its SR
stored in Orthanc (``dicom_sent`` of kind sr: Orthanc answered Success), p50, p95 and max; the same to
the SC of each flagged film.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import dicom_films  # noqa: E402
from dicom_net import Orthanc, free_port  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

DAEMON = [str(Path(sys.executable).parent / "xr-daemon")]


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def when(e: dict) -> float:
    return dt.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()


def make_films(folder: Path, n: int, kind: str) -> list[Path]:
    pictures = sorted(
        (REPO / "tests" / "fixtures" / ("fullres" if kind == "fullres" else "chest_xray/train")).rglob("*.jpeg")
    )
    folder.mkdir(parents=True)
    films = []
    for i in range(n):
        ds = dicom_films.cr_from_picture(pictures[i % len(pictures)], StudyInstanceUID=generate_uid())
        ds.AccessionNumber = f"BENCH-{i:05d}"
        films.append(dicom_films.write(ds, folder / f"film{i:05d}.dcm"))
    return films


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--films", type=int, default=200)
    ap.add_argument("--kind", choices=("fullres", "small"), default="fullres")
    ap.add_argument("--db", help="results database URL (default: SQLite in the run folder)")
    ap.add_argument(
        "--workers", type=int, default=1, help="daemons on one database (needs --db postgresql+psycopg://...)"
    )
    ap.add_argument(
        "--rate", type=float, help="films per second, one association each (default: all at once, one association)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the run folder")
    args = ap.parse_args()
    for tool in ("Orthanc", "storescu"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed (apt-get install orthanc dcmtk)")
    if args.workers > 1 and not (args.db or "").startswith("postgresql"):
        sys.exit("--workers > 1 needs --db postgresql+psycopg://...")
    tmp = Path(tempfile.mkdtemp(prefix="xr-bench-dicom-"))
    films = make_films(tmp / "films", args.films, args.kind)
    (tmp / "inbox").mkdir()
    pacs = Orthanc(tmp / "orthanc", {f"xr{k}": f"XRTRIAGE{k}" for k in range(args.workers)}).start()
    procs, logs, ports = [], [], []
    try:
        for k in range(args.workers):
            port = free_port()
            log = tmp / f"daemon{k}.log"
            cmd = [
                *DAEMON,
                "--watch",
                str(tmp / "inbox"),
                "--output",
                str(tmp / "out"),
                "--device",
                "cpu",
                "--dicom-port",
                str(port),
                "--ae-title",
                f"XRTRIAGE{k}",
                "--send-results",
                pacs.destination,
                "--rescan-s",
                "1",
                "--log-format",
                "json",
                *(["--db", args.db, "--worker-id", f"w{k}"] if args.db else []),
            ]
            with open(log, "ab") as fh:
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=fh, cwd=tmp))
            logs.append(log)
            ports.append(port)
        deadline = time.monotonic() + 600
        while not all(any(e.get("event") == "dicom_node_listening" for e in events(log)) for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                sys.exit(f"the daemon did not start: see {logs}")
            time.sleep(0.5)
        t0 = time.time()
        if args.rate:  # a steady stream: one association per film, paced
            for i, film in enumerate(films):
                port = ports[i % args.workers]
                aet = f"XRTRIAGE{i % args.workers}"
                subprocess.run(
                    ["storescu", "-aet", "MODALITY", "-aec", aet, "127.0.0.1", str(port), str(film)], check=True
                )
                time.sleep(max(0.0, t0 + (i + 1) / args.rate - time.time()))
        senders = (
            []
            if args.rate
            else [
                subprocess.Popen(
                    [
                        "storescu",
                        "-aet",
                        "MODALITY",
                        "-aec",
                        f"XRTRIAGE{k}",
                        "127.0.0.1",
                        str(port),
                        *map(str, films[k :: args.workers]),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for k, port in enumerate(ports)
            ]
        )
        for s in senders:
            _, err = s.communicate()
            if s.returncode:
                sys.exit(f"storescu failed: {err.decode(errors='replace')[-500:]}")
        t_sent = time.time()
        deadline = time.monotonic() + 3600
        while True:
            evs = [e for log in logs for e in events(log)]
            srs = [e for e in evs if e.get("event") == "dicom_sent" and e.get("kind") == "sr"]
            if len(srs) >= args.films:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                sys.exit(f"only {len(srs)} of {args.films} SRs reached Orthanc: see {logs}")
            time.sleep(0.5)
        db = args.db or f"sqlite:///{tmp / 'out' / 'results.sqlite'}"
        engine = create_engine(db)
        while True:  # then every flagged film's secondary capture
            with engine.connect() as c:
                flagged = c.execute(text("SELECT count(*) FROM results WHERE flagged")).scalar()
            evs = [e for log in logs for e in events(log)]
            if sum(1 for e in evs if e.get("event") == "dicom_sent" and e.get("kind") == "sc") >= flagged:
                break
            if time.monotonic() > deadline:
                sys.exit(f"not every SC reached Orthanc: see {logs}")
            time.sleep(0.5)
        engine.dispose()
        evs = [e for log in logs for e in events(log)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
        pacs.stop()
    received = {e["sop_instance_uid"]: when(e) for e in evs if e.get("event") == "dicom_received"}
    engine = create_engine(db)
    with engine.connect() as c:
        source = dict(c.execute(text("SELECT id, sop_instance_uid FROM results WHERE status = 'ok'")).all())
    engine.dispose()
    sent = [e for e in evs if e.get("event") == "dicom_sent"]
    sr_at = {source[e["result_id"]]: when(e) for e in sent if e.get("kind") == "sr"}
    sc_at = {source[e["result_id"]]: when(e) for e in sent if e.get("kind") == "sc"}
    lat = [sr_at[u] - received[u] for u in received if u in sr_at]
    lat_sc = [sc_at[u] - received[u] for u in received if u in sc_at]
    first, last_rx, last_sr = min(received.values()), max(received.values()), max(sr_at.values())
    out = {
        "films": args.films,
        "kind": args.kind,
        "workers": args.workers,
        "db": "postgresql" if args.db else "sqlite",
        "flagged": flagged,
        "sc_sent": len(sc_at),
        "rate": args.rate,
        "storescu_s": round(t_sent - t0, 2),
        "received_per_s": round((len(received) - 1) / max(last_rx - first, 1e-9), 1),
        "through_per_s": round(len(sr_at) / max(last_sr - first, 1e-9), 2),
        "cstore_to_sr_s": {
            "p50": round(statistics.median(lat), 2),
            "p95": round(pct(lat, 0.95), 2),
            "max": round(max(lat), 2),
        },
        "cstore_to_sc_s": {"p50": round(statistics.median(lat_sc), 2), "p95": round(pct(lat_sc, 0.95), 2)}
        if lat_sc
        else None,
        "retries": sum(1 for e in evs if e.get("event") == "dicom_send_retry"),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(out, indent=2))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"run folder: {tmp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
