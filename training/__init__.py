"""Local training, shared by the client (which trains a visit) and the coordinator (whose single-process references
replay visits, and whose fedlora run starts from ``initial_lora_adapter``): one implementation, so that a reference
is a bit-identical anchor of what the clients compute.

- ``train_block``: one visit of Cycle Block Gradient Descent (one block trained, all else frozen);
- ``train_full``: FedAvg-full's local training (every parameter);
- ``train_lora``: FedAvg-LoRA's local training (a LoRA adapter on the frozen model);
- ``peak_memory`` / ``reset_peak_memory``: the peak memory a visit reports, for measurements made elsewhere;
- ``RecordPrivacy`` (``VisitHyper.privacy``: DP-SGD inside a visit), ``poisson_batches``, and the client-level
  ``UpdatePrivacy`` / ``privatize_update`` (``training/privacy.py``).

``evaluate_loss`` is the loss every party measures a model by (``common/eval.py``), here so that training code needs
one import.
"""

from fedcybgd.common.eval import evaluate_loss
from fedcybgd.training.block import train_block
from fedcybgd.training.full import train_full
from fedcybgd.training.hyper import OnStep, RecordPrivacy, UpdatePrivacy, VisitHyper, VisitResult
from fedcybgd.training.lora import LoraConfig, initial_lora_adapter, merge_adapter, train_lora
from fedcybgd.training.memory import peak_memory, reset_peak_memory
from fedcybgd.training.privacy import poisson_batches, privatize_update

__all__ = ["VisitHyper", "VisitResult", "OnStep", "train_block", "train_full", "train_lora", "initial_lora_adapter",
           "LoraConfig", "merge_adapter", "peak_memory", "reset_peak_memory", "evaluate_loss", "RecordPrivacy",
           "UpdatePrivacy", "privatize_update", "poisson_batches"]
