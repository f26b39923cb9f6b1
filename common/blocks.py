"""Block partition of a Hugging Face causal LM for block-cyclic gradient descent.

The server trains one *block* of parameters per round and only ships that block over the wire, so
every participant must agree on exactly which tensors make up each block. The partition is derived
from the model's own structure (the decoder-layer ``nn.ModuleList``) instead of a hand-kept table
per architecture, so new architectures work without code changes, and the result is a pure
function of the model so server and clients compute the same partition independently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "TensorSpec",
    "BlockSpec",
    "EMBED_HEAD",
    "torch_dtype_to_st",
    "st_dtype_to_torch",
    "find_decoder_layers",
    "partition_model",
    "block_tensors",
    "load_block",
    "block_params",
    "block_values",
    "row_pieces",
    "resolved_bound",
]

#: Name of the final block holding every parameter outside the decoder layers.
EMBED_HEAD = "embed_head"


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------

# safetensors dtype strings <-> torch dtypes. Blocks travel as safetensors, so specs use the
# safetensors spelling, which is also what a peer written in another language would understand.
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Newer dtypes only exist in recent torch builds; register them when present.
for _st, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_st] = getattr(torch, _attr)
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_TORCH.items()}


def torch_dtype_to_st(dtype: torch.dtype) -> str:
    """Return the safetensors dtype string for ``dtype`` (e.g. ``torch.bfloat16`` -> ``"BF16"``).

    Raises ValueError for dtypes safetensors cannot represent, so a bad model fails early rather
    than when the first block is serialised.
    """
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent") from None


def st_dtype_to_torch(s: str) -> torch.dtype:
    """Return the torch dtype for a safetensors dtype string (e.g. ``"F32"`` -> ``torch.float32``).

    Raises ValueError for unknown strings, since they usually mean a corrupt or hostile message.
    """
    try:
        return _ST_TO_TORCH[s]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown safetensors dtype {s!r}; known: {sorted(_ST_TO_TORCH)}"
        ) from None


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one parameter, or of a range of its rows: enough to validate a received tensor.

    A matrix larger than the block bound (an embedding or LM head of a large vocabulary) is split into ranges of
    rows, each in its own block: ``rows = (start, stop)`` says which rows of the parameter ``name`` this piece is,
    and ``shape`` is the piece's shape (``stop - start`` rows). ``rows`` is None for a whole parameter.
    """

    name: str  # parameter name as in model.named_parameters()
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "F32", "BF16", ...
    rows: tuple[int, int] | None = None  # a row range [start, stop) of the parameter; None: all of it

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Size of the raw tensor data in bytes, used to budget transfers."""
        return self.numel * st_dtype_to_torch(self.dtype).itemsize


@dataclass(frozen=True)
class BlockSpec:
    """One unit of block-cyclic training: the parameters updated and exchanged together."""

    index: int
    name: str  # "layers.0", "layers.0-1" (grouped), "embed_head" (".1", ... when split) or "lm_head.weight[0:4096]"
    tensors: tuple[TensorSpec, ...]  # sorted by name

    @property
    def numel(self) -> int:
        """Total number of parameter elements in the block."""
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Total raw size of the block's tensors in bytes."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in spec order."""
        return tuple(t.name for t in self.tensors)

    @property
    def sliced(self) -> bool:
        """Whether the block holds a row range of a parameter rather than whole parameters only."""
        return any(t.rows is not None for t in self.tensors)


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
                    max_block_params: int | None = None) -> list[BlockSpec]:
    """Split the model's parameters into blocks for block-cyclic training.

    One block per run of ``layers_per_block`` consecutive decoder layers (the last may be shorter), named
    ``"layers.{i}"`` or ``"layers.{i}-{j}"`` in ascending layer order, then the blocks of every other parameter
    (embeddings, position embeddings, final norm, LM head). Tied input/output embeddings are one parameter and are
    listed once, under the name ``named_parameters()`` reports first.

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

    layer_groups: list[tuple[str, list[TensorSpec]]] = []
    for start in range(0, n_layers, layers_per_block):
        end = min(start + layers_per_block, n_layers) - 1
        specs = [s for i in range(start, end + 1) for s in per_layer[i]]
        layer_groups.append((f"layers.{start}" if start == end else f"layers.{start}-{end}", specs))
    bound = max_block_params
    if bound is None:
        bound = max((sum(s.numel for s in specs) for _, specs in layer_groups), default=0)
    groups = layer_groups + _bounded_groups(rest, bound, _row_splittable(model))
    blocks = [BlockSpec(i, name, tuple(sorted(specs, key=lambda s: (s.name, s.rows or (0, 0)))))
              for i, (name, specs) in enumerate(groups)]
    _check_partition(blocks, {n: p.numel() for n, p in all_params.items()})
    return blocks


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


# --------------------------------------------------------------------------------------------
# access
# --------------------------------------------------------------------------------------------


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=True))


def block_params(model: nn.Module, spec: BlockSpec) -> list[nn.Parameter]:
    """The model's Parameter objects for ``spec``, in ``spec.tensors`` order.

    Used to build an optimizer over one block and to freeze everything else (for a row range, the whole
    parameter it is cut from: ``training/slices.py`` trains the rows alone). Raises ValueError if
    the model does not match the spec (missing name, other shape or dtype), which means the spec
    was computed for a different model.
    """
    params = _named_params(model)
    out = []
    for t in spec.tensors:
        p = params.get(t.name)
        if p is None:
            raise ValueError(f"block {spec.name!r}: model has no parameter {t.name!r}")
        _check_param(spec, t, p)
        out.append(p)
    return out


def _check_param(spec: BlockSpec, t: TensorSpec, p: torch.Tensor) -> None:
    dtype = torch_dtype_to_st(p.dtype)
    if t.rows is None:
        fits = tuple(p.shape) == t.shape
    else:
        start, stop = t.rows
        fits = (p.dim() >= 1 and tuple(p.shape[1:]) == t.shape[1:] and 0 <= start < stop <= p.shape[0]
                and t.shape[0] == stop - start)
    if not fits or dtype != t.dtype:
        piece = "" if t.rows is None else f" rows {t.rows[0]}:{t.rows[1]} as"
        raise ValueError(
            f"block {spec.name!r}: model parameter {t.name!r} is {tuple(p.shape)} {dtype}, but the spec says"
            f"{piece} {t.shape} {t.dtype}"
        )


def _piece(t: TensorSpec, p: torch.Tensor) -> torch.Tensor:
    """The part of parameter ``p`` that ``t`` names (a view: rows of a contiguous tensor stay contiguous)."""
    return p if t.rows is None else p[t.rows[0]:t.rows[1]]


def block_values(spec: BlockSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block ``spec`` taken from whole parameters ``{name: tensor}`` (e.g. every parameter a FedAvg-full client
    trained): the named tensors, cut to their row ranges."""
    return {t.name: _piece(t, tensors[t.name]).contiguous() for t in spec.tensors}


