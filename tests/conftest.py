"""Shared fixtures and helpers: a tiny model on disk, per-client data, real coordinators (in-process
or as `fedcybgd coordinator` processes) on loopback, real client daemon processes, and the check
that a federated run ends with the weights of the single-process reference.

Everything that starts a server or a process is cleaned up by a fixture, so a failing test never
leaves a coordinator listening or a client daemon running behind it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedcybgd.cli.demo import free_port  # noqa: F401  (re-exported: the tests' one free_port)
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.data import load_packed
from fedcybgd.common.partition import partition_model
from fedcybgd.common.prompts import PromptFormat
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.tiny import TINY_TEXT, write_tiny_model_dir
from fedcybgd.server.app import start
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.reference import run_reference
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from fedcybgd.server.app import RunningCoordinator

# Two cores: one torch thread per process keeps concurrent processes from thrashing and makes
# CPU results bit-reproducible.
torch.set_num_threads(1)

#: Environment of every process a test starts: one thread each (see above), logs written at once.
PROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

Metadata = tuple[tuple[str, str], ...]


# -- markers -----------------------------------------------------------------------------------------

#: Fixtures that start a gRPC server or a process: a test using one (directly or through another
#: fixture) must carry the `multiprocess` marker, so that `-m "not multiprocess"` stays fast.
PROCESS_FIXTURES = {"coordinators", "module_coordinators", "clients", "module_clients", "coordinator_processes"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that starts servers or processes through a shared fixture but is not marked
    `multiprocess`: the fast suite must not quietly grow slow."""
    unmarked = [item.nodeid for item in items if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("multiprocess") is None]
    if unmarked:
        raise pytest.UsageError("these tests start servers or processes but are not marked multiprocess:\n  "
                                + "\n  ".join(unmarked))


# -- model and data ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """A tiny *base* model: its tokenizer has no chat template (instruction data needs a prompt format)."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("base-model") / "tiny-base", arch="llama", seed=0,
                                chat_template=False)


def sonnets() -> list[str]:
    return [t.strip() for t in TINY_TEXT.split("\n\n") if t.strip()]


def write_data(tmp_path: Path, clients: int) -> tuple[list[Path], Path]:
    """Disjoint whole documents per client, plus held-out documents for the coordinator."""
    docs = sonnets()
    eval_docs, rest = docs[:8], docs[8:]
    paths = []
    for c in range(clients):
        path = tmp_path / "data" / f"client-{c}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in rest[c::clients]))
        paths.append(path)
    eval_path = tmp_path / "data" / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in eval_docs))
    return paths, eval_path


def write_instruction_data(tmp_path: Path, clients: int) -> tuple[list[Path], Path]:
    """Instruction data as users hold it (JSON lines of instruction/input/output, some chats and plain text):
    disjoint sonnets per client, each asked for by its first line; held-out sonnets for the coordinator."""
    def records(docs: list[str]) -> str:
        out: list[dict[str, Any]] = []
        for i, doc in enumerate(docs):
            first, _, rest = doc.partition("\n")
            if i % 5 == 3:
                out.append({"messages": [{"role": "system", "content": "You complete sonnets."},
                                         {"role": "user", "content": first}, {"role": "assistant", "content": rest},
                                         {"role": "user", "content": "Again?"}, {"role": "assistant", "content": doc}]})
            elif i % 5 == 4:
                out.append({"text": doc})
            else:
                out.append({"instruction": "Continue this sonnet.", "input": first, "output": rest})
        return "".join(json.dumps(r) + "\n" for r in out)

    docs = sonnets()
    eval_docs, rest = docs[:8], docs[8:]
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(clients):
        path = tmp_path / "data" / f"client-{c}.jsonl"
        path.write_text(records(rest[c::clients]))
        paths.append(path)
    eval_path = tmp_path / "data" / "eval.jsonl"
    eval_path.write_text(records(eval_docs))
    return paths, eval_path


# -- waiting -----------------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def wait_clients(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert [p.returncode for p in procs] == [0] * len(procs), "a client daemon failed (see its log)"


# -- in-process coordinators -------------------------------------------------------------------------

def address_of(running: RunningCoordinator) -> str:
    """Loopback address of an in-process coordinator (it listens on a port the OS picked)."""
    return f"127.0.0.1:{running.port}"


