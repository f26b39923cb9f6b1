"""Abuse and revocation (issue 16, item 6): per-client rate limits on every RPC and revocation of sites.

Unit cases check the token buckets and the revocation list on their own; the end-to-end cases run a real
coordinator on loopback (and real client daemons where the behaviour is the daemon's): a flood is answered
RESOURCE_EXHAUSTED with a retry hint and changes nothing; a daemon that hits the limits backs off and still
finishes; a site revoked mid-run is refused at its next call, its task goes to another client, and the run
completes with every accepted visit.
"""
from __future__ import annotations

import json
import time
from typing import Any

import grpc
import pytest

from conftest import address_of, bearer, register, wait_clients, wait_for, write_data
from fedcybgd.cli.certs import make_certs, revoke_site
from fedcybgd.cli.main import main as cli_main
from fedcybgd.client.backoff import rate_limit_delay
from fedcybgd.common.transport import client_channel
from fedcybgd.server.config import RateLimitConfig, TrainingConfig
from fedcybgd.server.errors import Status
from fedcybgd.server.ratelimit import RETRY_AFTER_KEY, RateLimited, RateLimiter
from fedcybgd.server.revocation import REVOCATION_FILE, add_revocation, pem_fingerprint, read_list
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

TRAINING = TrainingConfig(local_steps=2, batch_size=2, seq_len=32)
SCHEDULE = ScheduleConfig(cycles=1, order="ascending", lr=1e-3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- unit: token buckets -----------------------------------------------------------------------------

def test_bucket_allows_the_burst_then_refuses_with_a_hint_and_refills():
    clock = FakeClock()
    limiter = RateLimiter(RateLimitConfig(heartbeat_per_s=2.0, heartbeat_burst=3), clock=clock)
    for _ in range(3):
        limiter.check("c-1", "Heartbeat")
    with pytest.raises(RateLimited) as refused:
        limiter.check("c-1", "Heartbeat")
    assert refused.value.status == Status.RESOURCE_EXHAUSTED
    assert refused.value.retry_after_ms == 500  # one token at 2 per second
    assert "Heartbeat" in refused.value.message and RETRY_AFTER_KEY in refused.value.message
    limiter.check("c-2", "Heartbeat")  # another client's bucket is its own
    limiter.check("c-1", "GetTask")    # so is another RPC's
    clock.now += 0.5
    limiter.check("c-1", "Heartbeat")  # refilled
    with pytest.raises(RateLimited):
        limiter.check("c-1", "Heartbeat")
    clock.now += 1000
    for _ in range(3):  # refills up to the burst, not beyond
        limiter.check("c-1", "Heartbeat")
    with pytest.raises(RateLimited):
        limiter.check("c-1", "Heartbeat")


def test_disabled_limits_and_bad_settings():
    limiter = RateLimiter(RateLimitConfig(enabled=False, get_task_burst=1))
    for _ in range(100):
        limiter.check("c-1", "GetTask")
    with pytest.raises(ValueError, match="rate_limits.get_task_per_s"):
        RateLimitConfig(get_task_per_s=0)


def test_defaults_never_bother_a_well_behaved_client():
    """A daemon's pattern, fast: a visit every second (GetTask, download, upload, retries) and a heartbeat per
    second for ten minutes of simulated time: never refused."""
    clock = FakeClock()
    limiter = RateLimiter(RateLimitConfig(), clock=clock)
    for _ in range(600):
        for rpc in ("GetTask", "GetTask", "DownloadModel", "UploadBlock", "Heartbeat"):
            limiter.check("c-1", rpc)
        clock.now += 1.0


# -- unit: the revocation list -----------------------------------------------------------------------

def test_revoke_writes_names_and_fingerprints(tmp_path):
    certs = make_certs(tmp_path / "certs", ["localhost"], ["site-a"], operator=False)
    path = revoke_site(certs, "site-a")
    assert path == certs / REVOCATION_FILE
    revoke_site(certs, "site-a")  # twice: recorded once
    revoke_site(certs, "ghost")   # no certificate here: by name only
    listed = read_list(path)
    assert listed.names == {"site-a", "ghost"} and len(listed.sites) == 2
    assert listed.certificates == {pem_fingerprint((certs / "site-a.pem").read_bytes())}
    with pytest.raises(ValueError, match="bad site name"):
        revoke_site(certs, "../ca")


def test_cli_revoke(tmp_path, capsys):
    assert cli_main(["certs", "--out", str(tmp_path), "--revoke", "site-x", "--revoke", "site-y"]) == 0
    assert read_list(tmp_path / REVOCATION_FILE).names == {"site-x", "site-y"}
    assert "revoked site-x" in capsys.readouterr().out
    assert cli_main(["certs", "--out", str(tmp_path)]) == 2  # neither --server-name nor --revoke


def test_malformed_list_is_refused_by_name(tmp_path):
    path = tmp_path / REVOCATION_FILE
    path.write_text('{"revoked": [{"nom": "x"}]}')
    with pytest.raises(ValueError, match="malformed"):
        read_list(path)
    assert read_list(tmp_path / "absent.json").names == frozenset()


# -- end to end ----------------------------------------------------------------------------------------

def _snapshot(coordinator) -> tuple:
    """What must not change when calls are refused: latest version and manifest, visits, tasks, clients."""
    state = coordinator.state
    return (state.latest_version(), len(state.visits()), sorted(t.id for t in state.tasks_with_status("issued")),
            sorted(c.id for c in state.clients()), sorted(coordinator.store.blobs))


@pytest.mark.multiprocess
def test_flooding_an_rpc_gets_resource_exhausted_with_a_retry_hint(coordinators):
    limits = RateLimitConfig(heartbeat_per_s=1.0, heartbeat_burst=5, get_model_info_per_s=0.5, get_model_info_burst=2,
                             register_per_s=0.5, register_burst=4, get_task_per_s=1.0, get_task_burst=3)
    running = coordinators.start(rate_limits=limits, training=TRAINING, schedule=SCHEDULE)
    channel = grpc.insecure_channel(address_of(running))
    stub = pb_grpc.CoordinatorStub(channel)
    flooder = register(stub, "flooder")
    calm = register(stub, "calm")
    first = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=flooder.md, timeout=10)
    assert first.HasField("task")
    before = _snapshot(running.coordinator)

    cases = [
        ("Heartbeat", lambda: stub.Heartbeat.with_call(pb.HeartbeatRequest(task_id=first.task.task_id),
                                                       metadata=flooder.md, timeout=10)),
        ("GetModelInfo", lambda: stub.GetModelInfo.with_call(pb.GetModelInfoRequest(), metadata=flooder.md,
                                                             timeout=10)),
        ("GetTask", lambda: stub.GetTask.with_call(pb.GetTaskRequest(wait_seconds=0), metadata=flooder.md,
                                                   timeout=10)),
    ]
    for rpc, call in cases:
        refusals: list[grpc.RpcError] = []
        for _ in range(30):
            try:
                call()
            except grpc.RpcError as err:
                refusals.append(err)
        assert refusals, f"{rpc} flood was never refused"
        refused = refusals[0]
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (rpc, refused.code(), refused.details())
        details = refused.details() or ""
        assert "rate limit" in details and rpc in details
        hint = _retry_hint(refused)
        assert hint is not None and 1 <= int(hint) <= 2000
        assert rate_limit_delay(refused) == pytest.approx(int(hint) / 1000)
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refusals)

    # Register is limited per peer address, before anything is created.
    refused_registrations = 0
    for i in range(20):
        try:
            register(stub, f"spam-{i}")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _retry_hint(err) is not None
            refused_registrations += 1
    assert refused_registrations > 0
    spam = {c.name for c in running.coordinator.state.clients()} - {"flooder", "calm"}
    assert len(spam) + refused_registrations == 20

    # The flooder's task is still its own; the calm client is not affected; nothing changed in the model or state.
    after = _snapshot(running.coordinator)
    assert after[:3] == before[:3] and after[4] == before[4]
    reply = stub.Heartbeat(pb.HeartbeatRequest(), metadata=calm.md, timeout=10)
    assert reply.heartbeat_interval_s > 0
    # A RESOURCE_EXHAUSTED without the hint (memory, disk) is not a rate limit for the daemon.
    assert rate_limit_delay(_FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, ())) is None
    channel.close()


