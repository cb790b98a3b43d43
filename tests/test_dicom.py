"""core/dicom.py: DICOM decoding in every transfer syntax of a CR/DX export, the display pipeline, the
identifiers and scope, and what a bad or short file says."""

from __future__ import annotations

import dicom_films
import numpy as np
import pydicom
import pytest

from xr.core.dicom import IDENTIFIERS, decode_dicom, is_dicom, read_header
from xr.core.errors import ImageError
from xr.core.imaging import load_image
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits
from xr.core.predict import Predictor

DEFAULT_SCOPE = (DEFAULT_LIMITS.dicom_modalities, DEFAULT_LIMITS.dicom_body_parts)  # config.yaml's defaults


def _picture(path) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.int64)


@pytest.mark.parametrize("syntax", ["rle", "jpegls", "j2k", "jpeg_lossless"])
def test_every_lossless_syntax_gives_the_native_picture(dicom_dir, syntax):
    assert pydicom.dcmread(dicom_dir[syntax], stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(_picture(dicom_dir[syntax]), _picture(dicom_dir["native"]))


def test_jpeg_baseline_export_is_the_same_picture_within_jpeg_noise(dicom_dir):
    diff = np.abs(_picture(dicom_dir["jpeg_baseline"]) - _picture(dicom_dir["native"]))
    assert diff.mean() < 1.5 and diff.max() <= 12


def test_the_real_cr_chest_in_its_jpeg2000_forms():
    """pydicom-data's RG1: J2KR is the lossless form of UNCR, J2KI the lossy one whose decompressed pixels
    are UNCI."""
    native = _picture(dicom_films.rg1("RG1_UNCR.dcm"))
    assert native.shape == (1955, 1841) and 60 < native.mean() < 230 and native.std() > 20  # a film, not a flat field
    assert np.array_equal(_picture(dicom_films.rg1("RG1_J2KR.dcm")), native)
    lossy = _picture(dicom_films.rg1("RG1_J2KI.dcm"))
    assert np.abs(lossy - _picture(dicom_films.rg1("RG1_UNCI.dcm"))).max() <= 1
    assert np.abs(lossy - native).mean() < 2


def test_monochrome1_is_inverted_so_bone_is_white(dicom_dir):
    """RG1 is MONOCHROME1: on display its lungs (low attenuation) are dark, the mediastinum bright."""
    pic = _picture(dicom_dir["native"])
    h, w = pic.shape
    lungs = pic[h // 3 : h // 2, w // 6 : w // 3].mean()
    mediastinum = pic[h // 3 : h // 2, int(w * 0.45) : int(w * 0.55)].mean()
    assert mediastinum > lungs + 20, (lungs, mediastinum)


def test_monochrome1_and_its_monochrome2_twin_score_alike(dicom_dir, tiny_checkpoint):
    assert np.abs(_picture(dicom_dir["mono2"]) - _picture(dicom_dir["native"])).max() <= 1
    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", amp="off")
    a, b = pred.predict_paths([dicom_dir["native"], dicom_dir["mono2"]])
    assert abs(a.probability - b.probability) < 0.01


def test_a_windowed_12bit_film_scores_like_its_8bit_export(dicom_dir, tiny_checkpoint):
    ds = pydicom.dcmread(dicom_dir["windowed12"], stop_before_pixels=True)
    assert ds.BitsStored == 12 and "WindowCenter" in ds
    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", amp="off")
    a, b = pred.predict_paths([dicom_dir["windowed12"], dicom_dir["export8"]])
    assert abs(a.probability - b.probability) < 0.02
    assert np.abs(_picture(dicom_dir["windowed12"]) - _picture(dicom_dir["export8"])).max() <= 1


def test_the_configured_window_is_used_where_there_are_several(dicom_dir, tmp_path):
    ds = pydicom.dcmread(dicom_dir["windowed12"])
    ds.WindowCenter = [float(ds.WindowCenter), 1100.0]
    ds.WindowWidth = [float(ds.WindowWidth), 100.0]
    path = dicom_films.write(ds, tmp_path / "two_windows.dcm")
    first, second = _picture(path), np.asarray(load_image(path, DecodeLimits(dicom_window=1)), dtype=np.int64)
    assert np.abs(first - _picture(dicom_dir["export8"])).max() <= 1
    assert (second == 255).mean() > 0.5  # a narrow window low in the range: most of the film saturates


def test_first_frame_and_colour_objects_decode(dicom_dir):
    assert np.array_equal(_picture(dicom_dir["two_frames"]), _picture(dicom_dir["export8"]))
    assert np.abs(_picture(dicom_dir["colour"]) - _picture(dicom_dir["export8"])).max() <= 1


def test_identifiers_come_from_the_header_and_never_the_patients_name(dicom_dir):
    data = dicom_dir["native"].read_bytes()
    assert is_dicom(data) and not is_dicom(b"\x89PNG" + bytes(200))
    header = read_header(data)
    assert set(header.identifiers) == set(IDENTIFIERS)
    ids = header.identifiers
    assert ids["patient_id"] == "PID-0001" and ids["accession_number"] == "ACC-0001"
    assert ids["modality"] == "CR" and ids["body_part"] == "CHEST" and ids["view_position"] == "PA"
    assert ids["sop_instance_uid"].startswith("1.") and ids["study_date"] == "20040826"
    assert dicom_films.PATIENT_NAME not in repr(header) and "Doe" not in repr(header)
    assert header.out_of_scope(*DEFAULT_SCOPE) is None


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("knee", "BodyPartExamined KNEE: not one of CHEST"),
        ("sr", "Modality SR: not one of CR, DX"),
        ("no_pixels", "no pixel data"),
    ],
)
def test_objects_out_of_scope_say_why(dicom_dir, key, reason):
    assert read_header(dicom_dir[key].read_bytes()).out_of_scope(*DEFAULT_SCOPE) == reason
    assert read_header(dicom_dir["knee"].read_bytes()).out_of_scope(("CR",), ("CHEST", "KNEE")) is None  # configurable


def test_a_syntax_without_a_decoder_is_an_error_that_names_it():
    path = dicom_films.PYDICOM_FILES / "JPGExtended.dcm"  # 12-bit JPEG extended: only GPL's pylibjpeg-libjpeg reads it
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == (
        "compressed with JPEG Extended (Process 2 and 4) at 12-bit precision (pylibjpeg-libjpeg, GPLv3, decodes it): "
        "decoder not installed"
    )
    assert str(path) in str(info.value) and not info.value.incomplete


def test_a_missing_plugin_for_jpeg_ls_is_named(dicom_dir, monkeypatch):
    """pydicom's own error, as it words it, when no installed plugin decodes JPEG-LS (each one's
    dependencies made missing): the reason names the syntax."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    decoder = get_decoder(JPEGLSLossless)
    assert decoder._available  # installed here: the plugins are taken away for this test only
    unavailable = {**decoder._unavailable, **{name: ("a missing package",) for name in decoder._available}}
    monkeypatch.setattr(decoder, "_unavailable", unavailable)
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(ImageError) as info:
        decode_dicom(dicom_dir["jpegls"].read_bytes(), window=0, max_pixels=10**8)
    assert info.value.reason == "compressed with JPEG-LS Lossless Image Compression: decoder not installed"
    assert not info.value.incomplete


def test_a_cut_dicom_file_is_incomplete_and_a_wrong_one_is_not(dicom_dir, tmp_path):
    data = dicom_dir["native"].read_bytes()
    for cut in (60, 131, 2000, len(data) // 2):
        (tmp_path / "cut.dcm").write_bytes(data[:cut])
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / "cut.dcm")
        assert info.value.incomplete, (cut, info.value.reason)
    (tmp_path / "text.dcm").write_text("not a dicom file at all\n" * 20)
    with pytest.raises(ImageError, match="not a DICOM file") as info:
        load_image(tmp_path / "text.dcm")
    assert not info.value.incomplete


def test_the_lookup_table_gives_the_per_pixel_pipelines_picture(dicom_dir):
    from xr.core.dicom import _display, to_display

    for key in ("native", "mono2", "windowed12"):
        ds = pydicom.dcmread(dicom_dir[key])
        arr = ds.pixel_array
        assert np.array_equal(np.asarray(to_display(arr, ds)), _display(arr, ds, 0)), key


# -- the display pipeline's other inputs (films from tests/dicom_films.py; expectations by numpy) ---------------
def _decode(ds, tmp_path, name: str, **limits) -> np.ndarray:
    path = dicom_films.write(ds, tmp_path / name)
    return np.asarray(load_image(path, DecodeLimits(**limits) if limits else DEFAULT_LIMITS), dtype=np.int64)


def _grey(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.int64)


def test_a_modality_lut_sequence_maps_each_stored_value(dicom_dir, tmp_path):
    """A non-linear 16-bit Modality LUT and no VOI: each pixel is table[stored], scaled from the table's
    16-bit range to 8 bits."""
    grey = _grey(dicom_dir["export8"])
    table = np.rint(65535 * (np.arange(256) / 255.0) ** 2).astype(np.int64)  # a square law: not the identity
    got = _decode(dicom_films.with_modality_lut(dicom_dir["export8"], table, 16), tmp_path, "mlut.dcm")
    want = np.rint(table[grey] * 255 / 65535)
    assert np.abs(got - want).max() <= 1 and np.abs(got - grey).mean() > 20  # the LUT was applied


def test_a_voi_lut_sequence_maps_from_its_first_entry(dicom_dir, tmp_path):
    """A 10-bit VOI LUT whose first entry maps stored value 1000 (stored = 1000 + 4 x grey): each pixel is
    table[stored - 1000], scaled from 10 bits to 8."""
    grey = _grey(dicom_dir["export8"])
    table = np.rint(1023 * (np.arange(1021) / 1020.0) ** 0.5).astype(np.int64)  # a gamma curve
    ds = dicom_films.with_voi_lut(dicom_dir["export8"], 1000, table, 10)
    ds.WindowCenter, ds.WindowWidth = 1500, 100  # a window beside the LUT: the LUT comes first
    got = _decode(ds, tmp_path, "voilut.dcm")
    want = np.rint(table[4 * grey] * 255 / 1023)
    assert np.abs(got - want).max() <= 1 and np.abs(got - grey).mean() > 10


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_presentation_lut_shape_inverse_inverts_once(dicom_dir, tmp_path, photometric):
    """Presentation LUT Shape INVERSE shows the film as its negative; on a MONOCHROME1 film it is how that
    film is shown anyway (one inversion, not two)."""
    grey = _grey(dicom_dir["export8"])
    ds = dicom_films.cr_from_picture(dicom_dir["export8"], PhotometricInterpretation=photometric)
    ds.PresentationLUTShape = "INVERSE"
    assert np.array_equal(_decode(ds, tmp_path, "inverse.dcm"), 255 - grey)
    ds.PresentationLUTShape = "IDENTITY"
    assert np.array_equal(_decode(ds, tmp_path, "identity.dcm"), grey if photometric == "MONOCHROME2" else 255 - grey)


def test_signed_pixels_are_read_as_twos_complement(dicom_dir, tmp_path):
    """12-bit signed stored values (stored = -600 + 4 x grey, so most are negative): through a window that
    covers them the film comes back; without one, 8 bits over the signed 12-bit range [-2048, 2047]."""
    grey = _grey(dicom_dir["export8"])
    windowed = dicom_films.signed(dicom_dir["export8"], -600, WindowCenter=-600 + 510 + 0.5, WindowWidth=1021)
    assert np.abs(_decode(windowed, tmp_path, "signed-w.dcm") - grey).max() <= 1
    plain = dicom_films.signed(dicom_dir["export8"], -600)
    want = np.rint((-600 + 4 * grey + 2048) * 255 / 4095)
    assert np.abs(_decode(plain, tmp_path, "signed.dcm") - want).max() <= 1


def test_a_ybr_full_colour_film_reads_as_its_luminance(dicom_dir, tmp_path):
    """A tinted colour capture stored as YBR_FULL: the picture is the RGB original's luminance (ITU-R 601)."""
    from PIL import Image

    grey = _grey(dicom_dir["export8"]).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    want = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.int64)
    got = _decode(dicom_films.ybr_full(rgb), tmp_path, "ybr.dcm")
    assert np.abs(got - want).max() <= 2


