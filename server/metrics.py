"""Prometheus metrics of the coordinator.

Names follow Prometheus conventions (unit in the name, `_total` for counters). Labels take a few
fixed values, plus the client's site name (bounded by the number of registered sites); never a
round number or a task id. "Per round" figures are gauges holding the last completed round's
value (a round is one visit), next to cumulative counters: Grafana plots the gauge over time,
and `increase()` of the counters gives any window.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedcybgd.server.records import VisitStats
from fedcybgd.server.scheduler import Schedule

DIRECTIONS = ("down", "up")
#: block: the trainable block; context: the frozen rest of the model (and the manifest);
#: full: whole-model exchanges (FedAvg-style strategies).
KINDS = ("block", "context", "full")
VISIT_OUTCOMES = ("completed", "failed", "reassigned")
REJECTION_REASONS = ("task", "data", "stale")
#: memory: a GetTask answered Wait because the open block's visit does not fit the client's memory;
#: no_block_fits: a GetTask refused (RESOURCE_EXHAUSTED) because no block of the run fits it.
WITHHELD_REASONS = ("memory", "no_block_fits")


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.transfer_bytes = Counter("fedcybgd_transfer_bytes_total", "Bytes on the wire (after compression)",
                                      ["direction", "kind"], registry=r)
        self.transfer_raw_bytes = Counter("fedcybgd_transfer_raw_bytes_total", "Bytes before compression",
                                          ["direction", "kind"], registry=r)
        self.round_bytes = Gauge("fedcybgd_round_transfer_bytes", "Bytes on the wire of the last completed round",
                                 ["direction", "kind"], registry=r)
        self.round_raw_bytes = Gauge("fedcybgd_round_transfer_raw_bytes", "Raw bytes of the last completed round",
                                     ["direction", "kind"], registry=r)
        self.fedavg_equivalent_bytes = Counter(
            "fedcybgd_fedavg_full_equivalent_bytes_total",
            "Bytes the same visits would cost exchanging the full model both ways", registry=r)
        self.round_fedavg_equivalent_bytes = Gauge(
            "fedcybgd_round_fedavg_full_equivalent_bytes", "FedAvg-full bytes for one round (2 x model size)",
            registry=r)
        self.model_bytes = Gauge("fedcybgd_model_bytes", "Raw size of the full model", registry=r)
        self.context_blocks = Counter("fedcybgd_context_blocks_approximated_total",
                                      "Frozen blocks sent approximated (or, for drop, not sent) instead of exactly",
                                      ["method"], registry=r)
        self.visits = Counter("fedcybgd_visits_total", "Visits by outcome", ["outcome"], registry=r)
        self.rejections = Counter("fedcybgd_upload_rejections_total", "Rejected uploads by reason", ["reason"],
                                  registry=r)
        self.tasks_withheld = Counter("fedcybgd_tasks_withheld_total",
                                      "GetTask calls given no task for a reason other than a busy schedule",
                                      ["reason"], registry=r)
        self.visit_seconds = Histogram("fedcybgd_visit_duration_seconds", "Task issue to commit",
                                       buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.dp_epsilon = Gauge("fedcybgd_dp_epsilon", "Differential privacy each site reports having spent "
                                "(epsilon at the run's delta), by level: records (DP-SGD) or updates",
                                ["client", "level"], registry=r)
        self.round = Gauge("fedcybgd_round", "Rounds (visits) committed so far", registry=r)
        self.cycle = Gauge("fedcybgd_cycle", "Current cycle (0-based)", registry=r)
        self.total_rounds = Gauge("fedcybgd_rounds_planned", "Rounds planned for the run", registry=r)
        self.clients_registered = Counter("fedcybgd_clients_registered_total", "Client registrations", registry=r)
        self.active_clients = Gauge("fedcybgd_active_clients", "Clients heard from within 3 heartbeat intervals",
                                    registry=r)
        self.train_loss = Gauge("fedcybgd_train_loss", "Client-reported loss of the last round", ["when"], registry=r)
        self.eval_loss = Gauge("fedcybgd_eval_loss", "Held-out loss of the latest evaluated version", registry=r)
        self.client_gpu_peak = Gauge("fedcybgd_client_gpu_peak_bytes",
                                     "Peak GPU memory reported by a client (0 on CPU-only clients)",
                                     ["client", "kind"], registry=r)
        self.client_host_memory = Gauge("fedcybgd_client_host_memory_bytes", "Host RSS reported by a client",
                                        ["client"], registry=r)
        self.client_visit_peak = Gauge("fedcybgd_client_visit_peak_memory_bytes",
                                       "Peak memory of a client's last visit (CUDA allocated, or RSS on CPU)",
                                       ["client"], registry=r)
        self.blob_bytes = Gauge("fedcybgd_coordinator_blob_bytes",
                                "Bytes of the coordinator's blob store (the versions it keeps, uploads in part)",
                                registry=r)
        self.state_dir_bytes = Gauge("fedcybgd_coordinator_state_bytes",
                                     "Bytes of the coordinator's whole state directory (blobs, database, caches)",
                                     registry=r)
        self.versions_pruned = Counter("fedcybgd_versions_pruned_total",
                                       "Model versions the retention rule removed from disk", registry=r)
        self.pruned_bytes = Counter("fedcybgd_pruned_blob_bytes_total",
                                    "Blob bytes the retention rule deleted", registry=r)
        self._round_fedavg_bytes = 0
        # Every fixed label value exists from the start, so dashboards show 0 rather than nothing.
        for direction in DIRECTIONS:
            for kind in KINDS:
                for metric in (self.transfer_bytes, self.transfer_raw_bytes, self.round_bytes, self.round_raw_bytes):
                    metric.labels(direction=direction, kind=kind)
        for outcome in VISIT_OUTCOMES:
            self.visits.labels(outcome=outcome)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        for reason in WITHHELD_REASONS:
            self.tasks_withheld.labels(reason=reason)

    def serve(self, port: int, address: str = "127.0.0.1") -> tuple[Any, Any]:
        return start_http_server(port, addr=address, registry=self.registry)

    def count_active_clients(self, count: Callable[[], int]) -> None:
        self.active_clients.set_function(count)

    def measure_disk(self, blob_bytes: Callable[[], int], state_bytes: Callable[[], int]) -> None:
        """Disk use, measured when scraped (a walk of the directories: the kept versions' blobs, not the run's)."""
        self.blob_bytes.set_function(blob_bytes)
        self.state_dir_bytes.set_function(state_bytes)

    def count_transfer(self, direction: str, kind: str, wire: int, raw: int) -> None:
        self.transfer_bytes.labels(direction=direction, kind=kind).inc(wire)
        self.transfer_raw_bytes.labels(direction=direction, kind=kind).inc(raw)

    def set_progress(self, rounds_done: int, schedule: Schedule) -> None:
        self.round.set(rounds_done)
        self.total_rounds.set(schedule.total_rounds)
        self.cycle.set(min(schedule.cycle_of(rounds_done), schedule.config.cycles - 1))

    def set_model_bytes(self, model_bytes: int) -> None:
        self._round_fedavg_bytes = 2 * model_bytes
        self.model_bytes.set(model_bytes)
        self.round_fedavg_equivalent_bytes.set(2 * model_bytes)

    def observe_round(self, record: VisitStats, round_bytes: dict[tuple[str, str], tuple[int, int]],
                      client_name: str) -> None:
        """A visit was committed: per-round gauges, outcome, losses, memory."""
        for direction in DIRECTIONS:
            for kind in KINDS:
                wire, raw = round_bytes.get((direction, kind), (0, 0))
                self.round_bytes.labels(direction=direction, kind=kind).set(wire)
                self.round_raw_bytes.labels(direction=direction, kind=kind).set(raw)
        self.visits.labels(outcome="completed").inc()
        self.visit_seconds.observe(record.visit_seconds)
        self.train_loss.labels(when="before").set(record.loss_before)
        self.train_loss.labels(when="after").set(record.loss_after)
        self.fedavg_equivalent_bytes.inc(self._round_fedavg_bytes)
        self.client_visit_peak.labels(client=client_name).set(record.peak_memory_bytes)

    def observe_client_memory(self, client: str, gpu_allocated: int, gpu_reserved: int, host_rss: int) -> None:
        self.client_gpu_peak.labels(client=client, kind="allocated").set(gpu_allocated)
        self.client_gpu_peak.labels(client=client, kind="reserved").set(gpu_reserved)
        if host_rss:
            self.client_host_memory.labels(client=client).set(host_rss)
