"""``xr-score``: score an archive in bulk on Ray Data, resumably, into Parquet.

    xr-score --data /archive --out /scores/2026-12 [--model CKPT] [--calibration FILE]
             [--address local|auto|ray://HOST:10001] [--batch-size N]

OUT/part-*.parquet: one row per file (path, sha256, logit, probability, threshold, flagged, model_id,
calibration_id, error). Run the same command again after a stop: files OUT already holds are skipped.
``--dicom-out DIR`` also writes each scored DICOM film's Structured Report (and Secondary Capture if
flagged) as DICOM files, with the UIDs the daemon gives them (docs/dicom.md).
``xr-results import OUT`` loads a run into the results database.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xr.core.errors import XRError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xr-score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="a folder (searched recursively) or a text file of paths")
    p.add_argument(
        "--out", type=Path, required=True, help="folder for the Parquet parts; an earlier run's are kept and skipped"
    )
    p.add_argument("--model", type=Path, help="checkpoint (default: daemon.model, else the shipped model)")
    p.add_argument(
        "--config",
        help="config.yaml for daemon.model and the decode limits: max_file_mb, max_pixels, dicom.* (default: $XR_CONFIG, else the packaged defaults)",
    )
    p.add_argument(
        "--calibration", type=Path, help="a site's calibration file (default: the one beside the checkpoint)"
    )
    p.add_argument(
        "--address",
        default="local",
        help="local (start Ray here, the default), auto (the running cluster), or ray://HOST:PORT",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument(
        "--part-rows", type=int, default=512, help="rows per Parquet part (default 512): a stop loses at most this many"
    )
    p.add_argument("--device", default="auto", help="auto (GPU actors where the cluster has GPUs) | cpu | cuda | mps")
    p.add_argument(
        "--dicom-out",
        type=Path,
        help="also write each scored DICOM film's SR (and SC if flagged) here, as the daemon sends them (docs/dicom.md)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from xr.core.files import use_group_named
    from xr.core.paths import model_path, settings_for

    try:
        cfg = settings_for(args.config)
        use_group_named(cfg.output.group)  # the Parquet parts: private, or shared with output.group
        checkpoint = model_path(cfg, args.model)
        from xr.core.intake import DecodeLimits
        from xr.score.bulk import score

        s = score(
            args.data,
            args.out,
            checkpoint,
            args.calibration,
            args.address,
            args.batch_size,
            args.device,
            part_rows=args.part_rows,
            limits=DecodeLimits.from_settings(cfg),  # the daemon's: the same film scores the same
        )
    except XRError as exc:
        print(f"xr-score: {exc}", file=sys.stderr)
        return 2
    print(
        f"xr-score: {s.files} files scored in {s.seconds:.1f} s ({s.rate:.1f} files/s), {s.errors} errors, "
        f"{s.skipped} already in {args.out}"
    )
    if args.dicom_out is not None:
        from xr.results.schema import utcnow
        from xr.score.bulk import read_run
        from xr.score.dicom_out import write_objects

        table, _ = read_run(args.out)
        d = write_objects(table, args.dicom_out, utcnow(), log=lambda m: print(m, file=sys.stderr))
        print(
            f"xr-score: {d.sr} SR and {d.sc} SC written to {args.dicom_out}, {d.kept} already there, {d.failed} failed"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
