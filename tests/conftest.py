"""Shared fixtures: the committed image fixtures, ../shared when present, a small real checkpoint,
and an autouse guard that fails a test which leaves threads running."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from xr.core.config import load_recipe
from xr.core.model import checkpoint_meta, create_model, save_checkpoint
from xr.core.preprocessing import Preset

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        leaked += [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("xr-")]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def xray_paths() -> list[Path]:
    """The 27 committed 224x224 training images (NORMAL first)."""
    return sorted((FIXTURES / "chest_xray" / "train").glob("*/*.jpeg"))


@pytest.fixture(scope="session")
def fullres_paths() -> list[Path]:
    return sorted((FIXTURES / "fullres").glob("*/*.jpeg"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared, or skip: `make test` must pass on a fresh clone without it. XR_REQUIRE_SHARED=1 turns
    the skip into a failure, for a machine where those checks must not be skipped silently."""
    need = SHARED / "data" / "chest_xray" / "train"
    if not need.is_dir():
        if os.environ.get("XR_REQUIRE_SHARED") == "1":
            pytest.fail(f"{need} is missing, and XR_REQUIRE_SHARED=1")
        pytest.skip(f"{need} not present (../shared: the full dataset and full-resolution samples)")
    return SHARED


PG_ADMIN = os.environ.get("XR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _pg_answers(url: str) -> str | None:
    """None when something listens where ``url`` points; else why not (the one reason the PostgreSQL tests
    may skip). Whatever happens after a server answers (bad auth, a broken driver) is a failure."""
    import socket

    from sqlalchemy.engine import make_url

    u = make_url(url)
    host = u.host or u.query.get("host") or "/var/run/postgresql"
    host = host if isinstance(host, str) else host[0]
    port = u.port or 5432
    try:
        if host.startswith("/"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(3)
                s.connect(f"{host}/.s.PGSQL.{port}")
        else:
            socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"no PostgreSQL server answers at {host}:{port} ({exc.strerror or type(exc).__name__})"
    return None


@pytest.fixture()
def pg_url():
    """A fresh PostgreSQL database for one test (dropped after), on the server at $XR_TEST_PG (default the
    local one, trust auth). Skipped, naming the address, only where no server answers there; a failure
    instead under XR_REQUIRE_PG=1 (CI). A server that answers but refuses us, or a driver that does not
    load, always fails."""
    import uuid

    from sqlalchemy import create_engine, text

    missing = _pg_answers(PG_ADMIN)
    if missing:
        if os.environ.get("XR_REQUIRE_PG") == "1":
            pytest.fail(f"{missing}, and XR_REQUIRE_PG=1 ($XR_TEST_PG={PG_ADMIN})")
        pytest.skip(f"{missing}: the PostgreSQL tests skip ($XR_TEST_PG={PG_ADMIN})")
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})
    name = f"xr_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    """The results database on each backend: a SQLite file, and a PostgreSQL database where a server answers."""
    if request.param == "sqlite":
        return str(tmp_path / "results.sqlite")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def dicom_dir(tmp_path_factory, xray_paths) -> dict[str, Path]:
    """DICOM films (tests/dicom_films.py): the CR chest in every transfer syntax, its MONOCHROME2 twin, a
    12-bit windowed film with its 8-bit export, and out-of-scope objects."""
    import dicom_films

    folder = tmp_path_factory.mktemp("dicom")
    films = dicom_films.chest_films(folder)
    export8 = xray_paths[-1]
    films["export8"] = export8
    films["windowed12"] = dicom_films.from_8bit(export8, folder, "windowed12.dcm")
    films.update(dicom_films.out_of_scope(folder, export8))
    return films


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real checkpoint (ImageNet Lite0 backbone, seeded head) with a calibration file beside it.

    Its predictions are not meaningful, but every path through loading, preprocessing and calibrated
    prediction is the product's own.
    """
    out = tmp_path_factory.mktemp("tiny_model")
    cfg = load_recipe()
    torch.manual_seed(0)
    model = create_model(cfg.model.arch, pretrained=True)
    # create_model zero-inits the head (p = 0.5 for every image); a seeded random head makes the
    # predictions differ between images, so tests can see a wrong preprocessing or calibration.
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.randn_like(model.get_classifier().weight) * 0.05)
    meta = checkpoint_meta(cfg.model.arch, Preset.from_config(cfg.preprocess), cfg.to_dict(), {"fixture": True})
    save_checkpoint(out / "xr_mvp_best.pt", model, meta)
    (out / "calibration_threshold.json").write_text(json.dumps({"T": 1.5, "threshold": 0.5, "objective": "f1"}))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir) -> Path:
    return tiny_model_dir / "xr_mvp_best.pt"