def block_tensors(model: nn.Module, spec: BlockSpec) -> dict[str, torch.Tensor]:
    """The block's current values as ``{name: tensor}``, detached and contiguous.

    Tensors stay on the parameter's device and are *not* copied when already contiguous (they
    share storage with the model, so a block of a large model costs no extra memory); clone them
    if you need a snapshot that survives later training steps or ``load_block`` calls.
    """
    return {t.name: _piece(t, p.detach()).contiguous()
            for t, p in zip(spec.tensors, block_params(model, spec), strict=True)}


def load_block(model: nn.Module, spec: BlockSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Copy received block values into the model's parameters in place.

    In-place copying keeps Parameter identity, so optimizers, hooks and tied weights (embedding
    and LM head sharing one tensor) all see the new values. Names, shapes and dtypes must match
    the spec exactly -- no silent casting or broadcasting -- and everything is validated before
    anything is written, so a bad message leaves the model untouched. Raises ValueError otherwise.
    Source tensors may live on any device.
    """
    if not isinstance(tensors, dict):
        raise ValueError(f"block {spec.name!r}: expected a dict of tensors, got {type(tensors).__name__}")
    expected = set(spec.names)
    got = set(tensors)
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"block {spec.name!r}: tensor names do not match the spec: " + "; ".join(parts))
    for t in spec.tensors:
        v = tensors[t.name]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"block {spec.name!r}: {t.name!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != t.shape:
            raise ValueError(
                f"block {spec.name!r}: {t.name!r} has shape {tuple(v.shape)}, expected {t.shape}"
            )
        st = _TORCH_TO_ST.get(v.dtype, str(v.dtype))
        if st != t.dtype:
            raise ValueError(f"block {spec.name!r}: {t.name!r} has dtype {st}, expected {t.dtype}")
    params = block_params(model, spec)  # validates the model against the spec too
    with torch.no_grad():
        for t, p in zip(spec.tensors, params, strict=True):
            _piece(t, p).copy_(tensors[t.name])
