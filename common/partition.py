"""Block partition of a Hugging Face causal LM for block-cyclic gradient descent.

The server trains one *block* of parameters per round and only ships that block over the wire, so
every participant must agree on exactly which tensors make up each block. The partition is derived
from the model's own structure (the decoder-layer ``nn.ModuleList``) instead of a hand-kept table
per architecture, so new architectures work without code changes, and the result is a pure
function of the model so server and clients compute the same partition independently.

How decoder layers are grouped is the run's **block layout**: ``contiguous`` (the paper's, and the default: block
``k`` holds layers ``kL`` to ``kL + L - 1``) or ``strided`` (block ``k`` of ``B`` holds layers ``k``, ``k + B``,
``k + 2B``, ...: every visit trains layers spread over the whole depth; docs/benchmarks.md measures it learning
more per token at the same block size, the price being a backward pass from near the bottom at every visit).

No block holds more parameters than a bound (by default the largest decoder-layer block): the
parameters outside the decoder layers are packed into blocks under it, and a matrix larger than
the bound (a large vocabulary's embedding or head) is split into row ranges, each a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from fedcybgd.common.blocks import EMBED_HEAD, BlockSpec, TensorSpec, torch_dtype_to_st
from fedcybgd.common.layouts import BLOCK_LAYOUTS, NEW_RUN_LAYOUT, check_layout

__all__ = ["find_decoder_layers", "partition_model", "row_pieces", "resolved_bound", "layer_block_count",
           "BLOCK_LAYOUTS", "NEW_RUN_LAYOUT", "check_layout"]


# --------------------------------------------------------------------------------------------
# structure discovery
# --------------------------------------------------------------------------------------------


def _num_layers_from_config(model: nn.Module) -> int | None:
    """Number of decoder layers declared by the model's config, if it has one."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        with contextlib.suppress(Exception):  # pragma: no cover - exotic configs
            configs.insert(0, get_text_config())
    for cfg in configs:
        # GPT-2 style configs map num_hidden_layers -> n_layer via attribute_map, but check the
        # raw spellings too for configs that do not.
        for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            n = getattr(cfg, attr, None)
            if isinstance(n, int) and n > 0:
                return n
    return None


def _homogeneous_module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList, int]]:
    """All non-empty ModuleLists whose children share one class and own parameters.

    Returned as (qualified name, module list, total parameter count).
    """
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(child) for child in mod}
        if len(classes) != 1:
            continue
        nparams = sum(p.numel() for p in mod.parameters())
        if nparams == 0:
            continue
        out.append((name, mod, nparams))
    return out


def _is_nested(name: str, others: list[str]) -> bool:
    """Whether module ``name`` lies strictly inside one of ``others``."""
    return any(o != name and (o == "" or name.startswith(o + ".")) for o in others)


def find_decoder_layers(model: nn.Module) -> tuple[str, int]:
    """Locate the decoder-layer ModuleList by structure; return (qualified name, number of layers).

    The decoder stack is the homogeneous ModuleList whose length equals the config's layer count
    (``num_hidden_layers`` / ``n_layer``). Without a config, or if no list matches it, the longest
    homogeneous ModuleList is taken. Lists nested inside another candidate (e.g. per-layer expert
    lists) lose to the outer one, and remaining ties go to the list with the most parameters.
    Raises ValueError if the model has no such list.
    """
    candidates = _homogeneous_module_lists(model)
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no homogeneous nn.ModuleList with parameters; "
            "cannot find its decoder layers"
        )
    n_cfg = _num_layers_from_config(model)
    matching = [c for c in candidates if n_cfg is not None and len(c[1]) == n_cfg]
    pool = matching or candidates
    if not matching:
        longest = max(len(c[1]) for c in pool)
        pool = [c for c in pool if len(c[1]) == longest]
    names = [c[0] for c in pool]
    outer = [c for c in pool if not _is_nested(c[0], names)]
    name, mod, _ = max(outer, key=lambda c: (c[2], -len(c[0])))
    return name, len(mod)


# --------------------------------------------------------------------------------------------
# partition
# --------------------------------------------------------------------------------------------


def _spec_of(name: str, p: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(int(d) for d in p.shape), dtype=torch_dtype_to_st(p.dtype))


