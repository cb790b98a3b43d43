"""``xr-score --dicom-out DIR``: the DICOM objects of a scoring run as files, for archives (docs/dicom.md).

For each DICOM film the run scored: its Structured Report, and for a flagged film a Secondary Capture of the
film with the legend (xr-score draws no heatmap: the SC shows the film as the model saw it). The SOP
Instance UIDs are those the daemon gives the same film under the same model and calibration, so an object
written here and one the daemon sends to the PACS are the same instance. Files are ``DIR/<SOPInstanceUID>.dcm``;
a second run writes only what is missing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from xr.core.dicom_results import Finding, build, encode, object_uid, read_film
from xr.core.files import make_dirs, write_private
from xr.core.intake import sniff_dicom


@dataclass
class DicomOut:
    sr: int = 0
    sc: int = 0
    kept: int = 0  # already in DIR
    not_dicom: int = 0
    failed: int = 0


def write_objects(table, out: Path, scored_at: dt.datetime, log=print) -> DicomOut:
    """The objects of ``table`` (an xr-score run's rows) into ``out``."""
    from xr.core.imaging import load_image

    make_dirs(out)
    done = DicomOut()
    for row in table.to_pylist():
        if row.get("error") or row.get("probability") is None:
            continue
        if not sniff_dicom(row["path"]):  # None (too short to tell): not DICOM
            done.not_dicom += 1
            continue
        finding = Finding(
            probability=row["probability"],
            threshold=row["threshold"],
            flagged=bool(row["flagged"]),
            model_id=row["model_id"] or "unknown",
            calibration_id=row["calibration_id"] or "none",
            processed_at=scored_at,
        )
        try:
            film = read_film(row["path"])
            for kind in ("sr", "sc") if finding.flagged else ("sr",):
                target = out / f"{object_uid(film.SOPInstanceUID, finding, kind)}.dcm"
                if target.exists():
                    done.kept += 1
                    continue
                picture = load_image(row["path"]).convert("RGB") if kind == "sc" else None
                write_private(target, encode(build(kind, film, finding, picture)))
                setattr(done, kind, getattr(done, kind) + 1)
        except Exception as exc:  # noqa: BLE001 - one film that cannot become an object does not stop the rest
            done.failed += 1
            log(f"xr-score: no DICOM objects for {row['path']}: {type(exc).__name__}: {exc}")
    return done
