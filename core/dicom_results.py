"""DICOM out: the objects a scored film's result becomes in the PACS, built with highdicom.

- :func:`build_sr`: a Comprehensive SR holding a TID 1500 Measurement Report in the film's own study (patient
  and study modules copied from the film, a series of its own): the finding (pneumonia, SCT 233604007), the
  calibrated probability (DCM 122157, UCUM ``1``) and the decision threshold as numeric measurements, the
  triage flag as a qualitative evaluation (SCT Yes/No), the model id and calibration id as the algorithm
  identification, the source image referenced, ``VerificationFlag`` UNVERIFIED and a comment that it is a
  triage aid, not a diagnosis.
- :func:`build_sc`: for a flagged film, a Secondary Capture of the film with the heatmap and a short legend
  burned in (``BurnedInAnnotation`` YES), same study, its own series.

SOP Instance UIDs (and series UIDs) are derived from the result, not drawn at random (:func:`object_uid`):
the same film, model, calibration and kind always give the same UID, so an object rebuilt or re-sent is
the same instance to a PACS, never a second one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("sr", "sc")
MANUFACTURER = "xr-triage"
SERIES_NUMBERS = {"sr": 9901, "sc": 9902}
# Patient and study attributes the objects copy from the film (type 2 in both): a film without one gets it empty
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
SC_SIDE = 512  # the secondary capture's long side: the 224 px heatmap made readable, 0.8 MB uncompressed  # high numbers: listed after the modality's own series
DISCLAIMER = (
    "xr-triage is a triage aid that orders the reading list; it is not a diagnosis. Every film is read by a clinician."
)

# Codes. Pneumonia and the plain chest X-ray procedure are SNOMED CT; the flag and threshold have no
# standard concept, so they use this product's private scheme (99XRTRIAGE, PS3.16 8.2: "99" prefix).
PRIVATE_SCHEME = "99XRTRIAGE"


def _codes():
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    return {
        "pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
        "procedure": CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        "probability": codes.DCM.Probability,
        "threshold": CodedConcept("THRESHOLD", PRIVATE_SCHEME, "Decision threshold"),
        "flag": CodedConcept("FLAGGED", PRIVATE_SCHEME, "Flagged for priority reading"),
        "yes": codes.SCT.Yes,
        "no": codes.SCT.No,
        "unit": CodedConcept("1", "UCUM", "no units"),
        "comment": codes.DCM.Comment,
    }


@dataclass(frozen=True)
class Finding:
    """What a results row says about a film: the values the objects carry."""

    probability: float
    threshold: float
    flagged: bool
    model_id: str
    calibration_id: str
    processed_at: dt.datetime | None = None  # the objects' content date/time (so a rebuild is the same object)

    @classmethod
    def from_row(cls, row: Any) -> Finding:
        return cls(
            probability=float(row.probability),
            threshold=float(row.threshold),
            flagged=bool(row.flagged),
            model_id=str(row.model_id or "unknown"),
            calibration_id=str(row.calibration_id or "none"),
            processed_at=row.processed_at,
        )


def object_uid(source_sop_uid: str, finding: Finding, kind: str) -> str:
    """The SOP Instance UID of the ``kind`` object for this film and model/calibration (2.25.<hash>)."""
    if kind not in KINDS:
        raise ValueError(f"object kind {kind!r}: expected one of {', '.join(KINDS)}")
    return _derived_uid(MANUFACTURER, source_sop_uid, finding.model_id, finding.calibration_id, kind)


def _derived_uid(*parts: str) -> str:
    """2.25.<a name-based UUID of ``parts``> (PS3.5 B.2): the same parts, the same UID, on any host."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def series_uid(study_uid: str, kind: str) -> str:
    """One series per study and kind: every xr-triage SR of a study sits in the same series."""
    return _derived_uid(MANUFACTURER, "series", study_uid, kind)


