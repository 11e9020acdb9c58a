"""`python -m scheduler`: the scheduler process (no torch)."""

from __future__ import annotations

import argparse

from loraserve.flags import (PAUSE_TOKENS_RATIO_HELP, add_logging_flags, die_with_parent, name_value_pairs,
                             on_termination, pause_tokens_ratio)
from loraserve.logs import configure_logging
from scheduler.config import SchedulerConfig
from scheduler.service import SchedulerService, SchedulerServiceConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scheduler", description=__doc__)
    parser.add_argument("--frontend-address", required=True, help="bound; frontends connect here")
    parser.add_argument("--worker-address", required=True, help="bound; the worker connects here")
    parser.add_argument("--lora-paths", nargs="*", metavar="NAME=PATH", help="adapters registered at start")
    overlap = parser.add_mutually_exclusive_group()
    overlap.add_argument("--enable-lora-overlap-loading", dest="overlap", action="store_true", default=True)
    overlap.add_argument("--disable-lora-overlap-loading", dest="overlap", action="store_false")
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--max-queued-requests", type=int, default=1024)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--pipelined-loads", action="store_true",
                        help="idle server: start a request while its adapter's copy runs (per-layer waits)")
    parser.add_argument("--pause-tokens-ratio", type=pause_tokens_ratio, default=SchedulerConfig.pause_tokens_ratio,
                        help=PAUSE_TOKENS_RATIO_HELP)
    parser.add_argument("--disable-overlap-schedule", action="store_true",
                        help="wait for each step's tokens before sending the next (the GPU idles meanwhile)")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                        help="stage and load adapters only on demand")
    parser.add_argument("--adapter-root", help="LoadAdapter accepts only paths inside this directory")
    parser.add_argument("--registry-file", help="keeps the adapters loaded at run time across restarts (JSON)")
    add_logging_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    die_with_parent()
    configure_logging(args.log_level, "scheduler", args.log_format)
    config = SchedulerConfig(
        overlap_loading=args.overlap, pipelined_loads=args.pipelined_loads,
        max_running_requests=args.max_running_requests,
        max_queued_requests=args.max_queued_requests, max_batch_tokens=args.max_batch_tokens,
        initial_adapters=name_value_pairs(args.lora_paths, "--lora-paths"), prefetch=args.prefetch,
        adapter_root=args.adapter_root, registry_file=args.registry_file,
        max_forwards_in_flight=1 if args.disable_overlap_schedule else 2, pause_tokens_ratio=args.pause_tokens_ratio,
    )
    service = SchedulerService(SchedulerServiceConfig(args.frontend_address, args.worker_address, config))
    on_termination(lambda: setattr(service, "stopping", True))
    service.run()


if __name__ == "__main__":
    main()
