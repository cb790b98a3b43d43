"""Decode what an export drops into a folder into one 8-bit grayscale image: one entry, dispatched on content.

Handles DICOM (core/dicom.py: the display pipeline of the standard), 8-bit grayscale, RGB, RGBA, LA and
palette PNG/JPEG, 16-bit grayscale PNG (scaled by its real bit depth), and EXIF orientation. Every failure
raises :class:`ImageError` with the file and a reason a radiographer can read; a decoder's own exceptions
never escape.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from xr.core.dicom import DICM_OFFSET, DICOM_SUFFIXES, decode_dicom, is_dicom
from xr.core.errors import ImageError
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits

# where discovery has imported the image names from; they are defined with the other intake rules
from xr.core.intake import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from xr.core.intake import is_image_name as is_image_name

SUPPORTED_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: multi-picture JPEG some cameras/exporters write
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # what a PNG or JPEG file starts with
SUPPORTED_MODES = (
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBX",
    "CMYK",
    "I",
    "I;16",
    "I;16B",
    "I;16L",
    "I;16N",
)

# A truncated file must be an error, not a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(
    source: str | Path | bytes,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    draft_size: tuple[int, int] | None = None,
    name: str | Path | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) to a mode "L" image within ``limits`` (its pixel
    limit and DICOM window: core/intake.py).

    ``draft_size`` lets a large JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT, never below that size:
    nearly free, and the resize that follows would throw those pixels away anyway.
    ``name`` is the file name used in error messages when ``source`` is bytes.
    """
    label = name if name is not None else (None if isinstance(source, bytes) else source)
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageError(label, "is a directory, not an image file") from None
        except OSError as exc:
            raise ImageError(label, f"cannot read file: {exc.strerror or exc}") from None
    return decode_image(data, limits, draft_size=draft_size, name=label)


def decode_image(
    data: bytes,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    draft_size: tuple[int, int] | None = None,
    name: str | Path | None = None,
) -> Image.Image:
    max_pixels = limits.max_pixels
    if len(data) == 0:
        raise ImageError(name, "empty file (0 bytes)", incomplete=True)
    if is_dicom(data):
        try:
            return decode_dicom(data, window=limits.dicom_window, max_pixels=max_pixels)
        except ImageError as exc:
            raise ImageError(name, exc.reason, incomplete=exc.incomplete) from None
    if name is not None and str(name).lower().endswith(DICOM_SUFFIXES):
        if len(data) < DICM_OFFSET + 4:
            raise ImageError(name, f"incomplete file: {len(data)} bytes end inside the DICOM preamble", incomplete=True)
        raise ImageError(name, f"not a DICOM file (no DICM marker at byte {DICM_OFFSET})")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces PIL's bomb warning/error with a clear message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if any(data.startswith(sig[: len(data)]) for sig in SIGNATURES):
            raise ImageError(
                name, f"incomplete file: {len(data)} bytes end inside the image header", incomplete=True
            ) from None
        raise ImageError(name, "not a PNG or JPEG image (unrecognised content)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"image too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        if "Truncated File Read" in str(exc):
            raise ImageError(name, f"truncated image header ({exc})", incomplete=True) from None
        raise ImageError(name, f"cannot open image: {exc}") from None

    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(name, f"unsupported format {img.format}; expected PNG or JPEG")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            name, f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
        )
    if width < 1 or height < 1:
        raise ImageError(name, f"image has no pixels ({width}x{height})")
    if img.mode not in SUPPORTED_MODES:
        raise ImageError(name, f"unsupported image mode {img.mode!r}")

    try:
        if draft_size is not None and img.format in ("JPEG", "MPO"):
            img.draft("L" if img.mode in ("RGB", "L") else img.mode, draft_size)
        img.load()
        # EXIF orientation: phones and some exporters store the pixels rotated.
        img = ImageOps.exif_transpose(img)
        return to_grayscale(img, name=name)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        if "truncated" in msg or "broken data stream" in msg:
            raise ImageError(name, f"truncated image data ({msg})", incomplete=True) from None
        raise ImageError(name, f"corrupt image data ({msg})") from None


def to_grayscale(img: Image.Image, name: str | Path | None = None) -> Image.Image:
    """Any supported mode -> 8-bit "L", without clipping high-bit-depth data."""
    mode = img.mode
    if mode == "L":
        return img
    if mode.startswith("I"):
        return _high_bit_depth_to_l(img)
    if mode in ("1", "RGB", "RGBX", "CMYK"):
        return img.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        return to_grayscale(img, name)
    if mode in ("RGBA", "LA", "La"):
        # Transparent regions become black, the background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    raise ImageError(name, f"unsupported image mode {mode!r}")


# Pixels converted per band in _high_bit_depth_to_l. The float64 arithmetic needs ~30 bytes per pixel
# of temporaries; doing it band by band keeps that to a few MB however large the film is.
_BAND_PIXELS = 1 << 16


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit int) grayscale by the bit depth its values really use.

    A 12-bit detector stored in a 16-bit PNG has values up to 4095: dividing by 65535 would make it
    nearly black, clipping at 255 would make it white. The smallest bit depth (>= 8) that holds the
    maximum value is the image's real depth; ``v * 255 / (2**bits - 1)`` then reproduces its 8-bit export.

    Works on bands of rows cropped from the image, so memory beyond the decoded image is the 8-bit
    result plus one band's temporaries, not a 64-bit copy of the whole film.
    """
    width, height = img.size
    if width == 0 or height == 0:
        return Image.new("L", img.size)
    rows = max(1, _BAND_PIXELS // width)
    bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:
        return np.asarray(img.crop((0, top, width, bottom)))

    # First pass: the value range. PIL's getextrema() rejects I;16B/I;16L/I;16N, so numpy does it.
    lo, hi = None, None
    for top, bottom in bands:
        values = band(top, bottom)
        band_lo, band_hi = int(values.min()), int(values.max())
        lo = band_lo if lo is None else min(lo, band_lo)
        hi = band_hi if hi is None else max(hi, band_hi)
    shift = -lo if lo < 0 else 0  # signed data: shift to zero before measuring the range
    bits = max(8, (hi + shift).bit_length())
    scale = 255.0 / float((1 << bits) - 1)

    # Second pass: the same float64 formula as always (identical output), one band at a time.
    out = np.empty((height, width), dtype=np.uint8)
    for top, bottom in bands:
        values = band(top, bottom).astype(np.int64)  # int64: also byte-swaps I;16B and holds int32 + shift
        if shift:
            values += shift
        scaled = values * scale
        np.rint(scaled, out=scaled)
        np.clip(scaled, 0, 255, out=scaled)
        out[top:bottom] = scaled
    return Image.fromarray(out)
