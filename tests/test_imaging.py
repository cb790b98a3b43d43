"""Image decoding (core/imaging.py): every format a DICOM export drops into a folder comes out as the
8-bit grayscale image a radiographer would see, and every bad file raises ImageError naming the file
and the reason (never a bare PIL exception)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xr.core.errors import ImageError
from xr.core.imaging import decode_image, load_image, to_grayscale
from xr.core.intake import DecodeLimits


# -- helpers ---------------------------------------------------------------------------------------
def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


@pytest.fixture(scope="module")
def xray_path(xray_paths) -> Path:
    return xray_paths[0]


@pytest.fixture(scope="module")
def gray(xray_path) -> np.ndarray:
    """A real 224x224 fixture X-ray as uint8 grayscale."""
    with Image.open(xray_path) as im:
        return np.asarray(im.convert("L"))


def _to_bits(gray: np.ndarray, bits: int) -> np.ndarray:
    """The fixture as a ``bits``-deep detector image stored in uint16: v * (2**bits - 1) / 255."""
    return np.rint(gray.astype(np.float64) * ((1 << bits) - 1) / 255.0).astype(np.uint16)


def _expect_image_error(data_or_path, name: str | None, *reason_words: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        if isinstance(data_or_path, bytes):
            decode_image(data_or_path, name=name, **kw)
        else:
            load_image(data_or_path, **kw)
    exc = info.value
    shown = name if name is not None else str(data_or_path)
    assert shown in str(exc), f"message does not name the file: {exc}"
    assert exc.path == shown
    for word in reason_words:
        assert word.lower() in exc.reason.lower(), f"reason {exc.reason!r} lacks {word!r}"
    return exc


# -- formats ---------------------------------------------------------------------------------------
def test_8bit_grayscale_png_is_exact(gray, tmp_path):
    path = tmp_path / "gray.png"
    path.write_bytes(_png(Image.fromarray(gray, mode="L")))
    out = load_image(path)
    assert out.mode == "L" and out.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(out), gray)


def test_8bit_grayscale_jpeg(gray):
    data = _jpeg(Image.fromarray(gray, mode="L"))
    assert Image.open(io.BytesIO(data)).mode == "L"
    out = decode_image(data, name="gray.jpg")
    assert out.mode == "L" and out.size == (224, 224)
    assert np.abs(_arr(out) - gray).mean() < 2.0  # JPEG is lossy, but it is the same picture


def test_fixture_rgb_jpeg_decodes_to_gray(xray_path, gray):
    with Image.open(xray_path) as im:
        assert im.mode == "RGB"  # the Kaggle files are RGB JPEGs
    out = load_image(xray_path)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), gray)


def test_rgb_png_uses_luma():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)
    rgb[:, 4:] = (90, 90, 90)
    out = _arr(decode_image(_png(Image.fromarray(rgb, "RGB")), name="rgb.png"))
    assert np.all(out[:, :4] == 76)  # ITU-R 601 luma of pure red
    assert np.all(out[:, 4:] == 90)  # neutral grey stays itself


def test_rgba_transparent_area_becomes_black(gray):
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    rgba[:, :100, :3] = 255  # white but ...
    rgba[:, :100, 3] = 0  # ... fully transparent
    out = _arr(decode_image(_png(Image.fromarray(rgba, "RGBA")), name="rgba.png"))
    assert np.all(out[:, :100] == 0)
    np.testing.assert_array_equal(out[:, 100:], gray[:, 100:])


def test_la_png(gray):
    alpha = np.full_like(gray, 255)
    alpha[:50] = 0
    la = Image.merge("LA", [Image.fromarray(gray, "L"), Image.fromarray(alpha, "L")])
    data = _png(la)
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = _arr(decode_image(data, name="la.png"))
    assert np.all(out[:50] == 0)
    np.testing.assert_array_equal(out[50:], gray[50:])


def test_palette_png_without_transparency(gray):
    pal = Image.fromarray(gray, "L").convert("P")
    data = _png(pal)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = _arr(decode_image(data, name="pal.png"))
    np.testing.assert_array_equal(out, _arr(pal.convert("L")))
    assert np.abs(out - gray).max() <= 1


def test_palette_png_with_transparency_becomes_black():
    idx = np.zeros((10, 10), np.uint8)
    idx[:, 5:] = 1
    pal = Image.fromarray(idx, "P")
    pal.putpalette([255, 255, 255, 128, 128, 128] + [0] * (254 * 3))
    data = _png(pal, transparency=0)  # index 0 (white) is transparent
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    out = _arr(decode_image(data, name="palt.png"))
    assert np.all(out[:, :5] == 0), "transparent palette entry must be black, not white"
    assert np.all(out[:, 5:] == 128)


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_16bit_png_scaled_by_real_bit_depth(gray, bits):
    """A 12-bit detector image stored in 16 bits looks like its 8-bit export: not black, not clipped."""
    data = _png(Image.fromarray(_to_bits(gray, bits)))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, name=f"{bits}bit.png")
    assert out.mode == "L"
    got = _arr(out)
    assert np.abs(got - gray).max() <= 1
    assert got.max() == gray.max() < 255  # nothing clipped to white
    assert got.mean() > 0.5 * gray.mean()  # not black


def test_16bit_full_range_uses_every_grey_level():
    ramp = np.linspace(0, 65535, 256 * 4, dtype=np.float64).reshape(16, 64).astype(np.uint16)
    out = _arr(decode_image(_png(Image.fromarray(ramp)), name="ramp16.png"))
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.abs(out - expected).max() <= 1
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) == 256


def _old_high_bit_depth_formula(arr: np.ndarray) -> np.ndarray:
    """The whole-image int64/float64 conversion imaging.py used before it worked in bands: the reference."""
    arr = arr.astype(np.int64)
    lo = int(arr.min())
    if lo < 0:
        arr = arr - lo
    bits = max(8, int(arr.max()).bit_length())
    return np.clip(np.rint(arr * (255.0 / float((1 << bits) - 1))), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("bits", [8, 9, 10, 12, 14, 15, 16])
def test_16bit_conversion_equals_the_old_formula(bits, monkeypatch):
    """Bit-for-bit the old output, with bands small enough that the image spans many (and a partial one)."""
    import xr.core.imaging as imaging

    monkeypatch.setattr(imaging, "_BAND_PIXELS", 3 * 37 + 5)  # 3 rows of 37 per band; 50 rows -> partial last
    rng = np.random.default_rng(bits)
    arr = rng.integers(0, 1 << bits, size=(50, 37), dtype=np.uint16)
    arr[7, 3] = (1 << bits) - 1  # the depth in use is exactly `bits`
    expected = _old_high_bit_depth_formula(arr)
    via_png = decode_image(_png(Image.fromarray(arr)), name=f"rand{bits}.png")
    assert np.array_equal(np.asarray(via_png), expected)
    big_endian = Image.frombytes("I;16B", (37, 50), arr.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_grayscale(big_endian)), expected)
    # A range that is not a full depth, in only the last (partial) band.
    arr = rng.integers(0, 3, size=(50, 37), dtype=np.uint16)
    arr[-1, -1] = rng.integers(256, 1 << bits) if bits > 8 else 200
    assert np.array_equal(np.asarray(to_grayscale(Image.fromarray(arr))), _old_high_bit_depth_formula(arr))


def test_signed_32bit_conversion_equals_the_old_formula(monkeypatch):
    import xr.core.imaging as imaging

    monkeypatch.setattr(imaging, "_BAND_PIXELS", 64)
    rng = np.random.default_rng(0)
    for lo, hi in [(-5000, 5000), (-(2**31), 2**31 - 1), (-9, -2), (0, 70000)]:
        arr = rng.integers(lo, hi, size=(20, 9), dtype=np.int32, endpoint=True)
        img = Image.fromarray(arr)
        assert img.mode == "I"
        assert np.array_equal(np.asarray(to_grayscale(img)), _old_high_bit_depth_formula(arr)), (lo, hi)


def test_16bit_conversion_memory_is_a_few_bytes_per_pixel():
    """A 79 Mpx 16-bit film took 3.5 GB through int64/float64 copies (~25 bytes/px): now the 8-bit result
    plus one band. tracemalloc sees numpy's and Python's allocations, not PIL's decoded image."""
    import tracemalloc

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 4096, size=(2000, 2000), dtype=np.uint16))
    img.load()
    tracemalloc.start()
    try:
        out = to_grayscale(img, name="big16.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.mode == "L" and out.size == (2000, 2000)
    assert peak / (2000 * 2000) < 6, f"peak {peak / 1e6:.1f} MB = {peak / 4e6:.1f} bytes per pixel"


def test_exif_orientation_is_applied():
    # Left half white on a landscape image; orientation 6 = "rotate 90 degrees clockwise to display".
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_jpeg(img, exif=exif.tobytes()), name="phone.jpg")
    assert out.size == (20, 40)  # portrait now
    a = _arr(out)
    assert a[:15].mean() > 240 and a[-15:].mean() < 15  # the white half is on top


