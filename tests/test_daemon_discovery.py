"""daemon/discovery.py: names, readiness by stable size/mtime, moved-in files, rescans, back-pressure."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

from xr.core.intake import is_candidate_name
from xr.daemon.discovery import Discovery
from xr.daemon.stage import Supervisor


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_candidate_names():
    for ok in ("a.png", "b.JPG", "c.jpeg", "D.PnG", "e.dcm", "F.DICOM", "g.Dcm"):
        assert is_candidate_name(ok)
    for bad in (".a.png", "a.png.part", "a.tmp", "a.png.crdownload", "a.png~", "a.txt", "a.dcm.part", ".b.dcm", ""):
        assert not is_candidate_name(bad)


def _disc(tmp_path, q=None, **kw):
    clock = Clock()
    d = Discovery(tmp_path, q or queue.Queue(maxsize=100), watch=False, clock=clock, **kw)
    return d, clock


def _drain(q):
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def test_old_file_ready_at_once_fresh_file_waits(tmp_path):
    old = tmp_path / "old.png"
    old.write_bytes(b"x")
    past = time.time() - 60
    os.utime(old, (past, past))
    (tmp_path / "fresh.png").write_bytes(b"y")
    (tmp_path / ".hidden.png").write_bytes(b"z")
    (tmp_path / "c.png.part").write_bytes(b"z")
    q = queue.Queue(maxsize=10)
    d, clock = _disc(tmp_path, q, stable_ms=500)
    assert d.scan() == 2
    d._check_pending()
    d._push_ready()
    assert [os.path.basename(i.path) for i in _drain(q)] == ["old.png"]
    clock.t += 0.6
    d._check_pending()
    d._push_ready()
    items = _drain(q)
    assert [os.path.basename(i.path) for i in items] == ["fresh.png"] and items[0].size == 1
    assert d.scan() == 0  # handed files are not noted again
    d.release(items[0].path)
    assert d.outstanding() == 1


def test_growing_file_is_not_ready_until_stable(tmp_path):
    f = tmp_path / "slow.png"
    f.write_bytes(b"a")
    q = queue.Queue(maxsize=10)
    d, clock = _disc(tmp_path, q, stable_ms=300)
    d.scan()
    for i in range(5):
        clock.t += 0.2
        with open(f, "ab") as fh:
            fh.write(b"b")
        os.utime(f, ns=(time.time_ns(), time.time_ns() + i + 1))  # a new mtime, whatever the fs resolution
        d._check_pending()
        d._push_ready()
        assert q.empty()
    clock.t += 0.31
    d._check_pending()
    d._push_ready()
    assert _drain(q)[0].size == 6


def test_moved_in_file_is_ready_at_once(tmp_path):
    q = queue.Queue(maxsize=10)
    d, clock = _disc(tmp_path, q, stable_ms=10_000)
    (tmp_path / ".x.png.part").write_bytes(b"data")
    os.rename(tmp_path / ".x.png.part", tmp_path / "x.png")
    d.note(str(tmp_path / "x.png"), moved=True)
    d._check_pending()
    d._push_ready()
    assert len(_drain(q)) == 1


def test_settled_and_excluded_and_hidden_dirs(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"1")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "b.png").write_bytes(b"1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"1")
    d, _ = _disc(tmp_path, exclude=(tmp_path / "out",))
    assert d.scan() == 1
    st = os.lstat(tmp_path / "sub" / "c.png")
    path = str(tmp_path / "sub" / "c.png")
    d._pending.clear()
    d.release(path, settled=(st.st_size, st.st_mtime_ns))
    assert d.scan() == 0  # left in place after processing: not picked up again


def test_back_pressure_keeps_names_only(tmp_path):
    for i in range(20):
        (tmp_path / f"{i:02d}.png").write_bytes(b"x")
        os.utime(tmp_path / f"{i:02d}.png", (1, 1))
    q = queue.Queue(maxsize=4)
    d, _ = _disc(tmp_path, q)
    d.scan()
    d._check_pending()
    d._push_ready()
    assert q.qsize() == 4 and d.outstanding() == 20
    _drain(q)
    d._push_ready()
    assert q.qsize() == 4


class _ReleasingQueue(queue.Queue):
    """A pipeline that takes each file and releases it (it vanished) before put() returns."""

    def __init__(self, discovery_ref: list):
        super().__init__(maxsize=10)
        self.ref = discovery_ref

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        self.get_nowait()
        self.ref[0].release(item.path)


def test_a_file_released_before_put_returns_is_not_left_outstanding(tmp_path):
    """Without this, --once and idle_timeout would wait for ever on a file the pipeline already dropped."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1, 1))
    ref: list = [None]
    d, _ = _disc(tmp_path, _ReleasingQueue(ref))
    ref[0] = d
    d.scan()
    d._check_pending()
    d._push_ready()
    assert d.outstanding() == 0 and d.stats.handed == 2


