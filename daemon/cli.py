"""``xr-daemon``: watch a folder and score every X-ray dropped into it (docs/operations.md)."""

from __future__ import annotations

import argparse
import signal
import sys

import yaml

from xr.core.errors import XRError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xr-daemon",
        description="Watch a folder, score each chest X-ray with the calibrated model, record results in SQLite and CSV.",
        epilog="xr-daemon install-units --help: write the systemd units or the launchd plist for this host.",
    )
    p.add_argument("--watch", help="inbox folder to watch (default: daemon.watch)")
    p.add_argument("--config", help="config.yaml (default: $XR_CONFIG, else the packaged defaults)")
    p.add_argument(
        "--db", help="results database: a path or SQLAlchemy URL (default: daemon.db, else <output>/results.sqlite)"
    )
    p.add_argument(
        "--output", help="output folder for results.sqlite, processed/, failed/, csv/ (default: daemon.output)"
    )
    p.add_argument("--model", help="checkpoint (default: daemon.model, else the shipped model)")
    p.add_argument(
        "--calibration",
        help="calibration file, e.g. a site's (default: daemon.calibration, else the one beside the checkpoint)",
    )
    p.add_argument("--once", action="store_true", help="process what is in the inbox now, then exit 0")
    p.add_argument("--log-format", choices=("json", "console"), help="default: daemon.log_format")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default: daemon.device)")
    p.add_argument("--batch-size", type=int, help="daemon.batch_size")
    p.add_argument("--max-wait-ms", type=int, help="daemon.max_wait_ms")
    p.add_argument("--stable-ms", type=int, help="daemon.stable_ms")
    p.add_argument("--rescan-s", type=float, help="daemon.rescan_s")
    p.add_argument("--poll", action="store_true", default=None, help="polling observer (network shares)")
    p.add_argument(
        "--worker-id", help="this daemon's name among several on one database (daemon.worker_id; default host-pid)"
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve /metrics and /healthz on this port (daemon.metrics_port; 0 = off)"
    )
    p.add_argument(
        "--dicom-port", type=int, help="run the DICOM node (storage SCP) on this port (dicom_node.port; 0 = off)"
    )
    p.add_argument("--ae-title", help="the node's AE title, also the one results are sent with (dicom_node.ae_title)")
    p.add_argument(
        "--send-results",
        action="append",
        metavar="AET@HOST:PORT",
        help="send an SR (and an SC for flagged films) of each scored DICOM film to this PACS; repeat for several (dicom_send.destinations)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config.yaml key, e.g. --set csv.rotation=rows (value parsed as YAML)",
    )
    return p


def parse_overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the flags given (an unset flag overrides nothing) and every ``--set``."""
    flags = {
        "daemon.device": args.device,
        "daemon.batch_size": args.batch_size,
        "daemon.max_wait_ms": args.max_wait_ms,
        "daemon.stable_ms": args.stable_ms,
        "daemon.rescan_s": args.rescan_s,
        "daemon.poll": args.poll,
        "daemon.log_format": args.log_format,
        "daemon.calibration": args.calibration,
        "daemon.metrics_port": args.metrics_port,
        "daemon.worker_id": args.worker_id,
        "dicom_node.port": args.dicom_port,
        "dicom_node.ae_title": args.ae_title,
        "dicom_send.destinations": args.send_results,
    }
    ov = {k: v for k, v in flags.items() if v is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise XRError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            ov[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise XRError(f"--set {item}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return ov


def _exit_during_startup(signum: int, _frame) -> None:
    # Until the service is up there is no batch to finish: leave quietly, as a signal later would.
    raise SystemExit(0)


_reload_pending = False


def _reload_later(signum: int, _frame) -> None:
    # SIGHUP while starting (its default action would kill): the service reads the config again once it runs
    global _reload_pending
    _reload_pending = True


def pending_reload() -> bool:
    return _reload_pending


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["install-units"]:  # writes the service files for this host; starts nothing
        from xr.daemon import units

        return units.main(argv[1:])
    global _reload_pending
    _reload_pending = False
    previous = {sig: signal.signal(sig, _exit_during_startup) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _reload_later)
    try:  # torch takes seconds to import: a signal then must not end in a traceback
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from xr.core.logs import configure_logging
    from xr.core.paths import settings_for

    try:
        overrides = parse_overrides(args)
        cfg = settings_for(args.config, overrides)
    except XRError as exc:
        configure_logging(args.log_format or "json").error("config_error", reason=str(exc))
        return 2
    log = configure_logging(cfg.daemon.log_format)

    from xr.core.predict import tune_malloc  # torch import after argument errors are reported
    from xr.daemon.service import Service

    tune_malloc()
    # The eager forward takes the GIL back between its layers; with Python's default 5 ms switch interval
    # each hand-back can wait on a claim/export thread (docs/benchmarks.md, "Daemon").
    sys.setswitchinterval(0.0005)

    svc = Service(
        cfg,
        watch=args.watch,
        output=args.output,
        db=args.db,
        model=args.model,
        once=args.once,
        log=log,
        reload_settings=lambda: settings_for(args.config, overrides),
    )
    signal.signal(signal.SIGTERM, svc.handle_signal)
    signal.signal(signal.SIGINT, svc.handle_signal)
    signal.signal(signal.SIGHUP, svc.handle_reload)
    if _reload_pending:
        svc.handle_reload()
    return svc.run()


if __name__ == "__main__":
    sys.exit(main())
