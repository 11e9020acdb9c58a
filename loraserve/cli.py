"""The `loraserve` command: serve, generate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from loraserve.bench import add_bench_parser
from loraserve.flags import PAUSE_TOKENS_RATIO_HELP, add_logging_flags, name_value_pairs, pause_tokens_ratio
from loraserve.logs import configure_logging
from loraserve.launcher import ServeConfig, serve
from loraserve.timeline import add_timeline_parsers


def add_serve_parser(commands) -> None:
    parser = commands.add_parser("serve", help="start the frontend, scheduler and worker",
                                 description="With no --model-path, serves the built-in demo model and adapters.")
    parser.add_argument("--model-path", help="a Hugging Face model directory (default: the built-in demo)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory, if it has one)")
    parser.add_argument("--lora-paths", nargs="*", metavar="NAME=PATH", default=[])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="the gRPC API")
    parser.add_argument("--http-port", type=int, help="the OpenAI-compatible HTTP API (default: off)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus metrics at /metrics (default: off)")
    parser.add_argument("--served-model-name", help="the base model's name in the APIs (default: the directory's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    parser.add_argument("--max-loras-per-batch", type=int, default=8)
    parser.add_argument("--max-loaded-loras", type=int, default=16)
    parser.add_argument("--max-lora-rank", type=int, default=64)
    overlap = parser.add_mutually_exclusive_group()
    overlap.add_argument("--enable-lora-overlap-loading", dest="overlap", action="store_true", default=True)
    overlap.add_argument("--disable-lora-overlap-loading", dest="overlap", action="store_false")
    parser.add_argument("--pipelined-loads", action="store_true",
                        help="idle server: start a request while its adapter's copy runs (per-layer waits)")
    parser.add_argument("--pause-tokens-ratio", type=pause_tokens_ratio,
                        help=PAUSE_TOKENS_RATIO_HELP + " (default: the scheduler's)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-kv-pages", type=int, default=2048)
    parser.add_argument("--host-cache-gb", type=float, default=4.0)
    parser.add_argument("--disable-cuda-graphs", action="store_true", help="decode steps run eagerly (comparisons)")
    parser.add_argument("--disable-overlap-schedule", action="store_true",
                        help="the scheduler waits for each step's tokens before sending the next")
    parser.add_argument("--disable-mixed-graphs", action="store_true",
                        help="steps with prefill chunks run eagerly (comparisons)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--max-queued-requests", type=int, default=1024)
    parser.add_argument("--grace-seconds", type=float, default=5.0,
                        help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restarts of a crashed process within 10 minutes before giving up")
    parser.add_argument("--adapter-root", help="LoadAdapter accepts only paths inside this directory "
                                               "(default with the demo: the demo's directory)")
    parser.add_argument("--auth-token-file", help="file holding the bearer token every RPC but health needs")
    parser.add_argument("--admin-token-file", help="file holding the bearer token LoadAdapter/UnloadAdapter need")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: mutual TLS, clients need a certificate it signed")
    add_logging_flags(parser)
    parser.add_argument("--log-file", help="append the three processes' logs here instead of stderr")
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, "launcher", args.log_format)
    lora_paths = name_value_pairs(args.lora_paths, "--lora-paths")
    model_path, adapter_root = args.model_path, args.adapter_root
    if model_path is None:
        from loraserve.demo import DEMO_MODEL_NAME, ensure_demo

        assets = ensure_demo()
        model_path = str(assets.model_dir)
        lora_paths = {name: str(path) for name, path in assets.adapters.items()} | lora_paths
        adapter_root = adapter_root or str(assets.root)
        args.served_model_name = args.served_model_name or DEMO_MODEL_NAME
    tokenizer = args.tokenizer or (model_path if _has_tokenizer(Path(model_path)) else None)
    config = ServeConfig(
        model_path=model_path, tokenizer_path=tokenizer, lora_paths=lora_paths, host=args.host, port=args.port,
        http_port=args.http_port, metrics_port=args.metrics_port, served_model_name=args.served_model_name,
        device=args.device, dtype=args.dtype,
        load_format="dummy" if args.load_format == "dummy" else "safetensors",
        max_loras_per_batch=args.max_loras_per_batch, max_loaded_loras=args.max_loaded_loras,
        max_lora_rank=args.max_lora_rank, overlap_loading=args.overlap, page_size=args.page_size,
        num_kv_pages=args.num_kv_pages, host_cache_bytes=int(args.host_cache_gb * (1 << 30)),
        max_batch_tokens=args.max_batch_tokens, max_running_requests=args.max_running_requests,
        max_queued_requests=args.max_queued_requests, log_level=args.log_level, log_format=args.log_format,
        log_file=args.log_file, grace_seconds=args.grace_seconds,
        max_restarts=args.max_restarts, adapter_root=adapter_root, auth_token_file=args.auth_token_file,
        admin_token_file=args.admin_token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        cuda_graphs=not args.disable_cuda_graphs, pipelined_loads=args.pipelined_loads,
        mixed_graphs=not args.disable_mixed_graphs, overlap_schedule=not args.disable_overlap_schedule,
        pause_tokens_ratio=args.pause_tokens_ratio,
    )
    return serve(config)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="send one prompt to a running server")
    parser.add_argument("prompt")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--adapter", default="", help="adapter name (default: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--token-file", help="file holding the bearer token, if the server needs one")
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate: connect with TLS")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from frontend.auth import read_token
    from loraserve.client import LoraServeClient

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    token = read_token(args.token_file) if args.token_file else None
    tls = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes()) if args.tls_ca else None
    try:
        with LoraServeClient(args.address, token=token, tls=tls) as client:
            if args.stream:
                for message in client.generate_stream(args.prompt, adapter=args.adapter, **sampling):
                    print(message.text, end="", flush=True)
                print()
            else:
                print(client.generate(args.prompt, adapter=args.adapter, **sampling).text)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve", description="A multi-LoRA inference server.")
    commands = parser.add_subparsers(required=True)
    add_serve_parser(commands)
    add_generate_parser(commands)
    add_bench_parser(commands)
    add_timeline_parsers(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
