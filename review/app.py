"""``xr-review``: the reading list in a browser, over the results database (a process apart from the daemon).

Routes: ``GET /`` the queue (flagged, not yet reviewed, highest probability first; filters by day and
accession), ``GET /cases/{id}`` one case, ``GET /cases/{id}/image`` and ``/heatmap`` its pictures,
``POST /cases/{id}/review`` a decision (``confirm`` or ``dismiss``, an optional note), ``GET /healthz``.

Only files under the output folder are ever read: a case's film is served from where the daemon moved it
(``processed/``), re-encoded as PNG (DICOM too); its heatmap from ``heatmaps/``. Every value from the
database is HTML-escaped by Jinja2's autoescaping.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select, text

from xr.core.errors import ImageError
from xr.core.imaging import load_image
from xr.results.engine import session_factory
from xr.results.export import export_reviews
from xr.results.schema import DECISIONS, SCORED, Result, Review, fs_path, utcnow

HERE = Path(__file__).resolve().parent
IMAGE_SIDES = {"thumb": 160, "full": 1024}


def create_app(engine: Any, output: Path) -> FastAPI:
    output = output.resolve()
    sessions = session_factory(engine)
    app = FastAPI(title="xr-triage review", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html
    export_reviews(output / "csv", sessions)  # reviews made while no CSV could be written

    def under_output(stored: str | None, sub: str | None = None) -> Path:
        """The file a row names, only if it lies under the output folder (``sub`` of it): else 404."""
        if not stored:
            raise HTTPException(404, "no file for this case")
        path = Path(fs_path(stored)).resolve()
        root = output / sub if sub else output
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(404, "the file is not in the output folder")
        return path

    def case(s, case_id: int) -> Result:
        row = s.get(Result, case_id)
        if row is None:
            raise HTTPException(404, f"no case {case_id}")
        return row

    @app.get("/")
    def queue(request: Request, day: str | None = None, accession: str | None = None) -> Response:
        reviewed = select(Review.result_id)
        stmt = select(Result).where(Result.flagged.is_(True), Result.status.in_(SCORED), Result.id.not_in(reviewed))
        if day:
            try:
                start = dt.datetime.fromisoformat(day)
            except ValueError:
                raise HTTPException(400, f"day must be YYYY-MM-DD, got {day!r}") from None
            stmt = stmt.where(Result.processed_at >= start, Result.processed_at < start + dt.timedelta(days=1))
        if accession:
            stmt = stmt.where(Result.accession_number == accession)
        with sessions() as s:
            rows = s.scalars(stmt.order_by(Result.probability.desc(), Result.id).limit(500)).all()
            n_reviewed = s.scalar(select(func.count()).select_from(Review)) or 0
        return templates.TemplateResponse(
            request,
            "queue.html",
            {
                "rows": rows,
                "day": day or "",
                "accession": accession or "",
                "n_reviewed": n_reviewed,
            },
        )

    @app.get("/cases/{case_id}")
    def show(request: Request, case_id: int) -> Response:
        with sessions() as s:
            row = case(s, case_id)
            reviews = s.scalars(select(Review).where(Review.result_id == case_id).order_by(Review.id)).all()
        return templates.TemplateResponse(
            request, "case.html", {"row": row, "reviews": reviews, "decisions": DECISIONS}
        )

    @app.get("/cases/{case_id}/image")
    def image(case_id: int, size: Annotated[str, Query(pattern="^(thumb|full)$")] = "full") -> Response:
        with sessions() as s:
            row = case(s, case_id)
            stored = row.moved_to if row.moved_at is not None else None
        path = under_output(stored)
        try:
            picture = load_image(path, draft_size=(IMAGE_SIDES[size], IMAGE_SIDES[size]))
        except ImageError as exc:
            raise HTTPException(422, f"cannot show the film: {exc.reason}") from None
        picture.thumbnail((IMAGE_SIDES[size], IMAGE_SIDES[size]))
        buf = io.BytesIO()
        picture.save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/cases/{case_id}/heatmap")
    def heatmap(case_id: int) -> Response:
        with sessions() as s:
            stored = case(s, case_id).heatmap_path
        return FileResponse(under_output(stored, "heatmaps"), media_type="image/png")

    @app.post("/cases/{case_id}/review")
    def review(
        case_id: int,
        decision: Annotated[str, Form()],
        note: Annotated[str, Form()] = "",
        reviewer: Annotated[str, Form()] = "",
    ) -> Response:
        if decision not in DECISIONS:
            raise HTTPException(422, f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        with sessions.begin() as s:
            case(s, case_id)
            s.add(
                Review(
                    result_id=case_id,
                    decision=decision,
                    note=note.strip()[:2000] or None,
                    reviewer=reviewer.strip()[:128] or None,
                    reviewed_at=utcnow(),
                )
            )
        export_reviews(output / "csv", sessions)
        response = RedirectResponse("/", status_code=303)
        if reviewer.strip():
            response.set_cookie("reviewer", reviewer.strip()[:128], samesite="strict")
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1 from results limit 1"))
        except Exception as exc:  # noqa: BLE001 - any database failure is unhealthy, said plainly
            return JSONResponse({"status": "unhealthy", "reason": f"database: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app
