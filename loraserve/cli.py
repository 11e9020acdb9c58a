"""The `loraserve` command: serve, generate, bench, trace, timeline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from loraserve.bench import add_bench_parser
from loraserve.command_line import (CommandError, OneLineErrorParser, add_connection_arguments, connection_from_args,
                                    describe_failure)
from loraserve.launcher import serve
from loraserve.timeline import add_timeline_parsers
from settings.config import LoggingConfig, ServeConfig
from settings.flags import add_serve_arguments, config_from_args, serve_config_from_args
from settings.logs import configure_logging
from settings.version import package_version

if TYPE_CHECKING:
    from loraserve.demo import DemoAssets


def add_serve_parser(commands) -> None:
    parser = commands.add_parser("serve", help="start the frontend, scheduler and worker",
                                 description="With no --model-path, serves the built-in demo model and adapters.")
    add_serve_arguments(parser)
    parser.set_defaults(run=run_serve, parser=parser)


def run_serve(args: argparse.Namespace) -> int:
    logging = config_from_args(args.parser, LoggingConfig, args)
    configure_logging(logging.log_level, "launcher", logging.log_format)
    demo = None if "model_path" in vars(args) else _ensure_demo()  # unset flags are absent from args
    config = serve_config_from_args(args.parser, args, **({"model_path": str(demo.model_dir)} if demo else {}))
    if demo:
        config = _with_demo(config, demo)
    if config.frontend.tokenizer_path is None and _has_tokenizer(Path(config.engine.model_path)):
        config = config.replace(tokenizer_path=config.engine.model_path)
    return serve(config)


def _ensure_demo() -> DemoAssets:
    from loraserve.demo import ensure_demo  # torch and transformers: only when serving the demo

    return ensure_demo()


def _with_demo(config: ServeConfig, demo: DemoAssets) -> ServeConfig:
    """The demo's adapters (besides any --lora-paths), adapter root and model name."""
    from loraserve.demo import DEMO_MODEL_NAME

    adapters = {name: str(path) for name, path in demo.adapters.items()}
    return config.replace(initial_adapters=adapters | config.scheduler.initial_adapters,
                          adapter_root=config.scheduler.adapter_root or str(demo.root),
                          model_name=config.frontend.model_name or DEMO_MODEL_NAME)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="send one prompt to a running server",
                                 description="Unset sampling options take the server's defaults.")
    parser.add_argument("prompt")
    add_connection_arguments(parser)
    parser.add_argument("--adapter", default="", help="adapter name (default: the base model)")
    parser.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                        help="most tokens to generate (default: the server's, 128 or what the context leaves)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling's probability mass (default: 1)")
    parser.add_argument("--seed", type=int, help="makes a sampled answer reproducible (default: none)")
    parser.add_argument("--stop", action="append", help="stop before this text; repeatable (default: none)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated (default: off)")
    parser.set_defaults(run=run_generate, parser=parser)


def run_generate(args: argparse.Namespace) -> int:
    sampling = {name: value for name, value in (("max_new_tokens", args.max_new_tokens),
                                                 ("temperature", args.temperature), ("top_p", args.top_p),
                                                 ("seed", args.seed), ("stop", args.stop)) if value is not None}
    with connection_from_args(args.parser, args).client() as client:
        if args.stream:
            for message in client.generate_stream(args.prompt, adapter=args.adapter, **sampling):
                print(message.text, end="", flush=True)
            print()
        else:
            print(client.generate(args.prompt, adapter=args.adapter, **sampling).text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="loraserve", description="A multi-LoRA inference server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(required=True)
    add_serve_parser(commands)
    add_generate_parser(commands)
    add_bench_parser(commands)
    add_timeline_parsers(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CommandError, grpc.RpcError, OSError, json.JSONDecodeError) as error:
        print(f"loraserve: error: {describe_failure(error, vars(args).get('address'))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loraserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