def _retry_hint(err: grpc.RpcError) -> str | None:
    """The retry-after-ms trailing metadata of a refused call, if any."""
    trailing: Any = err.trailing_metadata()  # a grpc.Call
    return next((str(value) for key, value in trailing or () if key == RETRY_AFTER_KEY), None)


class _FakeError(grpc.RpcError, grpc.Call):
    """An RpcError as the daemon sees one (only what `rate_limit_delay` reads)."""

    def __init__(self, code: grpc.StatusCode, trailing: tuple) -> None:
        self._code, self._trailing = code, trailing

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._trailing

    def details(self):
        return ""

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


@pytest.mark.multiprocess
def test_rate_limited_daemons_back_off_and_finish(coordinators, clients, tmp_path):
    """Limits so tight that a daemon hits them all the time (one GetTask, download and upload per 5 s, burst 1): it
    waits as hinted and the run still completes, every round visited once."""
    limits = RateLimitConfig(get_task_per_s=0.2, get_task_burst=1, download_model_per_s=0.2, download_model_burst=1,
                             upload_block_per_s=0.2, upload_block_burst=1, get_model_info_per_s=0.5,
                             get_model_info_burst=1, heartbeat_per_s=0.5, heartbeat_burst=1)
    data, _ = write_data(tmp_path, clients=2)
    running = coordinators.start(rate_limits=limits, training=TRAINING, schedule=SCHEDULE, grace=1)
    procs = [clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}")
             for i in range(2)]
    wait_clients(procs, timeout=300)
    coordinator = running.coordinator
    assert coordinator.all_rounds_done
    visits = coordinator.state.visits()
    assert sorted(v.round for v in visits) == list(range(coordinator.schedule.total_rounds))
    logs = "".join((tmp_path / "caches" / f"site-{i}.log").read_text() for i in range(2))
    assert "rate limited by the coordinator" in logs, "the limits were never hit: the test proves nothing"


