"""`python -m loraserve.healthcheck SERVICE ADDRESS`: exit 0 when that service is healthy.

The container healthchecks of the compose deployment (no torch is imported):

- `frontend HOST:PORT`: grpc.health.v1 says SERVING (`--tls-ca` etc. for a TLS frontend).
- `scheduler tcp://HOST:PORT` (its frontend socket): the scheduler answers an admin request,
  even with "waiting for the worker" - it is up, whether or not a worker is.
- `worker tcp://HOST:PORT` (the scheduler's frontend socket): the scheduler has a worker
  that said hello and registered the start-up adapters, so requests can run.
"""

from __future__ import annotations

import argparse
import sys

import zmq

from loraserve.client import Connection
from loraserve.command_line import OneLineErrorParser, add_connection_arguments, connection_from_args
from protos.loraserve.v1 import internal_pb2, serving_pb2


def frontend_serving(connection: Connection, timeout_s: float) -> bool:
    with connection.client() as client:
        return client.is_ready(timeout_s)


def ask_scheduler(address: str, timeout_s: float) -> internal_pb2.AdminResponse | None:
    """A server-info request to the scheduler's frontend socket; None if no answer in time."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        request = internal_pb2.AdminRequest(server_info=serving_pb2.GetServerInfoRequest(), correlation_id=1)
        socket.send(internal_pb2.FrontendMessage(admin=request).SerializeToString())
        if not socket.poll(int(timeout_s * 1000)):
            return None
        message = internal_pb2.SchedulerMessage.FromString(socket.recv())
        return message.admin if message.WhichOneof("kind") == "admin" else None
    finally:
        socket.close(linger=0)
        context.term()


def healthy(service: str, address: str, timeout_s: float, connection: Connection | None = None) -> bool:
    """`connection`: the frontend's credentials (TLS), if it needs any."""
    if service == "frontend":
        return frontend_serving(connection or Connection(address), timeout_s)
    answer = ask_scheduler(address, timeout_s)
    if service == "scheduler":
        return answer is not None
    return answer is not None and not answer.HasField("error")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m loraserve.healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", choices=("frontend", "scheduler", "worker"))
    parser.add_argument("address", help="HOST:PORT of the frontend, or the scheduler's frontend socket")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default: 3)")
    add_connection_arguments(parser, address=False)
    args = parser.parse_args(argv)
    ok = healthy(args.service, args.address, args.timeout, connection_from_args(parser, args))
    print(f"{args.service}: {'healthy' if ok else 'unhealthy'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
