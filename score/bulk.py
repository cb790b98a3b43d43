"""Bulk scoring on Ray Data: read and decode in CPU tasks, score in model actors (one per GPU, or one on
the CPU), results streamed back to this process and written as Parquet parts that a restart skips.

Files are read by ``read_input`` and decoded by the checkpoint's ``Preset`` within the operator's
``DecodeLimits`` (config.yaml: file size, pixel limit, DICOM window and scope), the forward and calibration
are the ``Predictor``'s: the same code path and settings as ``xr-daemon``, so a film scores the same in both.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xr.core.errors import ImageError, XRError
from xr.core.files import make_dirs, write_private
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits, is_read, read_input

if TYPE_CHECKING:
    from xr.core.preprocessing import Preset

RUN_FILE = "run.json"  # the model and calibration a scoring run uses: a restart must use the same
PART_ROWS = 512  # rows per Parquet part: a kill loses at most this much work, a restart skips the rest
# the Parquet columns and their Arrow types
FIELDS = (
    ("path", "string"),
    ("sha256", "string"),
    ("logit", "float64"),
    ("probability", "float64"),
    ("threshold", "float64"),
    ("flagged", "bool_"),
    ("model_id", "string"),
    ("calibration_id", "string"),
    ("error", "string"),
)
COLUMNS = tuple(name for name, _ in FIELDS)
TEXT = tuple(name for name, kind in FIELDS if kind == "string")


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise XRError("xr-score needs Ray Data: pip install 'xr-triage[cluster]'") from None
    return ray


def list_inputs(data: Path) -> list[str]:
    """Absolute paths of the files to score: every file the daemon would read under a folder (PNG, JPEG,
    DICOM by extension or by its DICM marker), or the lines of a text file listing paths."""
    if data.is_file():
        lines = [ln.strip() for ln in data.read_text().splitlines()]
        return [str(Path(ln).expanduser().resolve()) for ln in lines if ln and not ln.startswith("#")]
    if not data.is_dir():
        raise XRError(f"--data {data}: no such folder or list file")
    out = []
    for root, dirs, files in os.walk(data):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [str(Path(root, name).resolve()) for name in sorted(files) if is_read(os.path.join(root, name))]
    return out


def schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in FIELDS])


def scored_paths(out: Path) -> set[str]:
    """Paths OUT's Parquet parts already hold (parts are renamed into place whole, so each is complete)."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in sorted(out.glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
    return done


