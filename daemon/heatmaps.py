"""Heatmaps for the reading list, off the scoring path: thread ``xr-heatmap``.

The database is the queue: every ``daemon.heatmap_every_s`` the worker takes committed rows that should
have a heatmap (``daemon.heatmaps``: flagged ones, all, or none) and do not, whose file has reached its
final place, and draws one with a private copy of the model that scored the row (core/heatmap.py), reading
the film back from ``processed/``. So a heatmap never delays a batch, and a crash loses none: a restart
finds the rows still without one. A duplicate gets its first result's heatmap. A row whose model is no
longer loaded (scored before a reload or a restart with another model) gets none: only the model that
scored a film may say where it looked.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from xr.core.errors import ImageError
from xr.core.heatmap import OVERLAY_SIDE, gradcam, heatmap_model, write_heatmap
from xr.core.imaging import load_image
from xr.daemon.pipeline import POLL_S, Context, Stage
from xr.results.schema import Result, Status, fs_path, utcnow

PER_PASS = 4  # films per pass, so a stop is seen within a few seconds


class HeatmapWorker(Stage):
    name = "xr-heatmap"

    def __init__(self, ctx: Context, mode: str, every_s: float):
        super().__init__()
        self.ctx, self.mode, self.every_s = ctx, mode, every_s
        self.folder = ctx.output / "heatmaps"
        self._models: dict[str, tuple[Any, Any]] = {}  # model_id -> (predictor, private model copy)
        self._failed: set[int] = set()  # rows whose film could not be read: tried once per run
        self.written = 0
        self.caught_up = False  # the last pass found nothing left to draw
        self.passes = 0

    def run(self) -> None:
        next_pass = 0.0
        while not self.halt.wait(POLL_S):
            if time.monotonic() < next_pass:
                continue
            done = self.pass_once()
            next_pass = 0.0 if done == PER_PASS else time.monotonic() + self.every_s  # more waiting: go on

    def _known(self) -> dict[str, tuple[Any, Any]]:
        pred = self.ctx.predictor
        if pred.model_id not in self._models:
            self._models[pred.model_id] = (pred, heatmap_model(pred.model))
        return self._models

    def pass_once(self) -> int:
        """Draw up to :data:`PER_PASS` heatmaps; returns how many rows were handled."""
        models = self._known()
        with self.ctx.sessions() as s:
            want = [Result.status == Status.OK, Result.heatmap_path.is_(None), Result.model_id.in_(list(models))]
            if self.mode == "flagged":
                want.append(Result.flagged.is_(True))
            moved_or_left = (Result.moved_at.is_not(None)) | (Result.moved_to.is_(None))
            want.append(Result.id.not_in(self._failed or {-1}))
            if not self.ctx.exclusive:  # several workers: each draws its own films, and those a stopped one left
                orphaned = utcnow() - dt.timedelta(seconds=2 * self.ctx.lease_s)
                want.append((Result.worker_id == self.ctx.worker_id) | (Result.processed_at < orphaned))
            rows = s.execute(
                select(Result.id, Result.path, Result.moved_to, Result.model_id)
                .where(*want, moved_or_left)
                .order_by(Result.id)
                .limit(PER_PASS)
            ).all()
            waiting = rows or s.execute(select(Result.id).where(*want).limit(1)).first()  # not moved yet
        written: dict[int, str] = {}
        for row in rows:
            if self.halt.is_set():
                break
            path = self._draw(row, *models[row.model_id])
            if path is not None:
                written[row.id] = path
        with self.ctx.sessions.begin() as s:
            for rid, path in written.items():  # the film and its duplicates
                s.execute(update(Result).where(Result.id == rid).values(heatmap_path=path))
            firsts = select(Result.id, Result.heatmap_path).where(Result.heatmap_path.is_not(None)).subquery()
            for dup_id, path in s.execute(
                select(Result.id, firsts.c.heatmap_path)
                .join(firsts, Result.duplicate_of == firsts.c.id)
                .where(Result.status == Status.DUPLICATE, Result.heatmap_path.is_(None))
            ).all():
                s.execute(update(Result).where(Result.id == dup_id).values(heatmap_path=path))
        self.written += len(written)
        self.caught_up = not waiting
        self.passes += 1
        return len(rows)

    def done_since(self, passes: int) -> bool:
        """A pass that began after ``passes`` found nothing left to draw (``--once`` waits for that)."""
        return self.passes > passes + 1 and self.caught_up

    def _draw(self, row: Any, predictor: Any, model: Any) -> str | None:
        source = fs_path(row.moved_to or row.path)
        t0 = time.perf_counter()
        try:
            data = Path(source).read_bytes()
            pixels = predictor.pixels(data, name=source)
            film = load_image(
                data,
                max_pixels=predictor.preset.max_pixels,
                draft_size=(OVERLAY_SIDE, OVERLAY_SIDE),
                name=source,
                dicom_window=predictor.preset.dicom_window,
            )
            cam = gradcam(model, predictor.preset, pixels)
            out = write_heatmap(self.folder, str(row.id), film, cam, predictor.preset)
        except (OSError, ImageError) as exc:
            self._failed.add(row.id)
            self.ctx.log.warning("heatmap_failed", id=row.id, file=source, reason=str(getattr(exc, "reason", exc)))
            return None
        self.ctx.log.info("heatmap", id=row.id, path=str(out), ms=round((time.perf_counter() - t0) * 1000, 1))
        return os.fspath(out)
