"""``xr-review``: serve the reading list (review/app.py) on 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xr.core.errors import XRError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xr-review", description="Review flagged films in a browser.")
    p.add_argument("--db", help="results database: a path or SQLAlchemy URL (default: as xr-results finds it)")
    p.add_argument("--output", help="the daemon's output folder: films and heatmaps are served from there only")
    p.add_argument("--config", help="config.yaml (default: $XR_CONFIG, else the packaged defaults)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from xr.core.paths import output_dir, results_db, settings_for
    from xr.results.engine import open_existing

    try:
        cfg = settings_for(args.config)
        output = output_dir(cfg, args.output)
        db = results_db(cfg, output, args.db)
        engine = open_existing(db)
    except XRError as exc:
        print(f"xr-review: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from xr.review.app import create_app

    print(f"xr-review: http://{args.host}:{args.port}/ (database {db}, films from {output})", file=sys.stderr)
    uvicorn.run(create_app(engine, Path(output)), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
