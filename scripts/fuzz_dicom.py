"""Hostile DICOM input for the real daemon: mutated films through ``xr-daemon --once``, and what came of them.

    python scripts/fuzz_dicom.py [--files 300] [--seed 1] [--batch 100] [--keep DIR]

Seeds: pydicom-data's CR chest films (RG1, RG3 in native and JPEG 2000) and the variants of
tests/dicom_films.py (native, MONOCHROME2 twin, RLE, JPEG-LS, JPEG 2000, JPEG lossless and baseline).
Each fuzzed file is one seed with one or two mutations: random byte flips, a truncation, an element's
length field rewritten (to 0, odd, just past the end, or near 4 GB), the transfer syntax UID swapped for
another (the data left as it was), a compressed frame's own size (JPEG 2000 SIZ, JPEG SOF) rewritten, the dataset deflated (the Deflated syntax, sometimes with flips in the
compressed stream), or a deflate bomb (a few MB that inflate to 1-3 GB). Batches of ``--batch`` files go
through a real ``xr-daemon --once`` (heatmaps off, no deduplication so every file is decoded, CPU, the
shipped model) on a fresh inbox; a run that does not exit 0 is started again on what is left (the daemon
sets aside a file at its second crash), up to three times.

Reported: files, rows by status, runs and their exit codes, ``stage_failed``/``daemon_crashed`` events,
files left in the inbox or without a row, the highest peak resident memory of a run (``wait4``) beside
that of a run on the unmutated seeds, and the most frequent error reasons. ``--keep DIR`` keeps the inputs and outputs for a look.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import dicom_films  # noqa: E402
import pydicom  # noqa: E402
from pydicom import uid as uids  # noqa: E402

_SCRIPT = Path(sys.executable).parent / "xr-daemon"
DAEMON = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "xr.daemon.cli"]
SYNTAXES = [
    uids.ImplicitVRLittleEndian,
    uids.ExplicitVRLittleEndian,
    uids.ExplicitVRBigEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.RLELossless,
    uids.JPEGBaseline8Bit,
    uids.JPEGLosslessSV1,
    uids.JPEGLSLossless,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    "1.2.3.4.5.6.7",  # not a transfer syntax at all
]


# -- seeds ---------------------------------------------------------------------------------------------------
def seeds(folder: Path) -> list[bytes]:
    out = [dicom_films.rg1(n).read_bytes() for n in ("RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm", "RG3_J2KI.dcm")]
    out += [p.read_bytes() for p in dicom_films.chest_films(folder).values()]
    return out


# -- mutations -----------------------------------------------------------------------------------------------
def flip(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 4, 32, 256))):
        i = rng.randrange(len(b))
        b[i] = rng.randrange(256)
    return bytes(b)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(132, len(data))]


def element_offsets(data: bytes) -> list[int]:
    """Offsets of explicit-VR element headers with a 4-byte length (OB, OW, SQ, UN, UT, OF) or a 2-byte one."""
    found = []
    for m in re.finditer(rb"(?s)..(?=..(OB|OW|SQ|UN|UT|OF|UI|LO|CS|US|DS|IS|SH|PN|DA))", data[132:]):
        found.append(132 + m.start())
    return found


def bad_length(rng: random.Random, data: bytes) -> bytes:
    offsets = element_offsets(data)
    if not offsets:
        return flip(rng, data)
    at = rng.choice(offsets)
    vr = data[at + 4 : at + 6]
    b = bytearray(data)
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF"):
        length = rng.choice((0, 1, 3, len(data) - at, len(data) + 1, 0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFFF))
        b[at + 8 : at + 12] = struct.pack("<I", length)
    else:
        b[at + 6 : at + 8] = struct.pack("<H", rng.choice((0, 1, 0xFFFF, 0x8000)))
    return bytes(b)


def swap_syntax(rng: random.Random, data: bytes) -> bytes:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        ds.file_meta.TransferSyntaxUID = rng.choice(SYNTAXES)  # the data stays as it was encoded
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)  # write the dataset as read, under the new meta
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - a seed already mangled: flip it instead
        return flip(rng, data)


def deflate(rng: random.Random, data: bytes) -> bytes:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        out = dicom_films.deflated(ds)
    except Exception:  # noqa: BLE001
        return flip(rng, data)
    if rng.random() < 0.5:  # a corrupt compressed stream
        b = bytearray(out)
        for _ in range(rng.choice((1, 8))):
            i = rng.randrange(400, len(b))
            b[i] = rng.randrange(256)
        out = bytes(b)
    return out


def codestream_dims(rng: random.Random, data: bytes) -> bytes:
    """A compressed frame whose own header (JPEG 2000 SIZ, JPEG SOF) claims another size than Rows x Columns."""
    b = bytearray(data)
    side = rng.choice((1, 225, 20000, 65535))
    at = b.find(b"\xff\x4f\xff\x51")
    if at > 0:
        b[at + 8 : at + 16] = struct.pack(">II", side, side)
        return bytes(b)
    for sof in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7"):
        at = b.find(sof, 132)
        if at > 0:
            b[at + 5 : at + 9] = struct.pack(">HH", side, side)
            return bytes(b)
    return flip(rng, data)


def bomb(rng: random.Random, _data: bytes) -> bytes:
    picture = rng.choice(sorted((REPO / "tests" / "fixtures" / "chest_xray" / "train").glob("*/*.jpeg")))
    return dicom_films.deflate_bomb(picture, rng.choice((1, 2, 3)) * 2**30)


MUTATIONS = {
    "flip": (flip, 30),
    "truncate": (truncate, 15),
    "length": (bad_length, 25),
    "syntax": (swap_syntax, 15),
    "deflate": (deflate, 12),
    "dims": (codestream_dims, 8),
    "bomb": (bomb, 3),
}


def fuzzed(rng: random.Random, pool: list[bytes]) -> tuple[bytes, list[str]]:
    names, weights = zip(*((k, w) for k, (_, w) in MUTATIONS.items()))
    data, done = rng.choice(pool), []
    for _ in range(rng.choice((1, 1, 2))):
        name = rng.choices(names, weights)[0]
        data = MUTATIONS[name][0](rng, data)
        done.append(name)
        if name == "bomb":
            break  # parsing it again here (a syntax swap) would inflate it whole
    return data, done


# -- running the daemon --------------------------------------------------------------------------------------
def run_daemon(inbox: Path, out: Path, log: Path) -> tuple[int, float, float]:
    """One ``xr-daemon --once``: (exit code, peak RSS in MB, seconds)."""
    cmd = [
        *DAEMON,
        *("--watch", str(inbox), "--output", str(out), "--once", "--device", "cpu"),
        *("--stable-ms", "100", "--set", "daemon.heatmaps=none", "--set", "daemon.cpu_trace=false"),
        *("--set", "daemon.incomplete_grace_s=1"),  # a cut-short file is an error at once, not after 60 s
        *("--set", "daemon.dedupe=false"),  # every file decoded, not taken as a duplicate by its SOP UID
    ]
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, time.monotonic() - t0


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--keep", type=Path, default=None, help="keep inputs and outputs here")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="xr-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    pool = seeds(work / "seeds")
    out = work / "out"
    kinds: collections.Counter = collections.Counter()
    runs, crashes, peak, seconds, written = [], [], 0.0, 0.0, 0
    clean = work / "inbox-seeds"  # the seeds as they are: the daemon's own peak, to compare the fuzzed runs with
    clean.mkdir()
    for i, data in enumerate(pool):
        (clean / f"seed-{i:02d}.dcm").write_bytes(data)
    rc, baseline, _ = run_daemon(clean, work / "out-seeds", work / "daemon-seeds.log")
    print(f"seeds: exit {rc}, peak {baseline:.0f} MB", flush=True)
    for start in range(0, args.files, args.batch):
        inbox = work / f"inbox-{start // args.batch:03d}"
        inbox.mkdir()
        for i in range(start, min(args.files, start + args.batch)):
            data, done = fuzzed(rng, pool)
            kinds.update(done)
            (inbox / f"fuzz-{i:05d}.dcm").write_bytes(data)
            written += 1
        for attempt in range(3):
            log = work / f"daemon-{start // args.batch:03d}-{attempt}.log"
            rc, mb, s = run_daemon(inbox, out, log)
            runs.append(rc)
            peak, seconds = max(peak, mb), seconds + s
            crashes += [
                e for e in events(log) if e.get("event") in ("stage_failed", "daemon_crashed", "file_set_aside")
            ]
            print(f"batch {start // args.batch}: run {attempt + 1} exit {rc}, peak {mb:.0f} MB, {s:.1f} s", flush=True)
            if rc == 0:
                break
    con = sqlite3.connect(out / "results.sqlite")
    rows = con.execute("select status, error from results").fetchall()
    con.close()
    by_status = collections.Counter(r[0] for r in rows)
    reasons = collections.Counter(re.sub(r"\d[\d,]*", "N", (r[1] or "")[:90]) for r in rows if r[0] == "error")
    left = [f for d in work.glob("inbox-0*") for f in d.iterdir() if not f.name.startswith(".")]
    report = {
        "files": written,
        "mutations": dict(kinds),
        "rows": len(rows),
        "rows_by_status": dict(by_status),
        "runs": len(runs),
        "exit_codes": dict(collections.Counter(runs)),
        "crash_events": [{k: e.get(k) for k in ("event", "stage", "file", "reason")} for e in crashes],
        "left_in_inbox": len(left),
        "peak_rss_mb": round(peak),
        "seeds_peak_rss_mb": round(baseline),
        "daemon_seconds": round(seconds, 1),
        "top_errors": reasons.most_common(12),
    }
    print(json.dumps(report, indent=2))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(rc == 0 for rc in runs) and not crashes and not left and len(rows) == written
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
