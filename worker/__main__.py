"""`python -m worker`: the GPU worker process."""

from __future__ import annotations

import argparse

from loraserve.flags import add_logging_flags, die_with_parent, name_value_pairs, on_termination
from loraserve.logs import configure_logging
from worker.engine import EngineConfig
from worker.service import WorkerConfig, WorkerService


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--scheduler-address", required=True, help="the scheduler's worker socket (ipc:// or tcp://)")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--load-format", choices=("safetensors", "dummy"), default="safetensors")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-kv-pages", type=int, default=2048)
    parser.add_argument("--max-loras-per-batch", type=int, default=8)
    parser.add_argument("--max-loaded-loras", type=int, default=16)
    parser.add_argument("--max-lora-rank", type=int, default=64)
    parser.add_argument("--host-cache-bytes", type=int, default=4 << 30)
    parser.add_argument("--disable-mixed-graphs", action="store_true",
                        help="steps with prefill chunks run eagerly (the engine before mixed graphs; comparisons)")
    parser.add_argument("--disable-cuda-graphs", action="store_true",
                        help="decode steps run eagerly (the engine before CUDA graphs; for comparisons)")
    parser.add_argument("--slow-load", action="append", metavar="NAME=SECONDS",
                        help="test only: make every load of this adapter take SECONDS longer")
    parser.add_argument("--slow-read", action="append", metavar="NAME=SECONDS",
                        help="test only: make every read of this adapter from disk take SECONDS longer")
    add_logging_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    die_with_parent()
    configure_logging(args.log_level, "worker", args.log_format)
    engine = EngineConfig(
        model_path=args.model_path, load_format=args.load_format, device=args.device, dtype=args.dtype,
        page_size=args.page_size, num_kv_pages=args.num_kv_pages, max_loras_per_batch=args.max_loras_per_batch,
        max_loaded_loras=args.max_loaded_loras, max_lora_rank=args.max_lora_rank,
        host_cache_bytes=args.host_cache_bytes, cuda_graphs=not args.disable_cuda_graphs,
        static_mixed=not args.disable_mixed_graphs,
    )
    slow_loads = {name: float(seconds) for name, seconds in name_value_pairs(args.slow_load, "--slow-load").items()}
    slow_reads = {name: float(seconds) for name, seconds in name_value_pairs(args.slow_read, "--slow-read").items()}
    service = WorkerService(WorkerConfig(args.scheduler_address, engine, slow_loads, slow_reads))
    on_termination(lambda: setattr(service, "stopping", True))
    service.run()


if __name__ == "__main__":
    main()
