"""DICOM test films made from the real CR chest PA of the PyPI package pydicom-data (RG1_UNCI.dcm:
MONOCHROME1, 15 bits stored, with window values), shrunk 3x so tests stay quick, and re-encoded in each
transfer syntax a CR/DX export uses; plus out-of-scope objects. Every file names a patient, so tests can
check that the name never leaves the daemon."""

from __future__ import annotations

import io
from importlib.resources import files
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane"
DATA_STORE = Path(str(files("data_store"))) / "data"  # pydicom-data's files, read without pydicom's downloader
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def rg1(name: str = "RG1_UNCI.dcm") -> Path:
    return DATA_STORE / name


def _base() -> Dataset:
    ds = pydicom.dcmread(rg1())
    arr = ds.pixel_array[::3, ::3].astype(np.uint16)
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "PID-0001"
    ds.AccessionNumber = "ACC-0001"
    ds.SOPInstanceUID = generate_uid()  # a film of its own, not RG1's instance
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _fresh(ds: Dataset) -> Dataset:
    """A copy with its own SOPInstanceUID (another instance of the same film)."""
    out = pydicom.dcmread(_bytes(ds))
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _bytes(ds: Dataset) -> io.BytesIO:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def chest_films(folder: Path) -> dict[str, Path]:
    """Every variant as a file in ``folder``; the keys name what each one is."""
    base = _base()
    out = {"native": write(base, folder / "native.dcm")}
    # MONOCHROME2 twin: stored values inverted, window centre mirrored: the same picture on a display
    twin = _fresh(base)
    arr = twin.pixel_array.astype(np.int64)
    top = 2 ** int(twin.BitsStored) - 1
    twin.PixelData = (top - arr).astype(np.uint16).tobytes()
    twin.PhotometricInterpretation = "MONOCHROME2"
    twin.WindowCenter = top - float(base.WindowCenter)
    out["mono2"] = write(twin, folder / "mono2.dcm")
    for key, uid in (("rle", RLELossless), ("jpegls", JPEGLSLossless), ("j2k", JPEG2000Lossless)):
        ds = _fresh(base)
        ds.compress(uid)
        out[key] = write(ds, folder / f"{key}.dcm")
    out["jpeg_lossless"] = _gdcm_jpeg_lossless(out["native"], folder / "jpeg_lossless.dcm")
    out["jpeg_baseline"] = write(_jpeg_baseline(base), folder / "jpeg_baseline.dcm")
    return out


def _gdcm_jpeg_lossless(src: Path, dst: Path) -> Path:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    ds = pydicom.dcmread(dst)  # a new instance of the film
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return write(ds, dst)


def _jpeg_baseline(base: Dataset) -> Dataset:
    """The film's display picture (after its window), as an 8-bit MONOCHROME2 JPEG baseline export."""
    from xr.core.dicom import to_display

    picture = to_display(base.pixel_array, base)
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=95)
    ds = _fresh(base)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    for tag in ("WindowCenter", "WindowWidth"):
        if tag in ds:
            del ds[tag]
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds


def from_8bit(picture: Path, folder: Path, name: str, *, bits: int = 12, **tags) -> Path:
    """A 12-bit DICOM whose window maps exactly onto ``picture`` (an 8-bit JPEG export of a film):
    stored = 1000 + 4 x grey, window centre/width covering [1000, 1000 + 4 x 255]."""
    grey = np.asarray(Image.open(picture).convert("L"), dtype=np.uint16)
    stored = 1000 + 4 * grey
    ds = _minimal(stored, bits)
    ds.WindowCenter, ds.WindowWidth = 1000 + 4 * 255 / 2 + 0.5, 4 * 255 + 1
    for key, value in tags.items():
        setattr(ds, key, value)
    return write(ds, folder / name)


def _minimal(arr: np.ndarray, bits: int, modality: str = "CR", body_part: str | None = "CHEST") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, "PID-0002", "ACC-0002"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.StudyDate = modality, "PA", "20261202"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1 if arr.ndim == 2 else 3
    ds.PhotometricInterpretation = "MONOCHROME2" if arr.ndim == 2 else "RGB"
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = arr.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    return ds