def read_film(data: bytes | Path | str):
    """The film's header: what the objects copy and reference (the SC draws the heatmap picture, not the
    film's own pixels, so they are not read)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data, stop_before_pixels=True)
    for keyword in TYPE2_COPIED:  # type 2: present, maybe empty; highdicom copies them and needs them there
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def _stamp(ds: Any, finding: Finding) -> None:
    """Content and creation date/time from the result, not the clock: a rebuild gives the same object."""
    when = finding.processed_at or dt.datetime(1970, 1, 1)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for prefix in ("Content", "InstanceCreation", "Series"):
        if f"{prefix}Date" in ds or prefix == "Content":
            setattr(ds, f"{prefix}Date", date)
            setattr(ds, f"{prefix}Time", time)
    for item in ds.get("ContributingEquipmentSequence", []):  # highdicom stamps its own contribution: now
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time


def build_sr(film: Any, finding: Finding):
    """The Structured Report (a highdicom ``ComprehensiveSR``, a pydicom Dataset) for ``film``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    c = _codes()
    algorithm = hd.sr.AlgorithmIdentification(
        name=MANUFACTURER,
        version=finding.model_id,
        parameters=[f"calibration_id={finding.calibration_id}", f"threshold={finding.threshold:.6g}"],
    )
    source = hd.sr.SourceImageForMeasurement.from_source_image(film)
    measurements = [
        hd.sr.Measurement(
            name=c["probability"],
            value=_ds(finding.probability),
            unit=c["unit"],
            algorithm_id=algorithm,
            referenced_images=[source],
        ),
        hd.sr.Measurement(name=c["threshold"], value=_ds(finding.threshold), unit=c["unit"], algorithm_id=algorithm),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=object_uid(film.SOPInstanceUID, finding, "sr") + ".1", identifier="pneumonia triage"
        ),
        finding_type=c["pneumonia"],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(c["flag"], c["yes"] if finding.flagged else c["no"])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(film)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=series_uid("device", "observer"), name=MANUFACTURER, model_name=finding.model_id[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c["procedure"],
        imaging_measurements=[group],
    )
    root = report[0]
    root.ContentSequence.append(
        hd.sr.TextContentItem(
            name=c["comment"],
            value=DISCLAIMER,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[film],
        content=root,
        series_instance_uid=series_uid(film.StudyInstanceUID, "sr"),
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=object_uid(film.SOPInstanceUID, finding, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,  # VerificationFlag UNVERIFIED: no clinician has signed it
    )
    sr.SeriesDescription = "xr-triage pneumonia triage (not a diagnosis)"
    _stamp(sr, finding)
    return sr


def _ds(value: float) -> float:
    """A value a Decimal String (16 characters) holds: 10 significant digits."""
    return float(f"{value:.10g}")


def legend(finding: Finding) -> list[str]:
    state = "FLAGGED for priority reading" if finding.flagged else "not flagged"
    return [
        f"xr-triage: pneumonia probability {finding.probability:.2f} ({state}, threshold {finding.threshold:.2f})",
        f"model {finding.model_id}, calibration {finding.calibration_id}",
        "Heatmap: where the model looked. Triage aid, NOT a diagnosis.",
    ]


def burn_legend(picture: Image.Image, finding: Finding) -> Image.Image:
    """``picture`` (the film with its heatmap; the daemon draws it at the model's 224 pixels) brought to
    :data:`SC_SIDE` on its long side, with a black band and the legend below it, wrapped to the width."""
    rgb = picture.convert("RGB")
    scale = SC_SIDE / max(rgb.size)
    if scale > 1:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC)
    size = max(12, rgb.width // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(rgb)
    lines: list[str] = []
    for text in legend(finding):
        words, line = text.split(), ""
        for word in words:
            trial = f"{line} {word}".strip()
            if line and measure.textlength(trial, font=font) > rgb.width - 12:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    step = size + 6
    out = Image.new("RGB", (rgb.width, rgb.height + step * len(lines) + 8), (0, 0, 0))
    out.paste(rgb, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        draw.text((6, rgb.height + 4 + k * step), line, fill=(255, 255, 0), font=font)
    return out


def build_sc(film: Any, finding: Finding, picture: Image.Image):
    """The Secondary Capture (highdicom ``SCImage``) of ``picture`` (the film with its heatmap) plus the
    legend, in the film's study."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    pixels = np.asarray(burn_legend(picture, finding), dtype=np.uint8)
    with warnings.catch_warnings():  # highdicom warns on the film's own odd person names: copied as they are
        warnings.simplefilter("ignore", UserWarning)
        sc = _sc(hd, film, pixels, finding)
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "xr-triage heatmap (not a diagnosis)"
    sc.ImageComments = " ".join(legend(finding))[:10240]
    sc.DerivationDescription = "Film with a Grad-CAM heatmap of the pneumonia score and a legend burned in"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = film.SOPClassUID, film.SOPInstanceUID
    sc.SourceImageSequence = Sequence([ref])
    _stamp(sc, finding)
    return sc


def _sc(hd: Any, film: Any, pixels: np.ndarray, finding: Finding):
    from pydicom.uid import ExplicitVRLittleEndian

    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=film,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid(film.StudyInstanceUID, "sc"),
        series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=object_uid(film.SOPInstanceUID, finding, "sc"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(film),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def _orientation(film: Any) -> tuple[str, str]:
    value = film.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return (str(value[0]), str(value[1]))
    return ("L", "F")  # a PA chest film as displayed: rows run to the patient's left, columns to the feet


def encode(ds: Any) -> bytes:
    """A DICOM file (preamble, file meta) of ``ds``, as sent and as written by ``xr-score --dicom-out``."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build(kind: str, film: Any, finding: Finding, picture: Image.Image | None = None):
    if kind == "sr":
        return build_sr(film, finding)
    if kind == "sc":
        if picture is None:
            raise ValueError("a secondary capture needs the picture to draw (the film with its heatmap)")
        return build_sc(film, finding, picture)
    raise ValueError(f"object kind {kind!r}: expected one of {', '.join(KINDS)}")


def read_sr(data: bytes) -> dict[str, Any]:
    """What an xr-triage SR says, read back through highdicom's TID 1500 classes (tests, and anyone
    checking what the PACS holds)."""
    import highdicom as hd

    sr = hd.sr.srread(io.BytesIO(data))
    report = hd.sr.MeasurementReport.from_sequence([_root(sr)])
    (group,) = report.get_image_measurement_groups()
    c = _codes()
    values = {m.name: m for m in group.get_measurements()}
    flag = group.get_qualitative_evaluations(name=c["flag"])[0]
    source = group.source_images[0]
    comments = [
        str(item.TextValue)
        for item in _root(sr).ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == c["comment"].value
    ]
    return {
        "sop_instance_uid": str(sr.SOPInstanceUID),
        "study_instance_uid": str(sr.StudyInstanceUID),
        "series_instance_uid": str(sr.SeriesInstanceUID),
        "patient_id": str(sr.get("PatientID", "")),
        "verification": str(sr.VerificationFlag),
        "finding": group.finding_type,
        "probability": float(values[c["probability"]].value),
        "threshold": float(values[c["threshold"]].value),
        "flagged": flag.value == c["yes"],
        "algorithm": _algorithm_field(group, "111001"),
        "model_id": _algorithm_field(group, "111003"),
        "parameters": _algorithm_parameters(group),
        "source_sop_instance_uid": str(source.referenced_sop_instance_uid),
        "comments": comments,
    }


def _root(sr: Any):
    """The SR document's content tree as the root item highdicom's template classes read."""
    from pydicom.dataset import Dataset

    root = Dataset()
    for keyword in ("ValueType", "ConceptNameCodeSequence", "ContinuityOfContent", "ContentTemplateSequence"):
        if keyword in sr:
            setattr(root, keyword, getattr(sr, keyword))
    root.ContentSequence = sr.ContentSequence
    return root


def _walk(items: Any):
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def _algorithm_field(group: Any, code: str) -> str | None:
    for item in _walk(group):
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == code:
            return str(item.TextValue)
    return None


def _algorithm_parameters(group: Any) -> list[str]:
    found = (
        str(item.TextValue)
        for item in _walk(group)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111002"
    )
    return list(dict.fromkeys(found))  # the group and each measurement name the same algorithm