class Coordinators:
    """Starts in-process coordinators (`fedcybgd.server.app.start`) and, at teardown, closes every
    channel opened to them and stops every one still running, whatever the test did.

    Configurations default to what the tests need almost always: plaintext, a port the OS picks on
    127.0.0.1, the tiny model and a fresh state directory; any CoordinatorConfig field can be
    overridden."""

    def __init__(self, model_dir: Path, tmp: Path) -> None:
        self.model_dir = model_dir
        self.tmp = tmp
        self._running: list[tuple[RunningCoordinator, float]] = []
        self._channels: list[grpc.Channel] = []
        self._state_dirs = 0

    def config(self, **overrides: Any) -> CoordinatorConfig:
        """A CoordinatorConfig; state directories are `<tmp>/state`, then `<tmp>/state-2`, ..."""
        self._state_dirs += 1
        state_dir = self.tmp / ("state" if self._state_dirs == 1 else f"state-{self._state_dirs}")
        values: dict[str, Any] = dict(insecure=True, model=str(self.model_dir), state_dir=str(state_dir),
                                      address="127.0.0.1:0")
        values.update(overrides)
        return CoordinatorConfig(**values)

    def start(self, config: CoordinatorConfig | None = None, *, interceptors: Sequence[grpc.ServerInterceptor] = (),
              grace: float = 0, **overrides: Any) -> RunningCoordinator:
        """Start `config` (or `self.config(**overrides)`); stopped with `grace` seconds at teardown."""
        if config is None:
            config = self.config(**overrides)
        elif overrides:
            raise TypeError("give either a config or overrides, not both")
        running = start(config, interceptors=list(interceptors)) if interceptors else start(config)
        self._running.append((running, grace))
        return running

    def stop(self, running: RunningCoordinator, grace: float = 0) -> None:
        """Stop one coordinator now (a test that restarts on the same state directory)."""
        self._running = [(r, g) for r, g in self._running if r is not running]
        running.stop(grace=grace)

    def channel(self, running: RunningCoordinator) -> grpc.Channel:
        """A plaintext channel to `running`, closed at teardown."""
        channel = grpc.insecure_channel(address_of(running))
        self._channels.append(channel)
        return channel

    def stub(self, running: RunningCoordinator) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(self.channel(running))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        errors = []
        for running, grace in reversed(self._running):
            try:
                running.stop(grace=grace)
            except Exception as exc:  # stop the others anyway; report the first failure
                errors.append(exc)
        self._running.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def coordinators(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Coordinators]:
    """In-process coordinators for one test (state under tmp_path), stopped at its end."""
    factory = Coordinators(tiny_model_dir, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_coordinators(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinators]:
    """In-process coordinators shared by the tests of one module (a finished run looked at from
    several angles), stopped when the module is done."""
    factory = Coordinators(tiny_model_dir, tmp_path_factory.mktemp("coordinators"))
    try:
        yield factory
    finally:
        factory.close()


class Registration(NamedTuple):
    reply: pb.RegisterResponse
    md: Metadata  # the bearer token as call metadata


def bearer(token: str) -> Metadata:
    """Call metadata carrying a client's bearer token."""
    return (("authorization", f"Bearer {token}"),)


def register(stub: pb_grpc.CoordinatorStub, name: str = "site", timeout: float | None = 10,
             **fields: Any) -> Registration:
    """Register a raw client (a test speaking the protocol itself) and get its credentials."""
    reply = stub.Register(pb.RegisterRequest(name=name, **fields), timeout=timeout)
    return Registration(reply, bearer(reply.token))


# -- client daemon processes -------------------------------------------------------------------------

def start_client(address: str, data: Path, cache_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    """`fedcybgd client` as a process on one thread and CPU; its log is `<cache_dir>/../<name>.log`.
    Prefer the `clients` fixture, which also kills it at teardown."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # The client writes to it for as long as it runs: handed to the process, not closed here.
    log = open(cache_dir.parent / f"{name}.log", "a")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "fedcybgd.cli.main", "client", "--coordinator", address, "--data", str(data),
         "--cache-dir", str(cache_dir), "--name", name, "--threads", "1", "--device", "cpu", "--insecure", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=PROCESS_ENV)


def kill_processes(procs: Iterable[subprocess.Popen | None]) -> None:
    """SIGKILL every process still alive and reap it; a stopped one (SIGSTOP) is continued first."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=30)


class ClientProcesses:
    """Client daemons started for a test; every one still running at teardown is killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, address: str, data: Path, cache_dir: Path, name: str, *extra: str) -> subprocess.Popen:
        proc = start_client(address, data, cache_dir, name, *extra)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        kill_processes(self.procs)


@pytest.fixture
def clients() -> Iterator[ClientProcesses]:
    tracked = ClientProcesses()
    try:
        yield tracked
    finally:
        tracked.kill_all()


@pytest.fixture(scope="module")
def module_clients() -> Iterator[ClientProcesses]:
    """Client daemons of a module-scoped run (see `module_coordinators`)."""
    tracked = ClientProcesses()
    try:
        yield tracked
    finally:
        tracked.kill_all()


# -- `fedcybgd coordinator` processes ----------------------------------------------------------------

class Probe:
    """The operator's view (GetStatus, no credentials in insecure mode) over one channel that
    reconnects quickly after a coordinator restart."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 300)])
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def status(self, timeout: float = 5.0) -> pb.GetStatusResponse | None:
        """The coordinator's status, or None while it is not serving."""
        try:
            return self.stub.GetStatus(pb.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return None

    def close(self) -> None:
        self.channel.close()


class CoordinatorProcess:
    """`fedcybgd coordinator --insecure` as a subprocess on a free loopback port, restartable with the
    same arguments (hence the same state directory and address). Logs to `<log_dir>/coordinator.log`."""

    def __init__(self, log_dir: Path, args: Sequence[str]) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.command = [sys.executable, "-m", "fedcybgd.cli.main", "coordinator", "--address", self.address,
                        "--insecure", *args]
        # Open across restarts, for every process started; closed at cleanup.
        self.log = open(log_dir / "coordinator.log", "a")  # noqa: SIM115
        self.proc: subprocess.Popen | None = None
        self.probe = Probe(self.address)
        self._channels: list[grpc.Channel] = []

    def start(self, timeout: float = 60) -> None:
        """Start the process and wait until it answers GetStatus."""
        proc = self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                            env=PROCESS_ENV)
        wait_for(lambda: self.probe.status() is not None or proc.poll() is not None, timeout,
                 "the coordinator to serve", interval=0.05)
        assert proc.poll() is None, "the coordinator exited at start (see coordinator.log)"

    def status(self) -> pb.GetStatusResponse | None:
        return self.probe.status()

    def sigkill(self) -> None:
        assert self.proc is not None, "the coordinator was never started"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def sigterm(self) -> None:
        assert self.proc is not None, "the coordinator was never started"
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None, "the coordinator was never started"
        return self.proc.wait(timeout=timeout)

    def channel(self) -> grpc.Channel:
        """A plaintext channel to the coordinator (for a raw client), closed at cleanup."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def cleanup(self) -> None:
        for channel in self._channels:
            channel.close()
        kill_processes([self.proc])
        self.probe.close()
        self.log.close()


@pytest.fixture
def coordinator_processes(tmp_path: Path) -> Iterator[Callable[..., CoordinatorProcess]]:
    """Factory of `CoordinatorProcess`es (not started yet) logging under tmp_path; every one is
    killed, and its channels closed, at teardown."""
    made: list[CoordinatorProcess] = []

    def make(*args: str) -> CoordinatorProcess:
        process = CoordinatorProcess(tmp_path, args)
        made.append(process)
        return process

    try:
        yield make
    finally:
        for process in made:
            process.cleanup()


def state_blob_path(state_dir: Path) -> Callable[[str], Path]:
    """Where a coordinator keeps a blob, read straight from its state directory (no coordinator
    object needed: the run was made by a process)."""
    return lambda sha: state_dir / "blobs" / "objects" / sha[:2] / sha


# -- the single-process reference ---------------------------------------------------------------------

def replay_reference(model_dir: Path, schedule: ScheduleConfig, training: TrainingConfig,
                     data_of_visit: Sequence[Path], max_block_params: int | None = None,
                     prompt: PromptFormat | None = None) -> PreTrainedModel:
    """The single-process reference (`run_reference`) replaying a run's visits in round order,
    `data_of_visit[r]` being the data file of the client that made visit r (blocks of one layer,
    others bounded by `max_block_params` as the run's; records in the run's `prompt` format)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    packed: dict[Path, Sequences] = {}
    for path in data_of_visit:
        if path not in packed:
            packed[path] = load_packed(path, tokenizer, training.seq_len, prompt)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir))
    run_reference(reference, 1, schedule, training, [packed[path] for path in data_of_visit],
                  max_block_params=max_block_params)
    return reference