def _check_bound(max_block_params: int | None) -> None:
    if max_block_params is not None and (not isinstance(max_block_params, int) or isinstance(max_block_params, bool)
                                         or max_block_params < 0):
        raise ValueError(f"max_block_params must be None (automatic), 0 (no bound) or a positive integer, "
                         f"got {max_block_params!r}")


def partition_model(model: nn.Module, layers_per_block: int = 1,
                    max_block_params: int | None = None, layout: str = "contiguous") -> list[BlockSpec]:
    """Split the model's parameters into blocks for block-cyclic training.

    One block per run of ``layers_per_block`` consecutive decoder layers (the last may be shorter), named
    ``"layers.{i}"`` or ``"layers.{i}-{j}"`` in ascending layer order (``layout="strided"``: as many blocks, block
    ``k`` of ``B`` holding layers ``k, k + B, ...``, named ``"layers.{k}+{k+B}+..."``), then the blocks of every
    other parameter (embeddings, position embeddings, final norm, LM head). Tied input/output embeddings are one
    parameter and are listed once, under the name ``named_parameters()`` reports first.

    The other parameters are bounded by ``max_block_params`` elements per block so that no visit needs much more
    memory than a decoder-layer visit: ``None`` (the default) bounds them by the largest decoder-layer block, a
    positive number by that number, ``0`` not at all (one ``"embed_head"`` block, whatever its size). Within the
    bound they are packed into as few blocks as fit (``"embed_head"``, ``"embed_head.1"``, ...; first fit,
    largest first); a matrix larger than the bound (a large vocabulary's embedding or head) is split into ranges
    of rows of near-equal size, each its own block (``"lm_head.weight[0:42752]"``). Every parameter element lands
    in exactly one block.
    """
    if not isinstance(layers_per_block, int) or isinstance(layers_per_block, bool) or layers_per_block < 1:
        raise ValueError(f"layers_per_block must be an integer >= 1, got {layers_per_block!r}")
    _check_bound(max_block_params)
    layers_name, n_layers = find_decoder_layers(model)
    prefix = layers_name + "." if layers_name else ""

    per_layer: list[list[TensorSpec]] = [[] for _ in range(n_layers)]
    rest: list[TensorSpec] = []
    all_params = dict(model.named_parameters(remove_duplicate=True))
    for name, p in all_params.items():
        layer_idx = None
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit() and int(head) < n_layers:
                layer_idx = int(head)
        spec = _spec_of(name, p)
        if layer_idx is None:
            rest.append(spec)
        else:
            per_layer[layer_idx].append(spec)

    layer_groups = _layer_groups(per_layer, layers_per_block, check_layout(layout))
    bound = max_block_params
    if bound is None:
        bound = max((sum(s.numel for s in specs) for _, specs in layer_groups), default=0)
    groups = layer_groups + _bounded_groups(rest, bound, _row_splittable(model))
    blocks = [BlockSpec(i, name, tuple(sorted(specs, key=lambda s: (s.name, s.rows or (0, 0)))))
              for i, (name, specs) in enumerate(groups)]
    _check_partition(blocks, {n: p.numel() for n, p in all_params.items()})
    return blocks