@pytest.mark.multiprocess
def test_revoked_site_is_refused_and_its_task_goes_to_another_client(coordinators, clients, tmp_path):
    """A raw client holds round 0 (sequential: nothing else can start); it is revoked through the CLI while the
    coordinator runs; the list is reloaded without a restart, the task expires, two daemons finish the run."""
    certs = tmp_path / "certs"
    certs.mkdir()
    data, _ = write_data(tmp_path, clients=2)
    running = coordinators.start(training=TRAINING, schedule=SCHEDULE, grace=1,
                                 revocation_list=str(certs / REVOCATION_FILE))
    coordinator = running.coordinator
    channel = grpc.insecure_channel(address_of(running))
    stub = pb_grpc.CoordinatorStub(channel)
    rogue = register(stub, "rogue")
    held = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=rogue.md, timeout=10)
    assert held.HasField("task") and held.task.round == 0
    procs = [clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}")
             for i in range(2)]
    time.sleep(2)
    assert coordinator.state.visits() == [], "round 0 is held by the rogue: nothing can be committed yet"

    assert cli_main(["certs", "--out", str(certs), "--revoke", "rogue"]) == 0
    wait_for(lambda: coordinator.state.task(held.task.task_id).status == "expired", 10,
             "the revoked site's task to expire")
    for call in (lambda: stub.Heartbeat(pb.HeartbeatRequest(task_id=held.task.task_id), metadata=rogue.md,
                                        timeout=10),
                 lambda: stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=rogue.md, timeout=10),
                 lambda: register(stub, "rogue")):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = refused.value.details() or ""
        assert "revoked" in details and "rogue" in details

    wait_clients(procs, timeout=300)
    assert coordinator.all_rounds_done
    visits = coordinator.state.visits()
    rogue_id = rogue.reply.client_id
    assert sorted(v.round for v in visits) == list(range(coordinator.schedule.total_rounds))
    assert all(v.client_id != rogue_id for v in visits)
    assert [v.new_version for v in sorted(visits, key=lambda v: v.round)] == list(range(1, len(visits) + 1))
    channel.close()


