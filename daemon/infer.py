"""Stage ``xr-infer``: group decoded files into micro-batches (up to ``batch_size``, or after ``max_wait_ms``),
score them, and commit each batch's rows in one transaction (results/journal.py ``commit_batch``); then
hand the moves to the finisher and the films that get a heatmap to the heatmap stage.

Between two batches it switches to a model or calibration the reloader has ready, so every row is scored
by exactly one model and calibration.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from typing import Any

import torch

from xr.daemon.claim import ClaimedFile, decode
from xr.daemon.discovery import Discovery
from xr.daemon.finish import PendingMove
from xr.daemon.moves import Destinations
from xr.daemon.reload import ModelReloader
from xr.daemon.runtime import CurrentModel, Runtime, WorkSlots
from xr.daemon.stage import POLL_S, Stage
from xr.results import journal, rows
from xr.results.journal import Committed, Outcome
from xr.results.schema import FINAL_STATUSES, Status, storable, utcnow


class Inferer(Stage):
    name = "xr-infer"
    idle_s = 0.0  # a step waits on its queue itself

    def __init__(
        self,
        rt: Runtime,
        discovery: Discovery,
        model: CurrentModel,
        slots: WorkSlots,
        destinations: Destinations,
        decoded: queue.Queue[ClaimedFile],
        finish: queue.Queue[list[PendingMove]],
        *,
        reloader: ModelReloader | None = None,
        heatmaps: Any = None,  # daemon/heatmaps.py HeatmapStage: takes the films that get a heatmap
        on_batch: Callable[[int], None] | None = None,
    ):
        super().__init__()
        self.rt, self.discovery, self.model, self.slots, self.destinations = rt, discovery, model, slots, destinations
        self.decoded, self.finish = decoded, finish
        self.reloader, self.heatmaps, self.on_batch = reloader, heatmaps, on_batch
        self.batches = 0
        self.files = 0

    def step(self, now: float) -> bool:
        batch, wait_ms = self.collect()
        if not batch:
            self.switch_model()  # idle is between batches too: the next film is scored by the new files
            return False
        try:
            self.process(batch, wait_ms)
        finally:
            self.slots.give_back(len(batch))  # the batch leaves the pipeline: committed, deferred or lost
        return True

    def collect(self) -> tuple[list[ClaimedFile], float]:
        try:
            first = self.decoded.get(timeout=POLL_S)
        except queue.Empty:
            return [], 0.0
        t0 = time.perf_counter()
        batch = [first]
        deadline = t0 + self.rt.daemon.max_wait_ms / 1000.0
        while len(batch) < self.rt.batch_size:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(self.decoded.get(timeout=remaining) if remaining > 0 else self.decoded.get_nowait())
            except queue.Empty:
                break
        return batch, (time.perf_counter() - t0) * 1000

    # -- between batches ----------------------------------------------------------------------------------
    def switch_model(self) -> None:
        """Score with what the reloader has ready from now on (a new model, or a new calibration)."""
        update = self.reloader.take_update() if self.reloader is not None else None
        if update is None:
            return
        rt, old = self.rt, self.model.predictor
        previous = {"previous_model_id": old.model_id, "previous_calibration_id": old.calibration_id}
        if update.predictor is not None:
            self.model.predictor = update.predictor
        else:
            old.with_calibration(update.calibration)
        pred = self.model.predictor
        with rt.sessions.begin() as s:
            rows.record_calibration(s, pred)
        if rt.metrics is not None:
            rt.metrics.model_in_use(pred.model_id, pred.calibration_id)
        rt.log.info(
            "model_reloaded" if update.predictor is not None else "calibration_reloaded",
            model_id=pred.model_id,
            calibration_id=pred.calibration_id,
            threshold=pred.threshold,
            **previous,
        )

    # -- one batch ------------------------------------------------------------------------------------------
    def process(self, batch: list[ClaimedFile], wait_ms: float) -> None:
        self.switch_model()
        pred = self.model.predictor
        batch = self.ready_to_score(batch, pred)
        if not batch:
            return
        to_score = [f for f in batch if f.pixels is not None]
        t0 = time.perf_counter()
        cams = self.heatmaps is not None  # the maps come from this same forward
        preds = pred.predict_batch(torch.stack([f.pixels for f in to_score]), cams=cams) if to_score else []
        model_ms = (time.perf_counter() - t0) * 1000
        scored = {f.row_id: p for f, p in zip(to_score, preds)}
        files = {f.row_id: f for f in batch}
        t1 = time.perf_counter()
        with self.rt.sessions.begin() as s:
            committed = journal.commit_batch(
                s,
                [self.outcome(f, scored.get(f.row_id)) for f in batch],
                worker=self.rt.worker_id,
                model=pred,
                wait_ms=wait_ms,
                model_ms=model_ms,
                place=lambda o: self.destinations.reserve(files[o.row_id].item.path, o.status),
                now=utcnow(),
                audit_rate=self.rt.cfg.review.audit_rate,
            )
        timings = {"wait_ms": wait_ms, "model_ms": model_ms, "commit_ms": (time.perf_counter() - t1) * 1000}
        self.report(committed, files, len(to_score), timings)
        moves = []
        for rid, row in committed.rows.items():
            f = files[rid]
            moves.append(PendingMove(rid, f.item.path, f.item.identity, row["moved_to"], f.token))
        self.finish.put(moves)
        if self.heatmaps is not None:
            self.submit_heatmaps(committed.rows, files, scored, pred.model_id)
        if self.on_batch is not None:
            self.on_batch(self.batches)

    def ready_to_score(self, batch: list[ClaimedFile], pred: Any) -> list[ClaimedFile]:
        """The batch as the current model scores it: decoded with its preset, cut-short files still being
        written handed back, duplicates marked."""
        for f in batch:  # decoded before a new model with another preset came in: decode again
            if f.pixels is not None and f.preset != pred.preset:
                f.pixels = None
                decode(f, pred, self.rt.limits)
        waiting = [f for f in batch if self.still_writing(f)]
        if waiting:
            self.defer(waiting)
            batch = [f for f in batch if f not in waiting]
        if batch and self.rt.daemon.dedupe:
            self.mark_duplicates(batch)
        return batch

    def report(self, committed: Committed, files: dict[int, ClaimedFile], n_scored: int, timings: dict) -> None:
        """Log each row and the batch, count them in the metrics, give back files another worker took."""
        rt = self.rt
        for o in committed.lost:
            path = files[o.row_id].item.path
            reason = "another worker took this file over: its result is that worker's"
            rt.log.warning("lease_lost", file=storable(path), id=o.row_id, reason=reason)
            self.discovery.release(path)
        counts = dict.fromkeys(FINAL_STATUSES, 0)
        for row in committed.rows.values():
            counts[row["status"]] += 1
            self._log_row(row, files[row["id"]].item.path)
        if rt.metrics is not None:
            n_flagged = sum(bool(r["flagged"]) for r in committed.rows.values())
            rt.metrics.batch(counts, n_flagged, (timings["model_ms"] + timings["commit_ms"]) / 1000)
        self.batches += 1
        self.files += len(files)
        rt.log.info(
            "batch",
            batch_id=committed.batch_id,
            size=len(files),
            scored=n_scored,
            ok=counts[Status.OK],
            errors=counts[Status.ERROR],
            duplicates=counts[Status.DUPLICATE],
            skipped=counts[Status.SKIPPED],
            decode_ms_mean=round(sum(f.decode_ms for f in files.values()) / len(files), 1),
            **{k: round(v, 1) for k, v in timings.items()},
        )

    def outcome(self, f: ClaimedFile, score: Any) -> Outcome:
        """What ``f``'s row becomes in the commit."""
        o = Outcome(f.row_id, f.token, Status.OK, f.received_at, score=score)
        if f.skip is not None:
            o.status, o.error = Status.SKIPPED, f.skip
        elif f.error is not None:
            o.status, o.error = Status.ERROR, f.error
            grace = self.rt.daemon.incomplete_grace_s
            if f.incomplete and grace > 0:
                o.error += f"; the file stayed unchanged for {grace:g} s"
        elif f.duplicate_of is not None:  # the first is earlier in this batch, or committed
            o.status, o.duplicate_of = Status.DUPLICATE, f.duplicate_of
        return o

    def mark_duplicates(self, batch: list[ClaimedFile]) -> None:
        """Files whose content (or DICOM instance) was scored before, or earlier in this batch: the model
        only sees content it has not scored."""
        fresh = [f for f in batch if f.pixels is not None and f.sha256]
        with self.rt.sessions() as s:
            known = rows.first_ok_by_sha(s, [f.sha256 for f in fresh])
            known_sops = rows.first_ok_by_sop(s, [f.sop for f in fresh if f.sop])
        seen: dict[str, ClaimedFile] = {}
        for f in fresh:
            keys = [f.sha256] + ([f"sop:{f.sop}"] if f.sop else [])  # the same bytes, or the same DICOM instance
            first = (
                known.get(f.sha256) or known_sops.get(f.sop) or next((seen[k].row_id for k in keys if k in seen), None)
            )
            if first is not None:
                f.duplicate_of, f.pixels = first, None
            else:
                seen.update(dict.fromkeys(keys, f))

    def still_writing(self, f: ClaimedFile) -> bool:
        """Read as cut short, and either changed since it was read or still inside its grace period after
        its last change: a writer may have paused, so it is watched again instead of failed."""
        if not f.incomplete or f.item.final:
            return False
        try:
            st = os.lstat(f.item.path)
        except OSError:
            return False  # gone: what was read is all there is
        changed = (st.st_size, st.st_mtime_ns) != f.item.identity
        return changed or time.monotonic() < f.item.changed_mono + self.rt.daemon.incomplete_grace_s

    def defer(self, waiting: list[ClaimedFile]) -> None:
        """Hand cut-short files back to discovery with no row: the file in the inbox is the only state, so a
        restart finds it as new work and its grace period runs on from its mtime."""
        rt = self.rt
        with rt.sessions.begin() as s:
            journal.give_back(s, {f.row_id: f.token for f in waiting}, rt.worker_id)
        for f in waiting:
            until = f.item.changed_mono + rt.daemon.incomplete_grace_s
            rt.log.info(
                "file_incomplete",
                file=storable(f.item.path),
                reason=f.error or f.skip,
                watching_s=round(max(0.0, until - time.monotonic()), 1),
            )
            self.discovery.defer(f.item, until)

    def submit_heatmaps(
        self, rows: dict[int, dict], files: dict[int, ClaimedFile], scored: dict, model_id: str
    ) -> None:
        """The committed films that get a heatmap (``daemon.heatmaps``: flagged or all), with the pixels and
        the class activation map this batch already has; duplicates get their first's later."""
        every = self.rt.daemon.heatmaps == "all"
        for rid, row in rows.items():
            if row["status"] == Status.OK and (every or row["flagged"]):
                self.heatmaps.submit(rid, files[rid].pixels, scored[rid].cam, model_id)

    def _log_row(self, row: dict, path: str) -> None:
        log = self.rt.log
        if row["status"] == Status.ERROR:
            log.error("file_error", file=storable(path), reason=row["error"], id=row["id"])
        elif row["status"] == Status.SKIPPED:
            log.info("file_skipped", file=storable(path), reason=row["error"], id=row["id"])
        elif row["flagged"]:  # a duplicate of a flagged film is flagged under its own name too
            extra = {"duplicate_of": row["duplicate_of"]} if row["status"] == Status.DUPLICATE else {}
            log.warning(
                "flagged",
                file=storable(path),
                id=row["id"],
                probability=round(row["probability"], 4),
                threshold=row["threshold"],
                **extra,
            )
