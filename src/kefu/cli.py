"""The ``kefu`` command: serve, token, version, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kefu import __version__, config
from kefu.auth import issue_token
from kefu.errors import ConfigError

log = logging.getLogger("kefu")

DEV_SECRET_WARNING = """
************************************************************************
*  KEFU_JWT_SECRET is not set. Using a generated DEVELOPMENT secret     *
*  stored in {path:<56}*
*  Anyone who can read that file can sign tokens. Set KEFU_JWT_SECRET  *
*  (at least 32 random bytes) before exposing this node.               *
************************************************************************"""


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value
    return out


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (also KEFU_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any setting by its flat name, e.g. --set rate_per_second=50",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kefu", description="Kefu customer-service IM node")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a node")
    _common(serve)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--node-id", help="this node's id (default: the host name)")

    token = sub.add_parser("token", help="print a JWT signed with the node's secret")
    _common(token)
    token.add_argument("--user", required=True, help="user id (the token's subject)")
    token.add_argument("--role", required=True, choices=["customer", "agent", "admin"])
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")

    sub.add_parser("version", help="print the version")

    bench = sub.add_parser("bench", help="load generator (see docs/benchmarks.md)", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _load(args: argparse.Namespace, extra: dict[str, Any]) -> config.Config:
    flags = _parse_set(args.set)
    flags.update({k: v for k, v in extra.items() if v is not None})
    if args.data_dir is not None:
        flags["data_dir"] = args.data_dir
    cfg = config.load(config_file=args.config, flags=flags)
    if cfg.jwt_secret_source == "dev":
        print(
            DEV_SECRET_WARNING.format(path=str(cfg.data_dir / config.DEV_SECRET_FILE)),
            file=sys.stderr,
        )
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from kefu.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"kefu {__version__}")
            return 0
        if args.command == "token":
            cfg = _load(args, {})
            print(issue_token(cfg.jwt_secret, args.user, args.role, ttl=args.ttl))
            return 0
        cfg = _load(args, {"host": args.host, "port": args.port, "node_id": args.node_id})
    except ConfigError as exc:
        print(f"kefu: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(cfg)
    return 0


def run(cfg: config.Config) -> None:
    from kefu.server import serve

    if cfg.use_uvloop:
        import uvloop

        uvloop.run(serve(cfg))
    else:
        asyncio.run(serve(cfg))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
