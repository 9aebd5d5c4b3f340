"""``dsoft config show|check CONFIG [--set key=value ...]``: print or validate a resolved config.

    dsoft config show configs/demo.yaml --set head.sample_rate=1/64
    dsoft config show demo            # the config embedded in the package, the one ``dsoft demo`` runs

CONFIG is a YAML file, or ``demo`` (when no file of that name exists) for the embedded demo config,
so it prints outside the repository too. A bad config is one ``dsoft config: error: ...`` line, exit 2.
"""
from __future__ import annotations

import os
import sys

from dsoft_dist.config.demo import demo_config
from dsoft_dist.config.loader import config_from_dict, dump_config, load_config
from dsoft_dist.errors import USER_ERROR_EXIT, ConfigError, report_user_error

EMBEDDED = "demo"  # the name of the embedded config (dsoft_dist.config.demo.DEMO_CONFIG)


def _load(path: str, sets: list[str]):
    """The config at ``path``, or the embedded demo config (overrides applied as ``dsoft demo`` does)."""
    if path == EMBEDDED and not os.path.exists(path):
        return config_from_dict(demo_config(sets))
    return load_config(path, sets)


def _run(args) -> int:
    try:
        cfg = _load(args.config, args.set)
    except ConfigError as err:
        report_user_error("dsoft config", err)  # one line; DSOFT_TRACEBACK=1 re-raises
        return USER_ERROR_EXIT
    if args.action == "show":
        sys.stdout.write(dump_config(cfg))
    else:
        sys.stdout.write(f"{args.config}: OK\n")
    return 0


def register(subparsers) -> None:
    """Adds ``dsoft config``."""
    parser = subparsers.add_parser("config", help="print or validate a resolved config",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("show", "check"), help="show: print the resolved YAML; check: validate only")
    parser.add_argument("config", help="YAML config file, or 'demo' for the config embedded in the package")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set head.sample_rate=1/64 (repeatable)")
    parser.set_defaults(func=_run)
