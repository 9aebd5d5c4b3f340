"""``dsoft config show|check CONFIG [--set key=value ...]``."""
from __future__ import annotations

import sys

from dsoft_dist.cli import report_user_error
from dsoft_dist.config.loader import dump_config, load_config
from dsoft_dist.config.schema import ConfigError


def _run(args) -> int:
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        report_user_error("dsoft config", err)  # one line; DSOFT_TRACEBACK=1 re-raises
        return 1
    if args.action == "show":
        sys.stdout.write(dump_config(cfg))
    else:
        sys.stdout.write(f"{args.config}: OK\n")
    return 0


def register(subparsers) -> None:
    """Adds ``dsoft config``."""
    parser = subparsers.add_parser("config", help="print or validate a resolved config")
    parser.add_argument("action", choices=("show", "check"), help="show: print the resolved YAML; check: validate only")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set head.sample_rate=0.015625 (repeatable)")
    parser.set_defaults(func=_run)