def assert_same_weights(model: PreTrainedModel, manifest: Sequence[str], blob_path: Callable[[str], Path], *,
                        tolerance: dict[str, float] | None = None, max_block_params: int | None = None,
                        error: type[AssertionError] = AssertionError) -> None:
    """Every tensor of every block of `manifest` (one blob per block, one layer per block) equals the
    same tensor of `model`: bit for bit, or within `tolerance` (rtol/atol of assert_close) where the
    computation legitimately differs in rounding. Raises `error` naming the first that differs."""
    for spec, sha in zip(partition_model(model, 1, max_block_params), manifest, strict=True):
        stored = safetensors.torch.load_file(str(blob_path(sha)))
        for name, tensor in block_tensors(model, spec).items():
            if tolerance is not None:
                torch.testing.assert_close(stored[name], tensor, rtol=tolerance["rtol"], atol=tolerance["atol"],
                                           msg=f"{spec.name}/{name}")
            elif not torch.equal(stored[name], tensor):
                raise error(f"{spec.name}/{name} differs from the single-process reference")


def assert_matches_reference(model_dir: Path, schedule: ScheduleConfig, training: TrainingConfig,
                             data_of_visit: Sequence[Path], manifest: Sequence[str], blob_path: Callable[[str], Path],
                             **checks: Any) -> PreTrainedModel:
    """The correctness anchor: a federated run's final weights (`manifest`) are those of the
    single-process reference replaying its visits. `checks`: see `assert_same_weights`."""
    prompt = checks.pop("prompt", None)
    reference = replay_reference(model_dir, schedule, training, data_of_visit, checks.get("max_block_params"), prompt)
    assert_same_weights(reference, manifest, blob_path, **checks)
    return reference


