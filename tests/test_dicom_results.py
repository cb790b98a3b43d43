"""core/dicom_results.py: the SR and SC a scored film becomes, read back with highdicom and pydicom."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pydicom
import pytest
from PIL import Image

from xr.core import dicom_results as dr

FINDING = dr.Finding(
    probability=0.8731234567,
    threshold=0.42,
    flagged=True,
    model_id="efficientnet_lite0-0123456789ab",
    calibration_id="c0ffee1234567890",
    processed_at=dt.datetime(2026, 12, 6, 8, 30, 15),
)


@pytest.fixture(scope="module")
def film(dicom_dir):
    return dr.read_film(dicom_dir["native"])


def test_sr_in_the_films_study_with_the_rows_values(film):
    data = dr.encode(dr.build_sr(film, FINDING))
    got = dr.read_sr(data)
    assert got["study_instance_uid"] == film.StudyInstanceUID
    assert got["series_instance_uid"] not in (film.SeriesInstanceUID, "")
    assert got["patient_id"] == film.PatientID
    assert got["verification"] == "UNVERIFIED"
    assert got["probability"] == pytest.approx(FINDING.probability, abs=1e-9)
    assert got["threshold"] == pytest.approx(0.42)
    assert got["flagged"] is True
    assert got["finding"].value == "233604007" and got["finding"].scheme_designator == "SCT"
    assert got["algorithm"] == "xr-triage" and got["model_id"] == FINDING.model_id
    assert f"calibration_id={FINDING.calibration_id}" in got["parameters"]
    assert got["source_sop_instance_uid"] == film.SOPInstanceUID
    assert any("not a diagnosis" in c for c in got["comments"])
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.PatientName == film.PatientName and ds.AccessionNumber == film.AccessionNumber
    assert ds.ContentDate == "20261206" and ds.ContentTime == "083015"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == film.StudyInstanceUID


def test_not_flagged(film):
    got = dr.read_sr(dr.encode(dr.build_sr(film, dr.Finding(0.1, 0.42, False, "m", "c"))))
    assert got["flagged"] is False and got["probability"] == pytest.approx(0.1)


def test_uids_are_stable_and_tell_objects_apart(film):
    a, b = dr.build_sr(film, FINDING), dr.build_sr(film, FINDING)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert dr.encode(a) == dr.encode(b)  # rebuilt: the same object, byte for byte
    other_model = dr.Finding(**{**FINDING.__dict__, "model_id": "another"})
    other_cal = dr.Finding(**{**FINDING.__dict__, "calibration_id": "another"})
    uids = {
        dr.object_uid(film.SOPInstanceUID, FINDING, "sr"),
        dr.object_uid(film.SOPInstanceUID, FINDING, "sc"),
        dr.object_uid(film.SOPInstanceUID, other_model, "sr"),
        dr.object_uid(film.SOPInstanceUID, other_cal, "sr"),
        dr.object_uid("1.2.3.4", FINDING, "sr"),
    }
    assert len(uids) == 5 and all(u.startswith("2.25.") and len(u) <= 64 for u in uids)
    with pytest.raises(ValueError, match="'xx'"):
        dr.object_uid(film.SOPInstanceUID, FINDING, "xx")


def test_secondary_capture_with_legend(film):
    picture = Image.fromarray(np.full((300, 240, 3), 90, np.uint8))
    sc = dr.build_sc(film, FINDING, picture)
    ds = pydicom.dcmread(__import__("io").BytesIO(dr.encode(sc)))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.StudyInstanceUID == film.StudyInstanceUID and ds.PatientID == film.PatientID
    assert ds.SeriesInstanceUID != dr.build_sr(film, FINDING).SeriesInstanceUID
    assert ds.SOPInstanceUID == dr.object_uid(film.SOPInstanceUID, FINDING, "sc")
    assert ds.BurnedInAnnotation == "YES" and ds.PhotometricInterpretation == "RGB"
    side = dr.SC_SIDE
    assert ds.Columns == round(240 * side / 300) and ds.Rows > side  # brought to SC_SIDE, the legend band below
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    band = ds.pixel_array[side:]
    assert (band != 0).any()  # text drawn
    assert "0.87" in ds.ImageComments and "NOT a diagnosis" in ds.ImageComments


def test_build_names_what_is_missing(film):
    with pytest.raises(ValueError, match="picture"):
        dr.build("sc", film, FINDING)
    with pytest.raises(ValueError, match="'pdf'"):
        dr.build("pdf", film, FINDING)


def test_xr_score_dicom_out_writes_the_daemons_objects(dicom_dir, tmp_path):
    """score/dicom_out.py: an SR per scored DICOM film, an SC per flagged one, with the UIDs the daemon would
    send; PNG/JPEG and error rows give nothing; a second run writes nothing new."""
    pa = pytest.importorskip("pyarrow")
    from xr.score.dicom_out import write_objects

    rows = [
        {"path": str(dicom_dir["native"]), "probability": 0.9, "threshold": 0.5, "flagged": True},
        {"path": str(dicom_dir["rle"]), "probability": 0.2, "threshold": 0.5, "flagged": False},
        {"path": str(dicom_dir["export8"]), "probability": 0.7, "threshold": 0.5, "flagged": True},
        {"path": str(dicom_dir["mono2"]), "probability": None, "threshold": None, "flagged": None, "error": "bad"},
    ]
    for r in rows:
        r.update(model_id="m-1", calibration_id="c-1", error=r.get("error"))
    table = pa.Table.from_pylist(rows)
    got = write_objects(table, tmp_path / "objects", FINDING.processed_at)
    assert (got.sr, got.sc, got.not_dicom, got.failed) == (2, 1, 1, 0)
    native = dr.read_film(dicom_dir["native"])
    finding = dr.Finding(0.9, 0.5, True, "m-1", "c-1")
    files = {p.name for p in (tmp_path / "objects").iterdir()}
    assert f"{dr.object_uid(native.SOPInstanceUID, finding, 'sr')}.dcm" in files
    assert f"{dr.object_uid(native.SOPInstanceUID, finding, 'sc')}.dcm" in files and len(files) == 3
    sr = dr.read_sr((tmp_path / "objects" / f"{dr.object_uid(native.SOPInstanceUID, finding, 'sr')}.dcm").read_bytes())
    assert sr["probability"] == pytest.approx(0.9) and sr["study_instance_uid"] == native.StudyInstanceUID
    again = write_objects(table, tmp_path / "objects", FINDING.processed_at)
    assert (again.sr, again.sc, again.kept) == (0, 0, 3)


def test_a_film_without_the_optional_patient_and_study_attributes(dicom_dir, tmp_path):
    import dicom_films

    ds = dicom_films.cr_from_picture(dicom_dir["export8"])
    for keyword in ("PatientBirthDate", "PatientSex", "StudyTime", "ReferringPhysicianName", "StudyID"):
        if keyword in ds:
            delattr(ds, keyword)
    film = dr.read_film(dicom_films.write(ds, tmp_path / "bare.dcm"))
    got = dr.read_sr(dr.encode(dr.build_sr(film, FINDING)))
    assert got["study_instance_uid"] == ds.StudyInstanceUID and got["patient_id"] == ds.PatientID
    sc = dr.build_sc(film, FINDING, Image.new("RGB", (64, 64)))
    assert sc.StudyInstanceUID == ds.StudyInstanceUID and sc.PatientBirthDate in ("", None)


@pytest.mark.slow
def test_xr_score_dicom_out(tmp_path, dicom_dir, tiny_checkpoint, capsys):
    """``xr-score --dicom-out``: the run's DICOM films get their SRs as files (on a local Ray)."""
    ray = pytest.importorskip("ray")
    import shutil

    from xr.score.cli import main

    data = tmp_path / "archive"
    data.mkdir()
    for key in ("native", "rle"):
        shutil.copy(dicom_dir[key], data / f"{key}.dcm")
    shutil.copy(dicom_dir["export8"], data / "export.jpeg")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        argv = ["--data", data, "--out", tmp_path / "run", "--model", tiny_checkpoint, "--dicom-out", tmp_path / "objs"]
        rc = main([str(a) for a in argv])
    finally:
        ray.shutdown()
    said = capsys.readouterr()
    assert rc == 0, said.err[-3000:]
    assert "2 SR and" in said.out
    srs = [dr.read_sr(p.read_bytes()) for p in (tmp_path / "objs").iterdir() if pydicom.dcmread(p).Modality == "SR"]
    sources = {pydicom.dcmread(data / f"{k}.dcm").SOPInstanceUID for k in ("native", "rle")}
    assert {s["source_sop_instance_uid"] for s in srs} == sources