@pytest.mark.parametrize("ink", ["cmy", "k"])
def test_cmyk_jpeg_gives_the_films_grey_levels(gray, ink):
    """A CMYK JPEG of the film, printed with cyan, magenta and yellow (K 0) or with black ink only: each
    channel's ink is 255 - grey, so the decoded picture is the film again within JPEG noise (inverted CMYK,
    as Adobe stores it, would be the film's negative)."""
    ink_ = 255 - gray
    zero = np.zeros_like(gray)
    planes = [ink_, ink_, ink_, zero] if ink == "cmy" else [zero, zero, zero, ink_]
    cmyk = Image.merge("CMYK", [Image.fromarray(c, "L") for c in planes])
    out = decode_image(_jpeg(cmyk), name="cmyk.jpg")
    assert out.mode == "L" and out.size == (224, 224)
    diff = np.abs(_arr(out) - gray.astype(np.int64))
    assert diff.mean() < 1.5 and diff.max() <= 16, (diff.mean(), diff.max())


def test_path_and_bytes_give_the_same_image(xray_path):
    a = load_image(xray_path)
    b = load_image(xray_path.read_bytes(), name=xray_path.name)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- bad input -------------------------------------------------------------------------------------
def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _expect_image_error(path, None, "empty")
    _expect_image_error(b"", "empty.png", "empty")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated_file(xray_path, gray, tmp_path, fmt):
    data = xray_path.read_bytes() if fmt == "jpeg" else _png(Image.fromarray(gray, "L"))
    path = tmp_path / f"half.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    _expect_image_error(path, None, "truncated")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_a_file_cut_anywhere_reads_as_incomplete(xray_path, gray, fmt):
    """What a writer that paused mid-file leaves: the daemon waits for such a file instead of failing it."""
    data = xray_path.read_bytes() if fmt == "jpeg" else _png(Image.fromarray(gray, "L"))
    for cut in (0, 1, 3, 8, 20, 100, len(data) // 3, 2 * len(data) // 3):
        with pytest.raises(ImageError) as info:
            decode_image(data[:cut], name=f"cut.{fmt}")
        assert info.value.incomplete, (cut, info.value.reason)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a text file, not an X-ray\n" * 10)
    exc = _expect_image_error(path, None, "not a PNG or JPEG")
    assert not exc.incomplete  # a wrong file, not a short one: it fails at once
    assert not _expect_image_error(b"GIF8", "short.png", "not a PNG or JPEG").incomplete


def test_over_the_pixel_limit(xray_path):
    exc = _expect_image_error(xray_path, None, "over the limit", limits=DecodeLimits(max_pixels=10_000))
    assert "224x224" in exc.reason
    load_image(xray_path, DecodeLimits(max_pixels=224 * 224))  # exactly at the limit is fine


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "BMP"])
def test_other_format_under_png_name_is_unsupported(gray, tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(gray, "L").save(buf, fmt)
    path = tmp_path / "disguised.png"
    path.write_bytes(buf.getvalue())
    _expect_image_error(path, None, "unsupported format", fmt)


@pytest.mark.parametrize("mode", ["F", "HSV", "YCbCr"])
def test_unsupported_mode(gray, mode):
    img = (
        Image.fromarray(gray, "L").convert("RGB").convert(mode)
        if mode != "F"
        else Image.fromarray(gray, "L").convert("F")
    )
    with pytest.raises(ImageError, match="unsupported image mode") as info:
        to_grayscale(img, name="odd.png")
    assert "odd.png" in str(info.value) and mode in str(info.value)


def test_missing_file(tmp_path):
    _expect_image_error(tmp_path / "gone.png", None, "not found")


def test_directory(tmp_path):
    d = tmp_path / "folder.png"
    d.mkdir()
    _expect_image_error(d, None, "directory")


def test_image_error_survives_pickling():
    exc = pickle.loads(pickle.dumps(ImageError("inbox/a.jpeg", "truncated image data", incomplete=True)))
    assert (exc.path, exc.reason, str(exc)) == (
        "inbox/a.jpeg",
        "truncated image data",
        "inbox/a.jpeg: truncated image data",
    )
    assert exc.incomplete


class _LoadEach(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.as_tensor(np.asarray(load_image(self.paths[i])))


def test_image_error_from_a_dataloader_worker_names_the_file(xray_path, tmp_path):
    """torch re-raises a worker's exception as type(exc)(traceback text): it must stay an ImageError
    with the file and reason, not become a RuntimeError carrying the worker's stack."""
    bad = tmp_path / "cut.jpeg"
    bad.write_bytes(xray_path.read_bytes()[:2000])
    loader = torch.utils.data.DataLoader(_LoadEach([str(bad)]), num_workers=1)
    with pytest.raises(ImageError) as info:
        list(loader)
    assert str(info.value).startswith(f"{bad}: truncated image data")
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


# -- the 16-bit file through the product's predictor ------------------------------------------------
def test_16bit_png_prediction_matches_its_8bit_original(tiny_checkpoint, xray_paths, tmp_path):
    from xr.core.predict import Predictor

    # conftest's checkpoint with a seeded random head: create_model starts the head at zero, which would
    # give every image logit 0 and make this comparison vacuous.
    raw = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    raw["model"]["classifier.weight"] = torch.randn(raw["model"]["classifier.weight"].shape, generator=gen) * 0.05
    ckpt = tmp_path / "scored.pt"
    torch.save(raw, ckpt)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu", amp="off", channels_last=False)
    originals = [xray_paths[0], xray_paths[-1]]  # one NORMAL, one PNEUMONIA
    sixteen = []
    for i, src in enumerate(originals):
        with Image.open(src) as im:
            g = np.asarray(im.convert("L"))
        out = tmp_path / f"detector12_{i}.png"
        out.write_bytes(_png(Image.fromarray(_to_bits(g, 12))))
        sixteen.append(out)
    p8 = predictor.predict_paths(originals)
    p16 = predictor.predict_paths(sixteen)
    assert abs(p8[0].logit - p8[1].logit) > 0.05  # the model tells these two images apart
    for a, b in zip(p8, p16):
        assert not isinstance(b, ImageError), b
        assert abs(a.probability - b.probability) < 1e-3
        assert abs(a.logit - b.logit) < 1e-2
        assert a.label == b.label
    # The inputs themselves agree to within one grey level of normalised range.
    t8 = predictor.preprocess(originals[0])
    t16 = predictor.preprocess(sixteen[0])
    assert torch.allclose(t8, t16, atol=1.5 / 255 / 0.225)
