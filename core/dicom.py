"""DICOM in: the header's identifiers and scope, and the pixels through the standard's display pipeline.

Decoding (pydicom 3, ``pydicom.pixels``) covers the transfer syntaxes of CR/DX exports with permissively
licensed plugins: native (uncompressed), RLE (pylibjpeg-rle), JPEG baseline (Pillow), JPEG extended and
JPEG lossless (GDCM), JPEG 2000 (pylibjpeg-openjpeg) and JPEG-LS (pyjpegls). A syntax no installed plugin
decodes is an :class:`ImageError` that names it.

The picture the model sees, in the standard's order (PS3.4 N.2): the first frame; the modality LUT
(rescale slope/intercept, or a Modality LUT Sequence); the VOI LUT (a VOI LUT Sequence, else window
center/width: the first window, or ``window``); MONOCHROME1 (or a Presentation LUT Shape of INVERSE)
inverted so bone is white; then 8 bits by the output range those steps define (the bits stored when there
is no VOI). So a MONOCHROME1 film and its MONOCHROME2 twin give the same picture.

Only the identifiers in :data:`IDENTIFIERS` leave this module: never a patient's name or any other tag.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from xr.core.errors import ImageError

DICM_OFFSET = 128  # a DICOM file: a 128-byte preamble, then b"DICM"
DICOM_SUFFIXES = (".dcm", ".dicom")
# results column -> DICOM keyword
IDENTIFIERS = {
    "patient_id": "PatientID",
    "accession_number": "AccessionNumber",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "study_date": "StudyDate",
    "manufacturer": "Manufacturer",  # the scanner, for performance and flag rates by scanner
    "station_name": "StationName",
}
_HEADER_TAGS = [*IDENTIFIERS.values(), "SOPClassUID", "Rows", "PixelData"]


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset zlib-compressed
HEADER_SLACK = 16 * 1024 * 1024  # what a dataset may hold besides its pixels (inflated), at most
INFLATE_STEP = 4 * 1024 * 1024
MAX_BYTES_PER_PIXEL = 6  # three samples of 16 bits: the most a film's frame stores per pixel
DEFAULT_MAX_PIXELS = 30_000_000  # core/config.py's daemon.max_pixels, for callers without limits


def is_dicom(data: bytes) -> bool:
    return data[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def inflate_limit(max_pixels: int) -> int:
    """The most a deflated dataset may inflate to: a film of ``max_pixels`` and its header."""
    return max_pixels * MAX_BYTES_PER_PIXEL + HEADER_SLACK


@dataclass(frozen=True)
class DicomHeader:
    identifiers: dict[str, str | None]
    has_pixels: bool
    image: bool  # an image object (it has Rows): without pixels it may be a file still being written

    @property
    def maybe_cut(self) -> bool:
        """An image whose pixel data is missing: what a writer that paused before it leaves behind."""
        return self.image and not self.has_pixels

    def out_of_scope(self, modalities: tuple[str, ...], body_parts: tuple[str, ...]) -> str | None:
        """Why this object is not a chest radiograph the daemon should score (None: it is)."""
        modality = (self.identifiers.get("modality") or "").upper()
        if modality not in {m.upper() for m in modalities}:
            return f"Modality {modality or '(none)'}: not one of {', '.join(modalities)}"
        if not self.has_pixels:
            return "no pixel data"
        part = (self.identifiers.get("body_part") or "").upper()
        if part and part not in {b.upper() for b in body_parts}:
            return f"BodyPartExamined {part}: not one of {', '.join(body_parts)}"
        return None


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomHeader:
    """The identifiers and whether there are pixels, without decoding them. Raises ImageError."""
    ds = _dataset(data, max_pixels, stop_before_pixels=False, specific_tags=_HEADER_TAGS)
    ids = {}
    try:  # pydicom converts a value when it is read: an unknown VR raises only here
        for column, keyword in IDENTIFIERS.items():
            value = ds.get(keyword)
            ids[column] = str(value).strip() or None if value is not None else None
        return DicomHeader(identifiers=ids, has_pixels="PixelData" in ds, image="Rows" in ds)
    except Exception as exc:  # noqa: BLE001 - a broken header is a bad file, never a crash
        raise ImageError(None, f"cannot read DICOM header: {type(exc).__name__}") from None


def _inflated(data: bytes, max_pixels: int) -> bytes:
    """A Deflated Explicit VR Little Endian file as the same file in Explicit VR Little Endian, inflated
    under a hard cap: pydicom inflates the whole dataset at once, so a few MB can ask for gigabytes.
    Any other file is returned as it is."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    if DEFLATED.encode() not in data[: DICM_OFFSET + 4096]:
        return data  # the transfer syntax is in the file meta, near the start
    fp = io.BytesIO(data)
    fp.seek(DICM_OFFSET + 4)
    meta = _read_file_meta_info(fp)
    if str(meta.get("TransferSyntaxUID", "")).strip("\x00 ") != DEFLATED:
        return data
    cap = inflate_limit(max_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    # in steps of at most INFLATE_STEP: one call with max_length grows its buffer by doubling, twice the cap
    chunks, size, rest = [], 0, memoryview(data)[fp.tell() :]
    try:
        while size <= cap:
            chunk = inflater.decompress(rest, INFLATE_STEP)
            rest = inflater.unconsumed_tail
            chunks.append(chunk)
            size += len(chunk)
            if inflater.eof or not (chunk or rest):
                break
    except zlib.error as exc:
        raise ImageError(None, f"cannot inflate Deflated Explicit VR Little Endian data: {exc}") from None
    if size > cap:
        raise ImageError(
            None,
            f"Deflated Explicit VR Little Endian data inflates past {cap:,} bytes, "
            f"more than a film within the pixel limit of {max_pixels:,} needs (daemon.max_pixels)",
        )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    write_file_meta_info(out, meta, enforce_standard=False)
    chunks.insert(0, data[: DICM_OFFSET + 4] + out.getvalue())
    return b"".join(chunks)


def _dataset(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, **kw: Any):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on odd but readable files; what fails is an error
            return pydicom.dcmread(io.BytesIO(_inflated(data, max_pixels)), **kw)
    except ImageError:
        raise
    except InvalidDicomError:
        raise ImageError(None, "not a DICOM file (no DICM marker)") from None
    except (EOFError, struct.error) as exc:
        raise ImageError(None, f"truncated DICOM data ({type(exc).__name__})", incomplete=True) from None
    except Exception as exc:  # noqa: BLE001 - a broken file is a bad file, never a crash
        raise ImageError(None, f"cannot read DICOM header: {type(exc).__name__}") from None


def decode_dicom(data: bytes, *, window: int, max_pixels: int) -> Image.Image:
    """The first frame of a DICOM image as the 8-bit grey picture the model sees, through ``window`` (which
    VOI) and refused over ``max_pixels`` (the operator's limits: core/intake.py). Raises ImageError
    (without a path: the caller names the file)."""
    try:
        return _decode(data, window, max_pixels)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom converts values when read: an unknown VR raises here
        raise ImageError(None, f"cannot read DICOM attributes: {type(exc).__name__}: {str(exc)[:120]}") from None


def _decode(data: bytes, window: int, max_pixels: int) -> Image.Image:
    from pydicom.pixels import pixel_array

    ds = _dataset(data, max_pixels)
    if "PixelData" not in ds:  # an image without pixels may be a file cut short (pydicom stops at the end quietly)
        raise ImageError(None, "no pixel data", incomplete="Rows" in ds)
    frames = _check_size(ds, max_pixels)
    _check_codestream(ds, frames)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as exc:  # noqa: BLE001
        raise _decode_error(exc, syntax, data, ds) from None
    except BaseException as exc:
        # a Rust decoder's panic (pyo3's PanicException, pylibjpeg-rle on corrupt RLE data) derives from
        # BaseException: a bad file, not a reason to stop the thread that decodes it
        if type(exc).__name__ != "PanicException":
            raise
        raise _decode_error(exc, syntax, data, ds) from None
    if arr.ndim == 3:  # colour: a secondary capture of a film, read as luminance (pydicom gives YBR as RGB)
        rgb = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        return rgb.convert("L")
    if arr.ndim != 2:
        raise ImageError(None, f"unexpected pixel array shape {arr.shape}")
    return to_display(arr, ds, window)


def _int(ds: Any, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise ImageError(None, f"{keyword} is not a number") from None


def _check_size(ds: Any, max_pixels: int) -> int:
    """The number of frames, once the first frame's size is known to fit the limits: what a decoder would
    allocate (Rows x Columns x SamplesPerPixel x bytes per sample), refused before it does."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    samples, bits = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 8)
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if min(rows, cols, samples, bits, frames) < 1 or samples > 4 or bits > 64:
        raise ImageError(
            None,
            f"implausible image attributes: {cols}x{rows}, {samples} samples of {bits} bits, {frames} frames",
        )
    if rows * cols > max_pixels:
        raise ImageError(None, f"image is {cols}x{rows} = {rows * cols:,} pixels, over the limit of {max_pixels:,}")
    frame_bytes = rows * cols * samples * -(-bits // 8)
    if frame_bytes > max_pixels * MAX_BYTES_PER_PIXEL:
        raise ImageError(
            None,
            f"one frame of {cols}x{rows} x {samples} samples x {bits} bits is {frame_bytes:,} bytes, over the "
            f"{max_pixels * MAX_BYTES_PER_PIXEL:,} a film within the pixel limit of {max_pixels:,} may take",
        )
    return frames


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares in its header (its SOF or SIZ
    marker), None when there is none to read: what its decoder will allocate, whatever the DICOM header says."""
    at = data.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC, then SIZ (Xsiz, Ysiz, XOsiz, YOsiz)
    if 0 <= at < 64 and len(data) >= at + 24:
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[at + 8 : at + 24])
        return xsiz - xo, ysiz - yo
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:  # JPEG / JPEG-LS: marker segments up to SOF
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return (width, height) if height else None  # 0: the height comes later (DNL)
        if marker == 0xDA:
            return None
        i += 2 + length
    return None


def _check_codestream(ds: Any, frames: int) -> None:
    """A compressed first frame whose codestream declares another size than Rows x Columns is refused
    before it is decoded: its decoder allocates what the codestream says (a 224 x 224 film whose JPEG
    2000 header said 20000 x 20000 took 2 GB before failing)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not getattr(syntax, "is_encapsulated", False):
        return
    from pydicom.encaps import generate_frames

    try:
        first = next(generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception:  # noqa: BLE001 - fragments that cannot be read: the decoder names what is wrong
        return
    size = codestream_size(bytes(first[:65536]))
    rows, cols = int(ds.Rows), int(ds.Columns)
    if size is not None and size != (cols, rows):
        raise ImageError(
            None,
            f"the compressed frame declares {size[0]}x{size[1]} pixels, the header {cols}x{rows} "
            f"({getattr(syntax, 'name', syntax)})",
        )


# What decodes a syntax the installed (permissively licensed) plugins do not.
_MISSING_HINT = {"JPEG Extended (Process 2 and 4)": " at 12-bit precision (pylibjpeg-libjpeg, GPLv3, decodes it)"}


def _decode_error(exc: BaseException, syntax: Any, data: bytes, ds: Any) -> ImageError:
    name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
    text = str(exc)
    plugins = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    if "raised by all available plugins" in text and not all("not support" in p for p in plugins):
        # installed decoders that took the data on and failed: the data is corrupt, not the install
        return ImageError(None, f"cannot decode DICOM pixel data ({name}): {plugins[-1][:200] if plugins else text}")
    if "missing dependencies" in text or "no pixel data decoders" in text.lower() or "plugin" in text.lower():
        return ImageError(None, f"compressed with {name}{_MISSING_HINT.get(name, '')}: decoder not installed")
    if "less than expected" in text or "insufficient" in text.lower() or "end of" in text.lower():
        return ImageError(None, f"truncated DICOM pixel data ({name})", incomplete=True)
    return ImageError(None, f"cannot decode DICOM pixel data ({name}): {type(exc).__name__}")


def _output_range(ds: Any) -> tuple[float, float]:
    """The range of values after the modality LUT (as pydicom's windowing defines it)."""
    bits = int(ds.get("BitsStored", 8))
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = (
        (0.0, float(2**bits - 1))
        if int(ds.get("PixelRepresentation", 0)) == 0
        else (float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1))
    )
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def to_display(arr: np.ndarray, ds: Any, window: int = 0) -> Image.Image:
    """Stored values -> modality LUT -> VOI -> inversion -> 8 bits (see the module docstring).

    Integer pixels of up to 16 bits go through the pipeline once per possible value (a lookup table), not
    once per pixel: the same result for a fraction of the cost on a film of millions of pixels."""
    bits = int(ds.get("BitsStored", 8))
    if np.issubdtype(arr.dtype, np.integer) and bits <= 16:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        first = -(2 ** (bits - 1)) if signed else 0
        values = np.arange(first, first + 2**bits, dtype=np.int64)
        lut = np.asarray(_display(values.reshape(1, -1), ds, window), dtype=np.uint8).reshape(-1)
        return Image.fromarray(lut[np.clip(arr.astype(np.int64) - first, 0, 2**bits - 1)], "L")
    return Image.fromarray(_display(arr, ds, window), "L")


def _display(arr: np.ndarray, ds: Any, window: int) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(arr, ds)
    lo, hi = _output_range(ds)
    if ds.get("VOILUTSequence"):
        index = min(window, len(ds.VOILUTSequence) - 1)
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int64)
        values = apply_voi(values, ds, index=index)
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[index].LUTDescriptor[2]) - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        n = ds["WindowCenter"].VM
        values = apply_windowing(values, ds, index=min(window, max(n, 1) - 1))
    values = values.astype(np.float64)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    shape = str(ds.get("PresentationLUTShape", "IDENTITY")).strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":  # one inversion: INVERSE is how MONOCHROME1 is shown
        values = hi - (values - lo)
    scaled = np.rint((values - lo) * (255.0 / max(hi - lo, 1e-12)))
    return np.clip(scaled, 0, 255).astype(np.uint8)
