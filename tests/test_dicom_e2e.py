"""End to end over the network: dcmtk's storescu (the modality) -> the real ``xr-daemon`` with its DICOM node
-> scored with the shipped model -> the SR (and SC for flagged films) C-STOREd into a real Orthanc (the PACS),
in the film's study, referencing the film, with the results row's probability. Then the failures a
department meets: the PACS down for a while, a kill -9 right after films were acknowledged, two workers on
PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import dicom_films
import pydicom
import pytest
from dicom_net import Orthanc, free_port, need, storescu
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text
from test_daemon_e2e import DAEMON, log_events, wait_for

from xr.core import dicom_results as dr

pytestmark = pytest.mark.slow

SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"


def make_films(folder: Path, pictures: list[Path]) -> list[Path]:
    """A CR film per picture, two studies, each film its own SOP Instance UID."""
    studies = [generate_uid(), generate_uid()]
    out = []
    for i, picture in enumerate(pictures):
        ds = dicom_films.cr_from_picture(picture, StudyInstanceUID=studies[i % 2], AccessionNumber=f"ACC-{i % 2}")
        out.append(dicom_films.write(ds, folder / f"film{i}.dcm"))
    return out


def start(tmp: Path, name: str, node_port: int, destination: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{name}.log"
    cmd = [
        *DAEMON,
        "--watch",
        str(tmp / "inbox"),
        "--output",
        str(tmp / "out"),
        "--device",
        "cpu",
        "--stable-ms",
        "300",
        "--rescan-s",
        "0.5",
        "--dicom-port",
        str(node_port),
        "--send-results",
        destination,
        "--set",
        "dicom_node.allowed_callers=[MODALITY]",
        "--set",
        "dicom_send.retry_initial_s=0.5",
        "--set",
        "dicom_send.retry_max_s=2",
        *extra,
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, cwd=tmp)
    return proc, log


def listening(proc: subprocess.Popen, log: Path) -> None:
    wait_for(
        lambda: any(e.get("event") == "dicom_node_listening" for e in log_events(log)), 300, proc, "the DICOM node"
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def rows(db: str) -> list[dict]:
    engine = create_engine(db if "://" in db else f"sqlite:///{db}")
    try:
        with engine.connect() as c:
            return [
                dict(r._mapping)
                for r in c.execute(
                    text("SELECT id, status, probability, flagged, sop_instance_uid, study_instance_uid FROM results")
                )
            ]
    finally:
        engine.dispose()


def check_pacs(pacs: Orthanc, films: list[Path], db: str) -> None:
    """Every film: scored once; its SR in its study, referencing it, with the row's probability; an SC iff
    flagged; nothing else in the PACS."""
    by_uid = {r["sop_instance_uid"]: r for r in rows(db)}
    assert len(by_uid) == len(films) and all(r["status"] == "ok" for r in by_uid.values())
    srs = {}
    for oid in pacs.find(SOPClassUID=SR_CLASS):
        got = dr.read_sr(pacs.file(oid))
        srs[got["source_sop_instance_uid"]] = got
    scs = {
        pacs.tags(oid)["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]: pacs.tags(oid)
        for oid in pacs.find(SOPClassUID=SC_CLASS)
    }
    for path in films:
        film = pydicom.dcmread(path, stop_before_pixels=True)
        row, sr = by_uid[film.SOPInstanceUID], srs[film.SOPInstanceUID]
        assert sr["study_instance_uid"] == film.StudyInstanceUID and sr["patient_id"] == film.PatientID
        assert sr["probability"] == pytest.approx(row["probability"], abs=1e-9)
        assert sr["flagged"] == bool(row["flagged"]) and sr["verification"] == "UNVERIFIED"
        if row["flagged"]:
            assert scs[film.SOPInstanceUID]["StudyInstanceUID"] == film.StudyInstanceUID
        else:
            assert film.SOPInstanceUID not in scs
    n_flagged = sum(bool(r["flagged"]) for r in by_uid.values())
    assert len(srs) == len(films) and len(scs) == n_flagged
    assert len(pacs.instances()) == len(films) + n_flagged  # the PACS holds our objects only, each once


def sent_uids(*logs: Path) -> list[str]:
    return [e["sop_instance_uid"] for log in logs for e in log_events(log) if e.get("event") == "dicom_sent"]


@pytest.fixture()
def setup(tmp_path, xray_paths):
    need("Orthanc", "storescu")
    (tmp_path / "inbox").mkdir()
    pictures = [xray_paths[0], xray_paths[1], xray_paths[-1], xray_paths[-2]]  # 2 NORMAL, 2 PNEUMONIA
    films = make_films(tmp_path / "films", pictures)
    pacs = Orthanc(tmp_path / "orthanc", {"xr": "XRTRIAGE", "xr2": "XRTRIAGE2"})
    yield tmp_path, films, pacs
    pacs.stop()


def test_round_trip_modality_daemon_pacs(setup):
    tmp, films, pacs = setup
    pacs.start()
    port = free_port()
    proc, log = start(tmp, "daemon", port, pacs.destination)
    try:
        listening(proc, log)
        r = storescu(port, films)
        assert r.returncode == 0, r.stderr
        refused = storescu(port, films[:1], aet="INTRUDER")
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
        db = str(tmp / "out" / "results.sqlite")
        wait_for(lambda: len(sent_uids(log)) >= len(films), 300, proc, "the SRs in Orthanc")
        flagged = sum(bool(r["flagged"]) for r in rows(db))
        wait_for(lambda: len(sent_uids(log)) == len(films) + flagged, 300, proc, "the SCs in Orthanc")
        assert 0 < flagged < len(films)  # the shipped model tells these NORMAL and PNEUMONIA films apart
        check_pacs(pacs, films, db)
        out = subprocess.run(
            [sys.executable, "-m", "xr.results.cli", "--db", db, "outbox"], capture_output=True, text=True
        )
        assert f"{pacs.destination:<40} sent     {len(films) + flagged}" in out.stdout
    finally:
        stop(proc)
    assert proc.returncode == 0


def test_pacs_down_and_kill9_after_acknowledged_films(setup):
    """Orthanc is down while films arrive; the daemon is killed right after it acknowledged them; after a
    restart they are scored, and once Orthanc is back every object arrives, each sent once."""
    tmp, films, pacs = setup
    port = free_port()
    proc, log = start(tmp, "first", port, pacs.destination)
    listening(proc, log)
    r = storescu(port, films)
    assert r.returncode == 0, r.stderr
    proc.send_signal(signal.SIGKILL)  # right after the acknowledgements
    proc.wait(30)
    inbox_or_done = list((tmp / "inbox").glob("*.dcm")) + list((tmp / "out" / "processed").glob("*.dcm"))
    assert len(inbox_or_done) == len(films)  # every acknowledged film survived the kill
    proc, log2 = start(tmp, "second", port, pacs.destination)
    try:
        db = str(tmp / "out" / "results.sqlite")
        wait_for(lambda: len([r for r in rows(db) if r["status"] == "ok"]) == len(films), 300, proc, "the scores")
        wait_for(
            lambda: any(e.get("event") == "dicom_send_retry" for e in log_events(log2)), 120, proc, "a failed send"
        )
        pacs.start()
        flagged = sum(bool(r["flagged"]) for r in rows(db))
        wait_for(lambda: len(sent_uids(log, log2)) == len(films) + flagged, 300, proc, "every object in Orthanc")
        time.sleep(2)  # nothing more comes
        uids = sent_uids(log, log2)
        assert len(uids) == len(set(uids)) == len(films) + flagged
        check_pacs(pacs, films, db)
    finally:
        stop(proc)


def test_two_workers_on_postgresql_send_each_object_once(setup, pg_url):
    tmp, films, pacs = setup
    pacs.start()
    ports = [free_port(), free_port()]
    procs = []
    try:
        for k, port in enumerate(ports):
            extra = ["--db", pg_url, "--worker-id", f"w{k}", "--poll"]
            if k == 1:
                extra += ["--ae-title", "XRTRIAGE2"]
            procs.append(start(tmp, f"w{k}", port, pacs.destination, *extra))
        for proc, log in procs:
            listening(proc, log)
        for k, port in enumerate(ports):
            r = storescu(port, films[k::2], aec="XRTRIAGE" if k == 0 else "XRTRIAGE2")
            assert r.returncode == 0, r.stderr
        logs = [log for _, log in procs]
        wait_for(lambda: len([r for r in rows(pg_url) if r["status"] == "ok"]) == len(films), 300, None, "scores")
        flagged = sum(bool(r["flagged"]) for r in rows(pg_url))
        wait_for(lambda: len(sent_uids(*logs)) >= len(films) + flagged, 300, None, "every object in Orthanc")
        time.sleep(3)
        uids = sent_uids(*logs)
        assert len(uids) == len(set(uids)) == len(films) + flagged
        check_pacs(pacs, films, pg_url)
    finally:
        for proc, _ in procs:
            stop(proc)
