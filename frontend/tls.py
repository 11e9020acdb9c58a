"""Optional TLS, and mutual TLS, for the gRPC port (PEM files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert: str  # the server's certificate chain
    key: str  # its private key
    client_ca: str | None = None  # set: mutual TLS, clients must present a certificate this CA signed


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    ca = Path(files.client_ca).read_bytes() if files.client_ca else None
    return grpc.ssl_server_credentials([(Path(files.key).read_bytes(), Path(files.cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)
