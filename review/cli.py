"""``xr-review``: serve the reading list (review/app.py) on 127.0.0.1 by default; ``xr-review users ...``
manages its accounts (review/users.py)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from xr.core.errors import XRError
from xr.results.schema import ROLES


def build_parser() -> argparse.ArgumentParser:
    def common(parser: argparse.ArgumentParser, top: bool) -> None:
        # before or after `users ...`; a sub-command's unset option keeps the top-level value
        d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
        parser.add_argument(
            "--db", default=d(None), help="results database: a path or SQLAlchemy URL (default: as xr-results finds it)"
        )
        parser.add_argument(
            "--output",
            default=d(None),
            help="the daemon's output folder: films and heatmaps are served from there only",
        )
        parser.add_argument(
            "--config", default=d(None), help="config.yaml (default: $XR_CONFIG, else the packaged defaults)"
        )

    p = argparse.ArgumentParser(prog="xr-review", description="Review flagged films in a browser.")
    common(p, True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the browser may use besides localhost/127.0.0.1/::1 (repeatable; also review.allowed_hosts)",
    )
    p.add_argument("--certfile", help="TLS certificate (PEM): serve HTTPS")
    p.add_argument("--keyfile", help="TLS private key (PEM) of --certfile")
    p.add_argument(
        "--trusted-proxy", metavar="ADDR", help="the reverse proxy's address: only its --user-header is believed"
    )
    p.add_argument("--user-header", metavar="NAME", help="header naming the signed-in user (e.g. X-Forwarded-User)")

    sub = p.add_subparsers(dest="command", metavar="{users}")
    users = sub.add_parser("users", help="manage the accounts that may sign in")
    common(users, False)
    act = users.add_subparsers(dest="action", required=True)
    add = act.add_parser("add", help="a new account")
    common(add, False)
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    pw = add.add_mutually_exclusive_group()
    pw.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    pw.add_argument(
        "--no-password", action="store_true", help="no password: the account signs in only through --trusted-proxy"
    )
    lst = act.add_parser("list", help="the accounts, their roles and states")
    common(lst, False)
    for name, what in (("disable", "disable an account (its sessions end)"), ("enable", "enable an account again")):
        a = act.add_parser(name, help=what)
        common(a, False)
        a.add_argument("name")
    passwd = act.add_parser("passwd", help="set an account's password (its sessions end)")
    common(passwd, False)
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    return p


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise XRError("no terminal to ask for the password: pass --password-stdin and write it to stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise XRError("the two passwords differ")
    return first


def locate(args: argparse.Namespace):
    from xr.core.files import use_group_named
    from xr.core.paths import output_dir, results_db, settings_for

    cfg = settings_for(args.config)
    use_group_named(cfg.output.group)  # what xr-review writes (a new database, thumbnails) is shared so or private
    output = output_dir(cfg, args.output)
    return cfg, output, results_db(cfg, output, args.db)


def users_command(args: argparse.Namespace) -> int:
    from xr.results.engine import make_engine, session_factory
    from xr.review import users

    by = f"cli:{getpass.getuser()}"
    _, _, db = locate(args)
    password = None
    if args.action == "passwd" or (args.action == "add" and not args.no_password):
        password = users.check_password(read_password(args.password_stdin))
    engine = make_engine(db)  # creates or upgrades it: accounts may come before the daemon's first film
    try:
        sessions = session_factory(engine)
        with sessions.begin() as s:
            if args.action == "add":
                users.add(s, args.name, args.role, password, by=by, remote_addr="local")
                print(f"added {args.name} ({args.role})")
            elif args.action in ("disable", "enable"):
                users.set_active(s, args.name, args.action == "enable", by=by, remote_addr="local")
                print(f"{args.action}d {args.name}")
            elif args.action == "passwd":
                users.set_password(s, args.name, password, by=by, remote_addr="local")
                print(f"password of {args.name} changed")
            else:
                print(f"{'name':<24} {'role':<8} {'state':<9} created (UTC)")
                for u in users.listing(s):
                    state = ("active" if u.active else "disabled") + ("" if u.password_hash else "*")
                    print(f"{u.name:<24} {u.role:<8} {state:<9} {u.created_at:%Y-%m-%d %H:%M}")
    finally:
        engine.dispose()
    return 0


def bind_refusal(args: argparse.Namespace) -> str | None:
    """Why xr-review must not start with these flags, or None."""
    from xr.review.auth import is_loopback

    if bool(args.certfile) != bool(args.keyfile):
        return "--certfile and --keyfile go together"
    if bool(args.trusted_proxy) != bool(args.user_header):
        return "--trusted-proxy and --user-header go together"
    if not is_loopback(args.host) and not args.certfile and not args.trusted_proxy:
        return (
            f"--host {args.host} would serve patient data over plain HTTP to the network: give --certfile and "
            "--keyfile (HTTPS), or put it behind a TLS reverse proxy with --trusted-proxy ADDR --user-header NAME "
            "(docs/security.md)"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "users":
        try:
            return users_command(args)
        except XRError as exc:
            print(f"xr-review: {exc}", file=sys.stderr)
            return 2
    why = bind_refusal(args)
    if why:
        print(f"xr-review: {why}", file=sys.stderr)
        return 2
    from xr.results.engine import open_existing, shown_url

    try:
        cfg, output, db = locate(args)
        engine = open_existing(db)
    except XRError as exc:
        print(f"xr-review: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from xr.core.intake import DecodeLimits
    from xr.review.app import Options, create_app

    allowed = list(args.allowed_host)
    if not is_wildcard(args.host):
        allowed.append(args.host.strip("[]"))  # the address it was started on is a name it answers to
    options = Options.from_settings(
        cfg,
        allowed_hosts=allowed,
        trusted_proxy=args.trusted_proxy,
        user_header=args.user_header,
        tls=bool(args.certfile),
    )
    if is_wildcard(args.host) and not options.allowed_hosts:
        print(
            "xr-review: only loopback Host names are answered: add --allowed-host NAME for the name browsers use",
            file=sys.stderr,
        )
    scheme = "https" if args.certfile else "http"
    shown = shown_url(db)  # a PostgreSQL password never reaches the terminal or the journal
    print(f"xr-review: {scheme}://{args.host}:{args.port}/ (database {shown}, films from {output})", file=sys.stderr)
    uvicorn.run(
        create_app(engine, Path(output), DecodeLimits.from_settings(cfg), options),
        host=args.host,
        port=args.port,
        log_level="warning",
        proxy_headers=False,  # only --trusted-proxy's headers are believed, by the app itself
        server_header=False,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
    )
    return 0


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


if __name__ == "__main__":
    sys.exit(main())