@pytest.mark.multiprocess
def test_revocation_list_edits_are_reloaded_and_a_broken_edit_keeps_the_old_list(coordinators, tmp_path):
    path = tmp_path / REVOCATION_FILE
    add_revocation(path, "gone")
    running = coordinators.start(training=TRAINING, schedule=SCHEDULE, revocation_list=str(path))
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(address_of(running)))
    with pytest.raises(grpc.RpcError) as refused:
        register(stub, "gone")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    site = register(stub, "later")
    stub.Heartbeat(pb.HeartbeatRequest(), metadata=site.md, timeout=10)
    path.write_text("{ half written")  # a broken edit: the previous list stays in force
    time.sleep(1.2)
    stub.Heartbeat(pb.HeartbeatRequest(), metadata=site.md, timeout=10)
    with pytest.raises(grpc.RpcError):
        register(stub, "gone")
    path.write_text(json.dumps({"revoked": [{"name": "gone"}, {"name": "later"}]}))

    def refused_now() -> bool:
        try:
            stub.Heartbeat(pb.HeartbeatRequest(), metadata=bearer(site.reply.token), timeout=10)
            return False
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            return True

    wait_for(refused_now, 10, "the edited list to be reloaded")


@pytest.mark.multiprocess
def test_malformed_list_fails_the_coordinator_at_start(coordinators, tmp_path):
    path = tmp_path / REVOCATION_FILE
    path.write_text("not json")
    with pytest.raises(ValueError, match="malformed"):
        coordinators.start(training=TRAINING, schedule=SCHEDULE, revocation_list=str(path))


@pytest.mark.multiprocess
def test_mutual_tls_revocation_by_certificate_and_by_name(coordinators, tmp_path):
    """With mutual TLS the list lives next to the client CA by default; a certificate's fingerprint alone revokes
    that certificate (whatever name the entry gives), `certs --revoke NAME` revokes the site."""
    certs = make_certs(tmp_path / "pki", ["localhost"], ["site-0", "site-1"])
    running = coordinators.start(insecure=False, address="localhost:0", tls_cert=str(certs / "server.pem"),
                                 tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"),
                                 training=TRAINING, schedule=SCHEDULE)
    assert running.coordinator.revocations.path == certs / REVOCATION_FILE

    def site(name: str) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(client_channel(f"localhost:{running.port}", tls_ca=str(certs / "ca.pem"),
                                                      tls_cert=str(certs / f"{name}.pem"),
                                                      tls_key=str(certs / f"{name}.key")))

    stubs = {name: site(name) for name in ("site-0", "site-1")}
    creds = {name: register(stub, name) for name, stub in stubs.items()}

    def heartbeat_code(name: str) -> grpc.StatusCode:
        try:
            stubs[name].Heartbeat(pb.HeartbeatRequest(), metadata=creds[name].md, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()

    assert heartbeat_code("site-0") == heartbeat_code("site-1") == grpc.StatusCode.OK
    add_revocation(certs / REVOCATION_FILE, "lost-laptop", (certs / "site-0.pem").read_bytes())
    wait_for(lambda: heartbeat_code("site-0") == grpc.StatusCode.PERMISSION_DENIED, 10, "site-0's certificate revoked")
    assert heartbeat_code("site-1") == grpc.StatusCode.OK
    revoke_site(certs, "site-1")
    wait_for(lambda: heartbeat_code("site-1") == grpc.StatusCode.PERMISSION_DENIED, 10, "site-1 revoked")
    with pytest.raises(grpc.RpcError) as refused:
        register(stubs["site-1"], "site-1")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