def test_full_queue_keeps_the_file_first_in_line_and_not_handed(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"x")
        os.utime(tmp_path / f"{i}.png", (1, 1))
    q = queue.Queue(maxsize=1)
    d, _ = _disc(tmp_path, q)
    d.scan()
    d._check_pending()
    order = [i.path for i in d._ready]
    d._push_ready()
    assert [i.path for i in d._ready] == order[1:] and list(d._handed) == order[:1]
    assert d.scan() == 0  # neither noted twice nor lost while it waits
    _drain(q)
    d._push_ready()
    assert _drain(q)[0].path == order[1] and d.outstanding() == 3


def test_watchdog_thread_sees_renamed_file(tmp_path):
    q = queue.Queue(maxsize=10)
    d = Discovery(tmp_path, q, stable_ms=60_000, rescan_s=3600)
    d.watch_events()
    runner = Supervisor([d])
    runner.start()
    try:
        assert d.first_scan_done.wait(10)
        (tmp_path / ".late.png.part").write_bytes(b"x")
        os.rename(tmp_path / ".late.png.part", tmp_path / "late.png")
        item = q.get(timeout=20)  # hang guard; ready at once because it was renamed in
        assert item.path.endswith("late.png")
    finally:
        runner.stop()


def test_inotify_limit_falls_back_to_polling(tmp_path, monkeypatch):
    """A host out of inotify watches (ENOSPC) must not stop the daemon: it polls and still finds files."""
    import errno

    import watchdog.observers

    class NoInotify(watchdog.observers.Observer):
        def start(self):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watchdog.observers, "Observer", NoInotify)
    q = queue.Queue(maxsize=10)
    d = Discovery(tmp_path, q, stable_ms=0, rescan_s=3600)
    reason = d.watch_events()
    runner = Supervisor([d])
    runner.start()
    try:
        assert reason and "inotify watch limit reached" in reason and "polling" in reason
        assert d.first_scan_done.wait(10)
        (tmp_path / "late.png").write_bytes(b"x")  # after the only scan: polling must see it
        assert q.get(timeout=20).path.endswith("late.png")
    finally:
        runner.stop()


class _Log:
    def __init__(self):
        self.events = []

    def warning(self, event, **kw):
        self.events.append((event, kw))


def test_a_deferred_file_comes_back_final_after_its_grace_period_unless_it_changes(tmp_path):
    f = tmp_path / "cut.jpeg"
    f.write_bytes(b"\xff\xd8\xff partial")
    os.utime(f, (1, 1))
    q = queue.Queue(maxsize=10)
    d, clock = _disc(tmp_path, q, stable_ms=300)
    d.scan()
    d._check_pending()
    d._push_ready()
    item = _drain(q)[0]
    assert not item.final and item.changed_mono < clock.t  # an old file: its last change lies in the past
    d.defer(item, until=clock.t + 5)
    assert d.outstanding() == 1 and d.deferred() == 1
    assert d.scan() == 0  # not picked up again by a scan while it waits
    clock.t += 4.9
    d._check_deferred()
    d._push_ready()
    assert q.empty()
    clock.t += 0.2
    d._check_deferred()
    d._push_ready()
    again = _drain(q)
    assert [i.path for i in again] == [str(f)] and again[0].final and d.deferred() == 0


