"""A case's pictures: ``GET /cases/{id}/image`` its film and ``/heatmap`` its heatmap, read only from under
the output folder. A film only for a scored row (ok or duplicate) whose film the daemon moved to
``processed/``, or an ``xr-results import`` row's film in its archive (review/films.py), decoded within the daemon's limits one at a time and kept as a private PNG under
``thumbnails/`` (decoded once per film and size). An audit case not yet reviewed is blinded: its heatmap
route answers as if it had none."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import select

from xr.core.errors import ImageError
from xr.core.files import make_dirs, write_private
from xr.core.imaging import decode_image
from xr.core.intake import DecodeLimits, InputError, read_input
from xr.results import audit
from xr.results.schema import Result, Review, fs_path
from xr.review.deps import SignedInPicture, case
from xr.review.films import film_source, same_film

IMAGE_SIDES = {"thumb": 160, "full": 1024}
THUMBNAILS = "thumbnails"  # <output>/thumbnails/: the films as served, decoded once


def mount(app: FastAPI, *, sessions, output: Path, limits: DecodeLimits, remote) -> None:
    decoding = threading.Lock()  # one film decoded at a time, whatever the number of requests

    def under_output(stored: str | None, sub: str | None = None) -> Path:
        """The file a row names, only if it lies under the output folder (``sub`` of it): else 404."""
        if not stored:
            raise HTTPException(404, "no file for this case")
        path = Path(fs_path(stored)).resolve()
        root = output / sub if sub else output
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(404, "the file is not in the output folder")
        return path

    def blinded(s, row: Result) -> bool:
        """An audit case nobody has decided yet: the reader must see the film as they would any other."""
        return bool(row.audit) and s.scalar(select(Review.id).where(Review.result_id == row.id).limit(1)) is None

    @app.get("/cases/{case_id}/image")
    def image(
        request: Request,
        who: SignedInPicture,
        case_id: int,
        size: Annotated[str, Query(pattern="^(thumb|full)$")] = "full",
    ) -> Response:
        with sessions.begin() as s:
            row = case(s, case_id)
            # processed/ films the daemon read and kept; an imported row's archive film (review/films.py)
            path, why = film_source(row, output)
            audit.record(
                s,
                "view_image",
                user=who.name,
                case=row,
                remote_addr=remote(request),
                outcome="ok" if path else "failed",
                detail=size if path else f"{size}: {why}",
            )
        if path is None:
            raise HTTPException(404, why)
        return Response(picture_of(row, path, size), media_type="image/png")

    def picture_of(row: Result, path: Path, size: str) -> bytes:
        """The film as a PNG of at most IMAGE_SIDES[size]: from the thumbnail cache, else decoded (one at a
        time: a film at the pixel limit takes hundreds of MB) and cached, private, for the next look."""
        source = row.moved_to or row.path  # an imported row's film is its archive path
        key = hashlib.sha256(f"{row.id}|{row.sha256}|{source}|{row.mtime_ns}".encode()).hexdigest()[:20]
        cached = output / THUMBNAILS / f"{row.id}-{key}-{size}.png"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        with decoding:
            try:
                # read once, as the daemon reads a film (core/intake.py): the size limit on the open file, hashed
                film = read_input(path, limits, read_dicom=False)
            except InputError as exc:  # over daemon.max_file_mb, gone, or not a regular file
                raise HTTPException(404, f"cannot show the film: {exc.reason}") from None
            if not same_film(row, film.sha256):
                raise HTTPException(404, f"cannot show the film: {row.path} is not the file that was scored")
            try:
                picture = decode_image(film.data, limits, draft_size=(IMAGE_SIDES[size], IMAGE_SIDES[size]), name=path)
            except ImageError as exc:
                raise HTTPException(422, f"cannot show the film: {exc.reason}") from None
            picture.thumbnail((IMAGE_SIDES[size], IMAGE_SIDES[size]))
            buf = io.BytesIO()
            picture.save(buf, "PNG")
        try:
            make_dirs(cached.parent)
            write_private(cached, buf.getvalue(), durable=False)
        except OSError:
            pass  # an output folder this account may only read: served, not kept
        return buf.getvalue()

    @app.get("/cases/{case_id}/heatmap")
    def heatmap(request: Request, who: SignedInPicture, case_id: int) -> Response:
        with sessions.begin() as s:
            row = case(s, case_id)
            hidden = blinded(s, row)
            audit.record(
                s,
                "view_heatmap",
                user=who.name,
                case=row,
                remote_addr=remote(request),
                outcome="denied" if hidden else "ok",
                detail="audit case not yet reviewed" if hidden else None,
            )
        if hidden:  # the same answer as a film without one: the route tells nothing about the case
            raise HTTPException(404, "no file for this case")
        return FileResponse(under_output(row.heatmap_path, "heatmaps"), media_type="image/png")
