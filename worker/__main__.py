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
from settings.process import die_with_parent, on_termination
from worker.errors import ModelLoadError

if TYPE_CHECKING:
    from worker.engine import Engine

PARTS = {"engine": EngineConfig, "logging": LoggingConfig}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: `--scheduler-address`, then `.engine` and `.logging`, each a settings dataclass."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--scheduler-address", required=True, help="the scheduler's worker socket (ipc:// or tcp://)")
    parser.add_argument("--ready-file", help="created once the model is loaded (the launcher waits for it)")
    for config_type in PARTS.values():
        add_arguments(parser, config_type)
    return parse_parts(parser, argv, PARTS)


def main(argv: list[str] | None = None, build_engine: Callable[[EngineConfig], Engine] | None = None) -> None:
    """`build_engine`: how the engine is made (a test's entry point passes one with hooks); by default `Engine`."""
    args = parse_args(argv)
    die_with_parent()
    configure_logging(args.logging.log_level, "worker", args.logging.log_format)
    # torch and transformers only now: what they warn of while importing is logged as records
    from worker.engine import Engine
    from worker.service import WorkerConfig, WorkerService

    try:
        engine = (build_engine or Engine)(args.engine)
    except (ModelLoadError, OSError) as error:  # a wrong path or a model we cannot serve: one line, no traceback
        logging.getLogger("loraserve.worker").error("cannot serve --model-path %s: %s", args.engine.model_path, error)
        sys.exit(1)
    service = WorkerService(WorkerConfig(args.scheduler_address, args.engine), engine)
    if args.ready_file:
        Path(args.ready_file).touch()
    on_termination(lambda: setattr(service, "stopping", True))
    service.run()


if __name__ == "__main__":
    main()
