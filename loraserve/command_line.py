"""What every `loraserve` client command shares: the connection flags, and one-line errors.

`add_connection_arguments` gives a command `--address`, `--token-file`, `--tls-ca`,
`--tls-cert` and `--tls-key`; `connection_from_args` turns them into a `Connection`. A
command's failure is one line naming the cause and the fix (`describe_failure`): exit 2
for usage errors (argparse's), 1 for runtime failures.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

import grpc

from loraserve.client import Connection

DEFAULT_ADDRESS = "127.0.0.1:50051"


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line pointing at --help, instead of the whole usage text (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandError(Exception):
    """A runtime failure whose message already names the cause and the fix."""


def existing_file(text: str) -> Path:
    """An argparse type: a path that must name a readable file (else a usage error)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def add_connection_arguments(parser: argparse.ArgumentParser, address: bool = True) -> None:
    """`address`: False where the command takes the address otherwise (a positional argument)."""
    group = parser.add_argument_group("connection")
    if address:
        group.add_argument("--address", default=DEFAULT_ADDRESS,
                           help="HOST:PORT of the gRPC API (default: %(default)s)")
    group.add_argument("--token-file", type=existing_file,
                       help="file holding the bearer token, if the server needs one (default: none)")
    group.add_argument("--tls-ca", type=existing_file,
                       help="PEM CA of the server's certificate: connect with TLS (default: plaintext)")
    group.add_argument("--tls-cert", type=existing_file,
                       help="PEM client certificate for mutual TLS, with --tls-key (default: none)")
    group.add_argument("--tls-key", type=existing_file, help="PEM private key of --tls-cert (default: none)")


def connection_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Connection:
    """The parsed connection flags (`args.address`, however the command took it); inconsistent ones are a
    usage error."""
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    token = args.token_file.read_text().strip() if args.token_file else None
    if token == "":
        parser.error(f"--token-file: {args.token_file} is empty")
    tls = None
    if args.tls_ca is not None or args.tls_cert is not None:  # without --tls-ca: the system's CAs
        key, cert = (args.tls_key.read_bytes(), args.tls_cert.read_bytes()) if args.tls_cert else (None, None)
        tls = grpc.ssl_channel_credentials(args.tls_ca.read_bytes() if args.tls_ca else None, key, cert)
    return Connection(args.address, token, tls)


RPC_FIXES = {
    grpc.StatusCode.UNAUTHENTICATED: "pass the server's token with --token-file",
    grpc.StatusCode.PERMISSION_DENIED: "this call needs the admin token (--token-file)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the server is busy or unreachable; try again",
}
# gRPC's own words when no server answered (as opposed to a server saying it is unavailable).
NO_CONNECTION_SIGNS = ("failed to connect", "connection refused", "socket closed", "handshake", "dns resolution")
NO_CONNECTION_FIX = "no server answered at {address}: check --address, and --tls-ca/--tls-cert if it serves TLS"


def describe_failure(error: Exception, address: str | None = None) -> str:
    """One line naming the cause of a command's failure and, where known, the fix."""
    if isinstance(error, grpc.RpcError):
        details = (error.details() or "").splitlines()[0] if error.details() else ""
        fix = RPC_FIXES.get(error.code(), "")
        if error.code() == grpc.StatusCode.UNAVAILABLE and any(sign in details.lower() for sign in NO_CONNECTION_SIGNS):
            fix = NO_CONNECTION_FIX.format(address=address or "that address")
        return f"{error.code().name}: {details}" + (f"; {fix}" if fix else "")
    if isinstance(error, json.JSONDecodeError):
        return f"not JSON ({error.msg} at line {error.lineno}); pass a file written by the command that makes it"
    if isinstance(error, OSError):
        return f"{error.strerror or error}: {error.filename}; check the path" if error.filename else str(error)
    return str(error)
