"""What touches `mx.distributed`: the group, the step broadcast, sharding, token agreement.

Owns the MLX half of scale-out (`dist/` owns launch, ranks and failure, and never imports
mlx): `init_group(backend)` joins the group MLX's launcher set up (`MLX_RANK` and
`MLX_HOSTFILE`, or NCCL's variables); `broadcast(group, payload)` carries rank 0's bytes to
every rank over the group itself (one `all_sum` when it fits `HEAD` bytes); `layer_pick(group)`
tells a GGUF load what this rank reads (a pipeline stage's layers, or every layer sharded as
soon as it is read); `shard(loaded, group)` splits a loaded model in place, tensor parallel
through mlx-lm's `Model.shard` when the architecture has it and its heads and packed widths
divide by the group size, else pipeline (a contiguous range of layers per rank, each stage's
hidden state handed on by one `all_sum` per stage so every rank holds the same logits; the
`dist_split` setting can ask for either); `LockstepDecoder` is the batch decoder whose
sampled tokens are rank 0's on every rank, so all caches stay in step however sampling or
summation order differ. Never talks to sockets or processes, never decides when a rank is lost.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlite import config
from mlxlite.engine.batch import Decoder
from mlxlite.engine.gguf import Share, layer_of, only_layers
from mlxlite.engine.model import GENERATION_STREAM, Loaded, _nbytes
from mlxlite.errors import Unsupported

HEAD = 4096     # bytes of the one collective a small step message takes (4 of them its length)
# Every collective goes on the stream the model runs on: two streams would each take their
# next collective in their own order, and ranks would pair different ones (a deadlock).
STREAM = GENERATION_STREAM


def step_stream() -> Any:
    """The context every forward pass of a group runs in (embeddings too)."""
    return mx.stream(STREAM)


def init_group(backend: str = "any") -> Any:
    """The group MLX's launcher prepared for this process (strict: no group is an error)."""
    return mx.distributed.init(strict=True, backend=backend)


def broadcast(group: Any, payload: bytes | None) -> bytes:
    """Rank 0's `payload` on every rank (others pass None): the message rides an `all_sum`
    of a zero-filled buffer, so every byte comes from rank 0."""
    rank = group.rank()
    head = np.zeros(HEAD, dtype=np.uint8)
    if rank == 0:
        data = payload or b""
        head[:4] = np.frombuffer(len(data).to_bytes(4, "little"), dtype=np.uint8)
        first = data[: HEAD - 4]
        head[4:4 + len(first)] = np.frombuffer(first, dtype=np.uint8)
    out = np.array(mx.distributed.all_sum(mx.array(head), group=group, stream=STREAM))
    size = int.from_bytes(out[:4].tobytes(), "little")
    if size <= HEAD - 4:
        return out[4:4 + size].tobytes()
    rest = np.zeros(size - (HEAD - 4), dtype=np.uint8)
    if rank == 0:
        rest[:] = np.frombuffer(payload[HEAD - 4:], dtype=np.uint8)
    tail = np.array(mx.distributed.all_sum(mx.array(rest), group=group, stream=STREAM))
    return out[4:].tobytes() + tail.tobytes()


def barrier(group: Any) -> None:
    mx.eval(mx.distributed.all_sum(mx.array([1]), group=group, stream=STREAM))


def gather_ints(group: Any, value: int) -> list[int]:
    """Every rank's `value`, in rank order, on every rank."""
    return [int(v) for v in mx.distributed.all_gather(mx.array([int(value)], dtype=mx.int64), group=group,
                                                            stream=STREAM).tolist()]


def reset_peak() -> int:
    """Starts measuring a peak; returns what MLX holds now (other models), for `peak_bytes`."""
    mx.reset_peak_memory()
    return int(mx.get_active_memory())


def peak_bytes(since: int = 0) -> int:
    """The most memory MLX held at once since `reset_peak`, above `since` (a rank's load: its share's peak)."""
    return max(0, int(mx.get_peak_memory()) - since)


# ---- sharding ------------------------------------------------------------------------------
def _args(model: Any) -> Any:
    return getattr(model, "args", None)


