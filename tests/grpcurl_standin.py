"""`python -m tests.grpcurl_standin ...`: the part of grpcurl the README uses, for machines without it.

grpcurl is not installable from the package registries CI has, so the README test runs its
grpcurl examples through this stand-in when grpcurl is not on PATH. Like grpcurl it knows
nothing of loraserve: it learns the services and message types from server reflection
and converts JSON to protobuf and back. Supported: `-plaintext`, `-d JSON`, `-H 'name:
value'`, `ADDRESS list`, `ADDRESS list SERVICE`, `ADDRESS SERVICE/METHOD` (unary or
server streaming; each response printed as JSON).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpcurl")
    parser.add_argument("-plaintext", action="store_true", required=True, help="the only transport supported")
    parser.add_argument("-d", dest="data", default="{}")
    parser.add_argument("-H", dest="headers", action="append", default=[])
    parser.add_argument("address")
    parser.add_argument("target", nargs="+")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        if args.target[0] == "list":
            return _list(database, args.target[1:])
        metadata = [tuple(part.strip() for part in header.split(":", 1)) for header in args.headers]
        return _invoke(channel, descriptor_pool.DescriptorPool(database), args.target[0], args.data, metadata)


def _list(database: ProtoReflectionDescriptorDatabase, service: list[str]) -> int:
    if not service:
        print("\n".join(sorted(database.get_services())))
        return 0
    pool = descriptor_pool.DescriptorPool(database)
    for method in pool.FindServiceByName(service[0]).methods:
        print(method.full_name)
    return 0


def _invoke(channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, target: str, data: str,
            metadata: list[tuple[str, ...]]) -> int:
    service_name, method_name = target.rsplit("/", 1)
    method = pool.FindServiceByName(service_name).methods_by_name[method_name]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(data, request_class())
    path = f"/{service_name}/{method_name}"
    call = channel.unary_stream if method.server_streaming else channel.unary_unary
    stub = call(path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_class.FromString)
    try:
        responses = stub(request, metadata=metadata or None, timeout=60)
        for response in (responses if method.server_streaming else [responses]):
            print(json_format.MessageToJson(response))
    except grpc.RpcError as error:
        print(f"ERROR:\n  Code: {error.code().name}\n  Message: {error.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
