"""One way in for a film (core/intake.py): DecodeLimits from the operator's config, read_input's identity,
bytes, hash and DICOM facts or its errors, and the same pixels in xr-daemon and xr-score under any config."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from xr.core.config import DaemonConfig, DicomConfig, Settings, load_settings
from xr.core.errors import ImageError
from xr.core.imaging import decode_image
from xr.core.intake import (
    DEFAULT_LIMITS,
    VANISHED,
    DecodeLimits,
    InputChanged,
    InputError,
    InputUnavailable,
    InputVanished,
    is_read,
    read_input,
)


# -- DecodeLimits ------------------------------------------------------------------------------------------
def test_the_defaults_are_the_config_definitions_own():
    d, dicom = DaemonConfig(), DicomConfig()
    assert DecodeLimits() == DEFAULT_LIMITS == DecodeLimits.from_settings(Settings())
    assert DEFAULT_LIMITS.max_file_bytes == int(d.max_file_mb * 1024 * 1024)
    assert DEFAULT_LIMITS.max_pixels == d.max_pixels
    assert DEFAULT_LIMITS.dicom_window == dicom.window
    assert DEFAULT_LIMITS.dicom_modalities == tuple(dicom.modalities)
    assert DEFAULT_LIMITS.dicom_body_parts == tuple(dicom.body_parts)


def test_limits_come_from_the_operators_settings(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "daemon:\n  max_file_mb: 1.5\n  max_pixels: 4000000\n"
        "dicom:\n  window: 2\n  modalities: [DX]\n  body_parts: [CHEST, THORAX]\n"
    )
    limits = DecodeLimits.from_settings(load_settings(path))
    assert limits == DecodeLimits(
        max_file_bytes=int(1.5 * 1024 * 1024),
        max_pixels=4_000_000,
        dicom_window=2,
        dicom_modalities=("DX",),
        dicom_body_parts=("CHEST", "THORAX"),
    )
    with pytest.raises(AttributeError):  # frozen: built once, shared by threads
        limits.max_pixels = 1  # type: ignore[misc]


# -- read_input ----------------------------------------------------------------------------------------------
def test_a_file_is_read_with_its_identity_bytes_and_hash(tmp_path, xray_paths):
    path = tmp_path / "a.jpeg"
    path.write_bytes(xray_paths[0].read_bytes())
    st = os.stat(path)
    film = read_input(path)
    assert film.path == str(path) and film.data == path.read_bytes()
    assert film.identity == (st.st_size, st.st_mtime_ns) and not film.is_symlink
    assert film.sha256 == hashlib.sha256(film.data).hexdigest()
    assert film.identifiers == dict.fromkeys(film.identifiers) and film.out_of_scope is None and not film.maybe_cut
    assert not film.changed((st.st_size, st.st_mtime_ns))
    assert film.changed((st.st_size - 1, st.st_mtime_ns))  # written again since a listing saw it


def _error(path, cls=InputError, **kw) -> InputError:
    with pytest.raises(cls) as info:
        read_input(path, **kw)
    exc = info.value
    assert exc.path == str(path) and str(exc).startswith(f"{path}: ")  # names the file
    return exc


def test_a_file_that_is_gone_has_vanished(tmp_path):
    exc = _error(tmp_path / "gone.png", InputVanished)
    assert exc.reason == VANISHED


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer: a blocking open would never return
    exc = _error(fifo)
    assert exc.reason == "not a regular file (a FIFO)" and type(exc) is InputError


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "folder.png").mkdir()
    assert "directory" in _error(tmp_path / "folder.png").reason


def test_a_file_over_the_size_limit_is_not_read(tmp_path, xray_paths):
    path = tmp_path / "big.jpeg"
    path.write_bytes(xray_paths[0].read_bytes())
    size = path.stat().st_size
    exc = _error(path, limits=DecodeLimits(max_file_bytes=size - 1))
    assert exc.reason == f"file is {size:,} bytes, over the limit of {size - 1:,} (daemon.max_file_mb)"
    assert read_input(path, DecodeLimits(max_file_bytes=size)).size == size  # at the limit is fine


def test_symlinks_must_stay_in_the_inbox(tmp_path, xray_paths):
    inbox, outside = tmp_path / "inbox", tmp_path / "elsewhere"
    inbox.mkdir()
    outside.mkdir()
    secret = outside / "secret.jpeg"
    secret.write_bytes(xray_paths[0].read_bytes())
    (inbox / "out.jpeg").symlink_to(secret)
    exc = _error(inbox / "out.jpeg", inbox=inbox)
    assert exc.reason == f"symlink points outside the inbox (to {secret})"
    assert read_input(inbox / "out.jpeg").data == secret.read_bytes()  # no inbox (xr-score): any target

    inside = inbox / "film.jpeg"
    inside.write_bytes(xray_paths[1].read_bytes())
    (inbox / "link.jpeg").symlink_to(inside)
    film = read_input(inbox / "link.jpeg", inbox=inbox)
    assert film.is_symlink and film.data == inside.read_bytes()
    assert not film.changed((0, 0))  # a listing of the link itself says nothing about the target

    (inbox / "dangling.jpeg").symlink_to(inbox / "nothing.jpeg")
    exc = _error(inbox / "dangling.jpeg", inbox=inbox)
    assert exc.reason == f"symlink target not found ({inbox / 'nothing.jpeg'})" and type(exc) is InputError


def test_a_file_swapped_after_it_was_listed_is_not_read_under_the_listed_identity(tmp_path, xray_paths):
    """The descriptor's (device, inode) is checked against the listing's: a file renamed over the listed
    one (same size and mtime, so nothing else tells) and a name turned into a symlink are InputChanged."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    film = inbox / "a.jpeg"
    film.write_bytes(xray_paths[0].read_bytes())
    st = film.stat()
    listed = (st.st_dev, st.st_ino)
    assert read_input(film, inbox=inbox, is_symlink=False, inode=listed).data == film.read_bytes()

    other = inbox / ".other.part"
    other.write_bytes(xray_paths[1].read_bytes()[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(other, film)
    assert (film.stat().st_size, film.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(InputChanged) as info:
        read_input(film, inbox=inbox, is_symlink=False, inode=listed)
    assert info.value.reason == "replaced by another file since it was listed"

    secret = tmp_path / "secret.jpeg"
    secret.write_bytes(xray_paths[2].read_bytes())
    film.unlink()
    film.symlink_to(secret)  # listed as a plain file: the link is not followed (O_NOFOLLOW)
    with pytest.raises(InputChanged) as info:
        read_input(film, inbox=inbox, is_symlink=False)
    assert "symlink" in info.value.reason


def test_a_symlink_in_the_inbox_is_read_through_its_resolved_target(tmp_path, xray_paths):
    """Symlinks inside the inbox stay allowed: resolved here, the target opened without following links,
    and its identity checked against the listing's (the target's)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    target = inbox / "film.jpeg"
    target.write_bytes(xray_paths[0].read_bytes())
    (inbox / "link.jpeg").symlink_to(target)
    st = target.stat()
    film = read_input(inbox / "link.jpeg", inbox=inbox, is_symlink=True, inode=(st.st_dev, st.st_ino))
    assert film.is_symlink and film.data == target.read_bytes()
    (inbox / ".new.part").write_bytes(xray_paths[1].read_bytes())
    os.replace(inbox / ".new.part", target)  # a new file behind the same link
    with pytest.raises(InputChanged):
        read_input(inbox / "link.jpeg", inbox=inbox, is_symlink=True, inode=(st.st_dev, st.st_ino))


@pytest.mark.parametrize(
    ("code", "cls", "reason"),
    [
        (errno.ESTALE, InputUnavailable, "share unavailable"),
        (errno.EIO, InputUnavailable, "share unavailable"),
        (errno.EACCES, InputError, "cannot read file: Permission denied"),
    ],
)
def test_a_share_that_went_away_is_unavailable_other_errors_are_not(tmp_path, monkeypatch, code, cls, reason):
    path = tmp_path / "a.png"
    path.write_bytes(b"x")

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", refuse)
    exc = _error(path, cls)
    assert type(exc) is cls and exc.reason.startswith(reason)


def test_input_errors_are_image_errors_that_survive_pickling(tmp_path):
    exc = _error(tmp_path / "gone.png", InputVanished)
    assert isinstance(exc, ImageError)
    again = pickle.loads(pickle.dumps(exc))  # Ray and DataLoader workers send errors back pickled
    assert type(again) is InputVanished and (again.path, again.reason) == (exc.path, exc.reason)


@pytest.fixture(scope="module")
def dicom_objects(tmp_path_factory, xray_paths) -> dict[str, Path]:
    import dicom_films

    folder = tmp_path_factory.mktemp("intake_dicom")
    films = dicom_films.out_of_scope(folder, xray_paths[-1])
    films["chest"] = dicom_films.from_8bit(xray_paths[-1], folder, "chest.dcm")
    return films


def test_dicom_identifiers_and_scope(dicom_objects):
    chest = read_input(dicom_objects["chest"])
    ids = chest.identifiers
    assert ids["patient_id"] == "PID-0002" and ids["accession_number"] == "ACC-0002"
    assert ids["modality"] == "CR" and ids["body_part"] == "CHEST" and ids["sop_instance_uid"]
    assert "Doe" not in repr(ids)  # the patient's name never leaves the header
    assert chest.out_of_scope is None and not chest.maybe_cut

    knee = read_input(dicom_objects["knee"])
    assert knee.out_of_scope == "BodyPartExamined KNEE: not one of CHEST"
    assert read_input(dicom_objects["knee"], DecodeLimits(dicom_body_parts=("CHEST", "KNEE"))).out_of_scope is None
    assert read_input(dicom_objects["sr"]).out_of_scope == "Modality SR: not one of CR, DX"
    assert read_input(dicom_objects["chest"], DecodeLimits(dicom_modalities=("DX",))).out_of_scope.startswith(
        "Modality CR"
    )
    unparsed = read_input(dicom_objects["chest"], read_dicom=False)
    assert unparsed.out_of_scope is None and unparsed.identifiers["patient_id"] is None


def test_a_dicom_image_without_its_pixels_may_be_cut_short(dicom_objects, tmp_path):
    nopix = read_input(dicom_objects["no_pixels"])
    assert nopix.maybe_cut and nopix.out_of_scope == "no pixel data"
    assert not read_input(dicom_objects["chest"]).maybe_cut
    # Cut inside the pixel data: the header's facts are there, and the decode says the file ends too early.
    data = dicom_objects["chest"].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    film = read_input(cut)
    assert film.size == len(data) // 2 and film.sha256 == hashlib.sha256(film.data).hexdigest()
    assert film.out_of_scope is None and film.identifiers["patient_id"] == "PID-0002"
    with pytest.raises(ImageError) as info:
        decode_image(film.data, name=str(cut))
    assert info.value.incomplete and "truncated DICOM pixel data" in info.value.reason


def test_which_names_are_read(tmp_path, dicom_objects):
    for name in ("a.png", "b.JPG", "c.jpeg", "d.dcm", "e.DICOM"):
        assert is_read(str(tmp_path / name))
    for name in (".hidden.png", "a.png.part", "a.tmp", "notes.txt"):
        assert not is_read(str(tmp_path / name))
    (tmp_path / "EXPORT1").write_bytes(dicom_objects["chest"].read_bytes())
    (tmp_path / "README").write_text("not DICOM")
    assert is_read(str(tmp_path / "EXPORT1")) and not is_read(str(tmp_path / "README"))


# -- the same film scores the same in xr-daemon and xr-score --------------------------------------------------
def test_xr_score_decodes_a_film_as_the_daemon_does_under_the_operators_config(
    tmp_path, tiny_checkpoint, xray_paths, monkeypatch
):
    """A DICOM with two windows and config.yaml choosing the second: the daemon's decode (Predictor.pixels
    with DecodeLimits.from_settings) and xr-score's give the same pixels, and not the first window's."""
    import dicom_films

    from xr.core.predict import Predictor
    from xr.core.preprocessing import Preset
    from xr.score import bulk

    path = dicom_films.from_8bit(xray_paths[-1], tmp_path, "two_windows.dcm")
    ds = pydicom.dcmread(path)
    ds.WindowCenter = [float(ds.WindowCenter), 1100.0]
    ds.WindowWidth = [float(ds.WindowWidth), 100.0]
    dicom_films.write(ds, path)
    config = tmp_path / "config.yaml"
    config.write_text("dicom:\n  window: 1\n")
    cfg = load_settings(config)
    limits = DecodeLimits.from_settings(cfg)

    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    daemon = pred.pixels(read_input(path, limits).data, limits, name=str(path))
    sha, score_side, err = bulk.decode_file(str(path), Preset.from_dict(pred.meta["preprocess"]), limits)
    assert err is None and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(daemon, torch.from_numpy(score_side))
    batch = bulk.decode_batch({"path": np.array([str(path)], dtype=object)}, pred.meta["preprocess"], limits)
    assert batch["error"][0] is None and np.array_equal(batch["pixels"][0], score_side)  # what the actors score
    first_window = pred.pixels(path.read_bytes(), DecodeLimits(), name=str(path))
    assert not torch.equal(daemon, first_window)  # the config changed the picture, in both programs

    # xr-score's command line hands the operator's limits to the run
    from xr.score.cli import main

    seen = {}
    monkeypatch.setattr(bulk, "score", lambda *a, **kw: seen.update(kw) or bulk.Summary(0, 0, 0, 0.0))
    argv = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert main([*argv, "--config", str(config)]) == 0
    assert seen["limits"] == limits
