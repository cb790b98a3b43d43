#!/usr/bin/env python
"""Archive re-scoring: ``xr-score`` (Ray Data) against ``xr-daemon --once`` and the raw model forward, on
the same films in one run (a benchmark, not a test).

Prints films/s end to end (process start to exit, model loading included, for both commands) and the
machine's CPU seconds per film (all processes: Ray's workers, the daemon's threads; read from the system's
CPU counters, so run it on an otherwise idle machine), the share of the raw forward each reaches, and the
largest probability difference between the two commands' scores of the same film.

    python scripts/bench_score.py --count 2000
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import FIXTURE_FULLRES, SHARED_FULLRES, ensure_model, make_images, raw_forward_rate


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and the machine's busy CPU seconds of one command."""
    c0, t0 = psutil.cpu_times(), time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, c1 = time.perf_counter() - t0, psutil.cpu_times()
    busy = (c1.user - c0.user) + (c1.system - c0.system) + (getattr(c1, "nice", 0) - getattr(c0, "nice", 0))
    return wall, busy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32, help="xr-score's batch size")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from xr.core.config import load_settings
    from xr.core.predict import resolve_device, use_bf16
    from xr.daemon.plan import plan_run, usable_cpus

    work = Path(tempfile.mkdtemp(prefix="xr-bench-score-"))
    try:
        ckpt, note = ensure_model(args.model, work)
        src = SHARED_FULLRES if SHARED_FULLRES.is_dir() else FIXTURE_FULLRES
        films = make_images(sorted(src.glob("*/*.jpeg")), work / "films", args.count, "film-")
        device = resolve_device(args.device)
        plan = plan_run(load_settings().daemon, device.type, bf16=device.type == "cpu" and use_bf16(device))
        print(f"model: {note}\nfilms: {len(films)} distinct full-resolution JPEGs from {src}; {usable_cpus()} CPUs")
        raw = max(
            raw_forward_rate(ckpt, plan.batch_size, 15, args.device, n, tuned, True)
            for n in sorted({1, usable_cpus()})
            for tuned in (False, True)
        )
        print(f"raw model forward (batch {plan.batch_size}, best of the thread and malloc variants): {raw:.1f} films/s")

        inbox, out = work / "inbox", work / "daemon-out"
        inbox.mkdir()
        for f in films:
            (inbox / f.name).hardlink_to(f)
        daemon = [
            sys.executable,
            "-m",
            "xr.daemon.cli",
            "--watch",
            str(inbox),
            "--output",
            str(out),
            "--model",
            str(ckpt),
            "--device",
            args.device,
            "--once",
            "--set",
            "daemon.heatmaps=none",
            "--set",
            "daemon.on_success=leave",
        ]
        d_wall, d_cpu = timed(daemon)
        score = [
            sys.executable,
            "-m",
            "xr.score.cli",
            "--data",
            str(work / "films"),
            "--out",
            str(work / "scores"),
            "--model",
            str(ckpt),
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
        ]
        s_wall, s_cpu = timed(score)

        n = len(films)
        con = sqlite3.connect(out / "results.sqlite")
        daemon_p = dict(con.execute("select filename, probability from results where status = 'ok'"))
        con.close()
        score_p = {
            Path(r["path"]).name: r["probability"]
            for p in sorted((work / "scores").glob("part-*.parquet"))
            for r in pq.read_table(p).to_pylist()
        }
        assert len(daemon_p) == len(score_p) == n, (len(daemon_p), len(score_p))
        diff = max(abs(daemon_p[k] - score_p[k]) for k in daemon_p)
        print(f"\n{'':<18} {'films/s':>8} {'CPU s/film':>11} {'of raw':>7}")
        for name, wall, cpu in (("xr-daemon --once", d_wall, d_cpu), ("xr-score", s_wall, s_cpu)):
            print(f"{name:<18} {n / wall:8.1f} {cpu / n:11.4f} {n / wall / raw:7.0%}")
        print(f"\nxr-score / xr-daemon: {d_wall / s_wall:.2f}x; largest probability difference {diff:.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
