"""`python -m tests.slow_worker [--slow-load NAME=SECONDS] [--slow-read NAME=SECONDS] <worker flags>`:
the worker with some adapters' loads (copies to a slot) or reads from disk made slow.

Integration tests run it in place of `python -m worker` (`slow_worker_modules`), so that no
test hook travels through the production settings or flags.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping

import torch

from loraserve.launcher import ProcessModules
from settings.config import EngineConfig
from settings.flags import name_value
from worker.__main__ import main as worker_main
from worker.engine import Engine
from worker.model.config import load_model_config
from worker.tensor_parallel import TensorParallel

MODULE = "tests.slow_worker"


def slow_worker_modules(slow_loads: Mapping[str, float] = {}, slow_reads: Mapping[str, float] = {}
                        ) -> ProcessModules:
    """The launcher's processes with this entry point, and these delays, as the worker."""
    flags = [("--slow-load", name, seconds) for name, seconds in slow_loads.items()]
    flags += [("--slow-read", name, seconds) for name, seconds in slow_reads.items()]
    return ProcessModules(worker=(MODULE, *(word for flag, name, seconds in flags
                                            for word in (flag, f"{name}={seconds}"))))


def slow_load_hook(delays: Mapping[str, float], num_layers: int, on_gpu: bool) -> Callable[[str, int, int], None]:
    """Makes the named adapters' copies slow: a spin kernel on the load stream, or a sleep."""

    def hook(name: str, slot: int, layer: int) -> None:
        seconds = delays.get(name, 0.0) / num_layers
        if seconds <= 0:
            return
        if on_gpu:
            torch.cuda._sleep(int(seconds * torch.cuda.clock_rate() * 1e6))
        else:
            time.sleep(seconds)

    return hook


def slow_read_hook(delays: Mapping[str, float], num_layers: int) -> Callable[[str, int], None]:
    """Makes the named adapters' reads from disk slow: the reader sleeps before each layer."""

    def hook(name: str, layer: int) -> None:
        time.sleep(delays.get(name, 0.0) / num_layers)

    return hook


def slow_engine(config: EngineConfig, slow_loads: Mapping[str, float], slow_reads: Mapping[str, float],
                tp: TensorParallel) -> Engine:
    num_layers = load_model_config(config.model_path).num_layers
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return Engine(config, load_hook=slow_load_hook(slow_loads, num_layers, on_gpu),
                  read_hook=slow_read_hook(slow_reads, num_layers), tp=tp)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--slow-load", type=name_value, action="append", default=[], metavar="NAME=SECONDS")
    parser.add_argument("--slow-read", type=name_value, action="append", default=[], metavar="NAME=SECONDS")
    delays, worker_argv = parser.parse_known_args()
    slow_loads = {name: float(seconds) for name, seconds in delays.slow_load}
    slow_reads = {name: float(seconds) for name, seconds in delays.slow_read}
    worker_main(worker_argv, build_engine=lambda config, tp: slow_engine(config, slow_loads, slow_reads, tp))


if __name__ == "__main__":
    main()
