"""How both sides open gRPC connections: TLS (optionally mutual) by default, plaintext only
when asked for explicitly, and the same message-size bounds everywhere."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc

from fedcybgd.common.codec import GRPC_CHANNEL_OPTIONS

#: Common name of the certificate that may make operator calls (status).
OPERATOR_NAME = "operator"


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def client_channel(address: str, *, insecure: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                   tls_key: str | None = None, server_name: str | None = None) -> grpc.Channel:
    if insecure:
        return grpc.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
    if not tls_ca:
        raise ValueError("a TLS connection needs the CA certificate that signed the coordinator's (tls_ca)")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                               certificate_chain=_read(tls_cert))
    options: list[tuple[str, Any]] = list(GRPC_CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, credentials, options=options)


def server_credentials(tls_cert: str, tls_key: str, tls_client_ca: str | None) -> grpc.ServerCredentials:
    """With a client CA, the TLS handshake itself refuses clients without a valid certificate."""
    return grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())],
                                       root_certificates=_read(tls_client_ca),
                                       require_client_auth=tls_client_ca is not None)


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """Common name of the verified client certificate of this call (mutual TLS), if any."""
    # types-grpcio declares Mapping[str, bytes]; grpc gives each property a list of values.
    auth = cast(Mapping[str, Sequence[bytes]], context.auth_context())
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else None