def plan(model: Any, size: int) -> str:
    """"tensor" when mlx-lm can shard this architecture and its heads divide, else "pipeline";
    `MLXLITE_DIST_SPLIT` can ask for either (tensor where it cannot be is an error)."""
    choice = config.get("dist_split")
    if choice == "pipeline":
        return "pipeline"
    args = _args(model)
    heads = int(getattr(args, "num_attention_heads", 0) or 0)
    kv = int(getattr(args, "num_key_value_heads", 0) or heads)
    inter = int(getattr(args, "intermediate_size", 0) or 0)
    if (hasattr(model, "shard") and heads and heads % size == 0 and kv % size == 0
            and (inter == 0 or inter % size == 0)):
        return "tensor"
    if choice == "tensor":
        why = ("mlx-lm has no `shard` for it" if not hasattr(model, "shard") else
               f"{heads} heads, {kv} key/value heads and {inter} MLP rows must each divide by {size}")
        raise Unsupported(f"MLXLITE_DIST_SPLIT=tensor: this model cannot be split tensor-parallel across "
                          f"{size} ranks ({why})")
    return "pipeline"


class _Stage(nn.Module):
    """One layer of this rank's range. A pipeline hands each stage's hidden state on with one
    `all_sum` per stage, every rank taking part in each (its own stage's output where it is
    the sender, else zeros): MLX's CUDA build has no send/recv, an `all_sum` runs on every
    backend. The first layer joins the hand-offs before its stage (the last of them is its
    input), the last layer joins its own and those after it (the last is the final stage's
    output), so every rank takes the same `all_sum`s in the same order, each chained to the one
    before, and continues with the same hidden state (and the same logits)."""

    def __init__(self, layer: Any, group: Any, first: bool, last: bool) -> None:
        super().__init__()
        self.layer = layer
        self._group, self._first, self._last = group, first, last

    def __getattr__(self, key: str) -> Any:
        # The model reads its layers' attributes (`use_sliding` when it makes caches).
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key == "layer":
                raise
            return getattr(self["layer"], key)

    def _hand_off(self, mine: mx.array | None, previous: mx.array) -> mx.array:
        """One stage's hand-off: `mine` from its sender, zeros (after `previous`: the order is
        the graph's) from everyone else. Zeros, not `previous * 0`: an inf would sum to NaN."""
        part = mine if mine is not None else mx.depends(mx.zeros_like(previous), [previous])
        return mx.distributed.all_sum(part, group=self._group, stream=STREAM)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        rank, size = self._group.rank(), self._group.size()
        if self._first:
            for _ in range(rank):           # stages 0 .. rank-1 hand off; the last one is this stage's input
                x = self._hand_off(None, x)
        y = self.layer(x, *args, **kwargs)
        if self._last:
            y = self._hand_off(y, y)
            for _ in range(rank + 1, size):     # the later stages' hand-offs; the last is the model's output
                y = self._hand_off(None, y)
            # A prefill evaluates only the caches; tie this stage's hand-offs to its cache so
            # every rank runs them then too (else the others wait forever).
            cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
            if cache is not None and getattr(cache, "keys", None) is not None:
                cache.keys = mx.depends(cache.keys, [y])
        return y


