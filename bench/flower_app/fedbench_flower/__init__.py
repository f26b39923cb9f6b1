"""The Flower side of fedcybgd's side-by-side benchmark: FedAvg of a causal LM, full parameters or LoRA."""
