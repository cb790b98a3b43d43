"""The reading list: ``GET /`` the queue (flagged and audit cases not yet reviewed, in order of arrival, so
an audit case cannot be told by its place; filters by day and accession), ``GET /cases/{id}`` one case and
``POST /cases/{id}/review`` a reader's decision (``pneumonia`` or ``normal``, an optional note), after which
reviews.csv is written again."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import and_, func, or_, select

from xr.core.errors import XRError
from xr.results import audit
from xr.results.export import export_reviews
from xr.results.schema import DECISIONS, SCORED, Result, Review, utcnow
from xr.review.deps import SignedIn, case
from xr.review.films import film_source, imported

log = logging.getLogger("xr.review")


def mount(app: FastAPI, *, sessions, output: Path, page, remote, check_csrf) -> None:

    @app.get("/")
    def queue(request: Request, who: SignedIn, day: str | None = None, accession: str | None = None) -> Response:
        reviewed = select(Review.result_id)
        to_read = or_(and_(Result.flagged.is_(True), Result.status.in_(SCORED)), Result.audit.is_(True))
        stmt = select(Result).where(to_read, Result.id.not_in(reviewed))
        if day:
            try:
                start = dt.datetime.fromisoformat(day)
            except ValueError:
                raise HTTPException(400, f"day must be YYYY-MM-DD, got {day!r}") from None
            stmt = stmt.where(Result.processed_at >= start, Result.processed_at < start + dt.timedelta(days=1))
        if accession:
            stmt = stmt.where(Result.accession_number == accession)
        with sessions.begin() as s:
            # by arrival: flagged and audit cases interleave, and nothing on the list tells them apart
            rows = s.scalars(stmt.order_by(Result.received_at, Result.id).limit(500)).all()
            n_reviewed = s.scalar(select(func.count()).select_from(Review)) or 0
            filters = ", ".join(f"{k}={v}" for k, v in (("day", day), ("accession", accession)) if v)
            audit.record(
                s,
                "view_queue",
                user=who.name,
                remote_addr=remote(request),
                detail=f"{len(rows)} cases" + (f" ({filters})" if filters else ""),
            )
        context = {"rows": rows, "day": day or "", "accession": accession or "", "n_reviewed": n_reviewed}
        return page(request, "queue.html", who, context)

    @app.get("/cases/{case_id}")
    def show(request: Request, who: SignedIn, case_id: int) -> Response:
        with sessions.begin() as s:
            row = case(s, case_id)
            reviews = s.scalars(select(Review).where(Review.result_id == case_id).order_by(Review.id)).all()
            audit.record(s, "view_case", user=who.name, case=row, remote_addr=remote(request))
        context = {
            "row": row,
            "reviews": reviews,
            "decisions": DECISIONS,
            "may_decide": who.role == "reader",
            "blinded": bool(row.audit) and not reviews,
            # why the film cannot be shown, or that it is an imported row's archive film (review/films.py)
            "film_note": film_source(row, output)[1],
            "archived": imported(row),
        }
        return page(request, "case.html", who, context)

    @app.post("/cases/{case_id}/review")
    def review(
        request: Request,
        who: SignedIn,
        case_id: int,
        decision: Annotated[str, Form()],
        note: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        addr = remote(request)
        if who.role != "reader":
            with sessions.begin() as s:
                row = case(s, case_id)
                audit.record(s, "review", user=who.name, outcome="denied", case=row, remote_addr=addr, detail=who.role)
            raise HTTPException(403, f"only readers decide; this account is an {who.role}")
        check_csrf(request, who, csrf, "review")
        if decision not in DECISIONS:
            raise HTTPException(422, f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        with sessions.begin() as s:
            row = case(s, case_id, lock=True)  # two tabs deciding one case at once: one waits for the other
            prior = s.scalar(select(Review).where(Review.result_id == case_id).order_by(Review.id).limit(1))
            if prior is None:
                s.add(
                    Review(
                        result_id=case_id,
                        decision=decision,
                        note=note.strip()[:2000] or None,
                        reviewer=who.name,
                        reviewed_at=utcnow(),
                    )
                )
                audit.record(s, "review", user=who.name, case=row, remote_addr=addr, detail=decision)
                conflict = None
            elif prior.reviewer == who.name and prior.decision == decision:
                # the same decision sent again (a retry after an error, a second click): recorded once
                audit.record(s, "review", user=who.name, case=row, remote_addr=addr, detail=f"{decision} (again)")
                conflict = None
            else:
                audit.record(
                    s,
                    "review",
                    user=who.name,
                    outcome="denied",
                    case=row,
                    remote_addr=addr,
                    detail=f"{decision}: already reviewed ({prior.decision} by {prior.reviewer or 'unnamed'})",
                )
                conflict = (
                    f"case {case_id} was already reviewed: {prior.decision} by {prior.reviewer or 'an unnamed reader'}"
                )
        if conflict:
            raise HTTPException(409, conflict)
        try:
            export_reviews(output / "csv", sessions)
        except (OSError, XRError) as exc:  # the review stands; reviews.csv catches up at the next one or restart
            log.warning("reviews.csv not written: %s", exc)
        return RedirectResponse("/", status_code=303)
