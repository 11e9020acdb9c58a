"""`python -m frontend --scheduler-address ADDR [...]`: serve the public gRPC API."""

from __future__ import annotations

import argparse
import asyncio
import sys

from frontend.auth import AuthTokens
from frontend.server import BindError, FrontendConfig, serve
from frontend.tls import TlsFiles
from loraserve.flags import add_logging_flags, die_with_parent
from loraserve.logs import configure_logging


def parse_args(argv: list[str] | None = None) -> tuple[FrontendConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m frontend", description="loraserve's gRPC frontend")
    parser.add_argument("--scheduler-address", required=True,
                        help="the scheduler's socket for frontends, e.g. ipc:///tmp/x/scheduler.sock")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    parser.add_argument("--tokenizer", help="tokenizer directory; without one, prompts must be input_ids")
    parser.add_argument("--model-name", help="the model name GetServerInfo reports")
    parser.add_argument("--max-message-bytes", type=int, default=16 << 20)
    parser.add_argument("--grace-seconds", type=float, default=5.0,
                        help="on SIGTERM/SIGINT, how long in-flight RPCs may take to finish")
    parser.add_argument("--auth-token-file", help="file holding the bearer token every RPC but health needs")
    parser.add_argument("--admin-token-file", help="file holding the bearer token LoadAdapter/UnloadAdapter need")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: mutual TLS, clients need a certificate it signed")
    parser.add_argument("--ready-file", help="created once the server first turns SERVING")
    parser.add_argument("--http-port", type=int, help="the OpenAI-compatible HTTP API (default: off)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics at /metrics here (default: off)")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        parser.error("--tls-cert and --tls-key go together, and --tls-client-ca needs them")
    config = FrontendConfig(
        scheduler_address=args.scheduler_address, host=args.host, port=args.port, tokenizer_path=args.tokenizer,
        model_name=args.model_name, max_message_bytes=args.max_message_bytes, grace_seconds=args.grace_seconds,
        auth=AuthTokens.from_files(args.auth_token_file, args.admin_token_file),
        tls=TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        ready_file=args.ready_file,
        http_port=args.http_port, metrics_port=args.metrics_port,
    )
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    die_with_parent()
    configure_logging(args.log_level, "frontend", args.log_format)
    try:
        asyncio.run(serve(config))
    except BindError as error:
        print(f"frontend: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
