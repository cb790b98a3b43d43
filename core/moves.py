"""Moving a file without ever overwriting or losing one: a hard link to a free name, then the old name
removed; a copy where a link cannot or must not be made. Used by the daemon (inbox -> processed/, failed/)
and by ``xr-results retry`` (failed/ -> inbox)."""

from __future__ import annotations

import errno
import filecmp
import os
import stat
from pathlib import Path

from xr.core.files import apply_mode, make_dirs, private_copy


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
    """``dst`` is a finished copy of ``src`` made by the copy path (private_copy keeps size and mtime)."""
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
