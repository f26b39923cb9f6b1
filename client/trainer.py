"""What a client computes in one visit. ``train_block``: one visit of Cycle Block Gradient Descent, train ONE block
of the model on local data, all else frozen. The baselines' local training, same loop: ``train_full`` (FedAvg-full,
every parameter) and ``train_lora`` (FedAvg-LoRA, a peft LoRA adapter on the frozen model).

A visit, top to bottom:

1. Freeze every parameter, then unfreeze only the block's parameters.
2. Draw this visit's batches (``visit_batches``: a pure function of the data size, batch size, steps and seed).
3. Measure the loss on the first ``eval_batches`` of those batches (no grad) -> ``loss_before``.
4. Run ``steps`` AdamW steps on the block (fresh optimizer, constant lr). Low-precision blocks (bf16/fp16) are
   optimized through fp32 master copies: grad -> fp32 master grad -> clip -> step -> copy back.
5. Measure the same batches again -> ``loss_after``.
6. Hand back the trained block's tensors (CPU copies, model dtype), freeze everything again, drop grads.

Everything runs in ``model.eval()`` (no dropout) so that a visit is a deterministic function of its inputs: on
CPU with one thread, two visits on identical models with identical inputs give bit-identical tensors.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedcybgd.common.blocks import BlockSpec, block_params, block_tensors, find_decoder_layers, partition_model
from fedcybgd.common.data import visit_batches
from fedcybgd.common.eval import causal_lm_loss, evaluate_loss, mean_loss, model_device
from fedcybgd.common.layers import DecoderStack, LayerInputCapture, checkpoint_layers, decoder_stack, forward_from_layer

__all__ = ["VisitHyper", "VisitResult", "train_block", "train_full", "train_lora", "initial_lora_adapter",
           "evaluate_loss"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class VisitHyper:
    """Hyper-parameters of one visit (sent by the coordinator with the task)."""

    lr: float
    steps: int
    batch_size: int
    seq_len: int
    seed: int
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eval_batches: int = 2  # loss_before/loss_after are measured on the visit's first eval_batches batches


@dataclass
class VisitResult:
    tensors: dict[str, torch.Tensor]  # what was trained (block / every parameter / LoRA adapter): CPU, contiguous
    loss_before: float
    loss_after: float
    peak_memory_bytes: int  # CUDA: max allocated during the visit; CPU: process peak RSS during the visit
    seconds: float
    samples: int  # sequences seen = steps * batch_size
    tokens: int  # input tokens seen = samples * seq_len


def train_block(
    model: nn.Module,
    spec: BlockSpec,
    sequences: torch.LongTensor,
    hyper: VisitHyper,
    *,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_above: bool = False,
    cache_block_inputs: bool = False,
) -> VisitResult:
    """Train the block ``spec`` of ``model`` (already on its device) on rows of ``sequences`` ``[n, seq_len]``.

    Only the block's parameters change. ``on_step(step_index, loss)`` is called after every optimizer step.
    Raises ``ValueError`` for inconsistent inputs and ``FloatingPointError`` when the training loss stops being
    finite (a diverged block must not be uploaded).

    Memory/compute options, off by default (the default path is the bit-exact anchor of the federated run); with
    them the result matches the default within float tolerance:

    * ``checkpoint_above``: the frozen decoder layers above the block (every decoder layer for ``embed_head``,
      whose embeddings sit below them) keep only their inputs for backward and recompute their activations when
      the gradient passes through them.
    * ``cache_block_inputs``: the hidden states entering the block are kept for rows that recur later in the
      visit (local epochs: ``steps * batch_size > n``) and dropped after their last use; a step whose rows are all
      kept runs from the block upward only (``common/layers.py``). Decoder-layer blocks of the architectures
      ``decoder_stack`` knows; elsewhere the option changes nothing.
    """
    _check_inputs(sequences, hyper)
    step_loss = None
    if cache_block_inputs:
        step_loss = _BlockInputCache.for_visit(model, spec, sequences, _visit_rows(sequences, hyper)[1])
    with checkpoint_layers(_layers_above(model, spec)) if checkpoint_above else contextlib.nullcontext():
        return _fit(model, block_params(model, spec), sequences, hyper, what=f"block {spec.name!r}",
                    on_step=on_step, step_loss=step_loss,
                    collect=lambda: _cpu_copies(block_tensors(model, spec)))


def train_full(
    model: nn.Module,
    sequences: torch.LongTensor,
    hyper: VisitHyper,
    *,
    on_step: Callable[[int, float], None] | None = None,
    lr_at: Callable[[int], float] | None = None,
) -> VisitResult:
    """FedAvg-full's local training: every parameter of ``model`` trainable, otherwise a visit like
    ``train_block`` (fresh AdamW, fp32 masters for bf16/fp16 weights, same batches and loss measurement).

    ``tensors`` holds every parameter (tied weights once) keyed by the names the block partition uses, so
    ``{n: tensors[n] for n in spec.names}`` is block ``spec`` for any ``layers_per_block``. ``lr_at(step)``, when
    given, sets the learning rate of each step (the centralized reference's schedule); else ``hyper.lr`` throughout.
    """
    specs = partition_model(model)
    return _fit(model, [p for spec in specs for p in block_params(model, spec)], sequences, hyper, what="model",
                on_step=on_step, lr_at=lr_at,
                collect=lambda: {n: t for spec in specs for n, t in _cpu_copies(block_tensors(model, spec)).items()})


def train_lora(
    model: nn.Module,
    sequences: torch.LongTensor,
    hyper: VisitHyper,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: str | Sequence[str] | None = None,
    adapter: Mapping[str, torch.Tensor] | None = None,
    init_seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> VisitResult:
    """FedAvg-LoRA's local training: a LoRA adapter (peft; rank ``rank``, scaling ``alpha / rank``, no dropout)
    on ``target_modules`` (default: every linear projection inside the decoder layers), trained alone with AdamW
    like a visit, in fp32 whatever the model's dtype.

    The adapter starts from ``adapter`` (the global adapter, as returned by this function or
    ``initial_lora_adapter``) when given, else from peft's initialisation (B = 0, A drawn from ``init_seed``, so
    every client without an adapter starts from the same one). ``tensors`` is the trained adapter: fp32 CPU
    tensors named ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` after the adapted module's name in
    ``model`` (e.g. ``model.layers.0.self_attn.q_proj.lora_A.weight``), nothing of peft's wrapping or adapter
    names. The model is left exactly as it was: the adapter is removed without merging.
    """
    with _lora_attached(model, rank, alpha, target_modules, init_seed) as weights:
        if adapter is not None:
            _load_adapter(weights, adapter)
        return _fit(model, list(weights.values()), sequences, hyper, what="LoRA adapter", on_step=on_step,
                    collect=lambda: _cpu_copies(weights))


def initial_lora_adapter(model: nn.Module, *, rank: int = 8, alpha: float = 16,
                         target_modules: str | Sequence[str] | None = None, init_seed: int = 0) -> dict[str, torch.Tensor]:
    """The adapter ``train_lora`` starts from without ``adapter=`` (same names, shapes and values): what a
    coordinator averages into in its first round. The model is left unchanged."""
    with _lora_attached(model, rank, alpha, target_modules, init_seed) as weights:
        return _cpu_copies(weights)


# ------------------------------------------------------------------------------------------------ the loop


def _visit_rows(sequences: torch.Tensor, hyper: VisitHyper) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(evaluation batches, training batches) of a visit. The first eval_batches of the training batches are also
    the evaluation batches, even when there are fewer training steps (visit_batches is prefix-stable, so asking
    for more changes nothing)."""
    batches = visit_batches(sequences.shape[0], hyper.batch_size, max(hyper.steps, hyper.eval_batches), hyper.seed)
    return batches[: hyper.eval_batches], batches[: hyper.steps]


def _fit(
    model: nn.Module,
    params: list[nn.Parameter],
    sequences: torch.LongTensor,
    hyper: VisitHyper,
    *,
    what: str,
    on_step: Callable[[int, float], None] | None,
    collect: Callable[[], dict[str, torch.Tensor]],
    step_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    lr_at: Callable[[int], float] | None = None,
) -> VisitResult:
    """Train ``params`` (everything else frozen) through one visit; ``collect()`` gives the result's tensors.
    ``step_loss(step, rows)`` replaces the plain training loss of a batch when given."""
    _check_inputs(sequences, hyper)
    start = time.perf_counter()
    device = model_device(model)
    _reset_peak_memory(device)
    params = _unique(params)  # tied weights appear once (dedup by identity)
    if not params:
        raise ValueError(f"{what} has no parameters in this model")
    was_training = model.training
    try:
        model.eval()  # dropout off for the whole visit: deterministic, and tiny configs/Llama have none anyway

        # 1. Freeze everything, unfreeze the trained parameters.
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)

        # 2. This visit's batches.
        eval_rows, train_rows = _visit_rows(sequences, hyper)

        # 3. Loss before.
        loss_before = mean_loss(model, sequences, eval_rows)

        # 4. Optimize. Low-precision parameters step on fp32 masters; fp32 ones are optimized in place.
        use_masters = any(p.dtype in _LOW_PRECISION for p in params)
        masters = [p.detach().to(torch.float32, copy=True) for p in params] if use_masters else params
        optimizer = torch.optim.AdamW(
            masters, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay
        )
        for step, rows in enumerate(train_rows):
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
            # The input ids are integers and every parameter below the trained ones is frozen, so nothing below
            # them requires grad: autograd records no graph and saves no activations for those layers. Only the
            # trained parameters and the layers above them (through which the gradient must flow back) are
            # recorded. Keep it that way: never set requires_grad on the inputs or on other parameters.
            if step_loss is None:
                loss = causal_lm_loss(model, sequences[rows].to(device))
            else:
                loss = step_loss(step, rows)
            loss_value = float(loss.detach().float())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{what}: training loss is {loss_value} at step {step}")
            loss.backward()
            del loss

            if use_masters:
                for p, m in zip(params, masters):
                    m.grad = p.grad.to(torch.float32) if p.grad is not None else None
                    p.grad = None
            if hyper.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(masters, hyper.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if use_masters:
                with torch.no_grad():
                    for p, m in zip(params, masters):
                        p.copy_(m)
            if on_step is not None:
                on_step(step, loss_value)
        del optimizer, masters

        # 5. Loss after, on the same batches as before.
        loss_after = mean_loss(model, sequences, eval_rows)

        # 6. The trained tensors, detached from the model.
        tensors = collect()
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        model.train(was_training)

    samples = hyper.steps * hyper.batch_size
    return VisitResult(
        tensors=tensors,
        loss_before=loss_before,
        loss_after=loss_after,
        peak_memory_bytes=_peak_memory(device),
        seconds=time.perf_counter() - start,
        samples=samples,
        tokens=samples * sequences.shape[1],
    )


# ------------------------------------------------------------------------------------ block visit options


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(find_decoder_layers(model)[0])


def _block_layers(model: nn.Module, spec: BlockSpec) -> range | None:
    """The decoder layers block ``spec`` consists of, or None when it holds anything else (embed_head)."""
    layers_name, _ = find_decoder_layers(model)
    prefix = layers_name + "." if layers_name else ""
    indices = set()
    for name in spec.names:
        head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        if not head.isdigit():
            return None
        indices.add(int(head))
    return range(min(indices), max(indices) + 1) if indices else None


def _layers_above(model: nn.Module, spec: BlockSpec) -> list[nn.Module]:
    """The decoder layers the gradient of block ``spec`` passes through without training them."""
    own = _block_layers(model, spec)
    first = 0 if own is None else own[-1] + 1  # embed_head: its embeddings lie below every decoder layer
    return list(_decoder_layers(model))[first:]


class _BlockInputCache:
    """``step_loss`` for ``cache_block_inputs``: keeps the hidden states entering the block for the rows that
    recur later in the visit, and runs a step from the block upward when all its rows are kept."""

    def __init__(self, model: nn.Module, stack: DecoderStack, start: int, sequences: torch.Tensor,
                 train_rows: list[torch.Tensor]) -> None:
        self.model, self.stack, self.start, self.sequences = model, stack, start, sequences
        uses: dict[int, list[int]] = {}
        for step, rows in enumerate(train_rows):
            for r in dict.fromkeys(rows.tolist()):
                uses.setdefault(r, []).append(step)
        self.last_use = {r: steps[-1] for r, steps in uses.items() if len(steps) > 1}  # recurring rows only
        self.hidden: dict[int, torch.Tensor] = {}
        self.calls = None
        self.replayed_steps = 0

    @classmethod
    def for_visit(cls, model, spec, sequences, train_rows) -> _BlockInputCache | None:
        stack, own = decoder_stack(model), _block_layers(model, spec)
        if stack is None or own is None:
            return None
        return cls(model, stack, own[0], sequences, train_rows)

    def __call__(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        ids = self.sequences[rows].to(model_device(self.model))
        keys = rows.tolist()
        if self.calls is not None and all(r in self.hidden for r in keys):
            hidden = torch.stack([self.hidden[r] for r in keys])
            loss = forward_from_layer(self.model, self.stack, self.start, hidden, self.calls, ids)
            self.replayed_steps += 1
        else:
            with LayerInputCapture(self.stack, self.start) as capture:
                loss = causal_lm_loss(self.model, ids)
            self.calls = capture.calls
            for i, r in enumerate(keys):
                if r in self.last_use and r not in self.hidden:
                    self.hidden[r] = capture.hidden[i].clone()
        for r in keys:  # a row may occur twice in one batch (when an epoch ends inside it)
            if self.last_use.get(r) == step:
                self.hidden.pop(r, None)
        return loss


# ---------------------------------------------------------------------------------------------------- LoRA


def _default_lora_targets(model: nn.Module) -> tuple[str, bool]:
    """A peft target regex for every linear projection inside the decoder layers, and whether they are GPT-2
    style ``Conv1D`` (transposed weights)."""
    from transformers.pytorch_utils import Conv1D

    layers_name, _ = find_decoder_layers(model)
    leaves, conv1d = set(), False
    for name, module in _decoder_layers(model).named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            leaves.add(name.rsplit(".", 1)[-1])
            conv1d |= isinstance(module, Conv1D)
    if not leaves:
        raise ValueError(f"{type(model).__name__} has no linear projections in its decoder layers")
    alternatives = "|".join(re.escape(leaf) for leaf in sorted(leaves))
    return rf"{re.escape(layers_name)}\.\d+\.(?:.*\.)?(?:{alternatives})", conv1d


@contextlib.contextmanager
def _lora_attached(model: nn.Module, rank: int, alpha: float, target_modules, init_seed: int):
    """Inject a LoRA adapter into ``model`` (in place), yield its weights by stable name, remove it unmerged."""
    import peft

    conv1d = False
    if target_modules is None:
        target_modules, conv1d = _default_lora_targets(model)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0,
                             bias="none", fan_in_fan_out=conv1d)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers 5 a deprecated question
        torch.manual_seed(init_seed)  # lora_A's initialisation
        wrapped = peft.get_peft_model(model, config)
    try:
        weights: dict[str, nn.Parameter] = {}
        for name, module in model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for part in ("lora_A", "lora_B"):
                    weights[f"{name}.{part}.weight"] = getattr(module, part)["default"].weight
        if not weights:
            raise ValueError(f"LoRA target_modules {target_modules!r} match no module of {type(model).__name__}")
        yield weights
    finally:
        wrapped.unload()


def _load_adapter(weights: dict[str, nn.Parameter], adapter: Mapping[str, torch.Tensor]) -> None:
    if set(adapter) != set(weights):
        missing, extra = sorted(set(weights) - set(adapter)), sorted(set(adapter) - set(weights))
        raise ValueError(f"adapter names do not match this LoRA configuration: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, p in weights.items():
        t = adapter[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape) or not t.is_floating_point():
            raise ValueError(f"adapter tensor {name!r} must be a float tensor of shape {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in weights.items():
            p.copy_(adapter[name])


# ------------------------------------------------------------------------------------------------ helpers


def _check_inputs(sequences: torch.Tensor, hyper: VisitHyper) -> None:
    if sequences.dim() != 2 or sequences.dtype != torch.long:
        raise ValueError(f"sequences must be a [n, seq_len] LongTensor, got {sequences.dtype} {tuple(sequences.shape)}")
    if sequences.shape[0] == 0:
        raise ValueError("no training sequences")
    if sequences.shape[1] != hyper.seq_len:
        raise ValueError(f"sequences have length {sequences.shape[1]}, the visit asks for seq_len={hyper.seq_len}")
    if hyper.steps < 0 or hyper.batch_size <= 0 or hyper.eval_batches < 0:
        raise ValueError(f"invalid steps/batch_size/eval_batches in {hyper}")


def _cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent CPU copies (same dtype, contiguous): a result that later training cannot change."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:  # not Linux: lifetime peak (bytes on macOS, kB elsewhere)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:
        return 0
