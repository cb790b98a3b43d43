"""daemon/pipeline.py: moving without overwriting, resuming a half-done move, destinations, CSV pacing."""

from __future__ import annotations

import os

from xr.daemon.pipeline import free_name, move_no_overwrite


def test_move_never_overwrites(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"old")
    (tmp_path / "out" / "a-1.png").write_bytes(b"older")
    src = tmp_path / "in" / "a.png"
    src.write_bytes(b"new")
    dst = move_no_overwrite(src, tmp_path / "out" / "a.png")
    assert dst.name == "a-2.png" and dst.read_bytes() == b"new" and not src.exists()
    assert (tmp_path / "out" / "a.png").read_bytes() == b"old"


def test_move_resumes_after_link_before_unlink(tmp_path):
    src = tmp_path / "a.png"
    src.write_bytes(b"x")
    (tmp_path / "out").mkdir()
    os.link(src, tmp_path / "out" / "a.png")  # a crash between link and unlink
    dst = move_no_overwrite(src, tmp_path / "out" / "a.png")
    assert dst == tmp_path / "out" / "a.png" and not src.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


def test_move_symlink_itself(tmp_path):
    target = tmp_path / "t.png"
    target.write_bytes(b"t")
    link = tmp_path / "l.png"
    link.symlink_to(target)
    dst = move_no_overwrite(link, tmp_path / "failed" / "l.png")
    assert dst.is_symlink() and os.readlink(dst) == str(target) and target.exists() and not os.path.lexists(link)


def test_free_name_respects_reserved(tmp_path):
    assert free_name(tmp_path / "a.png", {str(tmp_path / "a.png")}).name == "a-1.png"


def test_finisher_batches_csv_rewrites_under_a_stream(tmp_path):
    """Each CSV update rewrites the day's file, so a backlog of finished batches is exported once it is
    handled, not once per batch; and the last state is always exported."""
    import queue
    import threading

    from xr.daemon.pipeline import Context, Done, Finisher

    class Exporter:
        elect = False  # the only daemon on its database

        def __init__(self):
            self.calls = []

        def export(self):
            self.calls.append(handled[:])

    class Discovery:
        def release(self, path, settled=None):
            handled.append(path)

    handled: list[str] = []
    exporter = Exporter()
    ctx = Context(
        inbox=tmp_path,
        output=tmp_path,
        sessions=None,
        predictor=None,
        discovery=Discovery(),
        exporter=exporter,
        log=None,
    )
    q: queue.Queue = queue.Queue()
    for i in range(200):  # 200 finished batches waiting (files left in place: no move, no DB)
        q.put([Done(i, f"/in/{i}.png", (1, 1), None)])
    fin = Finisher(ctx, q)
    fin.start()
    while not q.empty():
        threading.Event().wait(0.01)
    fin.halt.set()
    fin.join(10)
    assert len(handled) == 200
    assert len(exporter.calls) <= 4, len(exporter.calls)  # not 200
    assert exporter.calls[-1] == handled  # everything handled reached the CSVs


def test_move_copies_when_the_kernel_refuses_the_link(tmp_path, monkeypatch):
    """protected_hardlinks: linking a file of another owner fails with EPERM; the move must still work."""
    import errno

    real_link = os.link
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    src.write_bytes(b"data")

    def link(a, b, **kw):
        if os.fspath(a) == os.fspath(src):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_link(a, b, **kw)

    monkeypatch.setattr(os, "link", link)
    dst = move_no_overwrite(src, tmp_path / "out" / "a.png")
    assert dst == tmp_path / "out" / "a.png" and dst.read_bytes() == b"data" and not src.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]  # no temp file left


def test_move_that_cannot_remove_the_inbox_file_leaves_no_copy(tmp_path, monkeypatch):
    """A read-only share or a sticky folder: the file stays where it was, and processed/ gets no
    copy (a copy per retry filled the disk), on the link path and on the copy path alike."""
    import errno

    real_unlink, real_link = os.unlink, os.link
    for refuse_link in (False, True):
        src = tmp_path / f"in{refuse_link}" / "a.png"
        src.parent.mkdir()
        src.write_bytes(b"data")

        def unlink(p, *a, _src=src, **kw):
            if os.fspath(p) == os.fspath(_src):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_unlink(p, *a, **kw)

        def link(a, b, _src=src, _refuse=refuse_link, **kw):
            if _refuse and os.fspath(a) == os.fspath(_src):
                raise PermissionError(errno.EPERM, "Operation not permitted")
            return real_link(a, b, **kw)

        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "link", link)
        out = tmp_path / f"out{refuse_link}"
        for _ in range(2):  # a retry
            try:
                move_no_overwrite(src, out / "a.png")
            except PermissionError:
                pass
            else:
                raise AssertionError("the move should fail")
        monkeypatch.undo()
        assert src.read_bytes() == b"data" and list(out.iterdir()) == []


def test_copy_finished_before_a_crash_is_recognised(tmp_path):
    """The copy path (other file system, or a file of another owner) died after the copy got its name and
    before the inbox name was removed: the restart must not make a second copy."""
    import shutil

    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    src.write_bytes(b"data")
    (tmp_path / "out").mkdir()
    shutil.copy2(src, tmp_path / "out" / "a.png")  # what the crashed move left
    (tmp_path / "out" / ".a.png.moving").write_bytes(b"da")  # and a half temp copy of an earlier try
    dst = move_no_overwrite(src, tmp_path / "out" / "a.png")
    assert dst == tmp_path / "out" / "a.png" and not src.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # the temp leftover too
    other = tmp_path / "in" / "b.png"  # same name reserved, different content: never taken for a copy
    other.write_bytes(b"other")
    assert move_no_overwrite(other, tmp_path / "out" / "a.png").name == "a-1.png"


def test_inbox_name_removed_by_someone_else_mid_move_keeps_the_moved_file(tmp_path, monkeypatch):
    real_unlink = os.unlink
    src = tmp_path / "a.png"
    src.write_bytes(b"data")

    def unlink(p, *a, **kw):
        if os.fspath(p) == os.fspath(src):
            real_unlink(p)  # another process got there first
            raise FileNotFoundError(2, "No such file or directory")
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    dst = move_no_overwrite(src, tmp_path / "out" / "a.png")
    assert dst.read_bytes() == b"data" and not src.exists()
