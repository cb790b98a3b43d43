"""The real DICOM parts the network tests talk to: Orthanc as the PACS (Debian package ``orthanc``), started
on free ports with its own configuration and storage folder, and dcmtk's ``storescu``/``echoscu`` (Debian
package ``dcmtk``) as the modality. Where a binary is missing the tests skip saying so; XR_REQUIRE_DICOM=1
turns that skip into a failure."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install orthanc dcmtk"


def need(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing:
        return
    why = f"{', '.join(missing)} not installed ({INSTALL_HINT}): the DICOM network tests cannot run"
    if os.environ.get("XR_REQUIRE_DICOM") == "1":
        pytest.fail(f"{why}, and XR_REQUIRE_DICOM=1")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# storescu proposes uncompressed syntaxes unless told: the option that proposes each film's own syntax
STORESCU_SYNTAX = {"rle": "-xr", "jpegls": "-xt", "j2k": "-xv", "jpeg_lossless": "-xs", "jpeg_baseline": "-xy"}


def storescu(
    port: int, files: list[Path], *, aet: str = "MODALITY", aec: str = "XRTRIAGE", syntax: str | None = None
) -> subprocess.CompletedProcess:
    cmd = ["storescu", "-R", "-aet", aet, "-aec", aec, *([syntax] if syntax else []), "127.0.0.1", str(port)]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)


def echoscu(port: int, *, aet: str = "MODALITY", aec: str = "XRTRIAGE") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60
    )


class Orthanc:
    """An Orthanc of the test's own: REST on ``http_port``, DICOM on ``dicom_port`` (AE ``ORTHANC``); it
    takes C-STOREs only from the AE titles in ``modalities`` (name -> AET)."""

    def __init__(
        self,
        folder: Path,
        modalities: dict[str, str],
        aet: str = "ORTHANC",
        *,
        ports: dict[str, int] | None = None,
        lua: list[Path] = (),
    ):
        need("Orthanc")
        self.folder, self.aet = Path(folder), aet
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = self.folder / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "xr-test",
                    "StorageDirectory": str(self.folder / "storage"),
                    "IndexDirectory": str(self.folder / "storage"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": aet,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": True,
                    "DicomAlwaysAllowStore": False,  # only the modalities below may store
                    "DicomModalities": {
                        name: [title, "127.0.0.1", (ports or {}).get(name, 104)] for name, title in modalities.items()
                    },
                    "LuaScripts": [str(p) for p in lua],
                    "Plugins": [],
                    "ConcurrentJobs": 1,
                    "HttpThreadsCount": 4,
                },
                indent=2,
            )
        )
        self.proc: subprocess.Popen | None = None

    @property
    def destination(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def start(self, timeout: float = 60) -> Orthanc:
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=log, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- REST ----------------------------------------------------------------------------------------------
    def _call(self, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def get(self, path: str):
        return json.loads(self._call(path))

    def find(self, **query: str) -> list[str]:
        """Orthanc ids of the instances matching a query on DICOM keywords."""
        body = json.dumps({"Level": "Instance", "Query": query}).encode()
        return json.loads(self._call("/tools/find", body))

    def instances(self) -> list[str]:
        return self.get("/instances")

    def file(self, orthanc_id: str) -> bytes:
        return self._call(f"/instances/{orthanc_id}/file")

    def tags(self, orthanc_id: str) -> dict:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def wait_for(self, predicate, timeout: float = 60, every: float = 0.25):
        """Poll ``predicate()`` until it returns something truthy; that value, or AssertionError."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
            time.sleep(every)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
