"""Files and folders the programs create hold patient data: private to the service account whatever the
umask (0600 files, 0700 folders), or shared with one group where ``output.group`` asks for it (0640, 0750).

Every file the daemon, xr-review or xr-score writes goes through :func:`write_private`, :func:`open_append`
or :func:`make_dirs`, so the modes hold for new files and survive rewrites.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()
_group: int | None = None  # gid of output.group; None: private to the owner


def use_group(gid: int | None) -> None:
    """Share what is created from now on with group ``gid`` (read-only for files), or with nobody (None)."""
    global _group
    with _lock:
        _group = gid


def use_group_named(name: str | None) -> None:
    """:func:`use_group` for ``output.group`` (a group name, or None); an unknown name is an XRError."""
    if name is None:
        use_group(None)
        return
    import grp

    from xr.core.errors import XRError

    try:
        use_group(grp.getgrnam(name).gr_gid)
    except KeyError:
        raise XRError(f"output.group: no group named {name!r} on this host") from None


def file_mode() -> int:
    return 0o600 if _group is None else 0o640


def dir_mode() -> int:
    return 0o700 if _group is None else 0o750


def apply_mode(path: str | os.PathLike, directory: bool = False, fd: int | None = None) -> None:
    """Set the mode (and the group, when one is set) of a file or folder this program created."""
    mode = dir_mode() if directory else file_mode()
    if fd is not None:
        os.fchmod(fd, mode)
        if _group is not None:
            os.fchown(fd, -1, _group)
        return
    os.chmod(path, mode)
    if _group is not None:
        os.chown(path, -1, _group)


def private_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to the new file ``dst`` (never over one), private from its creation, with
    ``src``'s times; fsynced. Not its mode: an inbox file may be readable by anyone."""
    import shutil

    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode())
    try:
        apply_mode(dst, fd=fd)
        with open(src, "rb") as f, os.fdopen(os.dup(fd), "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            st = os.fstat(f.fileno())
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` where each folder this call creates gets the private mode (existing ones are left:
    the operator may have set them up on purpose)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=dir_mode())
        except FileExistsError:
            continue
        apply_mode(d, directory=True)  # mkdir's mode is masked by the umask; this is not
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_private(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` whole: a hidden temp file beside it (private mode from its creation),
    fsync, rename over ``path``, fsync of the folder. A reader sees the old file or the new one.
    ``durable=False``: no fsync (a file that can be made again, such as a heatmap or a thumbnail)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, file_mode())
    try:
        apply_mode(tmp, fd=fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
    return path


def open_append(path: str | os.PathLike) -> int:
    """A descriptor appending to an existing file; its mode is set again (an older version may have made
    it world-readable)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)  # read too: a cut last line is looked for
    try:
        apply_mode(path, fd=fd)
    except OSError:
        os.close(fd)
        raise
    return fd
