"""The DICOM node: a storage SCP (pynetdicom) that turns each film a modality or PACS sends into a file in
the inbox, so the folder path's rules (journal before move, exactly once, cluster leases) apply unchanged.

Conformance (docs/dicom.md): Verification (C-ECHO); CR Image Storage and Digital X-Ray Image Storage - For
Presentation (C-STORE) in the transfer syntaxes core/dicom.py decodes. Any other SOP class is not negotiated
(its presentation context is rejected: abstract syntax not supported), and a C-STORE of one on an accepted
context is refused with 0x0122 (SOP class not supported). A caller outside ``dicom_node.allowed_callers``
(AE titles) or ``allowed_addresses`` is rejected at association; past ``max_associations`` open at once, a
new one is rejected as transient (local limit exceeded).

Each object is written as received (the file meta and the dataset's bytes as the peer encoded them) to a
hidden temp file in the inbox, fsynced, linked to its final name ``<SOPInstanceUID>.dcm`` (never over an
existing file: a second copy gets ``-1``, ``-2``...), and the folder fsynced; only then is Success (0x0000)
answered. So an acknowledged film survives a power cut, and a film not acknowledged is resent by its sender.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from xr.core.config import DicomNodeConfig
from xr.core.errors import XRError
from xr.core.files import apply_mode, file_mode, fsync_dir
from xr.daemon.stage import Stage

# the syntaxes core/dicom.py decodes (pydicom with pylibjpeg, GDCM, pyjpegls): uncompressed, JPEG baseline
# and lossless, JPEG-LS, JPEG 2000, RLE
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
}
VERIFICATION = "1.2.840.10008.1.1"

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700  # the inbox could not take the file (disk full, permissions): the sender retries
CANNOT_UNDERSTAND = 0xC000

_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
_OUR_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.part")  # write_new's temp names
STALE_TEMP_S = 3600.0  # a temp file this old is a write that a crash cut short (never acknowledged)


def remove_stale_temps(folder: Path, now: float | None = None) -> int:
    """Delete the temp files of writes a crash cut short (their films were never acknowledged, so their
    senders still have them); only old ones: another node on a shared inbox may be writing its own."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if _OUR_TEMP.fullmatch(entry.name):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
    return removed


def safe_name(sop_instance_uid: str | None) -> str:
    """A file name from a SOP Instance UID: UID characters only, never hidden, never empty."""
    stem = _UNSAFE.sub("_", (sop_instance_uid or "").strip())[:64].lstrip(".") or "instance"
    return f"{stem}.dcm"


