"""A pipeline rank of a GGUF model reads only its own layers (plus what every stage needs:
embedding, final norm, output), in one process with a stand-in group (no collectives run
while loading): the tensors read are counted at `quants.read_tensor`, and the weights a
rank holds are the one-rank load's for its layers."""

from __future__ import annotations

import re

import pytest

from tests.dist.test_dist import write_llama


class Group:
    """What loading and `shard` ask of a group: its rank and size."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.fixture(scope="module")
def pp_llama(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("share") / "pp.gguf", 5, 5, 3, seed=1)    # 5 heads: pipeline


def _load(path, pick, monkeypatch):
    from mlxlite.engine import gguf, quants

    read: list[str] = []
    real = getattr(quants.read_tensor, "real", quants.read_tensor)   # not a previous call's counter

    def counting(path, info, *args, **kwargs):
        read.append(info.name)
        return real(path, info, *args, **kwargs)

    counting.real = real

    monkeypatch.setattr(quants, "read_tensor", counting)
    model, *_ = gguf.load_gguf(path, on_cpu=True, float32=False, budget=0, pick=pick)
    return model, read


@pytest.mark.parametrize("rank,size,mine", [(0, 2, {0, 1}), (1, 2, {2}), (1, 3, {1}), (2, 3, {2})])
def test_a_pipeline_rank_reads_only_its_layers(pp_llama, monkeypatch, rank, size, mine):
    from types import SimpleNamespace

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxlite.engine import distributed

    full, read_all = _load(pp_llama, None, monkeypatch)
    model, read = _load(pp_llama, distributed.layer_pick(Group(rank, size)), monkeypatch)
    blocks = {int(m.group(1)) for m in map(re.compile(r"blk\.(\d+)\.").match, read) if m}
    assert blocks == mine
    per_layer = sum(1 for n in read_all if n.startswith("blk.0."))
    shared = [n for n in read_all if not n.startswith("blk.")]
    assert set(shared) == {"token_embd.weight", "output_norm.weight"}
    assert sorted(read) == sorted(shared + [n for n in read_all if n.startswith(tuple(f"blk.{i}." for i in mine))])
    assert len(read) == len(shared) + per_layer * len(mine)

    loaded = SimpleNamespace(model=model, size_bytes=0, info={})
    placement = distributed.shard(loaded, Group(rank, size))
    assert placement["mode"] == "pipeline"
    lo, hi = placement["layers"][rank]
    assert set(range(lo, hi)) == mine
    # What the rank holds is the one-rank load's weights of its layers, and nothing else.
    held = dict(tree_flatten(model.parameters()))
    want = {k: v for k, v in tree_flatten(full.parameters())
            if not k.startswith("model.layers.") or int(k.split(".")[2]) in mine}
    renamed = {}
    for k, v in held.items():
        if k.startswith("model.layers."):
            _, _, i, _, rest = k.split(".", 4)     # model.layers.<i>.layer.<rest>: i counts from lo
            k = f"model.layers.{lo + int(i)}.{rest}"
        renamed[k] = v
    assert sorted(renamed) == sorted(want)
    for k, v in want.items():
        assert mx.array_equal(renamed[k], v), k
    assert loaded.size_bytes == sum(v.nbytes for v in want.values())


def test_tensor_parallel_and_one_rank_read_every_layer(tmp_path, monkeypatch):
    from mlxlite.engine import distributed

    tp = write_llama(tmp_path / "tp.gguf", 6, 6, 3, seed=0)     # 6 heads divide by 2: tensor parallel
    _, read_all = _load(tp, None, monkeypatch)
    for group in (Group(1, 2), Group(0, 1)):
        _, read = _load(tp, distributed.layer_pick(group), monkeypatch)
        assert sorted(read) == sorted(read_all)