def layer_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Contiguous ranges of `n` layers, one per rank, the first ranks one longer when it doesn't divide."""
    base, extra = divmod(n, size)
    ranges = []
    start = 0
    for r in range(size):
        end = start + base + (1 if r < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def layer_pick(group: Any) -> Callable[[Any], Share | None]:
    """What `runner.load(pick=...)` asks before reading a GGUF's weights: this rank's range of
    layers when the model will be split as a pipeline (the rest is never read); when it will be
    split tensor parallel, a `split` that shards each layer as soon as it is read (so the rank
    never holds the whole model); None when one rank holds it all or `shard` is to decide."""
    def pick(model: Any) -> Share | None:
        size = group.size()
        layers = getattr(getattr(model, "model", None), "layers", None)
        if size == 1 or not isinstance(layers, list) or len(layers) < size:
            return None     # `shard` decides (and says why a model cannot be split)
        if plan(model, size) == "tensor":
            if not _shards_only_layers(model, group):
                return None     # read whole, `shard` after: it splits more than the layers
            if _splits(model, group):
                return Share(split=lambda m: m.shard(group))
            if config.get("dist_split") == "tensor":
                raise Unsupported(f"MLXLITE_DIST_SPLIT=tensor: this model cannot be split tensor-parallel across "
                                  f"{size} ranks (its packed weights don't divide into whole groups of 32)")
        return Share(layers=layer_ranges(len(layers), size)[group.rank()])
    return pick


def _splits(model: Any, group: Any) -> bool:
    """Whether the model's `shard` cuts every tensor evenly (tried on the unevaluated probe: shapes
    only). Packed widths must divide in whole groups: 32-wide experts can't be split in two."""
    try:
        model.shard(group)
    except ValueError:
        return False
    return True


def _shaped_like(model: Any) -> Any | None:
    """A fresh, unevaluated model of the same class and arguments, its modules quantized as
    `model`'s are (shapes only, nothing computed): a split can be tried on it without touching
    `model`, which a failed `shard` would leave half split. None if none can be made."""
    try:
        probe = type(model)(model.args)
    except Exception:   # noqa: BLE001 - not an mlx-lm model: `shard` on the model itself decides
        return None
    packed = {path: m for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
              or (hasattr(m, "bits") and hasattr(m, "group_size") and hasattr(m, "scales"))}
    if packed:
        nn.quantize(probe, class_predicate=lambda p, m: (
            {"group_size": packed[p].group_size, "bits": packed[p].bits, "mode": getattr(packed[p], "mode", "affine")}
            if p in packed and hasattr(m, "to_quantized") else False))
    return probe


def _shards_only_layers(model: Any, group: Any) -> bool:
    """Whether the model's `shard` leaves everything outside its layers as it is (then it can run
    one layer at a time). Tried on the unevaluated skeleton with no layers: nothing is computed."""
    from mlx.utils import tree_flatten

    before = {k: v.shape for k, v in tree_flatten(model.parameters()) if layer_of(k) is None}
    try:
        with only_layers(model, []):
            model.shard(group)
            after = {k: v.shape for k, v in tree_flatten(model.parameters())}
    except Exception:   # noqa: BLE001 - a `shard` that needs its layers: read whole, shard after
        return False
    return after == before


def _pipeline(model: Any, group: Any) -> dict:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    rank, size = group.rank(), group.size()
    if not isinstance(layers, list) or len(layers) < size:
        raise Unsupported(f"cannot split this model across {size} ranks: it has "
                          f"{len(layers) if isinstance(layers, list) else 'no'} layers to share out")
    ranges = layer_ranges(len(layers), size)
    start = len(layers)
    lo, hi = ranges[rank]
    mine = layers[lo:hi]
    inner.layers = [_Stage(layer, group, i == 0, i == len(mine) - 1) for i, layer in enumerate(mine)]
    del layers, mine
    gc.collect()
    return {"mode": "pipeline", "layers": [list(r) for r in ranges], "total_layers": start}


def shard(loaded: Loaded, group: Any) -> dict:
    """Split `loaded.model` for this rank in place; returns the placement (mode, what each rank
    holds) and updates `size_bytes` to this rank's share."""
    size = group.size()
    model = loaded.model
    placement: dict = {"ranks": size}
    if size > 1:
        share = loaded.info.pop("share", None)     # what a GGUF rank's load already did
        mode = share or plan(model, size)
        probe = _shaped_like(model) if mode == "tensor" and share is None else None
        if probe is not None and not _splits(probe, group):
            if config.get("dist_split") == "tensor":
                raise Unsupported(f"MLXLITE_DIST_SPLIT=tensor: this model cannot be split tensor-parallel across "
                                  f"{size} ranks (its quantized widths don't divide into whole groups)")
            mode = "pipeline"       # tried on a stand-in: the model itself is untouched
        if mode == "tensor":
            if share is None:
                try:
                    model.shard(group)
                except ValueError as exc:   # a width that doesn't divide among the ranks
                    raise Unsupported(f"cannot split this model tensor-parallel across {size} ranks: {exc}") from None
            args = _args(model)
            placement.update({"mode": "tensor", "heads_per_rank": int(args.num_attention_heads) // size})
        else:
            placement.update(_pipeline(model, group))
        mx.eval(model.parameters())
        gc.collect()
        mx.clear_cache()
    else:
        placement["mode"] = "single"
    loaded.size_bytes = _nbytes(model)
    placement["bytes"] = loaded.size_bytes
    loaded.info["placement"] = placement
    return placement


# ---- lockstep decoding ---------------------------------------------------------------------
class LockstepDecoder(Decoder):
    """The batch decoder with one sampler for the group: each step's tokens are rank 0's
    (an `all_sum` of rank 0's tokens and everyone else's zeros, inside the step's graph, so
    the look-ahead still overlaps). Every rank then feeds the same tokens to its caches."""

    def __init__(self, loaded: Any, max_batch: int, group: Any, *, keep_caches: bool = False) -> None:
        super().__init__(loaded, max_batch, keep_caches=keep_caches)
        self.group = group
        # Speculation's gate times each rank's own steps: ranks would choose different steps.
        self.speculator.enabled = False

    def _forward(self, inputs: mx.array) -> tuple[mx.array, ...]:
        out = super()._forward(inputs)
        toks = out[0].astype(mx.int32)
        if self.group.rank() != 0:
            # Zeros that still depend on this rank's forward pass: the collective must come
            # after the pass's own collectives on every rank, or ranks pair different ones.
            toks = toks * 0
        toks = mx.distributed.all_sum(toks, group=self.group, stream=STREAM).astype(mx.uint32)
        return (toks, *out[1:])