def _layer_groups(per_layer: list[list[TensorSpec]], layers_per_block: int,
                  layout: str) -> list[tuple[str, list[TensorSpec]]]:
    """The decoder-layer blocks, named, in the layout's order."""
    n_layers = len(per_layer)
    groups: list[tuple[str, list[TensorSpec]]] = []
    if layout == "strided":
        count = -(-n_layers // layers_per_block)  # as many blocks as the contiguous layout has
        for k in range(count):
            indices = range(k, n_layers, count)
            name = "layers." + "+".join(str(i) for i in indices)
            groups.append((name, [s for i in indices for s in per_layer[i]]))
        return groups
    for start in range(0, n_layers, layers_per_block):
        end = min(start + layers_per_block, n_layers) - 1
        specs = [s for i in range(start, end + 1) for s in per_layer[i]]
        groups.append((f"layers.{start}" if start == end else f"layers.{start}-{end}", specs))
    return groups


def layer_block_count(specs: Sequence[BlockSpec]) -> int:
    """How many of ``specs`` (a ``partition_model`` result) hold decoder layers: the first ones, named
    ``layers.*``; the rest hold the parameters outside the decoder layers."""
    count = 0
    for spec in specs:
        if not spec.name.startswith("layers."):
            break
        count += 1
    return count


def _bounded_groups(rest: list[TensorSpec], bound: int,
                    splittable: set[str]) -> list[tuple[str, list[TensorSpec]]]:
    """The parameters outside the decoder layers as named groups of at most ``bound`` elements (0: one group);
    only the parameters named in ``splittable`` may be cut into row ranges."""
    if not rest:
        return []
    if bound <= 0 or sum(s.numel for s in rest) <= bound:
        return [(EMBED_HEAD, rest)]
    groups: list[tuple[str, list[TensorSpec]]] = []
    whole: list[TensorSpec] = []
    for s in rest:
        if s.numel <= bound:
            whole.append(s)
        elif s.name not in splittable:
            raise ValueError(f"parameter {s.name} ({s.numel} elements) is larger than the block bound {bound} and is "
                             "not the weight of an embedding or linear layer, whose rows can be trained apart: "
                             f"raise max_block_params to at least {s.numel} (or 0: no bound)")
        else:
            groups.extend((f"{p.name}[{p.rows[0]}:{p.rows[1]}]", [p]) for p in row_pieces(s, bound)
                          if p.rows is not None)
    bins: list[list[TensorSpec]] = []
    for s in sorted(whole, key=lambda s: (-s.numel, s.name)):  # first fit, largest first
        target = next((b for b in bins if sum(t.numel for t in b) + s.numel <= bound), None)
        if target is None:
            bins.append([s])
        else:
            target.append(s)
    named = [(EMBED_HEAD if i == 0 else f"{EMBED_HEAD}.{i}", b) for i, b in enumerate(bins)]
    return named + groups


def resolved_bound(specs: list[BlockSpec], max_block_params: int | None) -> int:
    """The bound ``partition_model(..., max_block_params)`` applied to give ``specs``, as a number (0: none), so
    that another party partitioning the same model with it gets the same blocks."""
    _check_bound(max_block_params)
    if max_block_params is not None:
        return max_block_params
    return max((s.numel for s in specs if s.name.startswith("layers.")), default=0)


def _row_splittable(model: nn.Module) -> set[str]:
    """Names of the parameters whose rows can be trained apart: the weights of embeddings and linear layers (the
    modules ``training/slices.py`` knows how to route rows through), when every module using them is one."""
    users: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            users.setdefault(id(weight), []).append(module)
    return {name for name, p in model.named_parameters(remove_duplicate=True)
            if users.get(id(p)) and all(isinstance(m, (nn.Embedding, nn.Linear)) for m in users[id(p)])}


def row_pieces(spec: TensorSpec, bound: int) -> list[TensorSpec]:
    """``spec`` (a whole parameter of at least one dimension) cut into the fewest near-equal row ranges of at most
    ``bound`` elements each (at least one row per piece, even when one row alone exceeds the bound)."""
    if not spec.shape:
        raise ValueError(f"{spec.name}: a scalar cannot be split into rows")
    n_rows, row = spec.shape[0], spec.numel // max(1, spec.shape[0])
    per_piece = max(1, bound // max(1, row))
    pieces = -(-n_rows // per_piece)
    edges = [n_rows * i // pieces for i in range(pieces + 1)]
    return [TensorSpec(spec.name, (b - a, *spec.shape[1:]), spec.dtype, (a, b))
            for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _check_partition(blocks: list[BlockSpec], numel: dict[str, int]) -> None:
    """The invariant the whole protocol relies on: every element of every parameter in exactly one block."""
    pieces: dict[str, list[TensorSpec]] = {}
    for block in blocks:
        for t in block.tensors:
            pieces.setdefault(t.name, []).append(t)
    assert set(pieces) == set(numel), "a parameter was left out of every block"
    for name, found in pieces.items():
        if len(found) == 1 and found[0].rows is None:
            continue
        assert all(t.rows is not None for t in found), f"{name} was assigned to two blocks"
        ranges = sorted(t.rows for t in found if t.rows is not None)
        assert ranges[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:], strict=False)), \
            f"the row ranges of {name} overlap or leave a gap"
        assert sum(t.numel for t in found) == numel[name], f"the row ranges of {name} do not cover it"
