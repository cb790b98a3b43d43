"""DICOM chest films to try the DICOM round trip with (README, "DICOM with a PACS"): the picture fixtures of
tests/fixtures as 8-bit CR images, each its own patient, study and instance; prints their paths.

    python scripts/demo_films.py OUT_DIR [--n 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
CR = "1.2.840.10008.5.1.4.1.1.1"


def film(picture: Path, k: int) -> Dataset:
    grey = np.asarray(Image.open(picture).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = f"Demo^Patient{k}", f"DEMO-{k:03d}"
    ds.AccessionNumber, ds.StudyID = f"DEMOACC{k:03d}", str(k)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.StudyDescription = f"XR CHEST ({picture.parent.name.lower()} fixture)"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = grey.tobytes()
    return ds


def main() -> None:
    ap = argparse.ArgumentParser(description="write demo CR chest films (DICOM) from the picture fixtures")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=4, help="films: half NORMAL, half PNEUMONIA fixtures")
    args = ap.parse_args()
    train = REPO / "tests" / "fixtures" / "chest_xray" / "train"
    normal, pneumonia = sorted((train / "NORMAL").glob("*.jpeg")), sorted((train / "PNEUMONIA").glob("*.jpeg"))
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.n):
        pool = normal if k % 2 == 0 else pneumonia
        path = args.out / f"demo{k:03d}.dcm"
        film(pool[(k // 2) % len(pool)], k).save_as(path, enforce_file_format=True)
        print(path)


if __name__ == "__main__":
    main()
