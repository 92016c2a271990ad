"""A pipeline rank of a GGUF model reads only its own layers (plus what every stage needs:
embedding, final norm, output), in one process with a stand-in group (no collectives run
while loading): the tensors read are counted at `quants.read_tensor`, and the weights a
rank holds are the one-rank load's for its layers. A tensor-parallel rank reads every layer
but shards each as it is read: it ends with exactly the slices `Model.shard` cuts from the
whole model, and never holds the whole model at once."""

from __future__ import annotations

import re

import pytest

from tests.dist.standin import Group
from tests.dist.test_dist import write_llama


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


def _sharded_whole(path, group):
    """The reference: every tensor loaded, then mlx-lm's `shard` on the whole model (as before)."""
    from types import SimpleNamespace

    from mlxlite.engine import distributed, gguf

    model, *_ = gguf.load_gguf(path, on_cpu=True, float32=False, budget=0)
    placement = distributed.shard(SimpleNamespace(model=model, size_bytes=0, info={}), group)
    assert placement["mode"] == "tensor"
    return model


def _split_on_read(path, group):
    from types import SimpleNamespace

    from mlxlite.engine import distributed, gguf

    model, _, _, _, config = gguf.load_gguf(path, on_cpu=True, float32=False, budget=0,
                                            pick=distributed.layer_pick(group))
    assert config["_share"] == "tensor"
    loaded = SimpleNamespace(model=model, size_bytes=0, info={"share": "tensor"})
    placement = distributed.shard(loaded, group)
    assert placement["mode"] == "tensor" and "share" not in loaded.info
    return model, loaded


def _assert_same_parameters(model, reference):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(reference.parameters()))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
        assert mx.array_equal(got[k], v), k


