"""The `fedcybgd` command as an operator meets it: wrong invocations end with a non-zero status and
one clear line on stderr (no traceback); `status` and `export` work against a real run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from conftest import PROCESS_ENV, Coordinators, address_of, free_port, wait_for, write_data
from fedcybgd.cli.main import CLIENT_FLAGS, COORDINATOR_FLAGS, _overrides, build_parser
from fedcybgd.client.config import ClientConfig
from fedcybgd.client.daemon import ClientDaemon
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.config import from_dict, load_config
from fedcybgd.common.partition import partition_model
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

README = Path(__file__).resolve().parent.parent / "README.md"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcybgd.cli.main", "--log-level", "warning", *args],
                          capture_output=True, text=True, timeout=timeout, env=PROCESS_ENV)


def assert_clean_failure(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, a message naming what is wrong, and no Python traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr}"


# -- a small finished run, shared by `status` and `export` -----------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory, module_coordinators: Coordinators):
    """Coordinator in-process, one client daemon in a thread (this file is about the CLI; the
    client-process paths are covered by the end-to-end tests)."""
    tmp = tmp_path_factory.mktemp("cli-run")
    data, _ = write_data(tmp, clients=1)
    running = module_coordinators.start(state_dir=str(tmp / "state"), grace=1,
                                        schedule=ScheduleConfig(cycles=1, order="ascending", lr=3e-3, seed=1),
                                        training=TrainingConfig(local_steps=2, batch_size=2, seq_len=64))
    address = address_of(running)
    daemon = ClientDaemon(ClientConfig(coordinator=address, data=str(data[0]), cache_dir=str(tmp / "cache"),
                                       name="site-cli", device="cpu", threads=1, insecure=True))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the client daemon did not finish"
    wait_for(lambda: running.coordinator.finished, 30, "the run to finish")
    return {"address": address, "coordinator": running.coordinator, "state_dir": tmp / "state",
            "model_dir": tiny_model_dir}


# -- coordinator ------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_coordinator_without_model_on_a_fresh_state_dir_fails_clearly(tmp_path):
    proc = cli("coordinator", "--insecure", "--state-dir", str(tmp_path / "state"), "--address", "127.0.0.1:0")
    assert_clean_failure(proc, "--model")
    assert proc.returncode == 2


@pytest.mark.multiprocess
def test_coordinator_with_a_missing_model_directory_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = cli("coordinator", "--insecure", "--model", str(missing), "--state-dir", str(tmp_path / "state"),
               "--address", "127.0.0.1:0")
    assert_clean_failure(proc, str(missing))


@pytest.mark.multiprocess
def test_coordinator_config_file_with_unknown_keys_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "./m"\nlayers_per_blok = 2\n')
    proc = cli("coordinator", "--config", str(bad))
    assert_clean_failure(proc, "unknown key", "layers_per_blok")
    # Nested tables are checked too (in-process: same code path, no interpreter start-up).
    nested = tmp_path / "nested.toml"
    nested.write_text('[schedule]\ncycels = 2\n')
    with pytest.raises(ValueError, match=r"schedule.*unknown key 'cycels'"):
        load_config(CoordinatorConfig, nested, {})
    with pytest.raises(ValueError, match="expected a table"):
        load_config(CoordinatorConfig, None, {"training": 3})


def test_config_file_values_are_used_and_flags_override_them(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "./m"\nstate_dir = "./s"\nmax_concurrent_visits = 2\ninsecure = true\n'
                    '[schedule]\ncycles = 2\norder = "random"\nlr = 1e-3\n'
                    '[training]\nlocal_steps = 5\nseq_len = 128\n')
    args = build_parser().parse_args(["coordinator", "--config", str(path), "--cycles", "3", "--seq-len", "32",
                                      "--state-dir", "./other"])
    config = load_config(CoordinatorConfig, args.config, _overrides(args, COORDINATOR_FLAGS))
    assert config.model == "./m" and config.max_concurrent_visits == 2           # from the file
    assert config.schedule.order == "random" and config.schedule.lr == 1e-3
    assert config.training.local_steps == 5
    assert config.schedule.cycles == 3 and config.training.seq_len == 32        # flags win
    assert config.state_dir == "./other"
    assert config.training.batch_size == TrainingConfig().batch_size           # neither: default

    client_toml = tmp_path / "client.toml"
    client_toml.write_text('coordinator = "h:1"\ndata = "./d"\nname = "site-x"\nmax_visits = 4\n')
    args = build_parser().parse_args(["client", "--config", str(client_toml), "--max-visits", "7", "--insecure"])
    client = load_config(ClientConfig, args.config, _overrides(args, CLIENT_FLAGS))
    assert (client.coordinator, client.data, client.name, client.max_visits) == ("h:1", "./d", "site-x", 7)


def test_readme_configuration_example_is_valid():
    match = re.search(r"```toml\n(.*?)```", README.read_text(), re.S)
    if match is None:
        pytest.skip("README has no TOML example")
    values = tomllib.loads(match.group(1))
    config = from_dict(CoordinatorConfig, values, "README")
    assert config.schedule.cycles == values["schedule"]["cycles"]


@pytest.mark.multiprocess
def test_restart_on_a_state_dir_with_other_layers_per_block_is_refused(tiny_model_dir, tmp_path):
    state_dir = tmp_path / "state"
    # Initialise the run exactly as `coordinator --model M --state-dir S` (all other settings
    # default) would, then check that the same settings are accepted again.
    config = load_config(CoordinatorConfig, None,
                         {"model": str(tiny_model_dir), "state_dir": str(state_dir), "insecure": True})
    Coordinator(config).close()
    Coordinator(config).close()

    proc = cli("coordinator", "--insecure", "--model", str(tiny_model_dir), "--state-dir", str(state_dir),
               "--address", "127.0.0.1:0", "--layers-per-block", "2")
    assert_clean_failure(proc, "state directory", str(state_dir), '"layers_per_block": 2')
    assert proc.returncode == 2


# -- client -----------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_client_without_data_fails_clearly(tmp_path):
    proc = cli("client", "--coordinator", "127.0.0.1:1", "--cache-dir", str(tmp_path / "cache"))
    assert_clean_failure(proc, "--data")
    assert proc.returncode == 2


# -- status -----------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_status_prints_the_run_state(finished_run):
    proc = cli("status", "--insecure", "--coordinator", finished_run["address"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "run done: round 5/5" in out
    assert "model version 5" in out and "5 blocks" in out
    assert "site-cli" in out
    client = finished_run["coordinator"].state.clients()[0]
    assert re.search(rf"client {client.id} site-cli .* visits +5 ", out), out


@pytest.mark.multiprocess
def test_status_json_has_the_expected_keys(finished_run):
    proc = cli("status", "--insecure", "--coordinator", finished_run["address"], "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    for key in ("runState", "round", "totalRounds", "numBlocks", "version", "blocks", "clients", "visits",
                "totalBytesDown", "totalBytesUp", "modelBytes"):
        assert key in status, f"{key} missing from {sorted(status)}"
    assert status["runState"] == "done"
    # (proto3 JSON: 32-bit integers are numbers, 64-bit ones strings)
    assert status["round"] == status["totalRounds"] == status["numBlocks"] == int(status["version"]) == 5
    assert len(status["visits"]) == 5 and len(status["blocks"]) == 5
    assert status["clients"][0]["name"] == "site-cli"
    assert int(status["modelBytes"]) == finished_run["coordinator"].status(pb.GetStatusRequest()).model_bytes


@pytest.mark.multiprocess
def test_status_of_an_unreachable_coordinator_fails_clearly():
    address = f"127.0.0.1:{free_port()}"
    proc = cli("status", "--insecure", "--coordinator", address)
    assert_clean_failure(proc, address)


# -- export -----------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_export_without_state_fails_clearly(tmp_path):
    empty = tmp_path / "not-a-state-dir"
    empty.mkdir()
    proc = cli("export", "--state-dir", str(empty), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "no coordinator state", str(empty))
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_export_writes_the_latest_version_loadable_by_transformers(finished_run, tmp_path):
    out = tmp_path / "export"
    proc = cli("export", "--state-dir", str(finished_run["state_dir"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(str(out))
    coordinator = finished_run["coordinator"]
    latest, manifest = coordinator.state.latest_version()
    assert latest == 5
    for spec, sha in zip(partition_model(model, 1), manifest, strict=True):
        stored = safetensors.torch.load_file(str(coordinator.store.blobs.path(sha)))
        exported = block_tensors(model, spec)
        assert set(exported) == set(stored), spec.name
        for name, tensor in stored.items():
            assert torch.equal(exported[name], tensor), f"{spec.name}/{name} is not the latest version"
    assert manifest != coordinator.state.manifest(0), "the run should have changed the model"


def test_demo_takes_an_existing_split(tmp_path, tiny_model_dir):
    """`fedcybgd demo --split DIR` runs on a partition made beforehand (benchmarks make one split for all runs)."""
    from fedcybgd.cli.demo import DemoOptions, prepare_inputs

    split = tmp_path / "split"
    for name in ("client-0", "client-1", "eval"):
        (split / name).mkdir(parents=True)
    options = DemoOptions(out=str(tmp_path / "out"), model=str(tiny_model_dir), clients=2, split=str(split))
    model_dir, clients, held_out = prepare_inputs(options, tmp_path / "out")
    assert model_dir == tiny_model_dir and clients == [split / "client-0", split / "client-1"]
    assert held_out == split / "eval"
    with pytest.raises(FileNotFoundError, match="client-2"):
        prepare_inputs(DemoOptions(out=str(tmp_path / "out"), model=str(tiny_model_dir), clients=3, split=str(split)),
                       tmp_path / "out")
