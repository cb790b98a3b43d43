"""config.yaml, what an operator sets: read by xr-daemon, and in part by xr-results, xr-review and
xr-score (each section's ``ALSO_READ_BY``/``READ_BY``): its sections and the file ``Settings``. Loaded by
core/config.py ``load_settings``."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import (
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

from xr.core.config_base import Fraction, Number, Section, _File, _yaml_false_as


class DaemonConfig(Section):
    # The decode limits (core/intake.py DecodeLimits) are read by every program that decodes for the site.
    ALSO_READ_BY = {
        "watch": "xr-results (retry)",
        "output": "xr-results, xr-review",
        "db": "xr-results, xr-review",
        "model": "xr-score, xr-results (backup)",
        "calibration": "xr-results (backup)",
        "max_file_mb": "xr-score, xr-review",
        "max_pixels": "xr-score, xr-review",
    }

    watch: StrictStr | None = Field(None, description="inbox folder to watch; null: --watch is required")
    output: StrictStr | None = Field(
        None,
        description="folder for results.sqlite, processed/, failed/, csv/; null: the user's data folder (docs/operations.md)",
    )
    db: StrictStr | None = Field(
        None, description="results database, a path or SQLAlchemy URL; null: <output>/results.sqlite"
    )
    model: StrictStr | None = Field(None, description="checkpoint; null: the shipped model (package data)")
    calibration: StrictStr | None = Field(
        None,
        description="calibration file, e.g. a site's from xr-train site-calibrate; null: the one beside the checkpoint",
    )
    reload_s: Number = Field(
        2.0, gt=0, description="how often the checkpoint and calibration files are checked for changes, seconds"
    )
    device: StrictStr = Field("auto", description="auto (cuda, then mps, then cpu) | cuda | cuda:N | mps | cpu")
    batch_size: StrictInt = Field(0, ge=0, description="files per forward; 0 = choose by device (docs/design.md)")
    max_wait_ms: StrictInt = Field(50, ge=0, description="a batch closes this long after its first file, if not full")
    stable_ms: StrictInt = Field(
        500, ge=0, description="a file written in place is ready once size and mtime are unchanged this long"
    )
    incomplete_grace_s: Number = Field(
        60.0,
        ge=0,
        description="a file that reads as cut short (empty, truncated) is watched this long after its last change before it is an error",
    )
    rescan_s: Number = Field(5.0, gt=0, description="full inbox scan interval, seconds (file events are only hints)")
    poll: StrictBool = Field(False, description="polling observer, for network shares that send no file events")
    decode_workers: StrictInt = Field(0, ge=0, description="decode threads; 0 = choose by cores and device")
    torch_threads: StrictInt = Field(0, ge=0, description="model threads on the CPU; 0 = choose")
    cuda_graphs: StrictBool = Field(True, description="on CUDA, replay the forward as one CUDA graph")
    cpu_trace: StrictBool = Field(
        True, description="on the CPU, run the forward as a TorchScript trace (bitwise the same logits)"
    )
    on_success: Literal["move", "leave"] = Field(
        "move", description="scored files: move to <output>/processed/, or leave in place"
    )
    on_error: Literal["move", "leave"] = Field(
        "move", description="unreadable files: move to <output>/failed/, or leave in place"
    )
    on_skipped: Literal["move", "leave"] = Field(
        "move", description="DICOM objects out of scope (dicom.*): move to <output>/skipped/, or leave in place"
    )
    dedupe: StrictBool = Field(
        True, description="content already scored gets a duplicate row instead of a second inference"
    )
    max_file_mb: Number = Field(512.0, gt=0, description="larger files get an error row without being read")
    max_pixels: StrictInt = Field(
        30_000_000,
        ge=1,
        description="decompression-bomb guard: images with more pixels get an error row before they are decoded. "
        "The largest chest detectors (43 x 43 cm at 80 um: 29 MP) fit; a decode at the limit peaks near 20 bytes "
        "a pixel (600 MB), so a 2-core 24 GB host runs several decode threads and a batch with room to spare",
    )
    log_format: Literal["json", "console"] = Field(
        "json", description="log lines on stderr: JSON objects, or human-readable"
    )
    heartbeat_s: Number = Field(
        60.0, gt=0, description="interval of the heartbeat log event (backlog, rows since the last one)"
    )
    worker_id: StrictStr | None = Field(
        None, description="this daemon's name in results.worker_id and the leases; null: host name and process id"
    )
    lease_s: Number = Field(
        60.0,
        gt=0,
        description="a claimed file's lease: a worker that stops renewing it for this long loses the file to the others",
    )
    metrics_port: StrictInt = Field(
        0, ge=0, le=65535, description="port of /metrics (Prometheus) and /healthz; 0 = off"
    )
    metrics_host: StrictStr = Field("127.0.0.1", description="address /metrics and /healthz bind to")
    heatmaps: Annotated[Literal["flagged", "all", "none"], _yaml_false_as("none")] = Field(
        "flagged",
        description="Grad-CAM heatmaps under <output>/heatmaps/: for flagged films, all scored films, or none (off)",
    )
    heatmap_every_s: Number = Field(
        1.0, gt=0, description="how often the heatmap thread looks for films without one, seconds"
    )


class DicomConfig(Section):
    """Which DICOM objects are scored; anything else gets a ``skipped`` row with the reason."""

    ALSO_READ_BY = dict.fromkeys(("modalities", "body_parts", "window"), "xr-score, xr-review")

    modalities: list[StrictStr] = Field(
        ["CR", "DX"], min_length=1, description="Modality values scored (chest radiographs: CR, DX)"
    )
    body_parts: list[StrictStr] = Field(
        ["CHEST"], min_length=1, description="BodyPartExamined values scored, when the tag is present"
    )
    window: StrictInt = Field(
        0, ge=0, description="which window (VOI LUT or center/width) of a file with several to apply"
    )


class OutputConfig(Section):
    """Who may read what the programs write under the output folder (docs/security.md)."""

    ALSO_READ_BY = {"group": "xr-review, xr-score"}

    group: StrictStr | None = Field(
        None,
        description="null: what xr-daemon, xr-review and xr-score create (database, films, heatmaps, CSVs, "
        "folders) is private to their account whatever the umask (0600, 0700); a group name: readable by that "
        "group too (0640, 0750)",
    )


class CsvConfig(Section):
    rotation: Literal["daily", "rows"] = Field(
        "daily", description="daily: results-YYYY-MM-DD.csv; rows: results-NNNNNN.csv of max_rows"
    )
    max_rows: StrictInt = Field(10_000, ge=1, description="rows per file with rotation rows")
    dicom_identifiers: StrictBool = Field(
        True, description="write the DICOM identifier columns (patient_id, accession_number, ...) to the CSVs"
    )


class ReviewConfig(Section):
    """xr-review's sign-in (docs/security.md; addresses and TLS are flags) and the audit sample it reads."""

    READ_BY = dict.fromkeys(("idle_timeout_min", "failed_logins", "lockout_min", "allowed_hosts"), "xr-review")

    idle_timeout_min: Number = Field(
        30.0, gt=0, le=1440, description="xr-review: a session unused this long ends (sign in again), minutes"
    )
    failed_logins: StrictInt = Field(
        5, ge=1, description="xr-review: failed logins for one name (x4 from one address) before its logins pause"
    )
    lockout_min: Number = Field(
        15.0, gt=0, description="xr-review: the window failed logins count in, and the pause, minutes"
    )
    allowed_hosts: list[StrictStr] = Field(
        [], description="xr-review: Host names served besides the loopback ones (as --allowed-host)"
    )
    audit_rate: Fraction = Field(
        0.02,
        description="xr-daemon: share of unflagged films drawn at random when scored for a blinded review "
        "(audit cases: what the flag misses; xr-results performance)",
    )