def write_new(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as a new file in ``folder`` named ``name`` (or ``stem-N.dcm`` where that exists):
    hidden temp file (never read by discovery), fsync, hard link to the final name (which fails rather than
    replace a file), unlink of the temp name, fsync of the folder. Returns the final path."""
    tmp = folder / f".{name}.{secrets.token_hex(6)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode())
    try:
        apply_mode(tmp, fd=fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    stem = name[: -len(".dcm")] if name.endswith(".dcm") else name
    try:
        for n in range(10_000):
            final = folder / (name if n == 0 else f"{stem}-{n}.dcm")
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: test, then rename (one writer per name here)
                if final.exists():
                    continue
                os.rename(tmp, final)
            break
        else:
            raise OSError(f"no free name for {name} in {folder}")
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(folder)
    return final


class DicomNode(Stage):
    """The storage SCP as a stage: :meth:`open` binds the port (an error names it), the stage's steps watch
    the server, :meth:`close` stops it. Used alone: ``start()`` / ``stop()``."""

    name = "xr-dicom-node"
    idle_s = 0.5

    def __init__(self, cfg: DicomNodeConfig, inbox: Path, *, log: Any, metrics: Any = None, port: int | None = None):
        super().__init__()
        self.cfg, self.inbox, self.log = cfg, Path(inbox), log
        self.port = cfg.port if port is None else port
        self.networks = [ipaddress.ip_network(a, strict=False) for a in cfg.allowed_addresses]
        self.server = None
        self.received = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._received_c = self._refused_c = None
        if metrics is not None and getattr(metrics, "registry", None) is not None:
            from prometheus_client import Counter

            self._received_c = Counter(
                "xr_dicom_received", "Films received by C-STORE and written to the inbox", registry=metrics.registry
            )
            self._refused_c = Counter(
                "xr_dicom_refused",
                "Associations and C-STOREs refused, by reason",
                ["reason"],
                registry=metrics.registry,
            )

    # -- life cycle ---------------------------------------------------------------------------------------
    def open(self) -> int:
        """Start listening; returns the port (the one chosen when ``port`` is 0 in a test). XRError when the
        address cannot be bound."""
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.cfg.timeout_s
        ae.require_called_aet = True  # a film for another AE title is not ours
        ae.require_calling_aet = list(self.cfg.allowed_callers)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
        ]
        try:
            self.server = ae.start_server((self.cfg.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise XRError(
                f"cannot listen for DICOM on {self.cfg.host}:{self.port}: {exc.strerror or exc} "
                "(dicom_node.port / --dicom-port)"
            ) from None
        self.port = self.server.server_address[1]
        stale = remove_stale_temps(self.inbox)
        self.log.info(
            "dicom_node_listening",
            ae_title=self.cfg.ae_title,
            host=self.cfg.host,
            port=self.port,
            inbox=str(self.inbox),
            allowed_callers=list(self.cfg.allowed_callers) or "any",
            allowed_addresses=list(self.cfg.allowed_addresses) or "any",
            max_associations=self.cfg.max_associations,
            stale_temp_files_removed=stale,
        )
        return self.port

    start = open  # standalone use

    def step(self, now: float) -> bool:
        if self.server is not None and self.server.socket.fileno() == -1:
            raise RuntimeError("the DICOM storage SCP stopped listening")
        return False

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()  # stops accepting and closes the socket; associations in flight finish
            self.log.info("dicom_node_stopped", received=self.received, refused=self.refused)

    def stop(self) -> None:
        self.halt.set()
        self.close()

    # -- handlers (pynetdicom's threads) ----------------------------------------------------------------
    def _refuse(self, reason: str, **fields: Any) -> None:
        with self._lock:
            self.refused += 1
        if self._refused_c is not None:
            self._refused_c.labels(reason).inc()
        self.log.warning("dicom_refused", reason=reason, **fields)

    def _on_requested(self, event: Any) -> None:
        """Addresses outside the allowlist: A-ASSOCIATE-RJ, rejected permanent, no reason given."""
        if not self.networks:
            return
        address = event.assoc.requestor.address
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if ip is None or not any(ip in net for net in self.networks):
            self._refuse("address_not_allowed", address=address, calling_ae=event.assoc.requestor.ae_title)
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)

    def _on_rejected(self, event: Any) -> None:
        rq = event.assoc.requestor
        called = event.assoc.acceptor.primitive
        diagnostic = getattr(called, "diagnostic", None) if called is not None else None
        reason = {0x03: "calling_ae_not_allowed", 0x07: "called_ae_not_ours", 0x02: "too_many_associations"}.get(
            diagnostic, "rejected"
        )
        if reason != "rejected" or diagnostic != 0x01:
            self._refuse(reason, address=rq.address, calling_ae=rq.ae_title)

    def _on_echo(self, event: Any) -> int:
        self.log.info("dicom_echo", calling_ae=event.assoc.requestor.ae_title, address=event.assoc.requestor.address)
        return SUCCESS

    def _on_store(self, event: Any) -> int:
        t0 = time.perf_counter()
        rq = event.request
        sop_class = str(rq.AffectedSOPClassUID)
        uid = str(rq.AffectedSOPInstanceUID or "")
        peer = event.assoc.requestor
        if sop_class not in STORAGE_CLASSES:
            self._refuse("sop_class_not_supported", sop_class=sop_class, calling_ae=peer.ae_title)
            return SOP_CLASS_NOT_SUPPORTED
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a dataset pynetdicom cannot hand over is refused, not a crash
            self._refuse("unreadable", error=f"{type(exc).__name__}: {exc}", calling_ae=peer.ae_title)
            return CANNOT_UNDERSTAND
        try:
            path = write_new(self.inbox, safe_name(uid), data)
        except OSError as exc:
            self._refuse("inbox_write_failed", error=str(exc.strerror or exc), inbox=str(self.inbox))
            return OUT_OF_RESOURCES
        with self._lock:
            self.received += 1
        if self._received_c is not None:
            self._received_c.inc()
        self.log.info(
            "dicom_received",
            file=path.name,
            sop_instance_uid=uid,
            sop_class=STORAGE_CLASSES[sop_class],
            transfer_syntax=str(event.context.transfer_syntax),
            calling_ae=peer.ae_title,
            address=peer.address,
            bytes=len(data),
            ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return SUCCESS
