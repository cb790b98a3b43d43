"""Where a case's film is read from, or why it cannot be shown (the case page says which).

A film the daemon scored is read from the output folder's ``processed/`` only. A row of ``xr-results
import`` (``worker_id`` ``xr-score``: score/bulk.py) names its film in the archive, which the import left
where it was: that path is read, for such a row only, and only while it is the file that was scored (the
size and modification time the import recorded, and its SHA-256 when the run recorded one), decoded
within the daemon's limits like any other.
"""

from __future__ import annotations

from pathlib import Path

from xr.results.schema import SCORED, Result, fs_path

IMPORTER = "xr-score"  # score/bulk.py IMPORTER: results.worker_id of imported rows


def imported(row: Result) -> bool:
    return row.worker_id == IMPORTER and row.moved_to is None


def film_source(row: Result, output: Path) -> tuple[Path | None, str | None]:
    """(the film to read, None) or (None, why it cannot be shown, in a reader's words)."""
    if row.status not in SCORED:
        return None, f"This file was not scored ({row.status}): no film to show."
    if imported(row):
        return _archived(row)
    if row.moved_at is None:
        return None, "The film is still being processed: reload in a moment."
    if row.moved_to is None:
        if row.pruned_at is not None:
            return None, f"The film was deleted by retention on {row.pruned_at:%Y-%m-%d} (the result is kept)."
        return None, "The film was left where it was found (daemon.on_success: leave): it is not in the output folder."
    path = Path(fs_path(row.moved_to)).resolve()
    if not path.is_relative_to(output / "processed") or not path.is_file():
        return None, "The film is no longer in the output folder's processed/."
    return path, None


def _archived(row: Result) -> tuple[Path | None, str | None]:
    path = Path(fs_path(row.path))
    try:
        st = path.stat()
    except OSError:
        return None, f"This case was imported from an xr-score run; its film {row.path} is no longer there."
    if not path.is_absolute() or not path.is_file():
        return None, f"This case was imported from an xr-score run; {row.path} is not a film file."
    if (row.size_bytes or row.mtime_ns) and (st.st_size, st.st_mtime_ns) != (row.size_bytes, row.mtime_ns):
        return (
            None,
            f"This case was imported from an xr-score run; its film {row.path} has changed since it was scored.",
        )
    return path, None


def same_film(row: Result, sha256: str) -> bool:
    """An imported film's bytes are the ones scored: ``sha256``, that of the bytes read to be decoded, is
    the one the run recorded (where it recorded one)."""
    if not imported(row) or not row.sha256:
        return True
    return sha256 == row.sha256
