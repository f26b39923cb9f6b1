"""The memory planner (``training/planner.py``) and what it stands on: ``LiveMemory`` counts what real tensors
occupy, a visit simulated on the meta device counts what the same visit on real tensors counts, plans come one per
block in partition order, ``checkpoint_above`` predicts less where it saves memory, and ``fedcybgd plan`` reports
them (or says clearly what is wrong with its input)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedcybgd.cli.main import main
from fedcybgd.common.modeling import model_from_config
from fedcybgd.common.partition import partition_model
from fedcybgd.common.sizes import format_size, parse_size
from fedcybgd.common.tiny import tiny_config
from fedcybgd.training.live_memory import LiveMemory
from fedcybgd.training.planner import (
    CPU_ALLOCATOR_BYTES,
    CPU_RUNTIME_BYTES,
    PlanSettings,
    plan_model_dir_or_config,
    plan_visits,
    simulate_visit,
)

SETTINGS = PlanSettings(batch_size=2, seq_len=64, dtype=torch.float32)


# -- the tracker ---------------------------------------------------------------------------------------------------


def test_tracker_counts_live_bytes_once_and_frees_them():
    weights = torch.ones(1000)  # existed before: never counted, nor its views
    with LiveMemory() as memory:
        a = torch.empty(250, 100)  # 100,000 bytes
        view, alias = a.t(), a[1:]
        assert memory.live == 100_000
        b = a * 2 + 1  # the intermediate a * 2 is freed at once, b stays
        assert memory.live == 200_000 and memory.peak == 300_000
        del a, view
        assert memory.live == 200_000  # alias still holds a's storage
        del alias
        assert memory.live == 100_000
        weights.add_(1)
        weights.detach()[:10].mul_(2)
        assert memory.live == 100_000
        memory.reset_peak()
        assert memory.peak == 100_000
    del b
    assert memory.live == 0 and memory.peak == 100_000


def test_tracker_answers_scalar_questions_on_meta():
    with LiveMemory():
        mask = torch.ones(2, 8, dtype=torch.bool, device="meta")
        assert bool(mask.all()) is True
        assert int(torch.zeros(3, dtype=torch.long, device="meta").sum()) == 0
        assert float(torch.zeros(3, device="meta").sum()) == 0.0


# -- the simulation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_simulation_counts_what_real_tensors_count(arch, dtype):
    """The simulated visit of every block (layers, the rest, and row ranges of the embedding and head: a small
    block bound splits them) counts, on meta, what the same visit counts on real CPU tensors."""
    settings = dataclasses.replace(SETTINGS, dtype=dtype, max_block_params=4000)
    counted = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        model = model_from_config(tiny_config(arch), dtype, device)
        counted[device] = [simulate_visit(model, spec, settings) for spec in partition_model(model, 1, 4000)]
    assert len(counted["meta"]) > 6  # 4 layers, row ranges, the rest
    for cpu, meta in zip(counted["cpu"], counted["meta"], strict=True):
        assert meta.state_bytes == cpu.state_bytes
        assert meta.peak_bytes == pytest.approx(cpu.peak_bytes, rel=0.02)


def test_one_plan_per_block_in_partition_order():
    config = tiny_config("qwen2")
    settings = dataclasses.replace(SETTINGS, layers_per_block=2, max_block_params=4000)
    specs = partition_model(model_from_config(config, torch.float32, "meta"), 2, 4000)
    plans = plan_visits(config, settings)
    assert [(p.index, p.block, p.params) for p in plans] == [(s.index, s.name, s.numel) for s in specs]
    for p in plans:
        assert p.peak_bytes == p.weights_bytes + p.trained_bytes + p.activation_bytes + p.runtime_bytes
        assert p.runtime_bytes == CPU_RUNTIME_BYTES + CPU_ALLOCATOR_BYTES
        assert p.trained_bytes == 2 * 4 * p.params  # fp32: AdamW's two moments, no masters
        assert p.activation_bytes > 0
    assert plan_visits(config, settings) == plans  # remembered, same answer


def test_low_precision_trains_through_fp32_masters_and_cuda_counts_no_runtime():
    plans = plan_visits(tiny_config("llama"), dataclasses.replace(SETTINGS, dtype=torch.bfloat16,
                                                                  device_type="cuda"))
    layer = plans[0]
    assert layer.trained_bytes == 3 * 4 * layer.params  # fp32 master + two moments
    assert layer.runtime_bytes == 0
    params = sum(p.params for p in plans)
    assert 2 * params <= layer.weights_bytes < 2 * params + 1024  # bf16 weights, and the rotary buffers


def test_checkpoint_above_predicts_less_for_low_layers():
    config = tiny_config("llama")
    settings = dataclasses.replace(SETTINGS, seq_len=256)
    plain = plan_visits(config, settings)
    checkpointed = plan_visits(config, dataclasses.replace(settings, checkpoint_above=True))
    assert checkpointed[0].peak_bytes < plain[0].peak_bytes  # layers.0: three layers above it
    assert checkpointed[3].peak_bytes == plain[3].peak_bytes  # layers.3: nothing above
    assert plain[0].peak_bytes > plain[3].peak_bytes  # without it, lower layers keep more activations


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_attention_is_simulated_as_a_fused_kernel(device_type):
    """On meta, attention would take the reference path and hold [batch, heads, seq, seq] scores; the devices run
    fused kernels that hold no such matrix, so doubling the sequence must about double the activations."""
    settings = dataclasses.replace(SETTINGS, dtype=torch.bfloat16, device_type=device_type, seq_len=512)
    short = plan_visits(tiny_config("llama"), settings)[0].activation_bytes
    long = plan_visits(tiny_config("llama"), dataclasses.replace(settings, seq_len=1024))[0].activation_bytes
    assert long < 2.2 * short


def test_frozen_layers_held_compact_weigh_less():
    pytest.importorskip("torchao")
    plain = plan_visits(tiny_config("llama"), SETTINGS)
    compact = plan_visits(tiny_config("llama"), dataclasses.replace(SETTINGS, compact_frozen="int8"))
    assert compact[0].weights_bytes < plain[0].weights_bytes
    assert compact[0].trained_bytes == plain[0].trained_bytes  # the block itself stays in full precision


def test_settings_are_checked():
    with pytest.raises(ValueError, match="device_type"):
        PlanSettings(batch_size=1, seq_len=8, dtype=torch.float32, device_type="tpu")
    with pytest.raises(ValueError, match="batch_size"):
        PlanSettings(batch_size=0, seq_len=8, dtype=torch.float32)


def test_config_from_a_model_directory_or_a_config_file(tmp_path: Path):
    config = tiny_config("gpt2")
    config.save_pretrained(tmp_path)
    assert plan_model_dir_or_config(tmp_path).n_layer == 4
    assert plan_model_dir_or_config(tmp_path / "config.json").n_layer == 4
    with pytest.raises(FileNotFoundError, match="no model config"):
        plan_model_dir_or_config(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type"):
        plan_model_dir_or_config(tmp_path / "bad.json")


# -- fedcybgd plan -----------------------------------------------------------------------------------------------


def test_sizes():
    assert parse_size("24GiB") == parse_size("24G") == parse_size("24 gib") == 24 * 2**30
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("1.5G") == 3 * 2**29
    assert parse_size("1073741824") == 2**30
    for bad in ("", "lots", "24XB", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_size(bad, positive=True)
    assert format_size(19 * 2**30 + 2**28) == "19.25 GiB"


@pytest.fixture
def config_json(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config("llama").to_dict()))
    return path


def test_plan_command_prints_a_table(config_json, capsys):
    code = main(["plan", "--model", str(config_json), "--memory", "2GiB", "--batch-size", "2", "--seq-len", "64",
                 "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    for block in ("layers.0", "layers.3", "embed_head"):
        assert block in out
    assert "every visit fits" in out
    assert "checkpoint_above" in out and "layers/block" in out  # the summary of other settings


def test_plan_command_says_what_does_not_fit(config_json, capsys):
    code = main(["plan", "--model", str(config_json), "--memory", "100MiB", "--seq-len", "64", "--device", "cpu",
                 "--no-alternatives"])
    out = capsys.readouterr().out
    assert code == 0
    assert "NO" in out and "do not fit" in out and "layers/block" not in out


@pytest.mark.parametrize("args, message", [
    (["--model", "MISSING", "--memory", "24GiB"], "no model config"),
    (["--memory", "24 potatoes"], "is not a size"),
])
def test_plan_command_refuses_bad_input(config_json, capsys, args, message):
    argv = ["plan", *args] if "--model" in args else ["plan", "--model", str(config_json), *args]
    code = main([a.replace("MISSING", str(config_json.parent / "missing")) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