Days = Annotated[int | None, Strict(), Field(ge=0)]


class RetentionConfig(Section):
    """How long what the daemon writes is kept (results/retention.py; docs/operations.md, "Retention"). 0 or
    null keeps it for ever. Cases on the reading list (flagged or audit, not yet reviewed), claimed rows and
    films not yet moved are never deleted; the audit trail is not touched."""

    ALSO_READ_BY = dict.fromkeys(
        ("processed_days", "failed_days", "heatmaps_days", "csv_days", "rows_days"), "xr-results"
    )

    processed_days: Days = Field(None, description="films in processed/, days after scoring")
    failed_days: Days = Field(None, description="films in failed/ and skipped/, days after their row")
    heatmaps_days: Days = Field(None, description="heatmaps/ and the film's thumbnails/, days after scoring")
    csv_days: Days = Field(None, description="results-*.csv files, days after their last write")
    rows_days: Days = Field(
        None, description="result rows (with their reviews, sent outbox items, film and heatmap), days after scoring"
    )


AE_TITLE = re.compile(r"[ -\[\]-~]{1,16}")  # PS3.5 AE: up to 16 printable characters, no backslash
DESTINATION = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\s]+):(?P<port>\d{1,5})")


def _check_ae(key: str, value: str) -> None:
    if not AE_TITLE.fullmatch(value) or not value.strip():
        raise ValueError(f"{key}: {value!r} is not an AE title (1 to 16 printable characters, no backslash)")


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (AE title, host, port); ValueError naming the value otherwise."""
    m = DESTINATION.fullmatch(text.strip())
    port = int(m.group("port")) if m else 0
    if m is None or not 1 <= port <= 65535 or not AE_TITLE.fullmatch(m.group("aet")):
        raise ValueError(f"{text!r} is not a DICOM destination: expected AET@HOST:PORT, e.g. ORTHANC@pacs.local:4242")
    return m.group("aet"), m.group("host").strip("[]"), port


class DicomNodeConfig(Section):
    """The DICOM node (docs/dicom.md): a storage SCP that writes the films it receives into the inbox."""

    port: StrictInt = Field(0, ge=0, le=65535, description="port the storage SCP listens on; 0 = off (--dicom-port)")
    host: StrictStr = Field("0.0.0.0", description="address the storage SCP binds to")
    ae_title: StrictStr = Field("XRTRIAGE", description="this node's AE title (--ae-title)")
    allowed_callers: list[StrictStr] = Field(
        [], description="calling AE titles accepted; empty = any (then allowed_addresses should be set)"
    )
    allowed_addresses: list[StrictStr] = Field(
        [], description="peer IP addresses or networks (CIDR) accepted; empty = any"
    )
    max_associations: StrictInt = Field(8, ge=1, le=256, description="associations open at once; more are rejected")
    timeout_s: Number = Field(30.0, gt=0, description="network, ACSE and DIMSE timeouts, seconds")

    @model_validator(mode="after")
    def _check(self):
        _check_ae("ae_title", self.ae_title)
        for caller in self.allowed_callers:
            _check_ae("allowed_callers", caller)
        for address in self.allowed_addresses:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(
                    f"allowed_addresses: {address!r} is not an IP address or network (e.g. 10.1.2.3, 10.1.0.0/16)"
                ) from None
        return self


class DicomSendConfig(Section):
    """Results back to the PACS (docs/dicom.md): an SR per scored DICOM film, an SC per flagged one, by C-STORE."""

    destinations: list[StrictStr] = Field(
        [], description="where to send, each AET@HOST:PORT (--send-results); empty = off"
    )
    secondary_capture: StrictBool = Field(
        True, description="also send a Secondary Capture with the heatmap of flagged films"
    )
    retry_initial_s: Number = Field(
        5.0, gt=0, description="wait after the first failed send, doubling with each failure"
    )
    retry_max_s: Number = Field(300.0, gt=0, description="longest wait between two attempts, seconds")
    give_up_after_s: Number = Field(
        86_400.0, gt=0, description="an object not accepted this long after it was queued is marked failed"
    )
    timeout_s: Number = Field(30.0, gt=0, description="connect, ACSE and DIMSE timeouts of a send, seconds")

    @model_validator(mode="after")
    def _check(self):
        for d in self.destinations:
            try:
                parse_destination(d)
            except ValueError as exc:
                raise ValueError(f"destinations: {exc}") from None
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(f"retry_max_s: {self.retry_max_s:g} is below retry_initial_s ({self.retry_initial_s:g})")
        return self


class Settings(_File):
    """config.yaml: the operator's settings."""

    FILE = "config.yaml"
    READERS = "xr-daemon"
    daemon: DaemonConfig = DaemonConfig()
    dicom: DicomConfig = DicomConfig()
    csv: CsvConfig = CsvConfig()
    output: OutputConfig = OutputConfig()
    review: ReviewConfig = ReviewConfig()
    dicom_node: DicomNodeConfig = DicomNodeConfig()
    dicom_send: DicomSendConfig = DicomSendConfig()
    retention: RetentionConfig = RetentionConfig()
