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


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole: a hidden temp file beside it (private mode from its creation),
    fsync, rename over ``path``, fsync of the folder. A reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, file_mode())
    try:
        apply_mode(tmp, fd=fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
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
