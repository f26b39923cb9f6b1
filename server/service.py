"""The gRPC face of the coordinator: each RPC authenticates its caller, spends a token of the caller's rate limit
(`fedcybgd.server.ratelimit`), is logged, and is delegated to one `Coordinator` method; a `Refusal` becomes the
gRPC status of the same name (a rate-limit refusal also carries its retry hint as trailing metadata).
No logic of its own."""
from __future__ import annotations

import functools
import logging

import grpc

from fedcybgd.common.transport import peer_common_name
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.server.errors import Refusal
from fedcybgd.server.ratelimit import RETRY_AFTER_KEY, RateLimited, RateLimiter
from fedcybgd.server.revocation import peer_fingerprint
from fedcybgd.server.state import ClientRow
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("fedcybgd.service")


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    """The call's text metadata (binary "-bin" entries are not credentials)."""
    return {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}


def _abort(context: grpc.ServicerContext, exc: BaseException):
    if isinstance(exc, Refusal):
        log.debug("refused: %s %s", exc.status.name, exc.message)
        if isinstance(exc, RateLimited):
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
        context.abort(grpc.StatusCode[exc.status.name], exc.message)
    if isinstance(exc, grpc.RpcError):  # the peer's stream broke (cancelled, deadline, too large)
        log.info("call ended by the peer: %s", exc)
        context.abort(grpc.StatusCode.CANCELLED, "the request stream ended abnormally")
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def _unary(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        log.debug("%s", method.__name__)
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            _abort(context, exc)
    return wrapper


def _streaming(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        log.debug("%s", method.__name__)
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            _abort(context, exc)
    return wrapper


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.limits = RateLimiter(coordinator.config.rate_limits)

    def _client(self, context: grpc.ServicerContext, rpc: str) -> ClientRow:
        """The authenticated, unrevoked caller, charged one call of `rpc` (RateLimited when over its rate)."""
        client = self.coordinator.authenticate(_metadata(context), peer_common_name(context), peer_fingerprint(context))
        self.limits.check(client.id, rpc)
        return client

    @_unary
    def Register(self, request, context):
        self.limits.check(_peer_host(context), "Register")
        return self.coordinator.register(request, peer_common_name(context), peer_fingerprint(context))

    @_unary
    def GetModelInfo(self, request, context):
        self._client(context, "GetModelInfo")
        return self.coordinator.model_info()

    @_unary
    def Heartbeat(self, request, context):
        return self.coordinator.heartbeat(self._client(context, "Heartbeat"), request)

    @_unary
    def GetTask(self, request, context):
        return self.coordinator.get_task(self._client(context, "GetTask"), request)

    @_streaming
    def DownloadModel(self, request, context):
        yield from self.coordinator.download(self._client(context, "DownloadModel"), request)

    @_unary
    def UploadBlock(self, request_iterator, context):
        return self.coordinator.upload(self._client(context, "UploadBlock"), iter(request_iterator))

    @_unary
    def DeclineTask(self, request, context):
        return self.coordinator.decline_task(self._client(context, "DeclineTask"), request)

    @_unary
    def GetStatus(self, request, context):
        self.limits.check(_peer_host(context), "GetStatus")
        self.coordinator.authorize_operator(_metadata(context), peer_common_name(context))
        return self.coordinator.status(request)


def _peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1"): callers not yet known
    by identity are limited per host, whatever port each of their connections uses."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