def test_the_pixel_limit_refuses_a_film_before_decoding_it(dicom_dir, monkeypatch):
    """Rows x Columns over daemon.max_pixels: an error that says so, before any pixel is decoded (a huge
    film would take the memory first); at the limit it decodes."""
    import pydicom.pixels

    ds = pydicom.dcmread(dicom_dir["native"], stop_before_pixels=True)
    n = int(ds.Rows) * int(ds.Columns)
    assert np.asarray(load_image(dicom_dir["native"], DecodeLimits(max_pixels=n))).shape == (ds.Rows, ds.Columns)

    def no_decode(*a, **kw):
        raise AssertionError("pixels decoded for a film over the limit")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decode)
    with pytest.raises(ImageError) as info:
        load_image(dicom_dir["native"], DecodeLimits(max_pixels=n - 1))
    assert (
        info.value.reason == (f"image is {ds.Columns}x{ds.Rows} = {n:,} pixels, over the limit of {n - 1:,}")
        and not info.value.incomplete
    )


# -- hostile files: bounded before any large allocation ------------------------------------------------
def test_a_deflated_film_decodes_like_its_native_twin(xray_paths):
    ds = dicom_films.cr_from_picture(xray_paths[0])
    native = decode_dicom(dicom_films._bytes(ds).getvalue(), window=0, max_pixels=10**6)
    data = dicom_films.deflated(ds)
    assert read_header(data).identifiers["patient_id"] == "PID-0002"
    assert np.array_equal(np.asarray(decode_dicom(data, window=0, max_pixels=10**6)), np.asarray(native))