@pytest.mark.parametrize("rank,size", [(0, 2), (1, 2), (2, 3)])
def test_a_tensor_parallel_rank_holds_the_slices_shard_cuts(tmp_path, rank, size):
    import mlx.core as mx

    from mlxlite.engine import distributed

    path = write_llama(tmp_path / "tp.gguf", 6, 6, 8, seed=2)
    reference = _sharded_whole(path, Group(rank, size))
    whole = sum(v.nbytes for v in _whole_weights(path))
    held = distributed.reset_peak()
    model, loaded = _split_on_read(path, Group(rank, size))
    peak = distributed.peak_bytes(held)
    _assert_same_parameters(model, reference)
    layers = getattr(model, "layers")
    assert all(layer.self_attn.n_heads == 6 // size for layer in layers)     # `shard` ran once per layer
    # The share, plus one whole layer and its slices in flight: never the whole model.
    assert loaded.size_bytes < whole
    assert peak < loaded.size_bytes + 2 * whole / 8 + 2**20, (peak, loaded.size_bytes, whole)
    mx.clear_cache()


def _whole_weights(path):
    from mlxlite.engine import gguf

    header = gguf.gguf.read_gguf(path)
    return list(gguf.read_weights(path, header, gguf.gguf.model_config(header), on_cpu=True).values())


# Every GGUF family whose mlx-lm model has `shard`: quantized blocks, tied and untied outputs,
# llama3's rope_freqs, stacked experts, DeepSeek's joined kv_b, gpt-oss's sinks.
@pytest.mark.parametrize("family,qtype", [("llama3", "Q4_1"), ("qwen2", "Q8_0"), ("qwen3", "Q4_0"),
                                          ("qwen3moe", "F32"), ("deepseek2", "F32"), ("deepseek3", "Q4_0"),
                                          ("gpt-oss", "F32")])
def test_every_shardable_family_splits_on_read_as_shard_does(tmp_path, family, qtype):
    from mlxlite.engine import distributed
    from tests.arch_models import make_family

    path = make_family(family, qtype, tmp_path).path
    for rank in (0, 1):
        reference = _sharded_whole(path, Group(rank, 2))
        model, _ = _split_on_read(path, Group(rank, 2))
        _assert_same_parameters(model, reference)
    assert distributed.layer_pick(Group(0, 1))(None) is None    # one rank: read whole, nothing to split


def test_a_packed_width_that_does_not_divide_makes_a_pipeline(tmp_path, monkeypatch):
    """Heads divide, but 32-wide Q8_0 experts are one group each: `shard` would fail on them,
    so the rank loads a pipeline stage instead (it did fail at load before); insisting on
    tensor parallelism is a clear error."""
    from types import SimpleNamespace

    from mlxlite.engine import distributed, gguf
    from mlxlite.errors import Unsupported
    from tests.arch_models import make_family

    path = make_family("qwen3moe", "Q8_0", tmp_path).path
    for rank in (0, 1):
        model, _, _, _, config = gguf.load_gguf(path, on_cpu=True, float32=False, budget=0,
                                                pick=distributed.layer_pick(Group(rank, 2)))
        assert config["_share"] == "pipeline"
        placement = distributed.shard(SimpleNamespace(model=model, size_bytes=0, info={"share": "pipeline"}),
                                      Group(rank, 2))
        assert placement["mode"] == "pipeline" and placement["layers"][rank] == [rank, rank + 1]
    monkeypatch.setenv("MLXLITE_DIST_SPLIT", "tensor")
    with pytest.raises(Unsupported, match="MLXLITE_DIST_SPLIT=tensor: .* across 2 ranks"):
        gguf.load_gguf(path, on_cpu=True, float32=False, budget=0, pick=distributed.layer_pick(Group(0, 2)))
    monkeypatch.delenv("MLXLITE_DIST_SPLIT")
    whole, *_ = gguf.load_gguf(path, on_cpu=True, float32=False, budget=0)     # read whole, split after: the same
    assert distributed.shard(SimpleNamespace(model=whole, size_bytes=0, info={}), Group(0, 2))["mode"] == "pipeline"


def test_the_split_setting_picks_pipeline_or_insists_on_tensor(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mlxlite.engine import distributed, gguf
    from mlxlite.errors import Unsupported

    tp = write_llama(tmp_path / "tp.gguf", 6, 6, 3, seed=0)
    monkeypatch.setenv("MLXLITE_DIST_SPLIT", "pipeline")    # heads divide, but a pipeline is asked for
    model, _, _, _, config = gguf.load_gguf(tp, on_cpu=True, float32=False, budget=0,
                                            pick=distributed.layer_pick(Group(1, 2)))
    assert config["_share"] == "pipeline"
    placement = distributed.shard(SimpleNamespace(model=model, size_bytes=0, info={"share": "pipeline"}), Group(1, 2))
    assert placement["mode"] == "pipeline" and placement["layers"] == [[0, 2], [2, 3]]
    monkeypatch.setenv("MLXLITE_DIST_SPLIT", "tensor")      # 5 heads don't divide by 2: a clear refusal
    pp = write_llama(tmp_path / "pp.gguf", 5, 5, 3, seed=1)
    with pytest.raises(Unsupported, match="MLXLITE_DIST_SPLIT=tensor: .* across 2 ranks .*5 heads"):
        gguf.load_gguf(pp, on_cpu=True, float32=False, budget=0, pick=distributed.layer_pick(Group(0, 2)))
    monkeypatch.setenv("MLXLITE_DIST_SPLIT", "sideways")
    with pytest.raises(Exception, match="invalid value for MLXLITE_DIST_SPLIT"):
        distributed.plan(model, 2)


def test_a_quantized_model_whose_groups_do_not_divide_is_piped_not_half_split():
    """An mlx-lm model (as a safetensors directory loads) whose heads divide by 2 but whose
    64-wide MLP is one quantization group of 64: `shard` would fail partway, leaving the
    model half split. The split is tried on a stand-in first, so the rank runs a pipeline."""
    from types import SimpleNamespace

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from mlxlite.engine import distributed

    args = llama.ModelArgs.from_dict({"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
                                      "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "rms_norm_eps": 1e-5, "vocab_size": 64, "tie_word_embeddings": True})
    model = llama.Model(args)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    before = {k: v.shape for k, v in tree_flatten(model.parameters())}
    with pytest.raises(ValueError):      # what the old path did: `shard` fails on the model itself
        distributed._shaped_like(model).shard(Group(0, 2))
    placement = distributed.shard(SimpleNamespace(model=model, size_bytes=0, info={}), Group(1, 2))
    assert placement["mode"] == "pipeline" and placement["layers"] == [[0, 1], [1, 2]]
    stage = model.model.layers[0].layer
    assert stage.self_attn.n_heads == 4     # untouched by a failed tensor split
    assert {k: v for k, v in before.items() if k.startswith("model.layers.1.")} == {
        k.replace("model.layers.0.layer.", "model.layers.1."): v.shape
        for k, v in tree_flatten(model.parameters()) if k.startswith("model.layers.0.")}
