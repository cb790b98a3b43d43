"""One way in for a film, shared by xr-daemon, xr-score and xr-review.

- :class:`DecodeLimits`: the operator's decode settings (file size, pixel count, DICOM window and the DICOM
  objects in scope), built once from ``config.yaml`` (:meth:`DecodeLimits.from_settings`). They belong to
  the site, not to the model: the :class:`~xr.core.preprocessing.Preset` stored in a checkpoint holds only
  what defines the model, and every decode takes the limits as an argument. So one film decodes to the same
  pixels in every program reading the same config.
- :func:`read_input`: open, check and read one file (never blocking on a FIFO), hash its bytes and read its
  DICOM header; or raise an :class:`InputError` whose reason says what is wrong, and whose type says what
  a caller does about it (:class:`InputVanished`, :class:`InputChanged`, :class:`InputUnavailable`: no row;
  any other: an error row).

The daemon's claim is, per file::

    try:
        film = read_input(item.path, limits, inbox=inbox, is_symlink=item.is_symlink, inode=item.inode)
    except InputVanished: ...         # release it: the file is not there any more
    except InputChanged: ...          # another file under its name now: list it again
    except InputUnavailable: ...      # the share went away: try again later, no row
    except InputError as exc: ...     # an error row with exc.reason
    if film.changed((item.size, item.mtime_ns)): ...   # written again since it looked complete
    film.sha256, film.identifiers, film.out_of_scope, film.maybe_cut, film.data
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from xr.core.config import DaemonConfig, DicomConfig, Settings
from xr.core.dicom import DICM_OFFSET, DICOM_SUFFIXES, IDENTIFIERS, is_dicom, read_header
from xr.core.errors import ImageError

# Errors a network share gives while it is away: the file is tried again later, with no row.
TRANSIENT = frozenset(
    {
        errno.EIO,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.ENODEV,
    }
)
VANISHED = "file vanished before it could be read"
UNAVAILABLE = "share unavailable"
MIB = 1024 * 1024


def mb_to_bytes(mb: float) -> int:
    """``daemon.max_file_mb`` in bytes (MiB, as the daemon has always counted them)."""
    return int(mb * MIB)


# The defaults are the config definitions' own (core/config.py), read once: no second copy of a value.
_DAEMON, _DICOM = DaemonConfig(), DicomConfig()


@dataclass(frozen=True)
class DecodeLimits:
    """What the operator allows a decode: ``daemon.max_file_mb`` (in bytes), ``daemon.max_pixels``,
    ``dicom.window``, ``dicom.modalities`` and ``dicom.body_parts``. ``DecodeLimits()``: the defaults of
    config.yaml's definitions (what training and tests decode with)."""

    max_file_bytes: int = mb_to_bytes(_DAEMON.max_file_mb)
    max_pixels: int = _DAEMON.max_pixels
    dicom_window: int = _DICOM.window  # which of a DICOM file's windows (VOI) to apply
    dicom_modalities: tuple[str, ...] = tuple(_DICOM.modalities)
    dicom_body_parts: tuple[str, ...] = tuple(_DICOM.body_parts)

    @classmethod
    def from_settings(cls, cfg: Settings) -> DecodeLimits:
        """The limits of an operator's config.yaml (``xr.core.paths.settings_for`` loads it)."""
        return cls(
            max_file_bytes=mb_to_bytes(cfg.daemon.max_file_mb),
            max_pixels=cfg.daemon.max_pixels,
            dicom_window=cfg.dicom.window,
            dicom_modalities=tuple(cfg.dicom.modalities),
            dicom_body_parts=tuple(cfg.dicom.body_parts),
        )


DEFAULT_LIMITS = DecodeLimits()


# -- which files are read ------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)
TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", "~")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_hidden_or_temporary(name: str) -> bool:
    """A name exporters use while writing (never read, never reported)."""
    return not name or name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def is_candidate_name(name: str) -> bool:
    """An image name that is read: .png/.jpg/.jpeg/.dcm/.dicom in any case, not hidden, not temporary."""
    return not is_hidden_or_temporary(name) and is_image_name(name)


def is_extensionless(name: str) -> bool:
    """A name without an extension, not hidden or temporary: read if the file is DICOM."""
    return not is_hidden_or_temporary(name) and not os.path.splitext(name)[1]


def sniff_dicom(path: str) -> bool | None:
    """A file without an extension is read when it is DICOM (bytes 128-131 ``DICM``, as exporters often
    write them); None while it is too short to tell."""
    try:
        with open(path, "rb") as f:
            head = f.read(DICM_OFFSET + 4)
    except OSError:
        return False
    return None if len(head) < DICM_OFFSET + 4 else is_dicom(head)


def is_read(path: str) -> bool:
    """Whether the file at ``path`` is read (by xr-daemon in its inbox, by xr-score in an archive): an image
    name, or an extensionless file that is DICOM."""
    name = os.path.basename(path)
    return is_candidate_name(name) or bool(is_extensionless(name) and sniff_dicom(path))


# -- errors ---------------------------------------------------------------------------------------------
class InputError(ImageError):
    """A file that cannot be taken in; ``reason`` (without the path) is what its error row says.

    A subclass of :class:`ImageError`, so code that reports bad films reports these too."""


class InputVanished(InputError):
    """The file was not there any more when it was opened (renamed away, deleted): no row."""


class InputChanged(InputError):
    """Another file is under the name now than the one listed (replaced, or turned into a symlink): no row;
    the name is listed again and the file there settles as new work."""