def write_part(out: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as one Parquet part: a hidden temporary file, fsynced, renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp, final = out / f".{name}.tmp", out / name
    write_private(tmp, b"", durable=False)  # private from its creation: write_table keeps the mode
    pq.write_table(pa.Table.from_pylist(rows, schema=schema()), tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def decode_file(path: str, preset: Preset, limits: DecodeLimits) -> tuple[str | None, np.ndarray | None, str | None]:
    """One file -> (sha256, uint8 pixels [1, S, S] of the eval preset, None), or (the sha256 if it was read,
    None, the reason it is not scored): unreadable, or a DICOM object out of ``limits``' scope. The same
    read and decode as the daemon's, with the same limits."""
    try:
        film = read_input(path, limits)
    except ImageError as exc:  # InputError: vanished, not a regular file, over the size limit...
        return None, None, exc.reason
    if film.out_of_scope:
        return film.sha256, None, f"skipped: {film.out_of_scope}"
    try:
        return film.sha256, preset.pixel_transform()(preset.load(film.data, limits, name=path)).numpy(), None
    except ImageError as exc:
        return film.sha256, None, exc.reason


def decode_batch(batch: dict[str, np.ndarray], preset: dict[str, Any], limits: DecodeLimits) -> dict[str, np.ndarray]:
    """Ray Data task: paths -> sha256 and uint8 pixels [1, S, S] (the eval preset, within ``limits``: the
    operator's), or the reason a file is not scored (its pixels are zeros)."""
    from xr.core.preprocessing import Preset

    p = Preset.from_dict(preset)
    s = p.img_size
    shas, pixels, errors = [], [], []
    for path in batch["path"]:
        sha, px, err = decode_file(str(path), p, limits)
        shas.append(sha)
        pixels.append(px if px is not None else np.zeros((1, s, s), np.uint8))
        errors.append(err)
    return {
        "path": batch["path"],
        "sha256": np.array(shas, dtype=object),
        "pixels": np.stack(pixels),
        "error": np.array(errors, dtype=object),
    }


class Scorer:
    """Ray Data actor: the model, loaded once; scores decoded batches, passes errors through."""

    def __init__(self, checkpoint: str, calibration: str | None, device: str, threads: int, batch_size: int):
        import torch

        from xr.core.predict import Predictor

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.pred = Predictor.from_checkpoint(checkpoint, calibration, device=device)
        if self.pred.device.type == "cpu":
            try:
                self.pred.trace_forward(batch_size)  # the daemon's CPU forward, bit-identical to the eager one
            except RuntimeError:
                pass
        elif self.pred.device.type == "cuda":
            self.pred.capture_cuda_graph(batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["path"])
        errors = np.array(
            [e if isinstance(e, str) else None for e in batch["error"]], dtype=object
        )  # Arrow may give NaN for None
        ok = np.array([e is None for e in errors], dtype=bool)
        logit = np.full(n, np.nan)
        prob = np.full(n, np.nan)
        if ok.any():
            z = self.pred.logits(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
            logit[ok] = z.numpy()
            prob[ok] = self.pred.calibrate(z).numpy()
        pred = self.pred
        return {
            "path": batch["path"],
            "sha256": batch["sha256"],
            "logit": logit,
            "probability": prob,
            "threshold": np.full(n, pred.threshold),
            "flagged": np.where(ok, prob >= pred.threshold, False),
            "model_id": np.full(n, pred.model_id, dtype=object),
            "calibration_id": np.full(n, pred.calibration_id, dtype=object),
            "error": errors,
        }


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """One row of a Ray batch as Python values: an empty text cell (None, or NaN after Arrow) is None."""
    out = {}
    for k, v in row.items():
        v = v.item() if hasattr(v, "item") else v
        if k in TEXT:
            v = v if isinstance(v, str) else None
        elif isinstance(v, float) and np.isnan(v):
            v = None
        out[k] = v
    return out


class FileScorer(Scorer):
    """Ray Data actor for a cluster without GPUs: decodes its own batch, then scores it. One per core, each
    a process of its own, so decode and forward never wait for each other's GIL or for a transfer."""

    def __init__(
        self,
        checkpoint: str,
        calibration: str | None,
        device: str,
        threads: int,
        batch_size: int,
        limits: DecodeLimits,
    ):
        super().__init__(checkpoint, calibration, device, threads, batch_size)
        self.preset, self.limits = self.pred.preset.to_dict(), limits

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(decode_batch(batch, self.preset, self.limits))


@dataclass
class Summary:
    files: int
    skipped: int  # already in OUT from an earlier run
    errors: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0


def score(
    data: Path,
    out: Path,
    checkpoint: Path,
    calibration: Path | None = None,
    address: str = "local",
    batch_size: int = 32,
    device: str = "auto",
    decode_cpus: float = 1.0,
    part_rows: int = PART_ROWS,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Summary:
    """Score every file under ``data`` not yet in ``out``; rows land in ``out`` as they come. ``limits``:
    the operator's (``DecodeLimits.from_settings(cfg)``, as xr-daemon decodes with), by default
    config.yaml's defaults."""
    ray = _import_ray()
    from xr.core.predict import Predictor, resolve_device

    make_dirs(out)
    for stale in out.glob(".part-*.tmp"):  # a part being written when a run was killed: its rows are redone
        stale.unlink()
    paths = list_inputs(data)
    done = scored_paths(out)
    todo = [p for p in paths if p not in done]
    # a bad model or calibration fails here, not in an actor; a run goes on with the model it started with
    pred = Predictor.from_checkpoint(checkpoint, calibration, device="cpu")
    run = {
        "model": str(checkpoint),
        "calibration": str(calibration) if calibration else None,
        "model_id": pred.model_id,
        "calibration_id": pred.calibration_id,
    }
    run_file = out / RUN_FILE
    if run_file.exists():
        before = json.loads(run_file.read_text())
        if (before["model_id"], before["calibration_id"]) != (run["model_id"], run["calibration_id"]):
            raise XRError(
                f"{out} holds scores of model {before['model_id']} with calibration {before['calibration_id']}; "
                f"this run has {run['model_id']} with {run['calibration_id']}: use another --out"
            )
    else:
        write_private(run_file, json.dumps(run, indent=2).encode())
    preset = pred.meta["preprocess"]
    del pred
    t0 = time.perf_counter()
    if not todo:
        return Summary(0, len(done), 0, 0.0)
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if device in ("auto", "cuda") else 0
    if device == "cuda" and not gpus:
        raise XRError("--device cuda: the Ray cluster has no GPU")
    dev = "cuda" if gpus else ("cpu" if device in ("auto", "cuda") else resolve_device(device).type)
    cpus = max(1, int(resources.get("CPU", os.cpu_count() or 1)))
    ds = ray.data.from_items(
        [{"path": p} for p in todo], override_num_blocks=max(1, min(len(todo) // batch_size, 16 * cpus))
    )
    kwargs = {
        "checkpoint": str(checkpoint),
        "calibration": str(calibration) if calibration else None,
        "device": dev,
        "threads": 1,
        "batch_size": batch_size,
    }
    if gpus:
        # decode and preprocess in CPU tasks, the model in one actor per GPU
        ds = ds.map_batches(
            decode_batch,
            batch_size=batch_size,
            num_cpus=decode_cpus,
            fn_kwargs={"preset": preset, "limits": limits},
        )
        ds = ds.map_batches(
            Scorer, batch_size=batch_size, concurrency=gpus, num_gpus=1, num_cpus=1, fn_constructor_kwargs=kwargs
        )
    else:
        # no GPU: a process per core that decodes and scores its batches (a forward is a fifth of a film's
        # CPU, so a separate model actor would idle on a core of its own or starve the decoders)
        ds = ds.map_batches(
            FileScorer,
            batch_size=batch_size,
            concurrency=cpus,
            num_cpus=1,
            fn_constructor_kwargs=kwargs | {"limits": limits},
        )
    rows: list[dict[str, Any]] = []
    files = errors = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["path"])):
            row = _plain({c: batch[c][i] for c in COLUMNS})
            rows.append(row)
            errors += row["error"] is not None
        files += len(batch["path"])
        if len(rows) >= part_rows:
            write_part(out, rows)
            rows = []
    if rows:
        write_part(out, rows)
    return Summary(files, len(done), errors, time.perf_counter() - t0)


def read_run(out: Path):
    """A scoring run's rows (a pyarrow Table) and its run.json."""
    _import_ray()  # pyarrow comes with Ray Data: one extra names both
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_file = out / RUN_FILE
    if not run_file.exists():
        raise XRError(f"{out}: not an xr-score output folder (no {RUN_FILE})")
    parts = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else schema().empty_table()
    return table, json.loads(run_file.read_text())


IMPORTER = "xr-score"  # results.worker_id of imported rows


def import_run(out: Path, sessions) -> tuple[int, int]:
    """Load a scoring run into the results database under its model and calibration ids: one final row per
    file (moved_at set, moved_to empty: the archive stays where it is). Rows already imported for the same
    model and calibration are skipped. Returns (imported, skipped)."""
    from types import SimpleNamespace

    from sqlalchemy import select

    from xr.core.predict import Predictor
    from xr.results.rows import final_row, insert_rows, record_calibration
    from xr.results.schema import Result, Status, utcnow

    table, run = read_run(out)
    try:
        pred = Predictor.from_checkpoint(run["model"], run["calibration"], device="cpu")
    except (OSError, XRError) as exc:
        raise XRError(f"{out}: cannot load the run's model {run['model']} to record its calibration: {exc}") from None
    now = utcnow()
    rows = table.to_pylist()
    with sessions.begin() as s:
        record_calibration(s, pred)
        have = set(
            s.scalars(
                select(Result.path).where(
                    Result.worker_id == IMPORTER,
                    Result.model_id == run["model_id"],
                    Result.calibration_id == run["calibration_id"],
                )
            )
        )
        new = []
        for r in rows:
            if r["path"] in have:
                continue
            have.add(r["path"])
            try:
                st = os.stat(r["path"])
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = 0, 0
            ok = r["error"] is None
            scored_by = SimpleNamespace(
                model_id=r["model_id"],
                threshold=r["threshold"],
                temperature=pred.temperature,
                calibration_id=r["calibration_id"],
            )
            score = None
            if ok:
                label = pred.class_names[int(bool(r["flagged"]))]
                score = {
                    "logit": r["logit"],
                    "probability": r["probability"],
                    "label": label,
                    "flagged": bool(r["flagged"]),
                }
            new.append(
                {
                    "path": r["path"],
                    "filename": os.path.basename(r["path"]),
                    "size_bytes": size,
                    "mtime_ns": mtime,
                    "sha256": r["sha256"],
                    "received_at": now,
                    "claimed_at": now,
                    "moved_at": now,  # the archive stays where it is
                    **final_row(
                        Status.OK if ok else Status.ERROR,
                        now=now,
                        received_at=now,
                        model=scored_by,
                        score=score,
                        error=r["error"],
                        worker=IMPORTER,
                    ),
                }
            )
        insert_rows(s, new)
    return len(new), len(rows) - len(new)
