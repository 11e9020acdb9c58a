"""`python -m worker`: the GPU worker process."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from settings.config import EngineConfig, LoggingConfig
from settings.flags import add_arguments, parse_parts
from settings.logs import configure_logging
from settings.process import TP_HOST_MEMORY_FLAG, TP_RANK_FLAG, TP_RENDEZVOUS_FLAG, die_with_parent, on_termination
from worker.errors import ModelLoadError

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.group import Followers
    from worker.tensor_parallel import TensorParallel

PARTS = {"engine": EngineConfig, "logging": LoggingConfig}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: `--scheduler-address`, then `.engine` and `.logging`, each a settings dataclass."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--scheduler-address", required=True, help="the scheduler's worker socket (ipc:// or tcp://)")
    parser.add_argument("--ready-file", help="created once the model is loaded (the launcher waits for it)")
    # Given by rank 0 of a tensor-parallel group to the ranks it starts; never by hand.
    parser.add_argument(TP_RANK_FLAG, type=int, help=argparse.SUPPRESS)
    parser.add_argument(TP_RENDEZVOUS_FLAG, help=argparse.SUPPRESS)
    parser.add_argument(TP_HOST_MEMORY_FLAG, help=argparse.SUPPRESS)
    for config_type in PARTS.values():
        add_arguments(parser, config_type)
    return parse_parts(parser, argv, PARTS)


def main(argv: list[str] | None = None,
         build_engine: Callable[[EngineConfig, TensorParallel], Engine] | None = None) -> None:
    """`build_engine`: how the engine is made (a test's entry point passes one with hooks); by default `Engine`."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    die_with_parent()
    configure_logging(args.logging.log_level, "worker", args.logging.log_format)
    # torch and transformers only now: what they warn of while importing is logged as records
    if args.tp_rank:  # a follower: rank 0 reports everything
        follower(args, build_engine or _engine)
        return
    followers, tp = start_group(argv, args)
    log = logging.getLogger("loraserve.worker")
    try:
        engine = (build_engine or _engine)(args.engine, tp)
    except (ModelLoadError, OSError) as error:  # a wrong path or a model we cannot serve: one line, no traceback
        log.error("cannot serve --model-path %s: %s", args.engine.model_path, error)
        if followers is not None:
            followers.stop()
        sys.exit(1)
    serve(args, engine, followers)


def _engine(config: EngineConfig, tp: TensorParallel) -> Engine:
    from worker.engine import Engine

    return Engine(config, tp=tp)


def start_group(argv: list[str], args: argparse.Namespace) -> tuple[Followers | None, TensorParallel]:
    """Rank 0: starts the other ranks of its group (if --tensor-parallel-size > 1) and joins it."""
    from worker.group import Followers, GroupSpec, join
    from worker.lora.shared_host_memory import SharedLayout, create_shared_memory
    from worker.tensor_parallel import TensorParallel

    size = args.engine.tensor_parallel_size
    if size == 1:
        return None, TensorParallel()
    host_memory_fd = create_shared_memory(SharedLayout.of(args.engine, size).nbytes)
    followers = Followers(_without_ready_file(argv), size, args.engine.tp_timeout_s, host_memory_fd)
    spec = GroupSpec(size, 0, followers.rendezvous, args.engine.tp_timeout_s, followers.host_memory)
    return followers, join(spec, args.engine.device)


def follower(args: argparse.Namespace, build_engine: Callable[..., Engine]) -> None:
    """A rank other than 0: builds its part of the model, then follows rank 0 until told to stop."""
    from worker.group import GroupSpec, command_socket, follow, join
    from worker.tensor_parallel import GroupFailure

    commands = command_socket(args.tp_rendezvous, args.tp_rank)
    spec = GroupSpec(args.engine.tensor_parallel_size, args.tp_rank, args.tp_rendezvous, args.engine.tp_timeout_s,
                     args.tp_host_memory)
    tp = join(spec, args.engine.device)
    try:
        engine = build_engine(args.engine, tp)
    except (ModelLoadError, OSError):  # rank 0 meets the same error and reports it
        sys.exit(1)
    try:  # SIGTERM's default action ends a follower even inside a collective
        follow(engine, commands)
    except GroupFailure as failure:
        logging.getLogger("loraserve.worker").error("%s", failure)
        sys.exit(1)
    finally:
        engine.close()


def serve(args: argparse.Namespace, engine: Engine, followers: Followers | None) -> None:
    from worker.service import WorkerConfig, WorkerService
    from worker.tensor_parallel import GroupFailure

    service = WorkerService(WorkerConfig(args.scheduler_address, args.engine), engine, followers)
    if args.ready_file:
        Path(args.ready_file).touch()
    on_termination(lambda: setattr(service, "stopping", True))
    try:
        service.run()
    except GroupFailure as failure:  # the launcher starts the group again
        logging.getLogger("loraserve.worker").error("the tensor-parallel group goes down: %s", failure)
        followers.kill()
        service.close()
        sys.exit(1)


def _without_ready_file(argv: list[str]) -> list[str]:
    """Rank 0's flags for the other ranks: all but the ready file, which is rank 0's to write."""
    words: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--ready-file":
            skip = True
        elif not word.startswith("--ready-file="):
            words.append(word)
    return words


if __name__ == "__main__":
    main()