class InputUnavailable(InputError):
    """The file system answered with a transient error (:data:`TRANSIENT`: a share that went away): try
    again later, no row."""


def _os_error(path: str, exc: OSError) -> InputError:
    if exc.errno in TRANSIENT:
        return InputUnavailable(path, f"{UNAVAILABLE} ({exc.strerror or exc})")
    return InputError(path, f"cannot read file: {exc.strerror or exc}")


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a plain file")


# -- DICOM header ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DicomFacts:
    """What a file's DICOM header says before any pixel is decoded (all empty for PNG and JPEG)."""

    identifiers: dict[str, str | None] = field(default_factory=dict)  # results column -> value
    out_of_scope: str | None = None  # why it is not a chest radiograph to score; None: score it
    maybe_cut: bool = False  # an image object without its pixel data: perhaps still being written


def dicom_facts(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> DicomFacts:
    """The identifiers, scope and cut-short hint of ``data`` if it is DICOM. A header that cannot be read
    gives none of them: the decode then names what is wrong."""
    if not is_dicom(data):
        return DicomFacts()
    try:
        header = read_header(data, max_pixels=limits.max_pixels)
    except Exception:  # noqa: BLE001 - ImageError, or anything a broken header raises: the decode names it
        return DicomFacts()
    return DicomFacts(
        identifiers=header.identifiers,
        out_of_scope=header.out_of_scope(limits.dicom_modalities, limits.dicom_body_parts),
        maybe_cut=header.maybe_cut,
    )


# -- reading --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Input:
    """One file as read: identity, bytes, their sha256 and its DICOM header's facts."""

    path: str
    size: int  # from the open descriptor: what was read, not what a listing saw before
    mtime_ns: int
    is_symlink: bool
    data: bytes = field(repr=False)
    sha256: str
    dicom: DicomFacts

    @property
    def identity(self) -> tuple[int, int]:
        return self.size, self.mtime_ns

    def changed(self, listed: tuple[int, int]) -> bool:
        """Whether the file read differs from the (size, mtime_ns) a listing saw: written again since it
        looked complete. A symlink's listing is the link's own, never comparable: never changed."""
        return not self.is_symlink and self.identity != tuple(listed)

    @property
    def identifiers(self) -> dict[str, str | None]:
        """Every DICOM identifier column (None where absent, or for a PNG/JPEG)."""
        return {column: self.dicom.identifiers.get(column) for column in IDENTIFIERS}

    @property
    def out_of_scope(self) -> str | None:
        return self.dicom.out_of_scope

    @property
    def maybe_cut(self) -> bool:
        return self.dicom.maybe_cut


def read_input(
    path: str | os.PathLike,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    inbox: str | os.PathLike | None = None,
    is_symlink: bool | None = None,
    read_dicom: bool = True,
    inode: tuple[int, int] | None = None,
) -> Input:
    """Read the file at ``path`` within ``limits``; raises :class:`InputError` (or a subclass) naming it.

    ``inbox``: a symlink must resolve inside this folder (the daemon's); None: any target (xr-score's
    archive). ``is_symlink``: what the caller's listing saw (the daemon's discovery); None: ask now.
    ``read_dicom``: parse a DICOM header for identifiers and scope (False: ``dicom`` stays empty).
    ``inode``: the (st_dev, st_ino) the listing saw (for a symlink, its target's); another file open is
    :class:`InputChanged`, never read under the listed identity.

    A symlink is resolved here, and its target checked against ``inbox``; what is opened (the file, or the
    resolved target) is opened with O_NOFOLLOW, so a name turned into a symlink after the check is not
    followed, and with O_NONBLOCK, so a FIFO under an image name cannot block the caller. Size, type and
    identity come from ``fstat`` of that descriptor, so they describe what is read. Errors, by type:
    :class:`InputVanished` (no such file), :class:`InputChanged` (another file than listed),
    :class:`InputUnavailable` (a transient errno), else :class:`InputError`: a symlink out of the inbox or
    to nothing, a directory or other non-regular file, a file over ``limits.max_file_bytes`` (not read),
    or any other read error.
    """
    path = os.fspath(path)
    if is_symlink is None:
        is_symlink = os.path.islink(path)
    target = os.path.realpath(path) if is_symlink else path
    if is_symlink and inbox is not None:
        try:
            Path(target).relative_to(os.path.realpath(inbox))
        except ValueError:
            raise InputError(path, f"symlink points outside the inbox (to {target})") from None
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        if is_symlink and os.path.lexists(path):
            raise InputError(path, f"symlink target not found ({os.readlink(path)})") from None
        raise InputVanished(path, VANISHED) from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not an image file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink where the listing saw a file, or a target swapped for one
            raise InputChanged(path, "replaced by a symlink since it was listed") from None
        raise _os_error(path, exc) from None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if inode is not None and (st.st_dev, st.st_ino) != tuple(inode):
                raise InputChanged(path, "replaced by another file since it was listed")
            if not stat.S_ISREG(st.st_mode):
                raise InputError(path, f"not a regular file ({_file_kind(st.st_mode)})")
            limit = limits.max_file_bytes
            if st.st_size > limit:
                raise InputError(
                    path, f"file is {st.st_size:,} bytes, over the limit of {limit:,} (daemon.max_file_mb)"
                )
            data = f.read()
    except OSError as exc:
        raise _os_error(path, exc) from None
    return Input(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        is_symlink=is_symlink,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        dicom=dicom_facts(data, limits) if read_dicom else DicomFacts(),
    )
