"""Frozen decoder layers held quantized (training/compact.py): layer 0 trains in full precision while layers 1..N
are int8 / NF4 weight-only, and the loss still backpropagates through them to layer 0."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import address_of, wait_clients, wait_for, write_data
from fedcybgd.client.resident import ResidentModel
from fedcybgd.client.tasks import BlockTask, VisitContext
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.codec import serialize_block
from fedcybgd.common.partition import partition_model
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.tiny import make_tiny_model, tiny_config
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.training import VisitHyper, train_block
from fedcybgd.training.compact import (
    COMPACT_METHODS,
    compact_bytes_per_param,
    compact_layers,
    compact_linear_bytes,
    frozen_layers_compacted,
    is_compact,
    module_bytes,
    restore_layers,
    tensor_bytes,
)
from fedcybgd.v1 import coordinator_pb2 as pb

TQ = pytest.importorskip("torchao.quantization", reason="torchao is optional: pip install 'fedcybgd[compact]'")

DTYPES = (torch.float32, torch.bfloat16)
#: |loss(compact) - loss(exact)| on the tiny llama (loss ~5.5), observed over a few batches in fp32 and bf16:
#: int8 <= 3e-4, nf4 <= 6.2e-3.
LOSS_TOL = {"int8": 2e-3, "nf4": 2e-2}
#: cosine(grad of a layer-0 parameter, compact vs exact), observed minimum: int8 0.9997, nf4 0.969.
GRAD_COS = {"int8": 0.999, "nf4": 0.95}


def _setup(arch: str, dtype: torch.dtype):
    model = make_tiny_model(arch, dtype=dtype)
    model.requires_grad_(False)
    layers = model.get_decoder().layers
    layers[0].requires_grad_(True)
    return model, layers


def _loss_and_grads(model, layers, ids):
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in layers[0].named_parameters()}


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    return weight.get_original_weight() if isinstance(weight, TQ.NF4Tensor) else weight.dequantize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", COMPACT_METHODS)
def test_backward_reaches_the_block_below_compact_layers(method, dtype):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ref, ref_layers = _setup("llama", dtype)
    exact_loss, exact_grads = _loss_and_grads(ref, ref_layers, ids)

    model, layers = _setup("llama", dtype)
    before = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    originals = [weakref.ref(m.weight) for layer in layers[1:] for m in layer.modules() if isinstance(m, nn.Linear)]
    held_before = module_bytes(layers[1:])
    saved = compact_layers(layers[1:], method)
    gc.collect()
    assert all(r() is None for r in originals), "full-precision weights are still alive"
    assert saved == held_before - module_bytes(layers[1:]) > 0
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == before
    assert not is_compact(layers[0]) and all(is_compact(layer) for layer in layers[1:])

    loss, grads = _loss_and_grads(model, layers, ids)
    assert torch.isfinite(loss) and abs(loss.item() - exact_loss.item()) < LOSS_TOL[method]
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        cos = nn.functional.cosine_similarity(grad.float().flatten(), exact_grads[name].float().flatten(), dim=0)
        assert cos > GRAD_COS[method], (name, cos.item())
    for layer in layers[1:]:
        assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", COMPACT_METHODS)
def test_restore_gives_back_plain_parameters_under_the_same_names(method, dtype):
    ref = make_tiny_model("llama", dtype=dtype)
    model = make_tiny_model("llama", dtype=dtype)
    layers = model.get_decoder().layers
    before = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    compact_layers(layers[1:], method)
    expected = {n: _dequantized(p).to(dtype) for n, p in model.named_parameters() if hasattr(p, "__tensor_flatten__")}
    assert expected

    restore_layers(layers[1:], dtype)
    params = dict(model.named_parameters())
    assert [(n, p.shape, p.dtype) for n, p in params.items()] == before
    assert not any(is_compact(layer) for layer in layers)
    for name, value in expected.items():
        assert type(params[name]) is nn.Parameter and not params[name].requires_grad
        assert torch.equal(params[name], value), name

    exact = dict(ref.named_parameters())
    with torch.no_grad():
        for name in expected:
            params[name].copy_(exact[name])
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("method", COMPACT_METHODS)
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt_neox"])
def test_other_architectures_backprop_through_compact_layers(arch, method):
    model, layers = _setup(arch, torch.float32)
    assert compact_layers(layers[1:], method) > 0
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    _, grads = _loss_and_grads(model, layers, ids)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method", COMPACT_METHODS)
def test_no_full_precision_weight_copy_is_kept_for_backward(method):
    # torchao's own int8 linear saves qdata.to(x.dtype) for backward; compact layers must keep only what an exact
    # frozen layer keeps (activations), else every frozen weight is resident a second time at the peak.
    def saved_bytes(model, ids):
        params = {p.untyped_storage().data_ptr() for p in model.parameters() if not hasattr(p, "__tensor_flatten__")}
        saved: dict[int, int] = {}

        def pack(t):
            if not hasattr(t, "__tensor_flatten__") and t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids).loss.backward()
        return sum(saved.values())

    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4))
    exact, _ = _setup("llama", torch.bfloat16)
    model, layers = _setup("llama", torch.bfloat16)
    compact_layers(layers[1:], method)
    assert saved_bytes(model, ids) <= saved_bytes(exact, ids)


def test_int8_backward_matches_the_dequantized_weight():
    linear = nn.Linear(128, 32, bias=True)
    compact_layers([linear], "int8")
    linear.bias.requires_grad_(True)
    weight = linear.weight.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = linear.bias.detach().clone().requires_grad_(True)
    (linear(x) ** 2).sum().backward()
    (nn.functional.linear(x_ref, weight, bias_ref) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(linear.bias.grad, bias_ref.grad)
    assert linear.weight.grad is None
    restore_layers([linear], torch.float32)
    assert "forward" not in vars(linear) and torch.equal(linear.weight, weight)


def test_unknown_method_is_rejected():
    layers = make_tiny_model("llama").get_decoder().layers
    with pytest.raises(ValueError, match="unknown compact method 'fp8'.*int8"):
        compact_layers(layers[1:], "fp8")
    with pytest.raises(ValueError, match="unknown compact method"):
        compact_bytes_per_param("int4")
    with pytest.raises(ValueError, match="unknown compact method"):
        compact_linear_bytes(64, 64, "q4")
    assert not any(is_compact(layer) for layer in layers)


@pytest.mark.parametrize("method", COMPACT_METHODS)
def test_bytes_held_match_the_formula_and_shrink(method):
    # A 2-layer llama with realistic-width projections (hidden 512): per-row int8 scales cost 5 bytes a row.
    config = tiny_config("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = model.get_decoder().layers
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    bf16_bytes = sum(tensor_bytes(m.weight) for m in linears)
    n_params = sum(m.weight.numel() for m in linears)
    compact_layers(layers, method)
    held = [tensor_bytes(m.weight) for m in linears]
    assert held == [compact_linear_bytes(m.out_features, m.in_features, method, torch.bfloat16) for m in linears]
    ratio = sum(held) / bf16_bytes
    # int8: 1 byte + 5 bytes a row (fp32 scale, int8 zero point) -> just over half of bf16; nf4: ~0.258 of bf16.
    assert (0.5 < ratio < 0.51) if method == "int8" else (0.25 < ratio < 0.26)
    assert sum(held) / n_params == pytest.approx(compact_bytes_per_param(method, torch.bfloat16, 512), rel=0.02)


# -- a block visit with compact frozen layers (train_block(compact_frozen=), the client's --compact-frozen) -------

HYPER = VisitHyper(lr=3e-3, steps=2, batch_size=2, seq_len=24, seed=0)


def _sequences() -> Sequences:
    return Sequences(torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("method", COMPACT_METHODS)
def test_a_visit_with_compact_frozen_layers_trains_the_block_close_to_the_exact_visit(method):
    exact_model, model = make_tiny_model("llama"), make_tiny_model("llama")
    specs = partition_model(model, 1)
    spec = next(s for s in specs if s.name == "layers.0")
    start = block_tensors(model, spec)
    start = {k: v.clone() for k, v in start.items()}
    exact = train_block(exact_model, spec, _sequences(), HYPER)
    compact = train_block(model, spec, _sequences(), HYPER, compact_frozen=method)
    assert abs(compact.loss_before - exact.loss_before) < LOSS_TOL[method]
    for name, value in exact.tensors.items():
        update, error = value - start[name], compact.tensors[name] - value
        assert error.norm() < 0.5 * update.norm(), name  # the block moved as the exact visit moved it, roughly
    # Afterwards every layer holds plain parameters again (the frozen ones dequantized, for the caller to reload).
    assert not any(is_compact(layer) for layer in model.get_decoder().layers)
    assert all(not hasattr(p, "__tensor_flatten__") for p in model.parameters())


def test_the_planner_puts_the_original_weights_back():
    model = make_tiny_model("llama")
    spec = partition_model(model, 1)[0]
    before = {n: p for n, p in model.named_parameters()}
    with frozen_layers_compacted(model, spec, "int8", keep_originals=True) as frozen:
        assert frozen == list(range(1, len(model.get_decoder().layers)))
        assert is_compact(model.get_decoder().layers[1]) and not is_compact(model.get_decoder().layers[0])
    assert all(p is before[n] for n, p in model.named_parameters())


def test_the_client_reloads_the_exact_frozen_blocks_after_a_compact_visit(tmp_path):
    """A compact visit leaves the frozen layers dequantized in the resident model; the client must not take them
    for the versions it holds: at the next manifest they are exact again, so the next visit trains from the exact
    model (a block trained from its dequantized copy would carry the quantization error into the global model)."""
    model = make_tiny_model("llama")
    specs = partition_model(model, 1)
    cache = BlobStore(tmp_path / "cache")
    blobs = [cache.put(serialize_block(block_tensors(model, spec))) for spec in specs]
    manifest = pb.Manifest(version=1, blocks=[
        pb.BlockEntry(index=i, name=s.name, sha256=sha, tensors=[
            pb.TensorEntry(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in s.tensors])
        for i, (s, sha) in enumerate(zip(specs, blobs, strict=True))])
    resident = ResidentModel(model, specs, cache)
    resident.load_manifest(manifest)
    ctx = VisitContext(model=model, specs=specs, loaded=resident.loaded, cache=cache, lora=pb.LoraSpec(),
                       upload_codec=pb.CODEC_ZSTD, compact_frozen="int8")
    trained = next(i for i, s in enumerate(specs) if s.name == "layers.0")
    BlockTask().train(ctx, pb.Task(block_index=trained), manifest, _sequences(), HYPER, lambda step, loss: None)
    frozen = next(i for i, s in enumerate(specs) if s.name == "layers.1")
    assert frozen not in resident.loaded and trained in resident.loaded
    assert any(not torch.equal(v, block_tensors(model, specs[frozen])[k])
               for k, v in _blob(cache, blobs[frozen]).items())  # dequantized now
    resident.load_manifest(manifest)
    for i, spec in enumerate(specs):
        if i != trained:
            assert all(torch.equal(v, block_tensors(model, spec)[k]) for k, v in _blob(cache, blobs[i]).items())


def _blob(cache: BlobStore, sha: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(cache.path(sha)))


@pytest.mark.multiprocess
def test_a_client_with_compact_frozen_layers_takes_part_in_a_run(tmp_path, coordinators, clients):
    """`fedcybgd client --compact-frozen int8` as a process: it registers the option, trains every block of a cycle
    (reloading the exact frozen blocks between visits) and the run finishes with finite losses that went down."""
    running = coordinators.start(schedule=ScheduleConfig(cycles=1, order="ascending", lr=3e-3),
                                 training=TrainingConfig(local_steps=2, batch_size=2, seq_len=32))
    coordinator = running.coordinator
    data, _ = write_data(tmp_path, clients=1)
    wait_clients([clients.start(address_of(running), data[0], tmp_path / "caches" / "c", "c",
                                "--compact-frozen", "int8")])
    wait_for(lambda: coordinator.status(pb.GetStatusRequest()).run_state == "done", 60, "the run's end")
    status = coordinator.status(pb.GetStatusRequest())
    assert [c.compact_frozen for c in status.clients] == ["int8"]
    assert len(status.visits) == len(coordinator.run.specs)
    assert all(math.isfinite(v.loss_after) and v.loss_after < v.loss_before for v in status.visits)
