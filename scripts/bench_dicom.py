"""DICOM decode cost per transfer syntax, beside a full-resolution JPEG (a benchmark, not a test).

    python scripts/bench_dicom.py [--repeats 7]

The film is pydicom-data's CR chest PA (RG1, 1841x1955, 15 bits stored, MONOCHROME1) in each transfer
syntax a CR/DX export uses (re-encoded here with the encoders tests/dicom_films.py uses; the JPEG 2000
forms are pydicom-data's own files). For each it times, on one thread, the median of ``--repeats`` runs of
``load_image`` (decode and display pipeline to 8 bits) and of ``Predictor.pixels`` (everything a decode
thread of the daemon does: that plus the rendering, resize and crop), against the full-resolution JPEG
samples of ../shared (or tests/fixtures/fullres).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import dicom_films  # noqa: E402

from xr.core.imaging import load_image  # noqa: E402
from xr.core.predict import Predictor  # noqa: E402


def films(folder: Path) -> dict[str, Path]:
    full = pydicom.dcmread(dicom_films.rg1("RG1_UNCR.dcm"))
    out = {"native (Explicit VR Little Endian)": dicom_films.write(full, folder / "native.dcm")}
    for key, uid in (("RLE Lossless", pydicom.uid.RLELossless), ("JPEG-LS Lossless", pydicom.uid.JPEGLSLossless)):
        ds = pydicom.dcmread(out["native (Explicit VR Little Endian)"])
        ds.compress(uid)
        out[key] = dicom_films.write(ds, folder / f"{key.split()[0]}.dcm")
    out["JPEG Lossless (Process 14 SV1)"] = dicom_films._gdcm_jpeg_lossless(
        out["native (Explicit VR Little Endian)"], folder / "jll.dcm"
    )
    out["JPEG Baseline (8-bit, quality 95)"] = dicom_films.write(dicom_films._jpeg_baseline(full), folder / "jpeg.dcm")
    out["JPEG 2000 Lossless"] = dicom_films.rg1("RG1_J2KR.dcm")
    out["JPEG 2000 (lossy)"] = dicom_films.rg1("RG1_J2KI.dcm")
    return out


def median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "xr_mvp_best.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pred = Predictor.from_checkpoint(args.model, device="cpu")
    shared = REPO.parent / "shared" / "samples" / "fullres"
    jpegs = sorted((shared if shared.is_dir() else REPO / "tests" / "fixtures" / "fullres").glob("*/*.jpeg"))[:8]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            (
                f"full-resolution JPEG ({len(jpegs)} samples, mean {statistics.mean(p.stat().st_size for p in jpegs) / 1e3:.0f} KB)",
                [p.read_bytes() for p in jpegs],
            )
        ]
        rows += [(name, [p.read_bytes()]) for name, p in films(Path(tmp)).items()]
        print(f"{'input':<58} {'KB':>6} {'decode ms':>10} {'pixels ms':>10}")
        for name, blobs in rows:
            decode = statistics.mean(median_ms(lambda b=b: load_image(b), args.repeats) for b in blobs)
            pixels = statistics.mean(median_ms(lambda b=b: pred.pixels(b), args.repeats) for b in blobs)
            kb = statistics.mean(len(b) for b in blobs) / 1e3
            print(f"{name:<58} {kb:>6.0f} {decode:>10.1f} {pixels:>10.1f}")


if __name__ == "__main__":
    main()
