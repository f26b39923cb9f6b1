"""What the ServerApp and the ClientApp share: the job, the model, the LoRA adapter, local training.

The job comes from a JSON file (written by bench/flower_run.py) so that the Flower side runs exactly the job that
fedcybgd runs. Local training matches fedcybgd's (``training/loop.py``) so that the benchmark compares systems, not
numerics: the model in its stored dtype (bf16), every trained low-precision parameter stepped through an fp32
master copy, AdamW with gradient clipping at 1.0 and no weight decay, dropout off, the causal-LM loss of the model
(labels shifted by one, -100 ignored), and batches drawn by walking seeded permutations of the client's rows.

This app is self-contained (it runs in the Flower venv, where fedcybgd is not installed).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

__all__ = ["Job", "load_job", "set_threads", "load_model", "attach_lora", "trainable_state", "load_trainable",
           "load_rows", "visit_batches", "train_local", "merged_state_dict"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Job:
    """One benchmark job, as bench/flower_run.py writes it."""

    model_dir: str
    data: list[str]  # one safetensors file per client: input_ids, labels int64 [n, seq_len]
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    seed: int
    threads: int
    mode: str  # "full" | "lora"
    out: str
    lora_rank: int = 8
    lora_alpha: float = 16.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    round_timeout: float = 86400.0

    @classmethod
    def from_json(cls, path: Path) -> Job:
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        job = cls(**{k: v for k, v in raw.items() if k in known})
        if job.mode not in ("full", "lora"):
            raise ValueError(f"job mode must be 'full' or 'lora', got {job.mode!r}")
        return job


def load_job(run_config: Mapping[str, Any]) -> Job:
    """The job named by the run config key ``job``."""
    path = str(run_config.get("job", ""))
    if not path:
        raise ValueError("run config key 'job' (path of the job JSON file) is not set")
    return Job.from_json(Path(path))


def set_threads(job: Job) -> None:
    """Intra-op threads of this process (the benchmark gives both systems the same number)."""
    torch.set_num_threads(max(1, job.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(job.threads))


def load_model(job: Job, dtype: torch.dtype | str = "auto") -> nn.Module:
    """The model from ``job.model_dir`` in its stored dtype (``"auto"``) or ``dtype``, dropout off."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=dtype)
    model.eval()  # as fedcybgd's visits: deterministic, no dropout
    return model


def attach_lora(model: nn.Module, job: Job) -> nn.Module:
    """``model`` wrapped with a LoRA adapter on every linear layer of the decoder (peft's "all-linear": not the LM
    head), rank ``job.lora_rank``, alpha ``job.lora_alpha``, no dropout; A initialised from ``job.seed`` so the
    server and every client start from the same adapter. peft keeps the adapter in fp32 on a bf16 model."""
    import peft

    config = peft.LoraConfig(r=job.lora_rank, lora_alpha=job.lora_alpha,  # type: ignore[arg-type]
                             target_modules="all-linear", lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        return peft.get_peft_model(model, config)


def trainable_state(model: nn.Module, job: Job) -> dict[str, torch.Tensor]:
    """What travels: every parameter and buffer (full) or the adapter (lora), as float32 tensors, because
    ``ArrayRecord`` converts through numpy, which has no bfloat16."""
    if job.mode == "lora":
        import peft

        state = peft.get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
    return {name: t.detach().to(torch.float32) for name, t in state.items()}


def load_trainable(model: nn.Module, job: Job, state: Mapping[str, torch.Tensor]) -> None:
    """Set the received tensors into ``model`` (cast to the model's dtypes)."""
    if job.mode == "lora":
        import peft

        expected = set(peft.get_peft_model_state_dict(model))
        if set(state) != expected:
            raise ValueError(f"adapter tensors do not match: got {sorted(set(state) ^ expected)[:3]} in excess/missing")
        peft.set_peft_model_state_dict(model, dict(state))
    else:
        model.load_state_dict(dict(state), strict=True)


def load_rows(job: Job, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's (input_ids, labels)."""
    tensors = safetensors.torch.load_file(job.data[partition_id])
    return tensors["input_ids"], tensors["labels"]


def visit_batches(num_rows: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Row indices of each step's batch: a walk through a seeded random permutation of the rows, continued in a
    fresh permutation when it runs out (so every row is seen once before any is seen twice)."""
    gen = torch.Generator().manual_seed(int(seed))
    perm, pos = torch.randperm(num_rows, generator=gen), 0
    batches = []
    for _ in range(steps):
        parts, need = [], batch_size
        while need:
            if pos == num_rows:
                perm, pos = torch.randperm(num_rows, generator=gen), 0
            take = min(need, num_rows - pos)
            parts.append(perm[pos:pos + take])
            pos, need = pos + take, need - take
        batches.append(torch.cat(parts))
    return batches


class _MasterAdamW:
    """AdamW through fp32 master copies when any trained parameter is bf16/fp16: a copy of fedcybgd's ``MasterAdamW``
    (training/loop.py) on purpose, since this app runs where fedcybgd is not installed, and both systems must step
    the same way for their held-out losses to compare."""

    def __init__(self, params: list[nn.Parameter], job: Job) -> None:
        self.params = params
        self.use_masters = any(p.dtype in _LOW_PRECISION for p in params)
        self.masters = [p.detach().to(torch.float32, copy=True) for p in params] if self.use_masters else params
        self.max_grad_norm = job.max_grad_norm
        self.optimizer = torch.optim.AdamW(self.masters, lr=job.lr, weight_decay=job.weight_decay)

    def step(self) -> None:
        if self.use_masters:
            for p, m in zip(self.params, self.masters, strict=True):
                m.grad = p.grad.to(torch.float32) if p.grad is not None else None
                p.grad = None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.use_masters:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters, strict=True):
                    p.copy_(m)


def train_local(model: nn.Module, job: Job, input_ids: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """``job.local_steps`` AdamW steps on the trainable parameters; the mean training loss of the steps."""
    params = [p for p in model.parameters() if p.requires_grad] if job.mode == "lora" else list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = _MasterAdamW(params, job)
    losses = []
    for step, rows in enumerate(visit_batches(input_ids.shape[0], job.batch_size, job.local_steps, seed)):
        loss = model(input_ids=input_ids[rows], labels=labels[rows], use_cache=False).loss
        losses.append(float(loss.detach()))
        loss.backward()
        del loss
        optimizer.step()
        # One line per step: the benchmark's driver takes a growing log as progress (a stall has none).
        print(f"local step {step + 1}/{job.local_steps} loss {losses[-1]:.4f}", flush=True)
    return sum(losses) / max(1, len(losses))


def merged_state_dict(job: Job, adapter: Mapping[str, torch.Tensor],
                      dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The base model with ``adapter`` merged in: merged in fp32 and rounded once to ``dtypes`` (the stored
    model's, by tensor name), as fedcybgd merges an adapter."""
    model = attach_lora(load_model(job, torch.float32), job)
    load_trainable(model, job, adapter)
    merged = model.merge_and_unload()  # type: ignore[operator]
    return {name: t.detach().to(dtypes[name], copy=True).contiguous() for name, t in merged.state_dict().items()}
