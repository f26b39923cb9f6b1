"""Differential privacy of a visit: record-level DP-SGD inside the visit (Abadi et al. 2016, "Deep Learning with
Differential Privacy") and the client-level option that clips and noises the update a visit uploads.

Record-level DP-SGD (``VisitHyper.privacy``, ``RecordPrivacy``), one step:

1. **Sampling.** Each of the site's ``n`` sequences joins the step's batch independently with probability ``q``
   (Poisson sampling, ``poisson_batches``), so batch sizes vary and a batch may be empty: the sampling the RDP/PRV
   accountants of the subsampled Gaussian mechanism assume.
2. **Per-example gradients.** Each sampled row's loss (the mean over its tokens, as the ordinary loss of a batch of
   one) is backpropagated on its own: microbatches of one. That is exact for every kind of block (decoder layers,
   tied embedding/head, row ranges of a sliced vocabulary, LoRA adapters), whatever the forward pass does, and
   needs memory O(block): one gradient of the trained parameters at a time, next to an fp32 running sum, where
   vectorised per-sample gradients (``torch.func.vmap``, Opacus's hooks) hold ``batch x block`` values. A visit
   trains one block, which is what makes this affordable for an LLM at all. The cost is time: ``batch`` backward
   passes of one row instead of one of ``batch`` rows.
3. **Clipping.** Each example's gradient over *all* the trained parameters together is scaled to an L2 norm of at
   most ``C`` (factor ``min(1, C / (norm + 1e-6))``) and added into fp32 sums (``ClippedGradSum``).
4. **Noise.** ``N(0, (sigma C)^2)`` is added to every coordinate of the sum, which is then divided by the
   *expected* batch size ``q n`` (``ClippedGradSum.noisy_mean``): with Poisson sampling the real batch size is
   itself private, and a fixed denominator keeps each record's influence on the step bounded by ``C / (q n)``.
5. **Step.** The optimizer steps on that gradient (``MasterAdamW.step_on``) with no further clipping:
   ``hyper.max_grad_norm`` does not apply; per-example clipping replaces it.

The privacy unit is one packed sequence (a row of ``Sequences``). A document packed into several sequences is
protected as a group of that many records (its epsilon grows accordingly); documents sharing a sequence share
its protection.

**Secret randomness** (``secret_generator``). The batches and the noise come from generators seeded from the
operating system's entropy, never from the task's seed: the coordinator chose that seed and replays visits with
it (``server/reference.py``), so noise drawn from it would be known to the coordinator, who could subtract it
from the upload and undo the protection. Stated limits: torch's generators (Mersenne Twister on CPU, Philox on
CUDA) are not cryptographically secure, and sampling Gaussians in floating point leaks through the low-order bits
(Mironov 2012); an adversary able to exploit either needs far more than the uploaded block (the generator's
63-bit seed is never sent), but the guarantee is the standard one of DP-SGD libraries without a CSPRNG, not more.

Client-level option (``privatize_update``, ``UpdatePrivacy``): the whole update of the visit (the trained tensors
minus the ones it started from) is clipped to norm ``S`` and noised with ``N(0, (sigma S)^2)`` before upload.
One client makes each visit, so nothing averages that noise down: it protects the site's whole data set against
whoever sees the upload, at the noise level ``sigma`` alone.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from fedcybgd.common.sequences import Sequences
from fedcybgd.training.hyper import OnStep, RecordPrivacy, UpdatePrivacy

__all__ = ["poisson_batches", "secret_generator", "ClippedGradSum", "clipped_example_grads", "private_steps",
           "privatize_update", "STABILITY"]

#: Added to a gradient's norm before dividing by it (the constant of Opacus and of the DP-SGD paper's code).
STABILITY = 1e-6


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for ``device`` seeded from the operating system's entropy (63 bits of ``secrets``), for the
    batches and the noise of a private visit: they must not be derivable from the task's seed, which the coordinator
    knows (see the module docstring). ``meta`` (the memory planner) gets a CPU generator, which meta ops accept."""
    device = torch.device(device)
    generator = torch.Generator(device="cpu" if device.type == "meta" else device)
    generator.manual_seed(secrets.randbits(63))  # os.urandom underneath
    return generator


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices (int64, ascending) of each of ``steps`` batches: each of the rows ``0..n-1`` joins each batch
    independently with probability ``sample_rate`` (Poisson sampling; batches vary in size and may be empty).
    ``generator`` is a CPU generator, a secret one for a private visit."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    return [torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten() for _ in range(steps)]