def test_a_deferred_file_that_grows_waits_to_be_stable_as_a_new_file(tmp_path):
    f = tmp_path / "slow.png"
    f.write_bytes(b"\x89PNG")
    q = queue.Queue(maxsize=10)
    d, clock = _disc(tmp_path, q, stable_ms=300)
    d.scan()
    clock.t += 0.4
    d._check_pending()
    d._push_ready()
    item = _drain(q)[0]
    d.defer(item, until=clock.t + 60)
    with open(f, "ab") as fh:  # the writer goes on
        fh.write(b"\r\n\x1a\nmore")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    d._check_deferred()
    d._check_pending()
    d._push_ready()
    assert q.empty() and d.deferred() == 0 and d.outstanding() == 1  # pending again, waiting to settle
    clock.t += 0.31
    d._check_pending()
    d._push_ready()
    grown = _drain(q)[0]
    assert grown.size == 12 and not grown.final and grown.changed_mono > item.changed_mono


def test_a_deferred_file_that_vanishes_is_dropped(tmp_path):
    f = tmp_path / "gone.png"
    f.write_bytes(b"x")
    q = queue.Queue(maxsize=10)
    d, clock = _disc(tmp_path, q)
    os.utime(f, (1, 1))
    d.scan()
    d._check_pending()
    d._push_ready()
    d.defer(_drain(q)[0], until=clock.t + 60)
    f.unlink()
    d._check_deferred()
    assert d.outstanding() == 0


def test_names_the_daemon_does_not_read_are_reported_once_and_left(tmp_path):
    (tmp_path / "study.tiff").write_bytes(b"II*\x00")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "noext").write_text("x" * 200)  # long enough to know it is not DICOM
    (tmp_path / "short").write_text("x")  # an extensionless file still arriving may be DICOM: not yet
    for quiet in (".hidden.tiff", "a.png.part", "b.tmp", "c.tiff~"):
        (tmp_path / quiet).write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.pdf").write_text("x")  # the daemon's own output: not the inbox's
    log = _Log()
    d = Discovery(tmp_path, queue.Queue(), watch=False, exclude=(tmp_path / "out",), log=log)
    d.scan()
    d.scan()
    d.note(str(tmp_path / "study.tiff"))  # a file event for it too
    reported = {Path(kw["file"]).name: kw["reason"] for event, kw in log.events if event == "file_ignored"}
    assert len(log.events) == 3 and set(reported) == {"study.tiff", "notes.txt", "noext"}
    assert reported["study.tiff"].startswith(
        "extension .tiff is not read (the daemon reads .png, .jpg, .jpeg, .dcm, .dicom"
    )
    assert reported["noext"].startswith("no extension is not read")
    assert (tmp_path / "study.tiff").exists() and d.outstanding() == 0
    (tmp_path / "study.tiff").unlink()
    d.scan()
    (tmp_path / "study.tiff").write_bytes(b"II*\x00")  # a new file under the name: reported again
    d.scan()
    assert sum(Path(kw["file"]).name == "study.tiff" for _, kw in log.events) == 2


def test_extensionless_dicom_files_are_found_by_their_dicm_marker(tmp_path):
    (tmp_path / "IM000001").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00" * 20)
    (tmp_path / "README").write_bytes(b"plain text, no marker " * 20)
    os.utime(tmp_path / "IM000001", (1, 1))
    q = queue.Queue(maxsize=10)
    log = _Log()
    d = Discovery(tmp_path, q, watch=False, log=log)
    assert d.scan() == 1
    d._check_pending()
    d._push_ready()
    assert [Path(i.path).name for i in _drain(q)] == ["IM000001"]
    assert [Path(kw["file"]).name for _, kw in log.events] == ["README"]
