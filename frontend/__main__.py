"""`python -m frontend --scheduler-address ADDR [...]`: serve the public gRPC API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from settings.config import FrontendConfig, LoggingConfig
from settings.flags import add_arguments, parse_parts
from settings.logs import configure_logging
from settings.process import die_with_parent

PARTS = {"frontend": FrontendConfig, "logging": LoggingConfig}
log = logging.getLogger("loraserve.frontend")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: the schedulers' addresses and the ready file, then `.frontend` and `.logging`."""
    parser = argparse.ArgumentParser(prog="python -m frontend", description="loraserve's gRPC frontend")
    parser.add_argument("--scheduler-address", action="append", dest="scheduler_addresses", default=[],
                        help="a replica's scheduler socket for frontends, e.g. ipc:///tmp/x/scheduler.sock or "
                             "tcp://10.0.0.2:5555; repeat it for each replica")
    parser.add_argument("--ready-file", help="created once the server first turns SERVING")
    for config_type in PARTS.values():
        add_arguments(parser, config_type)
    args = parse_parts(parser, argv, PARTS)
    args.scheduler_addresses += args.frontend.replica_addresses
    if not args.scheduler_addresses:
        parser.error("give --scheduler-address (or --replica-address) at least once")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_parent()
    configure_logging(args.logging.log_level, "frontend", args.logging.log_format)
    from frontend.server import BindError, serve  # imports grpc, which reads GRPC_VERBOSITY once, set just above

    try:
        asyncio.run(serve(args.frontend, args.scheduler_addresses, ready_file=args.ready_file))
    except BindError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