class ClippedGradSum:
    """fp32 sums, one per trained parameter, of per-example gradients each clipped to norm ``clip_norm`` over all
    the parameters together. Allocated once per visit; ``reset`` zeroes them for the next step."""

    def __init__(self, params: Sequence[nn.Parameter], clip_norm: float) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
        self.params = list(params)
        self.clip_norm = clip_norm
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.examples = 0

    def reset(self) -> None:
        for s in self.sums:
            s.zero_()
        self.examples = 0

    def add_example(self) -> torch.Tensor:
        """Clip the gradient one example's ``backward()`` left on the parameters, add it to the sums and drop it
        from the parameters. Returns its norm before clipping (a 0-dim fp32 tensor on the parameters' device: no
        synchronisation with the device per example). A parameter without a gradient contributes zeros."""
        grads = [p.grad for p in self.params]
        present = [g for g in grads if g is not None]
        if present:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in present]))
        else:
            norm = torch.zeros((), dtype=torch.float32, device=self.sums[0].device)
        scale = (self.clip_norm / (norm + STABILITY)).clamp(max=1.0)
        for s, g, p in zip(self.sums, grads, self.params, strict=True):
            if g is not None:
                s.addcmul_(g, scale)  # in fp32, without an fp32 copy of a low-precision gradient
            p.grad = None
        self.examples += 1
        return norm

    def noisy_mean(self, noise_multiplier: float, expected_batch_size: float,
                   generator: torch.Generator) -> list[torch.Tensor]:
        """In place: the sums plus ``N(0, (noise_multiplier * clip_norm)^2)`` per coordinate (from ``generator``,
        a secret one on the sums' device), divided by ``expected_batch_size``. Returns the sums."""
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}")
        std = noise_multiplier * self.clip_norm
        for s in self.sums:
            if std > 0:
                s.add_(torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype), alpha=std)
            s.div_(expected_batch_size)
        return self.sums


def clipped_example_grads(params: Sequence[nn.Parameter], losses: Iterable[Callable[[], torch.Tensor]],
                          clip_norm: float) -> list[tuple[list[torch.Tensor], float]]:
    """Each example's clipped gradient (fp32, one tensor per parameter) and its norm before clipping, computed as a
    private step computes them (``ClippedGradSum.add_example``, one example at a time). ``losses`` are callables
    giving one example's loss each. For tests and inspection: it holds every example's gradient at once."""
    out = []
    for loss_of in losses:
        one = ClippedGradSum(params, clip_norm)
        loss_of().backward()
        norm = one.add_example()
        out.append((one.sums, float(norm)))
    return out


def private_steps(
    params: Sequence[nn.Parameter],
    batches: Sequence[torch.Tensor],
    sequences: Sequences,
    privacy: RecordPrivacy,
    loss_of_rows: Callable[[int, torch.Tensor], torch.Tensor],
    step_on: Callable[[int, list[torch.Tensor]], None],
    *,
    what: str,
    on_step: OnStep | None,
    noise_generator: torch.Generator,
) -> int:
    """The optimizer steps of a private visit, one per batch of ``batches`` (row indices of ``sequences``):
    per-example clipped gradients summed, noised and divided by the expected batch size ``q n``, then
    ``step_on(step, gradients)``. ``loss_of_rows(step, rows)`` is the loss of a batch (here always one row).
    ``on_step(step, loss)`` gets the mean of the step's per-example losses (``nan`` for an empty batch). Returns
    the number of sequences drawn. Raises FloatingPointError when a loss stops being finite."""
    accumulator = ClippedGradSum(params, privacy.clip_norm)
    expected = privacy.sample_rate * len(sequences)
    drawn = 0
    for step, rows in enumerate(batches):
        accumulator.reset()
        loss_sum: torch.Tensor | None = None
        examples = 0
        for row in rows.reshape(-1, 1):
            if sequences.loss_tokens(row) == 0:  # no token carries loss: a zero gradient (and a 0/0 loss)
                continue
            loss = loss_of_rows(step, row)
            loss.backward()
            accumulator.add_example()
            value = loss.detach().float()
            loss_sum = value if loss_sum is None else loss_sum + value
            examples += 1
            del loss
        drawn += len(rows)
        loss_value = float(loss_sum) / examples if loss_sum is not None else float("nan")
        if loss_sum is not None and not math.isfinite(loss_value):
            raise FloatingPointError(f"{what}: training loss is {loss_value} at step {step}")
        step_on(step, accumulator.noisy_mean(privacy.noise_multiplier, expected, noise_generator))
        if on_step is not None:
            on_step(step, loss_value)
    return drawn


def privatize_update(start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], privacy: UpdatePrivacy,
                     generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """``start + clip(trained - start, S) + N(0, (sigma S)^2)``, computed in fp32 and cast back to each tensor's
    dtype, where the update ``trained - start`` is clipped to L2 norm ``S = privacy.clip_norm`` over all tensors
    together; and the update's norm before clipping. ``generator`` (a secret one: ``secret_generator``) must be on
    the tensors' device. Raises ValueError when the two sets of tensors do not match."""
    if set(start) != set(trained):
        raise ValueError(f"start and trained hold different tensors: {sorted(set(start) ^ set(trained))[:3]}")
    for name, s in start.items():
        t = trained[name]
        if s.shape != t.shape or not (s.is_floating_point() and t.is_floating_point()):
            raise ValueError(f"{name}: start and trained must be float tensors of one shape, got "
                             f"{tuple(s.shape)} {s.dtype} and {tuple(t.shape)} {t.dtype}")
    deltas = {name: trained[name].float() - start[name].float() for name in start}
    norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(d) for d in deltas.values()]))) if deltas else 0.0
    scale = min(1.0, privacy.clip_norm / (norm + STABILITY))
    std = privacy.noise_multiplier * privacy.clip_norm
    out = {}
    for name, d in deltas.items():
        d.mul_(scale)
        if std > 0:
            d.add_(torch.randn(d.shape, generator=generator, device=d.device, dtype=d.dtype), alpha=std)
        out[name] = (start[name].float() + d).to(start[name].dtype)
    return out, norm
