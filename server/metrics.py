"""Prometheus metrics of the coordinator. Names follow Prometheus conventions (units in the
name, `_total` for counters); labels take a few fixed values, plus the client name (bounded by
the number of registered sites), never a round number or task id."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.transfer_bytes = Counter("fedcybgd_transfer_bytes_total", "Bytes on the wire (after compression)",
                                      ["direction", "kind"], registry=r)
        self.transfer_raw_bytes = Counter("fedcybgd_transfer_raw_bytes_total", "Bytes before compression",
                                          ["direction", "kind"], registry=r)
        self.fedavg_equivalent_bytes = Counter("fedcybgd_fedavg_full_equivalent_bytes_total",
                                               "Bytes the same visits would cost exchanging the full model both ways",
                                               registry=r)
        self.visits = Counter("fedcybgd_visits_total", "Visits by outcome", ["outcome"], registry=r)
        self.rejections = Counter("fedcybgd_upload_rejections_total", "Rejected uploads by reason", ["reason"], registry=r)
        self.visit_seconds = Histogram("fedcybgd_visit_duration_seconds", "Task issue to commit",
                                       buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.round = Gauge("fedcybgd_round", "Visits committed so far", registry=r)
        self.cycle = Gauge("fedcybgd_cycle", "Current cycle (0-based)", registry=r)
        self.total_rounds = Gauge("fedcybgd_rounds_planned", "Visits planned for the run", registry=r)
        self.clients_registered = Counter("fedcybgd_clients_registered_total", "Client registrations", registry=r)
        self.train_loss = Gauge("fedcybgd_train_loss", "Client-reported loss of the last visit", ["when"], registry=r)
        self.eval_loss = Gauge("fedcybgd_eval_loss", "Held-out loss of the latest evaluated version", registry=r)
        self.client_gpu_peak = Gauge("fedcybgd_client_gpu_peak_bytes", "Peak GPU memory reported by a client",
                                     ["client", "kind"], registry=r)
        self.client_host_memory = Gauge("fedcybgd_client_host_memory_bytes", "Host RSS reported by a client",
                                        ["client"], registry=r)
        self.client_visit_peak = Gauge("fedcybgd_client_visit_peak_memory_bytes",
                                       "Peak memory of a client's last visit (CUDA allocated, or RSS on CPU)",
                                       ["client"], registry=r)
        self._model_bytes = 0

    def serve(self, port: int, address: str = "127.0.0.1"):
        return start_http_server(port, addr=address, registry=self.registry)

    def count_transfer(self, direction: str, kind: str, wire: int, raw: int) -> None:
        self.transfer_bytes.labels(direction=direction, kind=kind).inc(wire)
        self.transfer_raw_bytes.labels(direction=direction, kind=kind).inc(raw)

    def set_progress(self, rounds_done: int, schedule) -> None:
        self.round.set(rounds_done)
        self.total_rounds.set(schedule.total_rounds)
        self.cycle.set(min(rounds_done // schedule.num_blocks, schedule.config.cycles - 1))

    def set_model_bytes(self, model_bytes: int) -> None:
        self._model_bytes = model_bytes

    def observe_visit(self, visit, block_name: str, client_name: str = "") -> None:
        r = visit.record
        self.visits.labels(outcome="completed").inc()
        self.visit_seconds.observe(r["visit_seconds"])
        self.train_loss.labels(when="before").set(r["loss_before"])
        self.train_loss.labels(when="after").set(r["loss_after"])
        self.fedavg_equivalent_bytes.inc(2 * self._model_bytes)
        if client_name:
            self.client_visit_peak.labels(client=client_name).set(r["peak_memory_bytes"])

    def observe_client_memory(self, client: str, gpu_allocated: int, gpu_reserved: int, host_rss: int) -> None:
        if gpu_allocated or gpu_reserved:
            self.client_gpu_peak.labels(client=client, kind="allocated").set(gpu_allocated)
            self.client_gpu_peak.labels(client=client, kind="reserved").set(gpu_reserved)
        if host_rss:
            self.client_host_memory.labels(client=client).set(host_rss)
