"""Moving a finished file out of the inbox without ever overwriting or losing one, and choosing where it goes.

A destination is chosen (and reserved) in the batch commit, so the row names it before the file moves;
:class:`Destinations` keeps the names chosen and not yet moved to, so two files of one name never get the
same one.
"""

from __future__ import annotations

import errno
import filecmp
import os
import stat
import threading
from pathlib import Path

from xr.core.files import apply_mode, make_dirs, private_copy
from xr.results.schema import Status, storable


def candidate_names(dst: Path):
    yield dst
    stem, suffix = dst.stem, dst.suffix
    i = 1
    while True:
        yield dst.with_name(f"{stem}-{i}{suffix}")
        i += 1


def free_name(dst: Path, reserved: set[str] | None = None) -> Path:
    """``dst``, or ``name-1.ext``, ``name-2.ext``... : the first that neither exists nor is reserved."""
    for cand in candidate_names(dst):
        if not os.path.lexists(cand) and (reserved is None or str(cand) not in reserved):
            return cand
    raise AssertionError("unreachable")


def same_file(a: str | Path, b: str | Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def same_copy(src: str | Path, dst: str | Path) -> bool:
    """``dst`` is a finished copy of ``src`` made by the copy path (copy2 keeps size and mtime)."""
    try:
        ss, sd = os.lstat(src), os.lstat(dst)
    except OSError:
        return False
    if (ss.st_size, ss.st_mtime_ns, stat.S_IFMT(ss.st_mode)) != (sd.st_size, sd.st_mtime_ns, stat.S_IFMT(sd.st_mode)):
        return False
    if stat.S_ISLNK(ss.st_mode):
        return os.readlink(src) == os.readlink(dst)
    return filecmp.cmp(src, dst, shallow=False)


def must_copy(st: os.stat_result) -> bool:
    """Whether a film is copied rather than linked into the output: one with other hard links (whoever holds
    one could change the film after it was scored) or of another owner (its mode cannot be made private)."""
    return stat.S_ISREG(st.st_mode) and (st.st_nlink > 1 or st.st_uid != os.geteuid())


def move_no_overwrite(src: str | Path, dst: str | Path) -> Path:
    """Move ``src`` (a file or a symlink itself) to ``dst`` or, if taken, to ``dst`` with a ``-N`` suffix.

    Never overwrites and never deletes data: a hard link is made first (``link`` fails if the name
    exists), then the inbox name is removed, and the film made private (core/files.py: it keeps its
    inode, and with it the mode the exporter gave it). Across file systems, where the kernel refuses to
    link a file of another owner, and for a film with other hard links or of another owner
    (:func:`must_copy`), the file is copied, private, to a hidden temp name beside the destination and
    linked from there. If the inbox name cannot be removed (a read-only share, a sticky folder), the new
    name is taken back and the error raised: the file stays where it was, with no second copy.
    """
    src, dst = Path(src), Path(dst)
    make_dirs(dst.parent)
    tmp = dst.with_name(f".{dst.name}.moving")  # one name per destination: a crash's leftover is found
    if os.path.lexists(dst) and (same_file(src, dst) or same_copy(src, dst)):
        # A previous run linked or copied it there and died before removing the inbox name. ``dst`` is
        # the name this file's row reserved, so an equal file there is that copy, not another file.
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if not os.path.islink(dst):
            apply_mode(dst)  # linked before the crash, perhaps not yet made private
        os.unlink(src)
        return dst
    try:
        if must_copy(os.lstat(src)):
            raise OSError(errno.EPERM, "copied, not linked")
        new = _link_free_name(src, dst)
        try:
            apply_mode(new)
        except OSError:
            os.unlink(new)  # a film that cannot be made private is copied instead
            raise OSError(errno.EPERM, "cannot make the linked film private") from None
    except OSError as exc:
        # EXDEV: another file system. EPERM: protected_hardlinks (the default on Linux) refuses a link to
        # a file the daemon does not own, the usual case when an exporter account writes the inbox.
        if exc.errno not in (errno.EXDEV, errno.EPERM):
            raise
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            if os.path.islink(src):
                os.symlink(os.readlink(src), tmp)
            else:
                private_copy(src, tmp)
            new = _link_free_name(tmp, dst)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass  # someone else removed or renamed the inbox name meanwhile: ``new`` holds the data
    except OSError:
        os.unlink(new)
        raise
    return new


def _link_free_name(source: Path, dst: Path) -> Path:
    for cand in candidate_names(dst):
        try:
            os.link(source, cand, follow_symlinks=False)
        except FileExistsError:
            continue
        return cand
    raise AssertionError("unreachable")


class Destinations:
    """Where finished files go (processed/, failed/, skipped/, or left in place, by ``daemon.on_*``), and the
    destinations chosen but not yet moved to: shared by the inferer (which reserves) and the finisher."""

    def __init__(self, inbox: Path, output: Path, on_success: str, on_error: str, on_skipped: str):
        self.inbox = inbox
        self.modes = {
            Status.ERROR: (on_error, output / "failed"),
            Status.SKIPPED: (on_skipped, output / "skipped"),
        }
        self.success = (on_success, output / "processed")
        self._reserved: set[str] = set()
        self._lock = threading.Lock()

    def reserve(self, src: str, status: Status) -> str | None:
        """Choose and reserve where a finished file goes, under its path below the inbox (None: left in place)."""
        mode, base = self.modes.get(status, self.success)
        if mode == "leave":
            return None
        try:
            rel = Path(src).relative_to(self.inbox)
        except ValueError:
            rel = Path(Path(src).name)
        rel = Path(storable(str(rel)))  # the row names its destination, so it must be a name the DB can hold
        with self._lock:
            dst = free_name(base / rel, self._reserved)
            self._reserved.add(str(dst))
        return str(dst)

    def hold(self, dst: str) -> None:
        """Reserve a destination a row already names (a move left by a stopped run)."""
        with self._lock:
            self._reserved.add(dst)

    def release(self, dst: str | None) -> None:
        """The file went there, or will not: the name is no longer held back."""
        if dst is not None:
            with self._lock:
                self._reserved.discard(dst)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reserved)
