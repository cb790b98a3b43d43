"""The daemon's own overhead (a benchmark, not a test): everything but the model.

Runs the real pipeline (claim, decode, micro-batch, commit, move, CSV export) in-process with ``--once``
over N distinct 224-px JPEGs, with a near-free model (global average pool + linear) in place of the
network, and prints files/s. On a GPU the model costs little, so this is the ceiling the daemon's
Python stages set there (docs/benchmarks.md).

    python scripts/bench_pipeline.py --count 2000 [--decode-workers 1] [--sources ../shared/samples/fullres]

``--sources`` takes another folder of JPEGs (searched recursively), such as the full-resolution samples,
whose decoding is what a GPU host spends its CPU on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import make_images

from xr.core.config import load_settings
from xr.core.logs import configure_logging
from xr.core.model import load_checkpoint
from xr.core.predict import Calibration, Predictor
from xr.daemon.service import Service

REPO = Path(__file__).resolve().parents[1]
SOURCES = (REPO.parent / "shared" / "data" / "chest_xray" / "train", REPO / "tests" / "fixtures" / "chest_xray")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--decode-workers", type=int, default=0, help="daemon.decode_workers (0: the daemon's plan)")
    ap.add_argument(
        "--model", type=Path, default=REPO / "models" / "xr_mvp_best.pt", help="checkpoint whose preset is used"
    )
    ap.add_argument("--sources", type=Path, help="folder of JPEGs to vary (default: the 224-px training images)")
    args = ap.parse_args()

    root = args.sources or next(p for p in SOURCES if p.is_dir())
    sources = sorted(root.rglob("*.jpeg"))[:200]
    if not sources:
        ap.error(f"--sources {root}: no .jpeg files there")
    work = Path(tempfile.mkdtemp(prefix="xr-bench-pipeline-"))
    try:
        inbox = work / "inbox"
        make_images(sources, inbox, args.count, "f")
        _, meta = load_checkpoint(args.model)
        free = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 1))
        predictor = Predictor(free, meta, Calibration(1.0, 0.5), device="cpu", model_id="near-free")
        cfg = load_settings(overrides={"daemon.decode_workers": args.decode_workers})
        log = configure_logging("json", stream=open(os.devnull, "w"))  # the daemon's logging cost, not its output
        service = Service(cfg, watch=inbox, output=work / "out", once=True, predictor=predictor, log=log)
        t0 = time.perf_counter()
        rc = service.run()
        elapsed = time.perf_counter() - t0
        print(
            f"{args.count} files from {root} (JPEG variants), near-free model, "
            f"{service.plan.decode_workers} decode thread(s): {args.count / elapsed:.1f} files/s ({elapsed:.1f} s), exit {rc}"
        )
        return rc
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
