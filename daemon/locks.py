"""One daemon per output folder, per SQLite results database and per inbox (file locks, held for the run):
two on one database would roll back each other's claims, two on one inbox would score every file twice.

The inbox is the users' folder: its lock, named after the inbox's path, lives in a folder only this
account can write (:func:`lock_dir`), so no other local user can create and hold it to keep the daemon from
starting.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from xr.core.errors import XRError
from xr.results.engine import db_url, sqlite_file


def private_dir(path: Path) -> bool:
    """A folder of this account's that no other user can write to (so none can plant or hold a file in it)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def lock_dir(output: Path) -> Path:
    """Where the inbox lock lives: the service's runtime directory (systemd's ``RuntimeDirectory``), the
    user's (``$XDG_RUNTIME_DIR``), or a folder of this account's in the temp folder; the output folder when
    none is private (a lock there still keeps two daemons of that output off one inbox)."""
    for env in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        d = os.environ.get(env, "").split(":")[0]
        if d and private_dir(Path(d)):
            return Path(d)
    mine = Path(tempfile.gettempdir()) / f"xr-daemon-{os.geteuid()}"
    try:
        mine.mkdir(mode=0o700)
    except OSError:
        pass  # there already: used only if it is this account's and private
    return mine if private_dir(mine) else output


def take_locks(output: Path, db: str | Path, inbox: Path) -> list[int]:
    """Lock the output folder, the SQLite database (if it is one) and the inbox; their descriptors (close
    them to release). Raises XRError naming what another daemon holds, or what cannot be locked."""
    locks = [(output / ".xr-daemon.lock", f"output folder {output}", True)]
    url = db_url(db)
    if url.startswith("sqlite:///"):
        db_file = sqlite_file(url)
        locks.append((db_file.with_name(f".{db_file.name}.xr-daemon.lock"), f"results database {db_file}", True))
    tag = hashlib.sha256(os.fsencode(inbox)).hexdigest()[:16]
    locks.append((lock_dir(output) / f"xr-daemon-inbox-{tag}.lock", f"watch folder {inbox}", False))
    fds: list[int] = []
    try:
        for path, what, required in locks:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                if required:
                    raise XRError(f"cannot use {what}: {exc.strerror or exc}") from None
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if isinstance(exc, BlockingIOError):
                    raise XRError(f"another xr-daemon is already running with {what}") from None
                if required:  # e.g. ENOLCK on a network file system
                    raise XRError(f"cannot lock {what}: {exc.strerror or exc}") from None
                continue
            fds.append(fd)
    except XRError:
        for fd in fds:
            os.close(fd)
        raise
    return fds
