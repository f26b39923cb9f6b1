"""Running a coordinator: the gRPC server with health checking and reflection, the metrics
endpoint, and a clean stop on SIGTERM (in-flight calls get a grace period; state is durable
anyway, so even SIGKILL loses no accepted upload)."""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedcybgd.common.codec import GRPC_CHANNEL_OPTIONS
from fedcybgd.common.transport import server_credentials
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.server.service import SERVICE_NAME, CoordinatorService
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("fedcybgd.server")
LINGER_S = 60.0


@dataclass
class RunningCoordinator:
    coordinator: Coordinator
    server: grpc.Server
    health: health.HealthServicer
    port: int
    metrics_server: tuple[Any, Any] | None = None  # prometheus_client's (HTTP server, thread)

    def stop(self, grace: float = 10.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()
        self.coordinator.close()


def start(config: CoordinatorConfig, interceptors: Sequence[grpc.ServerInterceptor] = ()) -> RunningCoordinator:
    coordinator = Coordinator(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
                         options=GRPC_CHANNEL_OPTIONS, interceptors=list(interceptors))
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(coordinator), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.insecure:
        log.warning("listening in PLAINTEXT with open registration (insecure = true): trusted networks only")
        port = server.add_insecure_port(config.address)
    else:
        if not (config.tls_cert and config.tls_key):  # CoordinatorConfig refuses this already
            raise ValueError("TLS needs tls_cert and tls_key")
        port = server.add_secure_port(config.address, server_credentials(config.tls_cert, config.tls_key,
                                                                         config.tls_client_ca))
    if port == 0:
        raise OSError(f"cannot listen on {config.address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_server = (coordinator.metrics.serve(config.metrics_port, config.metrics_address)
                      if config.metrics_port else None)
    log.info("coordinator listening on port %d (%d blocks, %d rounds planned)%s", port, len(coordinator.run.specs),
             coordinator.schedule.total_rounds, f", metrics on :{config.metrics_port}" if config.metrics_port else "")
    return RunningCoordinator(coordinator, server, health_servicer, port, metrics_server)


def serve_forever(config: CoordinatorConfig, exit_when_finished: bool = False) -> None:
    """Run until SIGTERM/SIGINT (or, with exit_when_finished, until the run is complete)."""
    running = start(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    finished_at = None
    while not stop.wait(0.5):
        if exit_when_finished and running.coordinator.finished:
            # Linger until every registered client has heard "done" (a client backing off after
            # an outage may take a while to ask), but not forever: some may be gone for good.
            finished_at = finished_at or time.monotonic()
            if running.coordinator.everyone_told_done() or time.monotonic() - finished_at > LINGER_S:
                break
    log.info("stopping coordinator")
    running.stop()
