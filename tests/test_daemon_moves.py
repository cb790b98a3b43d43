"""core/moves.py and daemon/moves.py: moving without overwriting, resuming a half-done move, choosing and reserving destinations."""

from __future__ import annotations

import os

from xr.core.moves import free_name, move_no_overwrite
from xr.daemon.moves import Destinations
from xr.results.schema import Status


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


def test_destinations_by_status_keep_subfolders_and_never_hand_out_a_name_twice(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    dest = Destinations(inbox, out, on_success="move", on_error="move", on_skipped="leave")
    first = dest.reserve(str(inbox / "ward" / "a.png"), Status.OK)
    second = dest.reserve(str(inbox / "ward" / "a.png"), Status.DUPLICATE)  # same name, not moved yet
    assert first == str(out / "processed" / "ward" / "a.png")
    assert second == str(out / "processed" / "ward" / "a-1.png")
    assert dest.reserve(str(inbox / "b.png"), Status.ERROR) == str(out / "failed" / "b.png")
    assert dest.reserve(str(inbox / "c.dcm"), Status.SKIPPED) is None  # left in place
    assert dest.reserve("/elsewhere/d.png", Status.OK) == str(out / "processed" / "d.png")  # outside the inbox
    dest.release(first)  # moved (or given up): the name is free again unless a file took it
    assert dest.reserve(str(inbox / "ward" / "a.png"), Status.OK) == first
    dest.hold(str(out / "processed" / "e.png"))  # a row a stopped run left names it
    assert dest.reserve(str(inbox / "e.png"), Status.OK) == str(out / "processed" / "e-1.png")


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


def test_a_film_with_another_hard_link_is_copied_not_linked(tmp_path):
    """Whoever holds a second link to an inbox film could change the scored film through it: the output
    gets a copy of its own (another inode, private), the other link keeps the original."""
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "a.png"
    src.write_bytes(b"film")
    src.chmod(0o644)
    os.utime(src, ns=(1_000_000_000, 2_000_000_000))
    other = tmp_path / "writer-keeps.png"
    os.link(src, other)
    dst = move_no_overwrite(src, tmp_path / "out" / "processed" / "a.png")
    assert not src.exists() and dst.read_bytes() == b"film"
    assert dst.stat().st_ino != other.stat().st_ino and dst.stat().st_nlink == 1
    assert dst.stat().st_mode & 0o777 == 0o600 and dst.stat().st_mtime_ns == 2_000_000_000
    other.write_bytes(b"changed")  # the writer's link changes nothing under processed/
    assert dst.read_bytes() == b"film"
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")]


def test_a_moved_film_is_made_private_whatever_its_mode_was(tmp_path):
    """A linked film keeps its inode, and with it the exporter's mode: it is set to 0600 (the folders it
    goes into are created 0700) whatever the umask."""
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "a.png"
    src.write_bytes(b"film")
    src.chmod(0o666)
    ino = src.stat().st_ino
    old = os.umask(0o022)
    try:
        dst = move_no_overwrite(src, tmp_path / "out" / "processed" / "sub" / "a.png")
    finally:
        os.umask(old)
    assert dst.stat().st_ino == ino and dst.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "processed" / "sub").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "out" / "processed").stat().st_mode & 0o777 == 0o700