# -- what travels ---------------------------------------------------------------------------------------

@dataclass
class TappedCall:
    """One RPC as the server handled it: the method's name (`DownloadModel`, no service) and its
    request and response messages, in the order they passed."""

    method: str
    requests: list[Any] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)


class MessageTap(grpc.ServerInterceptor):
    """A server interceptor that records every message of every call, call by call, and changes
    nothing: the test's own account of what travelled, to search or to compare with what the
    coordinator reports. Pass it to `coordinators.start(interceptors=[tap])`.

    A request is recorded when the handler takes it and a response when the handler produces it
    (before gRPC sends it), so a stream the handler stops early, or a call it refuses, records what
    had passed by then. Every message is kept: meant for the tiny runs of the tests."""

    def __init__(self) -> None:
        self._calls: list[TappedCall] = []
        self._lock = threading.Lock()

    def calls(self, method: str | None = None) -> list[TappedCall]:
        """The calls so far (of `method` only, if given), oldest first; each a snapshot."""
        with self._lock:
            return [TappedCall(c.method, list(c.requests), list(c.responses)) for c in self._calls
                    if method is None or c.method == method]

    def requests(self, method: str | None = None) -> list[Any]:
        """Every request message so far (of `method`'s calls, if given), call after call."""
        return [m for call in self.calls(method) for m in call.requests]

    def responses(self, method: str | None = None) -> list[Any]:
        """Every response message so far (of `method`'s calls, if given), call after call."""
        return [m for call in self.calls(method) for m in call.responses]

    def _begin(self, method: str) -> TappedCall:
        call = TappedCall(method)
        with self._lock:
            self._calls.append(call)
        return call

    def _keep(self, messages: list[Any], message: Any) -> Any:
        with self._lock:
            messages.append(message)
        return message

    def _kept(self, messages: list[Any], stream: Iterable[Any]) -> Iterator[Any]:
        for message in stream:
            yield self._keep(messages, message)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_unary:
            unary_unary = handler.unary_unary

            def unary_unary_call(request: Any, context: grpc.ServicerContext) -> Any:
                call = self._begin(method)
                return self._keep(call.responses, unary_unary(self._keep(call.requests, request), context))
            return grpc.unary_unary_rpc_method_handler(unary_unary_call, **kwargs)
        if handler.unary_stream:
            unary_stream = handler.unary_stream

            def unary_stream_call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call = self._begin(method)
                yield from self._kept(call.responses, unary_stream(self._keep(call.requests, request), context))
            return grpc.unary_stream_rpc_method_handler(unary_stream_call, **kwargs)
        if handler.stream_unary:
            stream_unary = handler.stream_unary

            def stream_unary_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                call = self._begin(method)
                return self._keep(call.responses, stream_unary(self._kept(call.requests, requests), context))
            return grpc.stream_unary_rpc_method_handler(stream_unary_call, **kwargs)
        if handler.stream_stream:
            stream_stream = handler.stream_stream

            def stream_stream_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                call = self._begin(method)
                yield from self._kept(call.responses, stream_stream(self._kept(call.requests, requests), context))
            return grpc.stream_stream_rpc_method_handler(stream_stream_call, **kwargs)
        return handler