def test_a_deflate_bomb_is_refused_under_the_cap_without_inflating_it(xray_paths):
    """3 MB that inflate to 3 GB: inflating stops at the cap (the pixels max_pixels allows plus the header
    slack), the reason names the limit; header reads give no identifiers rather than a crash."""
    import resource

    from xr.core.dicom import inflate_limit
    from xr.core.intake import dicom_facts

    bomb = dicom_films.deflate_bomb(xray_paths[0], 3 * 2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError) as info:
        decode_dicom(bomb, window=0, max_pixels=10**6)
    assert "Deflated Explicit VR Little Endian" in info.value.reason and "daemon.max_pixels" in info.value.reason
    assert dicom_facts(bomb, DecodeLimits(max_pixels=10**6)).identifiers == {}
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb * 1024 < 4 * inflate_limit(10**6)  # a few caps at most, never the 3 GB


@pytest.mark.parametrize(
    "tags, reason",
    [
        ({"SamplesPerPixel": 3, "BitsAllocated": 64}, "3 samples x 64 bits is 1,204,224 bytes"),
        ({"Rows": 40000, "Columns": 40000}, "over the limit"),
        ({"Rows": 0}, "implausible image attributes"),
        ({"SamplesPerPixel": 9}, "implausible image attributes"),
    ],
)
def test_image_attributes_are_checked_before_any_pixel_is_decoded(xray_paths, monkeypatch, tags, reason):
    """What a decoder would allocate (Rows x Columns x SamplesPerPixel x bytes) is checked against the limit
    first, whatever the pixel data holds."""
    import pydicom.pixels

    ds = dicom_films.cr_from_picture(xray_paths[0])
    for key, value in tags.items():
        setattr(ds, key, value)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageError) as info:
        decode_dicom(dicom_films._bytes(ds).getvalue(), window=0, max_pixels=224 * 224 * 2)
    assert reason in info.value.reason


