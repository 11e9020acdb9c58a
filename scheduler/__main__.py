"""`python -m scheduler`: the scheduler process (no torch)."""

from __future__ import annotations

import argparse

from scheduler.service import SchedulerService, SchedulerServiceConfig
from settings.config import LoggingConfig, SchedulerConfig
from settings.flags import add_arguments, parse_parts
from settings.logs import configure_logging
from settings.process import die_with_parent, on_termination

PARTS = {"scheduler": SchedulerConfig, "logging": LoggingConfig}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: the two addresses, then `.scheduler` and `.logging`, each a settings dataclass."""
    parser = argparse.ArgumentParser(prog="python -m scheduler", description=__doc__)
    parser.add_argument("--frontend-address", required=True, help="bound; frontends connect here")
    parser.add_argument("--worker-address", required=True, help="bound; the worker connects here")
    for config_type in PARTS.values():
        add_arguments(parser, config_type)
    return parse_parts(parser, argv, PARTS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    die_with_parent()
    configure_logging(args.logging.log_level, "scheduler", args.logging.log_format, hugging_face=False)
    service = SchedulerService(SchedulerServiceConfig(args.frontend_address, args.worker_address, args.scheduler))
    on_termination(lambda: setattr(service, "stopping", True))
    service.run()


if __name__ == "__main__":
    main()
