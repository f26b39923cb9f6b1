"""TLS on, clients authenticated, least privilege.

With mutual TLS the handshake itself refuses a client without a certificate from the
federation's CA (the caller sees UNAVAILABLE: no byte reaches the service). Application-level
credentials (join token, bearer token, operator token) that are missing or wrong give
UNAUTHENTICATED; valid credentials used beyond their rights give PERMISSION_DENIED.
"""
from __future__ import annotations

import grpc
import pytest

from conftest import Coordinators, Registration, register
from fedcybgd.cli.certs import make_certs
from fedcybgd.common.transport import client_channel
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

JOIN = "join-secret-123"
OPERATOR = "operator-secret-456"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    good = make_certs(root / "good", ["localhost"], ["site-0", "site-1"])
    rogue = make_certs(root / "rogue", ["localhost"], ["site-0"])  # another CA, same names
    return good, rogue


@pytest.fixture(scope="module")
def coordinator(module_coordinators: Coordinators, pki):
    """Mutual TLS, a join token and an operator token: every check on."""
    good, _ = pki
    return module_coordinators.start(insecure=False, address="localhost:0", tls_cert=str(good / "server.pem"),
                                     tls_key=str(good / "server.key"), tls_client_ca=str(good / "ca.pem"),
                                     join_token=JOIN, operator_token=OPERATOR, max_concurrent_visits=2,
                                     schedule=ScheduleConfig(cycles=1),
                                     training=TrainingConfig(local_steps=1, seq_len=32))


def _stub(running, ca, cert=None, key=None):
    channel = client_channel(f"localhost:{running.port}", tls_ca=str(ca), tls_cert=cert and str(cert),
                             tls_key=key and str(key))
    return pb_grpc.CoordinatorStub(channel)


def _site(running, pki, name):
    good, _ = pki
    return _stub(running, good / "ca.pem", good / f"{name}.pem", good / f"{name}.key")


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _register(stub, name="whatever") -> Registration:
    return register(stub, name, join_token=JOIN)


@pytest.mark.multiprocess
def test_registration_needs_certificate_and_join_token_and_takes_the_certificates_name(coordinator, pki):
    good, rogue = pki
    site0 = _site(coordinator, pki, "site-0")
    reply, _ = _register(site0, name="i-claim-to-be-someone-else")
    names = {c.id: c.name for c in coordinator.coordinator.state.clients()}
    assert names[reply.client_id] == "site-0"

    assert _code(lambda: site0.Register(pb.RegisterRequest(name="x"), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: site0.Register(pb.RegisterRequest(name="x", join_token="wrong"), timeout=10)) \
        == grpc.StatusCode.UNAUTHENTICATED
    # No client certificate, or one from another CA: the TLS handshake refuses the connection.
    assert _code(lambda: _stub(coordinator, good / "ca.pem").Register(
        pb.RegisterRequest(name="x", join_token=JOIN), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: _stub(coordinator, good / "ca.pem", rogue / "site-0.pem", rogue / "site-0.key").Register(
        pb.RegisterRequest(name="x", join_token=JOIN), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA refuses it too; plaintext gets nowhere.
    assert _code(lambda: _stub(coordinator, rogue / "ca.pem", good / "site-0.pem", good / "site-0.key").Register(
        pb.RegisterRequest(name="x", join_token=JOIN), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    plain = pb_grpc.CoordinatorStub(client_channel(f"localhost:{coordinator.port}", insecure=True))
    assert _code(lambda: plain.Register(pb.RegisterRequest(name="x", join_token=JOIN), timeout=5)) \
        == grpc.StatusCode.UNAVAILABLE
    # The operator's certificate is not a site.
    operator = _stub(coordinator, good / "ca.pem", good / "operator.pem", good / "operator.key")
    assert _code(lambda: operator.Register(pb.RegisterRequest(name="x", join_token=JOIN), timeout=10)) \
        == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.multiprocess
def test_tokens_are_checked_and_bound_to_their_site(coordinator, pki):
    site0, site1 = _site(coordinator, pki, "site-0"), _site(coordinator, pki, "site-1")
    _, md0 = _register(site0)
    _, md1 = _register(site1)
    assert _code(lambda: site0.GetTask(pb.GetTaskRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: site0.GetTask(pb.GetTaskRequest(), metadata=(("authorization", "Bearer forged"),),
                                       timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    # site-1's token presented over site-0's certificate: a stolen token is useless elsewhere.
    assert _code(lambda: site0.GetTask(pb.GetTaskRequest(), metadata=md1, timeout=10)) \
        == grpc.StatusCode.PERMISSION_DENIED

    task0 = site0.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md0, timeout=10).task
    task1 = site1.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md1, timeout=10).task
    assert task0.task_id and task1.task_id and task0.block_index != task1.block_index
    # Least privilege: a site reads and writes only for its own task.
    assert _code(lambda: list(site0.DownloadModel(pb.DownloadRequest(task_id=task1.task_id), metadata=md0,
                                                  timeout=10))) == grpc.StatusCode.PERMISSION_DENIED
    header = pb.UploadHeader(task_id=task1.task_id, block_index=task1.block_index, base_version=task1.base_version,
                             blob_sha256="0" * 64, blob_size=10)
    assert _code(lambda: site0.UploadBlock(iter([pb.UploadMessage(header=header)]), metadata=md0, timeout=10)) \
        == grpc.StatusCode.PERMISSION_DENIED
    manifest = next(iter(site0.DownloadModel(pb.DownloadRequest(task_id=task0.task_id), metadata=md0, timeout=30)))
    assert manifest.HasField("manifest")


@pytest.mark.multiprocess
def test_operator_calls_need_operator_credentials(coordinator, pki):
    good, _ = pki
    site0 = _site(coordinator, pki, "site-0")
    _, md0 = _register(site0)
    assert _code(lambda: site0.GetStatus(pb.GetStatusRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: site0.GetStatus(pb.GetStatusRequest(), metadata=md0, timeout=10)) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: site0.GetStatus(pb.GetStatusRequest(), metadata=(("authorization", "Bearer nope"),),
                                         timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    by_token = site0.GetStatus(pb.GetStatusRequest(), metadata=(("authorization", f"Bearer {OPERATOR}"),), timeout=10)
    operator = _stub(coordinator, good / "ca.pem", good / "operator.pem", good / "operator.key")
    by_certificate = operator.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert by_token.num_blocks == by_certificate.num_blocks > 0


def test_tls_is_on_unless_insecure_is_explicit(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="TLS"):
        CoordinatorConfig(model=str(tiny_model_dir), state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="authenticate"):
        CoordinatorConfig(model=str(tiny_model_dir), state_dir=str(tmp_path), tls_cert="a", tls_key="b")
    from fedcybgd.client.config import ClientConfig
    with pytest.raises(ValueError, match="TLS"):
        ClientConfig(data="x")