def test_an_element_longer_than_the_file_is_an_error_not_an_allocation(xray_paths):
    """A length field that claims 4 GB in a 50 KB file: the value is what the file holds (a film whose
    pixels are all there decodes; one cut short is an error), nothing near the claim is allocated."""
    import resource
    import struct

    data = bytearray(dicom_films._bytes(dicom_films.cr_from_picture(xray_paths[0])).getvalue())
    at = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    data[at + 8 : at + 12] = struct.pack("<I", 0xFFFFFFF0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert decode_dicom(bytes(data), window=0, max_pixels=10**6).size == (224, 224)
    with pytest.raises(ImageError):
        decode_dicom(bytes(data[:-1000]), window=0, max_pixels=10**6)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_a_decoder_that_panics_or_refuses_corrupt_data_is_an_error_row_reason(xray_paths, monkeypatch):
    """Found by scripts/fuzz_dicom.py: pylibjpeg-rle panics on some corrupt RLE data (pyo3's PanicException,
    a BaseException that ``except Exception`` lets through to the decode thread), and corrupt data that every
    installed plugin refuses was reported as "decoder not installed"."""
    import pydicom.pixels

    data = dicom_films._bytes(dicom_films.cr_from_picture(xray_paths[0])).getvalue()
    PanicException = type("PanicException", (BaseException,), {})

    def panics(*a, **k):
        raise PanicException("index out of bounds: the len is 800656 but the index is 800656")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", panics)
    with pytest.raises(ImageError) as info:
        decode_dicom(data, window=0, max_pixels=10**6)
    assert info.value.reason == "cannot decode DICOM pixel data (Explicit VR Little Endian): PanicException"

    def refused(*a, **k):
        raise RuntimeError(
            "Unable to decode as exceptions were raised by all available plugins:\n"
            "  gdcm: 'NoneType' object has no attribute 'encode'\n"
            "  pyjpegls: Decoding error: Invalid JPEG-LS stream"
        )

    monkeypatch.setattr(pydicom.pixels, "pixel_array", refused)
    with pytest.raises(ImageError) as info:
        decode_dicom(data, window=0, max_pixels=10**6)
    assert "not installed" not in info.value.reason and "pyjpegls: Decoding error" in info.value.reason

    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # what stops the program still does
        decode_dicom(data, window=0, max_pixels=10**6)


@pytest.mark.parametrize("syntax", ["j2k", "jpegls", "jpeg_lossless", "jpeg_baseline"])
def test_a_codestream_that_claims_another_size_is_refused_before_its_decoder_allocates(dicom_dir, syntax, monkeypatch):
    """Found by hand after fuzzing: a 224 x 224 film whose JPEG 2000 header said 20000 x 20000 took 2 GB in
    openjpeg before it failed. The codestream's own size (SIZ, SOF) must be the header's Rows x Columns."""
    import struct

    import pydicom.pixels
    from pydicom.encaps import encapsulate, generate_frames

    from xr.core.dicom import codestream_size

    ds = pydicom.dcmread(dicom_dir[syntax])
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert codestream_size(bytes(frame)) == (ds.Columns, ds.Rows)  # the real films agree with their headers
    if frame.startswith(b"\xff\x4f"):
        at = frame.find(b"\xff\x51")
        frame[at + 6 : at + 14] = struct.pack(">II", 20000, 20000)
    else:
        at = next(i for i in range(2, len(frame)) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC1, 0xC3, 0xF7))
        frame[at + 5 : at + 9] = struct.pack(">HH", 20000, 20000)
    ds.PixelData = encapsulate([bytes(frame)])
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageError) as info:
        decode_dicom(dicom_films._bytes(ds).getvalue(), window=0, max_pixels=30_000_000)
    assert info.value.reason.startswith(
        f"the compressed frame declares 20000x20000 pixels, the header {ds.Columns}x{ds.Rows}"
    )


def test_a_header_value_of_an_unknown_vr_is_a_bad_file_not_a_crash(xray_paths):
    """Found by scripts/fuzz_dicom.py: pydicom converts a value only when it is read, so an element whose VR
    is garbage raised NotImplementedError out of read_header (after the parse) and stopped the claim stage,
    at every restart."""
    data = dicom_films._bytes(dicom_films.cr_from_picture(xray_paths[0], AccessionNumber="ACC-1")).getvalue()
    at = data.index(b"\x08\x00\x50\x00SH")
    bad = data[: at + 4] + b"S\x01" + data[at + 6 :]
    with pytest.raises(ImageError) as info:
        read_header(bad)
    assert info.value.reason == "cannot read DICOM header: NotImplementedError"
    from xr.core.intake import dicom_facts

    assert dicom_facts(bad).identifiers == {}  # no identifiers; the pixels, never touching that value, decode
    assert decode_dicom(bad, window=0, max_pixels=10**6).size == (224, 224)
