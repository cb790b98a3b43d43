"""daemon/dicom_node.py: the storage SCP, with dcmtk's storescu/echoscu as the modality and pynetdicom as
a second one."""

from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path

import pydicom
import pytest
from dicom_net import STORESCU_SYNTAX, echoscu, need, storescu

from xr.core.config import DicomNodeConfig
from xr.daemon import dicom_node as dn


class Log:
    """Collects the node's log events."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def _add(self, event, **kw):
        self.events.append((event, kw))

    info = warning = error = debug = _add

    def named(self, event):
        return [kw for e, kw in self.events if e == event]


@pytest.fixture()
def node(tmp_path):
    made = []

    def make(**cfg) -> tuple[dn.DicomNode, Path, Log]:
        inbox = tmp_path / f"inbox{len(made)}"
        inbox.mkdir()
        logger = Log()
        n = dn.DicomNode(DicomNodeConfig(**cfg), inbox, log=logger, port=0)
        n.open()
        made.append(n)
        return n, inbox, logger

    yield make
    for n in made:
        n.stop()


def visible(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir())


def test_echo_and_every_transfer_syntax_lands_whole(node, dicom_dir):
    need("storescu", "echoscu")
    n, inbox, logger = node(allowed_callers=["MODALITY"])
    assert echoscu(n.port).returncode == 0
    films = ["native", "mono2", "rle", "jpegls", "j2k", "jpeg_lossless", "jpeg_baseline"]
    for key in films:
        r = storescu(n.port, [dicom_dir[key]], syntax=STORESCU_SYNTAX.get(key))
        assert r.returncode == 0, f"{key}: {r.stderr}"
    assert len(visible(inbox)) == len(films) and not [p for p in inbox.iterdir() if p.name.startswith(".")]
    for key in films:
        sent = pydicom.dcmread(dicom_dir[key])
        got = pydicom.dcmread(inbox / f"{sent.SOPInstanceUID}.dcm")
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, key  # as sent, not converted
        assert got.PixelData == sent.PixelData, key
        assert got.PatientID == sent.PatientID and got.StudyInstanceUID == sent.StudyInstanceUID
    assert n.received == len(films)
    assert {kw["transfer_syntax"] for kw in logger.named("dicom_received")} >= {
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.50",
    }


def test_a_second_copy_never_overwrites(node, dicom_dir):
    need("storescu")
    n, inbox, _ = node()
    for _ in range(2):
        assert storescu(n.port, [dicom_dir["native"]]).returncode == 0
    uid = pydicom.dcmread(dicom_dir["native"]).SOPInstanceUID
    assert visible(inbox) == [f"{uid}-1.dcm", f"{uid}.dcm"]


def fake_store(data: bytes, sop_class: str = "1.2.840.10008.5.1.4.1.1.1", uid: str = "1.2.3.4"):
    return types.SimpleNamespace(
        request=types.SimpleNamespace(AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=uid),
        assoc=types.SimpleNamespace(requestor=types.SimpleNamespace(ae_title="MODALITY", address="127.0.0.1")),
        context=types.SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"),
        encoded_dataset=lambda include_meta=True: data,
    )


def test_the_bytes_as_received_and_success_only_after_the_rename(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    n = dn.DicomNode(DicomNodeConfig(), inbox, log=Log())
    data = os.urandom(4096)  # whatever the peer encoded, byte for byte
    order = []
    real_link, real_fsync_dir = os.link, dn.fsync_dir
    monkeypatch.setattr(dn.os, "link", lambda a, b: (order.append(("link", Path(b).name)), real_link(a, b))[1])
    monkeypatch.setattr(dn, "fsync_dir", lambda p: (order.append(("fsync_dir", str(p))), real_fsync_dir(p))[1])
    status = n._on_store(fake_store(data, uid="1.2.3.4/../x"))
    assert status == dn.SUCCESS
    assert order == [("link", "1.2.3.4_.._x.dcm"), ("fsync_dir", str(inbox))]  # named, then the folder synced
    assert visible(inbox) == ["1.2.3.4_.._x.dcm"]
    assert (inbox / "1.2.3.4_.._x.dcm").read_bytes() == data


def test_refusals_by_status(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    logger = Log()
    n = dn.DicomNode(DicomNodeConfig(), inbox, log=logger)
    assert n._on_store(fake_store(b"x", sop_class="1.2.840.10008.5.1.4.1.1.7")) == dn.SOP_CLASS_NOT_SUPPORTED
    gone = dn.DicomNode(DicomNodeConfig(), tmp_path / "no-such-inbox", log=logger)
    assert gone._on_store(fake_store(b"x")) == dn.OUT_OF_RESOURCES  # the sender keeps the film and retries
    assert [kw["reason"] for kw in logger.named("dicom_refused")] == ["sop_class_not_supported", "inbox_write_failed"]
    assert visible(inbox) == []


def test_unsupported_sop_class_is_not_negotiated(node, dicom_dir, tmp_path):
    need("storescu")
    import dicom_films

    n, inbox, _ = node()
    sc = dicom_films.cr_from_picture(dicom_dir["export8"])
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    path = dicom_films.write(sc, tmp_path / "sc.dcm")
    r = storescu(n.port, [path])
    assert r.returncode != 0 and "presentation context" in r.stderr.lower()
    assert visible(inbox) == []

    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", n.port, ae_title="XRTRIAGE")
    try:
        assert assoc.is_established
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
        rejected = {c.abstract_syntax for c in assoc.rejected_contexts}
        assert accepted == {"1.2.840.10008.5.1.4.1.1.1"} and rejected == {"1.2.840.10008.5.1.4.1.1.7"}
    finally:
        assoc.release()


def test_callers_outside_the_allowlists_are_rejected(node, dicom_dir):
    need("storescu", "echoscu")
    n, inbox, logger = node(allowed_callers=["MODALITY"])
    r = storescu(n.port, [dicom_dir["native"]], aet="INTRUDER")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
    assert echoscu(n.port, aec="NOTUS").returncode != 0  # a film for another AE title is not ours
    n2, inbox2, logger2 = node(allowed_addresses=["10.0.0.0/8"])  # we call from 127.0.0.1
    assert storescu(n2.port, [dicom_dir["native"]]).returncode != 0
    assert visible(inbox) == visible(inbox2) == []
    assert [kw["reason"] for kw in logger.named("dicom_refused")] == ["calling_ae_not_allowed", "called_ae_not_ours"]
    assert [kw["address"] for kw in logger2.named("dicom_refused")] == ["127.0.0.1"]


def test_association_limit(node):
    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    n, _, logger = node(max_associations=1)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", n.port, ae_title="XRTRIAGE")
    try:
        assert first.is_established
        second = ae.associate("127.0.0.1", n.port, ae_title="XRTRIAGE")
        assert second.is_rejected
        assert first.send_c_echo().Status == 0x0000
    finally:
        first.release()
    deadline = time.monotonic() + 10  # the node's side of a released association ends a moment later
    while n.server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    third = ae.associate("127.0.0.1", n.port, ae_title="XRTRIAGE")
    assert third.is_established
    third.release()
    assert [kw["reason"] for kw in logger.named("dicom_refused")] == ["too_many_associations"]


def test_port_in_use_is_an_error_naming_it(node, tmp_path):
    from xr.core.errors import XRError

    n, _, _ = node()
    other = dn.DicomNode(DicomNodeConfig(host="127.0.0.1"), tmp_path, log=Log(), port=n.port)
    with pytest.raises(XRError, match=f"127.0.0.1:{n.port}"):
        other.open()


def test_safe_names():
    assert dn.safe_name("1.2.840.113619.2.55") == "1.2.840.113619.2.55.dcm"
    assert dn.safe_name("../../etc/passwd") == "_.._etc_passwd.dcm"
    assert dn.safe_name("") == "instance.dcm" and dn.safe_name(None) == "instance.dcm"
    assert not dn.safe_name(".hidden").startswith(".")


def test_orthanc_routes_chest_films_to_the_node(node, dicom_dir, tmp_path):
    """deploy/orthanc/route-to-xr-triage.lua in a real Orthanc: a CR film stored into Orthanc reaches the node;
    a Secondary Capture does not."""
    need("Orthanc", "storescu")
    import dicom_films
    from dicom_net import Orthanc

    n, inbox, _ = node(allowed_callers=["ORTHANC"])
    lua = Path(__file__).resolve().parent.parent / "deploy" / "orthanc" / "route-to-xr-triage.lua"
    sc = dicom_films.cr_from_picture(dicom_dir["export8"])
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    sc_path = dicom_films.write(sc, tmp_path / "sc.dcm")
    with Orthanc(
        tmp_path / "orthanc", {"xr-triage": "XRTRIAGE", "modality": "MODALITY"}, ports={"xr-triage": n.port}, lua=[lua]
    ) as pacs:
        r = storescu(pacs.dicom_port, [dicom_dir["native"], sc_path], aec="ORTHANC")
        assert r.returncode == 0, r.stderr
        uid = pydicom.dcmread(dicom_dir["native"]).SOPInstanceUID
        pacs.wait_for(lambda: (inbox / f"{uid}.dcm").exists(), timeout=60)
        time.sleep(1)
    assert visible(inbox) == [f"{uid}.dcm"]


def test_temp_files_of_cut_writes_are_removed_when_old(tmp_path):
    old = tmp_path / ".1.2.3.dcm.0123456789ab.part"
    fresh = tmp_path / ".1.2.4.dcm.0123456789ab.part"
    theirs = tmp_path / ".export.part"  # not one of ours: left alone
    for p in (old, fresh, theirs):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * dn.STALE_TEMP_S,) * 2)
    os.utime(theirs, (time.time() - 2 * dn.STALE_TEMP_S,) * 2)
    assert dn.remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, theirs.name])


def test_metrics_count_received_and_refused(tmp_path, dicom_dir):
    need("storescu")
    from xr.daemon.metrics import Metrics

    metrics = Metrics(backlog=lambda: 0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    n = dn.DicomNode(DicomNodeConfig(allowed_callers=["MODALITY"]), inbox, log=Log(), metrics=metrics, port=0)
    n.open()
    try:
        assert storescu(n.port, [dicom_dir["native"]]).returncode == 0
        assert storescu(n.port, [dicom_dir["native"]], aet="INTRUDER").returncode != 0
    finally:
        n.stop()
    text = metrics.exposition().decode()
    assert "xr_dicom_received_total 1.0" in text
    assert 'xr_dicom_refused_total{reason="calling_ae_not_allowed"} 1.0' in text