def out_of_scope(folder: Path, picture: Path) -> dict[str, Path]:
    """A knee, a structured report, a CR object without pixels, a multi-frame and a colour object."""
    grey = np.asarray(Image.open(picture).convert("L"), dtype=np.uint8)
    knee = write(_minimal(grey, 8, body_part="KNEE"), folder / "knee.dcm")
    sr = _minimal(grey, 8, modality="SR")
    del sr.PixelData
    nopix = _minimal(grey, 8)
    del nopix.PixelData
    two = _minimal(grey, 8)  # frame 1 the film, frame 2 its negative
    two.NumberOfFrames = 2
    two.PixelData = np.stack([grey, 255 - grey]).astype(np.uint8).tobytes()
    colour = _minimal(np.stack([grey] * 3, axis=-1), 8)
    return {
        "knee": knee,
        "sr": write(sr, folder / "sr.dcm"),
        "no_pixels": write(nopix, folder / "nopix.dcm"),
        "two_frames": write(two, folder / "two_frames.dcm"),
        "colour": write(colour, folder / "colour.dcm"),
    }


def cr_from_picture(picture: Path, **tags) -> Dataset:
    """An 8-bit CR chest film (its own SOPInstanceUID) with the pixels of a PNG/JPEG fixture."""
    ds = _minimal(np.asarray(Image.open(picture).convert("L"), dtype=np.uint8), 8)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def with_modality(src: Path, dst: Path, **tags) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PatientName = PATIENT_NAME
    return write(ds, dst)


# -- the display pipeline's other inputs: LUT sequences, Presentation LUT Shape, signed pixels, YBR ----------
def _lut_item(first: int, bits: int, table: np.ndarray) -> Dataset:
    """A LUT sequence item: descriptor (entries, first stored value mapped, bits per entry) and its data."""
    item = Dataset()
    item.LUTDescriptor = [len(table), first, bits]
    item["LUTDescriptor"].VR = "US"
    item.LUTData = [int(v) for v in table]
    item["LUTData"].VR = "US"
    return item


def with_modality_lut(picture: Path, table: np.ndarray, bits: int) -> Dataset:
    """The 8-bit film with a Modality LUT Sequence mapping each stored value v to ``table[v]`` (``bits`` deep)."""
    ds = cr_from_picture(picture)
    item = _lut_item(0, bits, table)
    item.ModalityLUTType = "US"  # unspecified units
    ds.ModalityLUTSequence = [item]
    return ds


def with_voi_lut(picture: Path, first: int, table: np.ndarray, bits: int) -> Dataset:
    """A 12-bit film (stored = first + 4 x grey) with a VOI LUT Sequence whose first entry maps ``first``."""
    grey = np.asarray(Image.open(picture).convert("L"), dtype=np.uint16)
    ds = _minimal(first + 4 * grey, 12)
    item = _lut_item(first, bits, table)
    item.LUTExplanation = "test curve"
    ds.VOILUTSequence = [item]
    return ds


def signed(picture: Path, offset: int, **tags) -> Dataset:
    """A 12-bit film with signed stored values (PixelRepresentation 1): stored = offset + 4 x grey."""
    grey = np.asarray(Image.open(picture).convert("L"), dtype=np.int16)
    ds = _minimal(np.zeros(grey.shape, np.uint16), 12)
    ds.PixelRepresentation = 1
    ds.PixelData = (offset + 4 * grey).astype("<i2").tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def ybr_full(rgb: np.ndarray) -> Dataset:
    """A colour secondary capture stored as YBR_FULL (the RGB picture converted by the standard's equations)."""
    from pydicom.pixels import convert_color_space

    ds = _minimal(rgb, 8)
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint8).tobytes()
    return ds


def deflated(ds: Dataset) -> bytes:
    """``ds`` as a Deflated Explicit VR Little Endian file (PS3.5 A.5: the dataset after the file meta,
    zlib-deflated without a header)."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"\0" * 128 + b"DICM" + head.getvalue() + c.compress(body.getvalue()) + c.flush()


def deflate_bomb(picture: Path, inflated: int = 3 * 2**30) -> bytes:
    """A small 8-bit CR film in the Deflated syntax whose PixelData claims and holds ``inflated`` bytes of
    zeros: a few MB on disk, gigabytes once inflated. The stream repeats one fully flushed block of
    deflated zeros, so it is built without ever holding the inflated bytes."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = cr_from_picture(picture)
    del ds.PixelData
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    chunk = 1 << 20
    n = inflated // chunk
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, n * chunk)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = c.compress(body.getvalue() + pixel_header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every chunk of zeros
    return b"\0" * 128 + b"DICM" + head.getvalue() + start + block * n + c.flush()
