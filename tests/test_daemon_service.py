"""daemon/service.py in-process: run limits, reconcile after a crash, leave mode, one instance per output."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from xr.core.config import SHIPPED_MODEL, load_settings
from xr.core.logs import configure_logging
from xr.core.paths import model_path
from xr.core.predict import Predictor
from xr.daemon.locks import lock_dir
from xr.daemon.plan import RunPlan, plan_run
from xr.daemon.service import Service
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(autouse=True)
def restore_globals():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cfg(**kw):
    ov = {
        "daemon.stable_ms": 100,
        "daemon.rescan_s": 0.3,
        "daemon.device": "cpu",
        "daemon.batch_size": 4,
    }
    ov.update({f"daemon.{k}": v for k, v in kw.items()})
    return load_settings(overrides=ov)


def _inbox(tmp_path, paths):
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    for p in paths:
        shutil.copy(p, inbox / p.name)
        os.utime(inbox / p.name, (1, 1))  # long settled
    return inbox


def _svc(tmp_path, predictor, cfg=None, **kw):
    log = configure_logging("json", stream=open(os.devnull, "w"))
    return Service(cfg or _cfg(), watch=tmp_path / "inbox", output=tmp_path / "out", predictor=predictor, log=log, **kw)


def _rows(tmp_path):
    con = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("select * from results order by id")]
    con.close()
    return rows


def test_idle_timeout_run_processes_everything(tmp_path, predictor, xray_paths):
    _inbox(tmp_path, xray_paths[:5])
    assert _svc(tmp_path, predictor).run(idle_timeout=0.5) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 5 and {r["status"] for r in rows} == {"ok"}
    assert all(r["moved_at"] and os.path.exists(r["moved_to"]) for r in rows)
    assert not list((tmp_path / "inbox").iterdir())


def test_max_batches_then_restart_redoes_only_unfinished(tmp_path, predictor, xray_paths):
    _inbox(tmp_path, xray_paths[:10])
    assert _svc(tmp_path, predictor).run(max_batches=1) == 0
    first = _rows(tmp_path)
    done = [r for r in first if r["status"] == "ok"]
    assert 1 <= len(done) <= 4
    assert _svc(tmp_path, predictor).run(idle_timeout=0.5) == 0
    rows = _rows(tmp_path)
    assert sorted(r["filename"] for r in rows) == sorted(p.name for p in xray_paths[:10])
    assert {r["status"] for r in rows} == {"ok"}
    for r in done:  # not redone
        assert next(x for x in rows if x["id"] == r["id"])["batch_id"] == r["batch_id"]


def test_reconcile_after_crash(tmp_path, predictor, xray_paths):
    inbox = _inbox(tmp_path, xray_paths[:2])
    grown = inbox / "grown.jpeg"  # claimed half-written; its writer finished it while the daemon was down
    grown.write_bytes(xray_paths[2].read_bytes())
    os.utime(grown, (1, 1))
    out = tmp_path / "out"
    eng = make_engine(out / "results.sqlite")
    t = dt.datetime(2026, 1, 1)
    a, b = inbox / xray_paths[0].name, inbox / xray_paths[1].name
    sa, sb = os.lstat(a), os.lstat(b)
    (out / "processed").mkdir(parents=True)
    os.link(b, out / "processed" / b.name)  # b: died between link and unlink
    with session_factory(eng).begin() as s:
        # committed, move not started
        s.add(
            Result(
                path=str(a),
                filename=a.name,
                size_bytes=sa.st_size,
                mtime_ns=sa.st_mtime_ns,
                sha256="a",
                status=Status.OK,
                received_at=t,
                claimed_at=t,
                processed_at=t,
                moved_to=str(out / "processed" / a.name),
            )
        )
        # committed, half moved
        s.add(
            Result(
                path=str(b),
                filename=b.name,
                size_bytes=sb.st_size,
                mtime_ns=sb.st_mtime_ns,
                sha256="b",
                status=Status.OK,
                received_at=t,
                claimed_at=t,
                processed_at=t,
                moved_to=str(out / "processed" / b.name),
            )
        )
        # claimed, then the file was taken away
        s.add(
            Result(
                path=str(inbox / "gone.png"),
                filename="gone.png",
                size_bytes=1,
                mtime_ns=1,
                sha256=None,
                status=Status.CLAIMED,
                received_at=t,
                claimed_at=t,
            )
        )
        s.add(
            Result(
                path=str(grown),
                filename=grown.name,
                size_bytes=1000,
                mtime_ns=5,
                sha256=None,
                status=Status.CLAIMED,
                received_at=t,
                claimed_at=t,
            )
        )
    eng.dispose()
    assert _svc(tmp_path, predictor).run(idle_timeout=0.5) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 4  # nothing processed twice; the grown file has one row, of its whole bytes
    assert [(r["filename"], r["status"]) for r in rows] == [
        (a.name, "ok"),
        (b.name, "ok"),
        ("gone.png", "error"),
        ("grown.jpeg", "ok"),
    ]
    assert rows[2]["error"] == "file left the inbox before it was processed"
    assert rows[3]["size_bytes"] == len(xray_paths[2].read_bytes())
    assert sorted(p.name for p in (out / "processed").iterdir()) == sorted([a.name, b.name, "grown.jpeg"])  # no -1 copy
    assert not list(inbox.iterdir())


def test_leave_mode_keeps_files_and_does_not_redo(tmp_path, predictor, xray_paths):
    _inbox(tmp_path, xray_paths[:2])
    cfg = _cfg(on_success="leave")
    assert _svc(tmp_path, predictor, cfg).run(idle_timeout=0.8) == 0
    assert _svc(tmp_path, predictor, cfg).run(idle_timeout=0.8) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 2 and all(r["moved_to"] is None for r in rows)
    assert len(list((tmp_path / "inbox").iterdir())) == 2


def test_one_instance_per_output(tmp_path, predictor, xray_paths):
    _inbox(tmp_path, [])
    first = _svc(tmp_path, predictor)
    started = threading.Event()
    first.log = configure_logging("json", stream=open(os.devnull, "w"))
    t = threading.Thread(target=lambda: (first.run(idle_timeout=None), started.set()), name="svc-first")
    t.start()
    try:
        import time

        deadline = time.monotonic() + 60
        while not (tmp_path / "out" / ".xr-daemon.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert _svc(tmp_path, predictor).run(idle_timeout=0.1) == 2
    finally:
        first.handle_signal(15)
        t.join(60)
    assert first.exit_code == 0


def test_helpers(tmp_path):
    auto = _cfg().daemon.model_copy(update={"decode_workers": 0, "torch_threads": 0, "batch_size": 0})
    assert plan_run(auto, "cpu", cpus=2) == RunPlan(decode_workers=1, torch_threads=2, batch_size=4)
    assert plan_run(auto, "cpu", cpus=16) == RunPlan(decode_workers=4, torch_threads=16, batch_size=4)
    # a bf16 CPU model is about as cheap as decoding: the decoders get cores of their own; its activations
    # are half the size, so twice the batch fits the same working set
    assert plan_run(auto, "cpu", cpus=2, bf16=True) == RunPlan(decode_workers=1, torch_threads=1, batch_size=8)
    assert plan_run(auto, "cpu", cpus=16, bf16=True) == RunPlan(decode_workers=4, torch_threads=12, batch_size=8)
    # CUDA graphs: one call per batch, so decoders can have all but 2 cores; eager launches need the GIL
    assert plan_run(auto, "cuda", cpus=16, bf16=True) == RunPlan(decode_workers=14, torch_threads=16, batch_size=32)
    assert plan_run(auto, "cuda", cpus=16) == RunPlan(decode_workers=14, torch_threads=16, batch_size=32)
    assert plan_run(auto, "cuda", cpus=2) == RunPlan(decode_workers=1, torch_threads=2, batch_size=32)
    assert plan_run(auto, "cuda", cpus=64).decode_workers == 14  # larger hosts are not measured
    eager = auto.model_copy(update={"cuda_graphs": False})
    assert plan_run(eager, "cuda", cpus=16) == RunPlan(decode_workers=8, torch_threads=16, batch_size=8)
    assert plan_run(auto, "cuda", cpus=16, cuda_graph=False).decode_workers == 8  # the capture failed
    assert plan_run(auto, "mps", cpus=12) == RunPlan(decode_workers=8, torch_threads=12, batch_size=8)
    fixed = auto.model_copy(update={"decode_workers": 3, "torch_threads": 1, "batch_size": 16})
    assert plan_run(fixed, "cpu", cpus=8) == RunPlan(decode_workers=3, torch_threads=1, batch_size=16)
    assert plan_run(fixed, "cpu", cpus=8, bf16=True) == RunPlan(decode_workers=3, torch_threads=1, batch_size=16)
    assert plan_run(fixed, "cuda", cpus=8) == RunPlan(decode_workers=3, torch_threads=1, batch_size=16)
    assert model_path(_cfg()) == SHIPPED_MODEL and SHIPPED_MODEL.is_file()  # the packaged model by default
    assert model_path(_cfg(), "models/x.pt") == (Path.cwd() / "models" / "x.pt")  # a flag: from the current folder
    assert model_path(_cfg(model=str(tmp_path / "m.pt"))) == tmp_path / "m.pt"
    svc = Service(
        _cfg(),
        watch=tmp_path / "missing",
        output=tmp_path / "out",
        model=tmp_path / "none.pt",
        log=configure_logging("json", stream=open(os.devnull, "w")),
    )
    assert svc.run() == 2  # a missing inbox is a clear error, not a traceback


@pytest.mark.parametrize(
    "device, method, event, flag",
    [
        ("cuda", "capture_cuda_graph", "cuda_graph_unavailable", "cuda_graph"),
        ("cpu", "trace_forward", "cpu_trace_unavailable", "cpu_trace"),
    ],
)
def test_compiled_forward_failure_falls_back_to_eager(tmp_path, predictor, device, method, event, flag):
    """A GPU that cannot capture a CUDA graph, or a model whose CPU trace fails or scores differently, still
    gets a working daemon: a warning, then eager batches."""
    import io
    import json

    def refuse(self, batch_size):
        raise RuntimeError(f"{method} refused on this device")

    NoCompile = type("NoCompile", (Predictor,), {"warmup": lambda self, batch_size=1: None, method: refuse})
    fake = NoCompile(predictor.model, predictor.meta, predictor.calibration, device="cpu")
    fake.device = torch.device(device)  # only its type is read before the first batch
    stream = io.StringIO()
    svc = Service(
        _cfg(), watch=tmp_path, output=tmp_path / "out", predictor=fake, log=configure_logging("json", stream=stream)
    )
    assert svc.load_predictor() is fake and not fake.has_cuda_graph and not fake.has_trace
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    warn = next(e for e in events if e["event"] == event)
    assert warn["level"] == "warning" and "refused on this device" in warn["reason"]
    assert next(e for e in events if e["event"] == "model_ready")[flag] is False


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_thread_plan_follows_the_model_precision(tmp_path, predictor, monkeypatch, bf16):
    """Beside a bf16 model the decoder keeps a core: torch runs on the cores the decoders leave, and the
    batch doubles (half-size activations, the same working set)."""
    monkeypatch.setattr("xr.daemon.plan.usable_cpus", lambda: 2)
    pred = Predictor(predictor.model, predictor.meta, predictor.calibration, device="cpu", amp="off")
    pred.bf16 = bf16
    pred.warmup = lambda batch_size=1: None  # the plan, not the forward, is under test
    svc = _svc(tmp_path, pred, cfg=_cfg(decode_workers=0, torch_threads=0, batch_size=0, cpu_trace=False))
    svc.load_predictor()
    assert svc.plan == RunPlan(decode_workers=1, torch_threads=1 if bf16 else 2, batch_size=8 if bf16 else 4)
    assert torch.get_num_threads() == svc.plan.torch_threads


@pytest.mark.parametrize("cpu_trace", [True, False])
def test_cpu_trace_follows_the_config(tmp_path, tiny_checkpoint, xray_paths, cpu_trace):
    """On CPU the service runs the traced forward unless `daemon.cpu_trace` is off, and scores alike."""
    import io
    import json

    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    stream = io.StringIO()
    _inbox(tmp_path, xray_paths[:3])
    svc = Service(
        _cfg(cpu_trace=cpu_trace),
        watch=tmp_path / "inbox",
        output=tmp_path / "out",
        predictor=pred,
        log=configure_logging("json", stream=stream),
    )
    assert svc.run(idle_timeout=1.0) == 0
    assert pred.has_trace is cpu_trace
    ready = next(json.loads(x) for x in stream.getvalue().splitlines() if '"model_ready"' in x)
    assert ready["cpu_trace"] is cpu_trace
    eager = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    want = {p.name: r.logit for p, r in zip(xray_paths[:3], eager.predict_paths(xray_paths[:3]))}
    assert {r["filename"]: r["logit"] for r in _rows(tmp_path)} == pytest.approx(want, abs=1e-5)


def test_inbox_inside_or_equal_to_the_output_folder(tmp_path, predictor, xray_paths):
    """An inbox may sit inside the output folder or be it: its files are scored, and what the daemon
    writes (processed/, failed/, csv/) is never read back as input."""
    for name, inbox in (("inside", tmp_path / "out" / "inbox"), ("same", tmp_path / "out")):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        inbox.mkdir(parents=True)
        for p in xray_paths[:3]:
            shutil.copy(p, inbox / p.name)
            os.utime(inbox / p.name, (1, 1))
        log = configure_logging("json", stream=open(os.devnull, "w"))
        svc = Service(_cfg(), watch=inbox, output=tmp_path / "out", predictor=predictor, log=log)
        assert svc.run(idle_timeout=0.8) == 0, name
        rows = _rows(tmp_path)
        assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}, name
        assert len(list((tmp_path / "out" / "processed").rglob("*.jpeg"))) == 3, name


def test_inbox_inside_processed_is_refused(tmp_path, predictor):
    (tmp_path / "out" / "processed").mkdir(parents=True)
    log = configure_logging("json", stream=open(os.devnull, "w"))
    svc = Service(_cfg(), watch=tmp_path / "out" / "processed", output=tmp_path / "out", predictor=predictor, log=log)
    assert svc.run(idle_timeout=0.3) == 2


def test_fifo_and_dangling_symlink_become_error_rows(tmp_path, predictor, xray_paths):
    """Neither blocks nor is retried for ever: each gets an error row naming why, and goes to failed/."""
    inbox = _inbox(tmp_path, xray_paths[:1])
    os.mkfifo(inbox / "pipe.png")
    (inbox / "dangling.png").symlink_to(inbox / "missing.png")
    assert _svc(tmp_path, predictor, once=True).run() == 0
    rows = {r["filename"]: r for r in _rows(tmp_path)}
    assert rows[xray_paths[0].name]["status"] == "ok"
    assert rows["pipe.png"]["status"] == "error" and "not a regular file (a FIFO)" in rows["pipe.png"]["error"]
    assert rows["dangling.png"]["status"] == "error" and "symlink target not found" in rows["dangling.png"]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "failed").iterdir()) == ["dangling.png", "pipe.png"]
    assert not list(inbox.iterdir())


def test_file_over_the_size_limit_is_an_error_row(tmp_path, predictor, xray_paths):
    inbox = _inbox(tmp_path, xray_paths[:2])
    small = min(os.path.getsize(inbox / p.name) for p in xray_paths[:2])
    big = max(os.path.getsize(inbox / p.name) for p in xray_paths[:2])
    limit_mb = (small + big) / 2 / (1024 * 1024)
    svc = _svc(tmp_path, predictor, cfg=_cfg(max_file_mb=limit_mb), once=True)
    assert small < big and svc.run() == 0
    rows = sorted(_rows(tmp_path), key=lambda r: r["size_bytes"])
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert f"over the limit of {int(limit_mb * 1024 * 1024):,}" in rows[1]["error"]


def test_new_file_under_a_moved_name_is_not_moved_under_the_old_row(tmp_path, predictor, xray_paths):
    """kill -9 after the move, before moved_at was committed, then a new file with the same name: the
    restart records the old move and scores the new file as its own row."""
    inbox = _inbox(tmp_path, xray_paths[:1])
    out = tmp_path / "out"
    a = inbox / xray_paths[0].name
    st = os.lstat(a)
    (out / "processed").mkdir(parents=True)
    os.rename(a, out / "processed" / a.name)  # the move happened...
    shutil.copy(xray_paths[1], a)  # ...and a different file now has the name
    os.utime(a, (1, 1))
    eng = make_engine(out / "results.sqlite")
    t = dt.datetime(2026, 1, 1)
    with session_factory(eng).begin() as s:  # ...but moved_at was never written
        s.add(
            Result(
                path=str(a),
                filename=a.name,
                size_bytes=st.st_size,
                mtime_ns=st.st_mtime_ns,
                sha256="a",
                status=Status.OK,
                received_at=t,
                claimed_at=t,
                processed_at=t,
                moved_to=str(out / "processed" / a.name),
            )
        )
    eng.dispose()
    assert _svc(tmp_path, predictor).run(idle_timeout=0.8) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 2 and [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["moved_to"] == str(out / "processed" / a.name) and rows[0]["moved_at"]
    assert rows[1]["moved_to"] == str(out / "processed" / f"{a.stem}-1{a.suffix}")
    assert (out / "processed" / a.name).read_bytes() == xray_paths[0].read_bytes()
    assert (out / "processed" / f"{a.stem}-1{a.suffix}").read_bytes() == xray_paths[1].read_bytes()


@pytest.mark.parametrize("where", ["other", "inbox/.old"])
def test_claim_this_run_would_never_redo_is_rolled_back(tmp_path, predictor, xray_paths, where):
    """A SIGTERM leaves claimed rows to redo. A restart on another inbox, or one whose discovery never
    reads the claimed name (a hidden folder), must not let them block the CSVs for ever, nor mark an
    untouched file as failed."""
    _inbox(tmp_path, xray_paths[1:3])
    folder = tmp_path / where
    folder.mkdir(parents=True)
    shutil.copy(xray_paths[0], folder / "x.jpeg")
    st = os.lstat(folder / "x.jpeg")
    out = tmp_path / "out"
    out.mkdir()
    eng = make_engine(out / "results.sqlite")
    t = dt.datetime(2026, 1, 1)
    with session_factory(eng).begin() as s:
        s.add(
            Result(
                path=str(folder / "x.jpeg"),
                filename="x.jpeg",
                size_bytes=st.st_size,
                mtime_ns=st.st_mtime_ns,
                sha256=None,
                status=Status.CLAIMED,
                received_at=t,
                claimed_at=t,
            )
        )
    eng.dispose()
    assert _svc(tmp_path, predictor).run(idle_timeout=0.8) == 0
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok"] and (folder / "x.jpeg").exists()
    day_files = list((out / "csv").glob("results-*.csv"))
    assert len(day_files) == 1 and len(day_files[0].read_text().splitlines()) == 3  # header + 2 rows


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_discovery_failure_stops_the_daemon_with_exit_1(tmp_path, predictor, xray_paths, monkeypatch):
    """A dead discovery thread would leave a daemon that runs for ever and reads nothing."""
    from xr.daemon.discovery import Discovery

    def broken(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Discovery, "_check_pending", broken)
    _inbox(tmp_path, xray_paths[:1])
    assert _svc(tmp_path, predictor).run(idle_timeout=30) == 1


def test_file_name_that_is_not_utf8_is_scored_not_fatal(tmp_path, predictor, xray_paths):
    """Such a name cannot go into SQLite as is; it is stored (and moved) with \\xNN escapes."""
    inbox = _inbox(tmp_path, xray_paths[:1])
    raw = os.path.join(os.fsencode(inbox), b"caf\xe9.jpeg")
    shutil.copy(xray_paths[1], raw)
    os.utime(raw, (1, 1))
    assert _svc(tmp_path, predictor, once=True).run() == 0
    rows = {r["filename"]: r for r in _rows(tmp_path)}
    assert set(rows) == {xray_paths[0].name, "caf\\xe9.jpeg"} and {r["status"] for r in rows.values()} == {"ok"}
    moved = tmp_path / "out" / "processed" / "caf\\xe9.jpeg"
    assert rows["caf\\xe9.jpeg"]["moved_to"] == str(moved) and moved.read_bytes() == xray_paths[1].read_bytes()
    assert not list(inbox.iterdir())


def test_second_daemon_on_the_same_database_or_inbox_is_refused(tmp_path, predictor, xray_paths):
    _inbox(tmp_path, xray_paths[:1])
    log = configure_logging("json", stream=open(os.devnull, "w"))
    shared_db = str(tmp_path / "shared.sqlite")
    first = Service(
        _cfg(), watch=tmp_path / "inbox", output=tmp_path / "out", db=shared_db, predictor=predictor, log=log
    )
    first.take_locks()  # as a running daemon holds them
    try:
        (tmp_path / "inbox2").mkdir()
        same_db = Service(
            _cfg(), watch=tmp_path / "inbox2", output=tmp_path / "out2", db=shared_db, predictor=predictor, log=log
        )
        assert same_db.run(idle_timeout=0.3) == 2
        same_inbox = Service(_cfg(), watch=tmp_path / "inbox", output=tmp_path / "out3", predictor=predictor, log=log)
        assert same_inbox.run(idle_timeout=0.3) == 2
    finally:
        first.release_locks()
    assert not (tmp_path / "out2" / "results.sqlite").exists()


def test_setup_problems_exit_2_with_the_reason(tmp_path, predictor, capsys):
    (tmp_path / "inbox").mkdir()
    (tmp_path / "afile").write_text("x")
    buf = io.StringIO()
    log = configure_logging("json", stream=buf)
    cases = [
        ({"output": tmp_path / "afile" / "out"}, "cannot create output folder"),
        ({"output": tmp_path / "out", "watch": None}, "no watch folder: pass --watch DIR or set daemon.watch"),
        ({"output": tmp_path / "out", "db": "nosuchdriver://host/db"}, "use a SQLite file path or a postgresql"),
    ]
    for kw, reason in cases:
        svc = Service(_cfg(), **({"watch": tmp_path / "inbox"} | kw), predictor=predictor, log=log)
        assert svc.run(idle_timeout=0.3) == 2, reason
        assert reason in buf.getvalue()


def test_a_closed_log_pipe_does_not_stop_the_daemon(tmp_path, predictor, xray_paths):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    _inbox(tmp_path, xray_paths[:3])
    log = configure_logging("json", stream=ClosedPipe())
    svc = Service(_cfg(), watch=tmp_path / "inbox", output=tmp_path / "out", predictor=predictor, log=log, once=True)
    assert svc.run() == 0
    rows = _rows(tmp_path)
    assert len(rows) == 3 and all(r["status"] == "ok" and r["moved_at"] for r in rows)


def test_uncalibrated_checkpoint_is_a_warning(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "nocal" / "model.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_checkpoint, ckpt)  # without the calibration file beside it
    (tmp_path / "inbox").mkdir()
    buf = io.StringIO()
    svc = Service(
        _cfg(), watch=tmp_path / "inbox", output=tmp_path / "out", model=ckpt, log=configure_logging("json", stream=buf)
    )
    assert svc.run(idle_timeout=0.3) == 0
    warn = [e for e in map(json.loads, buf.getvalue().splitlines()) if e["event"] == "uncalibrated_model"]
    assert warn and warn[0]["level"] == "warning" and "temperature 1, threshold 0.5" in warn[0]["reason"]


@pytest.mark.parametrize("captured", [True, False])
def test_decoder_count_follows_whether_the_cuda_graph_was_captured(tmp_path, predictor, monkeypatch, captured):
    """Eager kernel launches need the GIL between them: a failed capture must not leave the daemon with the
    many decoders and the large batch planned for a graph."""
    monkeypatch.setattr("xr.daemon.plan.usable_cpus", lambda: 16)

    def capture(self, batch_size):
        if not captured:
            raise RuntimeError("no graphs on this device")

    Gpu = type("Gpu", (Predictor,), {"warmup": lambda self, batch_size=1: None, "capture_cuda_graph": capture})
    fake = Gpu(predictor.model, predictor.meta, predictor.calibration, device="cpu")
    fake.device = torch.device("cuda")  # only its type is read before the first batch
    svc = _svc(tmp_path, fake, cfg=_cfg(decode_workers=0, torch_threads=0, batch_size=0))
    svc.load_predictor()
    assert svc.plan == RunPlan(decode_workers=14 if captured else 8, torch_threads=16, batch_size=32 if captured else 8)


def test_the_inbox_lock_is_out_of_other_users_reach(tmp_path, predictor, xray_paths, monkeypatch):
    """The inbox lock lives in the service's runtime directory or a private folder, never under a name in
    the shared temp folder that another local user could create and hold to keep the daemon from starting."""
    import fcntl
    import hashlib
    import tempfile

    _inbox(tmp_path, xray_paths[:1])
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    tag = hashlib.sha256(os.fsencode((tmp_path / "inbox").resolve())).hexdigest()[:16]
    squatted = Path(tempfile.gettempdir()) / f"xr-daemon-inbox-{tag}.lock"  # the name the lock used to have
    fd = os.open(squatted, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, as another user's process would
    try:
        assert _svc(tmp_path, predictor).run(idle_timeout=0.3) == 0
    finally:
        os.close(fd)
        squatted.unlink()
    assert len(_rows(tmp_path)) == 1

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    svc = _svc(tmp_path, predictor)
    svc.take_locks()
    try:
        assert [p.name for p in runtime.iterdir()] == [f"xr-daemon-inbox-{tag}.lock"]
        assert (runtime / f"xr-daemon-inbox-{tag}.lock").stat().st_mode & 0o777 == 0o600
    finally:
        svc.release_locks()
    runtime.chmod(0o777)  # writable by others: passed over for this account's private folder
    mine = lock_dir(tmp_path / "out")
    assert mine == Path(tempfile.gettempdir()) / f"xr-daemon-{os.geteuid()}" and mine.stat().st_mode & 0o777 == 0o700


def test_daemon_started_hides_the_database_password(tmp_path, predictor, xray_paths, pg_url):
    """A password in --db never reaches the log: ``daemon_started`` shows the URL with ``***``."""
    _inbox(tmp_path, xray_paths[:1])
    url = pg_url.replace("://postgres@", "://postgres:s3cret-pw@")
    assert "s3cret-pw" in url
    buf = io.StringIO()
    log = configure_logging("json", stream=buf)
    svc = Service(_cfg(), watch=tmp_path / "inbox", output=tmp_path / "out", db=url, predictor=predictor, log=log)
    assert svc.run(idle_timeout=0.3) == 0, buf.getvalue()[-2000:]
    started = [json.loads(line) for line in buf.getvalue().splitlines() if '"daemon_started"' in line]
    assert len(started) == 1 and "postgres:***@" in started[0]["db"]
    assert "s3cret-pw" not in buf.getvalue()
