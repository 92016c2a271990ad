"""The per-family GGUF maps (formats/archs): metadata -> mlx-lm config, names, refusals.

The end-to-end proof (logits against transformers) is tests/engine/test_gguf_archs.py; these
pin the metadata rules that the tiny models cannot reach (real-size switches such as Gemma's
27B query scaling, YaRN keys) and the clear refusals.
"""

from __future__ import annotations

import pytest

from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats import archs, gguf


def _header(arch: str, tensors: tuple[str, ...] = (), **keys) -> gguf.Header:
    meta = {"general.architecture": arch, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"] * 100}
    base = {"embedding_length": 2048, "block_count": 4, "feed_forward_length": 8192, "attention.head_count": 8,
            "attention.head_count_kv": 2, "context_length": 8192}
    meta.update({f"{arch}.{k}": v for k, v in {**base, **keys}.items()})
    return gguf.Header("x.gguf", 3, meta, tuple(gguf.TensorInfo(t, (1,), 0, 0) for t in tensors))


def test_every_family_is_registered_by_its_gguf_name():
    assert set(archs.REGISTRY) == {"llama", "mistral", "smollm", "qwen2", "qwen25vl", "qwen3", "qwen3moe", "gemma2",
                                   "gemma3",
                                   "phi3", "granite", "olmo2", "starcoder2", "gpt-oss", "deepseek2",
                                   "bert", "nomic-bert"}
    with pytest.raises(Unsupported, match=r"'mamba' is not supported \(supported: bert, deepseek2, gemma2"):
        archs.get("mamba")


def test_gemma_query_scaling_follows_llama_cpp_by_model_size():
    """llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 2 27B (46 layers) and
    Gemma 3 27B (62 layers), which use hidden/heads (HF's query_pre_attn_scalar 144 and 168)."""
    g2_9b = gguf.model_config(_header("gemma2", block_count=42, embedding_length=3584, **{"attention.head_count": 16,
                                                                                        "attention.key_length": 256}))
    g2_27b = gguf.model_config(_header("gemma2", block_count=46, embedding_length=4608, **{"attention.head_count": 32,
                                                                                         "attention.key_length": 128}))
    g3_27b = gguf.model_config(_header("gemma3", block_count=62, embedding_length=5376, **{"attention.head_count": 32,
                                                                                         "attention.key_length": 128}))
    assert (g2_9b["query_pre_attn_scalar"], g2_27b["query_pre_attn_scalar"], g3_27b["query_pre_attn_scalar"]) == \
        (256, 144, 168)
    assert g2_9b["model_type"] == "gemma2" and g2_9b["final_logit_softcapping"] == 30.0
    assert g3_27b["model_type"] == "gemma3_text" and g3_27b["rope_local_base_freq"] == 10000.0


def test_gemma3_reads_linear_rope_scaling_and_window_keys():
    cfg = gguf.model_config(_header("gemma3", **{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0,
                                                 "attention.sliding_window": 1024, "rope.freq_base": 1e6}))
    assert cfg["rope_scaling"] == {"type": "linear", "factor": 8.0}
    assert (cfg["sliding_window"], cfg["sliding_window_pattern"], cfg["rope_theta"]) == (1024, 6, 1e6)


def test_gpt_oss_reads_yarn_experts_and_alternating_windows():
    cfg = gguf.model_config(_header("gpt-oss", ("output.weight",), block_count=4, **{
        "expert_count": 32, "expert_used_count": 4, "expert_feed_forward_length": 2880,
        "attention.sliding_window": 128, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
        "rope.scaling.original_context_length": 4096}))
    assert cfg["model_type"] == "gpt_oss" and cfg["tie_word_embeddings"] is False
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (32, 4, 2880)
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert cfg["rope_scaling"] == {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096}


def test_family_names_map_exactly():
    assert gguf.map_name("blk.2.attn_q_norm.weight", "qwen3") == "model.layers.2.self_attn.q_norm.weight"
    assert gguf.map_name("blk.0.ffn_up_exps.scales", "qwen3moe") == "model.layers.0.mlp.switch_mlp.up_proj.scales"
    assert gguf.map_name("blk.1.ffn_norm.weight", "gemma2") == "model.layers.1.pre_feedforward_layernorm.weight"
    assert gguf.map_name("blk.1.ffn_norm.weight", "llama") == "model.layers.1.post_attention_layernorm.weight"
    assert gguf.map_name("blk.0.attn_qkv.weight", "phi3") == "model.layers.0.self_attn.qkv_proj.weight"
    assert gguf.map_name("blk.0.ffn_up.weight", "phi3") == "model.layers.0.mlp.gate_up_proj.weight"
    assert gguf.map_name("blk.0.ffn_up.bias", "starcoder2") == "model.layers.0.mlp.c_fc.bias"
    assert gguf.map_name("blk.0.post_ffw_norm.weight", "olmo2") == "model.layers.0.post_feedforward_layernorm.weight"
    assert gguf.map_name("blk.3.attn_sinks.weight", "gpt-oss") == "model.layers.3.self_attn.sinks"
    for arch, bad in (("olmo2", "blk.0.attn_norm.weight"), ("llama", "blk.0.attn_q_norm.weight"),
                      ("starcoder2", "blk.0.ffn_gate.weight"), ("qwen3", "blk.0.attn_sinks.weight")):
        with pytest.raises(Unsupported, match=f"in the {arch} family"):
            gguf.map_name(bad, arch)


def test_quirks_are_declared_per_family():
    assert {n for n, a in archs.REGISTRY.items() if a.permute_qk} == {"llama", "mistral", "smollm", "granite"}
    assert {n for n, a in archs.REGISTRY.items() if a.norm_offset} == {"gemma2", "gemma3"}
    assert {n for n, a in archs.REGISTRY.items() if a.rope_freqs} == {"llama", "mistral", "smollm"}


def test_rope_freqs_is_refused_where_the_family_has_no_use_for_it():
    with pytest.raises(Unsupported, match="qwen3 with rope_freqs"):
        gguf.check_supported(_header("qwen3", ("rope_freqs.weight",)))
    gguf.check_supported(_header("llama", ("rope_freqs.weight",)))


PHI3_128K = {"embedding_length": 3072, "attention.head_count": 32, "attention.head_count_kv": 32,
             "rope.dimension_count": 96, "context_length": 131072, "rope.scaling.original_context_length": 4096,
             "rope.scaling.attn_factor": 1.1902380714238083}
LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")


def test_phi3_longrope_maps_onto_mlx_lms_longrope():
    """Phi-3-mini-128k's keys as llama.cpp writes them; the factor values come from the
    tensors at load (tests/engine/test_gguf_archs.py runs them)."""
    cfg = gguf.model_config(_header("phi3", LONGROPE, **PHI3_128K))
    assert cfg["model_type"] == "phi3" and cfg["rope_scaling"] == {"type": "longrope"}
    assert (cfg["original_max_position_embeddings"], cfg["max_position_embeddings"]) == (4096, 131072)
    assert "rope_scaling" not in gguf.model_config(_header("phi3", **PHI3_128K))  # 4k: plain RoPE
    assert archs.get("phi3").rope_factors == {"rope_factors_long.weight": "long_factor",
                                              "rope_factors_short.weight": "short_factor"}


def test_phi3_longrope_that_mlx_lm_would_run_otherwise_is_refused_by_name():
    with pytest.raises(Unsupported, match="attn_factor 1.5 is not the 1.19024"):
        gguf.model_config(_header("phi3", LONGROPE, **{**PHI3_128K, "rope.scaling.attn_factor": 1.5}))
    with pytest.raises(Unsupported, match="rope_factors_short.weight but no rope_factors_long"):
        gguf.model_config(_header("phi3", LONGROPE[1:], **PHI3_128K))
    del_orig = {k: v for k, v in PHI3_128K.items() if k != "rope.scaling.original_context_length"}
    with pytest.raises(BadRequest, match="lacks phi3.rope.scaling.original_context_length"):
        gguf.model_config(_header("phi3", LONGROPE, **del_orig))
    with pytest.raises(Unsupported, match="phi3 with 'linear' RoPE scaling is not supported"):
        gguf.model_config(_header("phi3", **{"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}))
    with pytest.raises(Unsupported, match="RoPE scaling 'su'"):
        gguf.model_config(_header("llama", **{"rope.scaling.type": "su", "rope.scaling.factor": 2.0}))


def test_missing_dimensions_are_a_bad_request_naming_the_key():
    h = _header("qwen3")
    del h.metadata["qwen3.block_count"]
    with pytest.raises(BadRequest, match="lacks qwen3.block_count"):
        gguf.model_config(h)
    moe = _header("qwen3moe", **{"expert_count": 8, "expert_used_count": 2})
    with pytest.raises(BadRequest, match="expert_feed_forward_length"):
        gguf.model_config(moe)


def _deepseek(**keys) -> gguf.Header:
    dims = {"attention.head_count": 16, "attention.head_count_kv": 1, "attention.key_length": 576,
            "attention.value_length": 512, "attention.key_length_mla": 192, "attention.value_length_mla": 128,
            "rope.dimension_count": 64, "attention.kv_lora_rank": 512, "expert_count": 64, "expert_used_count": 6,
            "expert_shared_count": 2, "expert_feed_forward_length": 1408, "leading_dense_block_count": 1,
            "expert_weights_scale": 1.0, "expert_gating_func": 1}
    return _header("deepseek2", ("output.weight",), **{**dims, **keys})


def test_deepseek2_reads_mla_sizes_experts_and_yarn_mscale():
    """V2-Lite's shape, with the head sizes llama.cpp's MLA files state under *_mla."""
    cfg = gguf.model_config(_deepseek(**{"rope.scaling.type": "yarn", "rope.scaling.factor": 40.0,
                                         "rope.scaling.original_context_length": 4096,
                                         "rope.scaling.yarn_log_multiplier": 0.0707}))
    assert cfg["model_type"] == "deepseek_v2" and cfg["q_lora_rank"] is None
    assert (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]) == \
        (128, 64, 128, 512)
    assert (cfg["n_routed_experts"], cfg["n_shared_experts"], cfg["num_experts_per_tok"]) == (64, 2, 6)
    assert cfg["first_k_dense_replace"] == 1 and cfg["topk_method"] == "greedy"
    assert cfg["rope_scaling"]["factor"] == 40.0 and cfg["rope_scaling"]["mscale_all_dim"] == pytest.approx(0.707)
    old = gguf.model_config(_deepseek(**{"attention.key_length": 192, "attention.value_length": 128,
                                         "attention.key_length_mla": 0, "attention.value_length_mla": 0}))
    assert (old["qk_nope_head_dim"], old["v_head_dim"]) == (128, 128)  # files from before the MLA split


def _with_tensors(h: gguf.Header, *names: str) -> gguf.Header:
    return gguf.Header(h.path, 3, h.metadata, (*h.tensors, *(gguf.TensorInfo(n, (1,), 0, 0) for n in names)))


V3 = {"attention.q_lora_rank": 1536, "expert_count": 256, "expert_used_count": 8, "expert_shared_count": 1,
      "expert_feed_forward_length": 2048, "leading_dense_block_count": 3, "expert_weights_scale": 2.5,
      "expert_weights_norm": True, "expert_gating_func": 2, "expert_group_count": 8, "expert_group_used_count": 4,
      "attention.head_count": 128}


def test_deepseek_v3_sigmoid_routing_runs_on_mlx_lms_deepseek_v3():
    """DeepSeek-V3/R1's routing keys as llama.cpp writes them; V2 files stay on deepseek_v2."""
    h = _with_tensors(_deepseek(**V3), "blk.3.exp_probs_b.bias")
    cfg = gguf.model_config(h)
    assert cfg["model_type"] == "deepseek_v3" and gguf.family(h).model_type == "deepseek_v3"
    assert (cfg["topk_method"], cfg["scoring_func"], cfg["norm_topk_prob"]) == ("noaux_tc", "sigmoid", True)
    assert (cfg["n_group"], cfg["topk_group"], cfg["routed_scaling_factor"]) == (8, 4, 2.5)
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["first_k_dense_replace"]) == (256, 8, 3)
    assert cfg["q_lora_rank"] == 1536 and cfg["num_key_value_heads"] == 128
    # Kimi-K2's shape: one group, so no group limit
    k2 = gguf.model_config(_with_tensors(_deepseek(**{**V3, "expert_count": 384, "expert_group_count": 1,
                                                      "expert_group_used_count": 1}), "blk.1.exp_probs_b.bias"))
    assert (k2["model_type"], k2["n_group"], k2["n_routed_experts"]) == ("deepseek_v3", 1, 384)
    assert gguf.model_config(_deepseek())["model_type"] == "deepseek_v2"
    assert gguf.check_supported(h) == "deepseek_v3" and gguf.check_supported(_deepseek()) == "deepseek_v2"


def test_deepseek_v3_names_keep_the_mla_split_and_the_router_bias():
    v3 = gguf.family(_with_tensors(_deepseek(**V3), "blk.3.exp_probs_b.bias"))
    assert v3.map_name("blk.3.exp_probs_b.bias") == "model.layers.3.mlp.gate.e_score_correction_bias"
    assert v3.map_name("blk.3.attn_k_b.weight") == "model.layers.3.self_attn.embed_q.weight"
    assert v3.map_name("blk.3.attn_v_b.scales") == "model.layers.3.self_attn.unembed_out.scales"
    assert v3.map_name("blk.3.attn_kv_b.weight") == "model.layers.3.self_attn.kv_b_proj.weight"  # older files
    assert not v3.mla_kv_b and archs.get("deepseek2").mla_kv_b
    assert archs.get("deepseek2").map_name("blk.3.attn_k_b.weight") == "model.layers.3.self_attn.k_b_proj.weight"


def test_deepseek_routing_mlx_lm_cannot_run_is_refused_by_name():
    with pytest.raises(Unsupported, match="sigmoid routing but no expert score biases"):
        gguf.model_config(_deepseek(**V3))
    with pytest.raises(Unsupported, match=r"score biases \(exp_probs_b\) but no sigmoid routing"):
        gguf.model_config(_with_tensors(_deepseek(), "blk.3.exp_probs_b.bias"))
    with pytest.raises(Unsupported, match=r"expert gating function 3 is not supported \(1, softmax, and 2"):
        gguf.model_config(_deepseek(expert_gating_func=3))  # llama.cpp's sqrt-softplus: neither class has it
    with pytest.raises(Unsupported, match="softmax routing and normalised top-k"):
        gguf.model_config(_deepseek(expert_weights_norm=True))
    with pytest.raises(Unsupported, match="256 experts in 7 groups"):
        gguf.model_config(_with_tensors(_deepseek(**{**V3, "expert_group_count": 7}), "blk.3.exp_probs_b.bias"))
    with pytest.raises(Unsupported, match=r"8 groups \(9 used\)"):
        gguf.model_config(_with_tensors(_deepseek(**{**V3, "expert_group_used_count": 9}), "blk.3.exp_probs_b.bias"))


def test_gemma3_reads_ollamas_rope_base_names_too():
    cfg = gguf.model_config(_header("gemma3", **{"rope.global.freq_base": 1e6, "rope.local.freq_base": 5000.0}))
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 5000.0)


def test_ollamas_gemma3_files_run_global_layers_at_linear_rope_8_as_ollama_corrects_them():
    """Ollama's converter writes no RoPE scaling for the multimodal gemma3 checkpoints; its
    runner puts HF's linear factor 8 back for the 4B, 12B and 27B (34, 48, 62 layers) when the
    window is shorter than the context. Without it the global layers rotate 8x too fast."""
    def cfg(layers, **keys):
        return gguf.model_config(_header("gemma3", block_count=layers, context_length=131072, **{
            "attention.sliding_window": 1024, **keys}))

    for layers in (34, 48, 62):
        assert cfg(layers)["rope_scaling"] == {"type": "linear", "factor": 8.0}
    assert "rope_scaling" not in cfg(26)                                    # the 1B: none
    assert "rope_scaling" not in cfg(34, **{"attention.sliding_window": 131072})
    # a file that says (llama.cpp's) is read as it says
    assert cfg(34, **{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})["rope_scaling"] == \
        {"type": "linear", "factor": 4.0}


GEMMA3_VISION = {"vision.block_count": 2, "vision.embedding_length": 32, "vision.feed_forward_length": 64,
                 "vision.attention.head_count": 2, "vision.image_size": 56, "vision.patch_size": 14,
                 "vision.attention.layer_norm_epsilon": 1e-6, "mm.tokens_per_image": 4}
IMAGE_TOKENS = ["<pad>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _gemma3_vision(tokens=IMAGE_TOKENS, tensors=("v.blk.0.attn_q.weight",), **keys) -> gguf.Header:
    header = _header("gemma3", tensors, **{**GEMMA3_VISION, **keys})
    return gguf.Header(header.path, 3, {**header.metadata, "tokenizer.ggml.tokens": [*tokens, *"abc"]},
                       header.tensors)


def test_gemma3_vision_tower_names_map_onto_mlx_vlms_gemma3():
    vision = archs.get("gemma3").vision
    tower = "vision_tower.vision_model."
    assert {n: vision.map_name(n) for n in (
        "v.patch_embedding.weight", "v.position_embedding.weight", "v.post_layernorm.bias",
        "v.blk.3.attn_q.weight", "v.blk.3.attn_output.bias", "v.blk.3.layer_norm2.weight", "v.blk.3.mlp.fc1.weight",
        "mm.mm_input_projection.weight", "mm.mm_soft_emb_norm.weight")} == {
        "v.patch_embedding.weight": tower + "embeddings.patch_embedding.weight",
        "v.position_embedding.weight": tower + "embeddings.position_embedding.weight",
        "v.post_layernorm.bias": tower + "post_layernorm.bias",
        "v.blk.3.attn_q.weight": tower + "encoder.layers.3.self_attn.q_proj.weight",
        "v.blk.3.attn_output.bias": tower + "encoder.layers.3.self_attn.out_proj.bias",
        "v.blk.3.layer_norm2.weight": tower + "encoder.layers.3.layer_norm2.weight",
        "v.blk.3.mlp.fc1.weight": tower + "encoder.layers.3.mlp.fc1.weight",
        "mm.mm_input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
        "mm.mm_soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight"}
    with pytest.raises(Unsupported, match="'v.blk.0.attn_qkv.weight' has no mlx-vlm equivalent"):
        vision.map_name("v.blk.0.attn_qkv.weight")
    # llama.cpp's mmproj names are another file's: not these
    with pytest.raises(Unsupported):
        vision.map_name("v.patch_embd.weight")


def test_a_gemma3_file_takes_images_when_it_carries_the_tower():
    assert gguf.takes_images(_gemma3_vision())
    assert not gguf.takes_images(_gemma3_vision(tensors=()))            # metadata, no tensors
    assert not gguf.takes_images(_header("gemma3", ("v.blk.0.attn_q.weight",)))  # no vision.block_count
    assert not gguf.takes_images(_header("llama", ("v.blk.0.attn_q.weight",), **GEMMA3_VISION))
    assert not gguf.takes_images(_header("mamba"))


def _vision_config(header: gguf.Header) -> dict:
    return gguf.vision_config(header, gguf.model_config(header))


def test_gemma3_vision_config_reads_the_image_tokens():
    header = _gemma3_vision()
    cfg = _vision_config(header)
    assert (cfg["image_token_index"], cfg["hidden_size"], cfg["text_config"]["mm_tokens_per_image"]) == (3, 2048, 4)
    assert cfg["text_config"]["rope_global_base_freq"] == 1e6 and "rope_theta" not in cfg["text_config"]
    assert cfg["processor"]["image_size"] == 56 and cfg["processor"]["image_mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(BadRequest, match=r"image_size 56, patch_size 14, mm.tokens_per_image 9"):
        gguf.vision_config(_gemma3_vision(**{"mm.tokens_per_image": 9}), gguf.model_config(header))
    with pytest.raises(Unsupported, match="lacks gemma3's image tokens \\(<image_soft_token>\\)"):
        gguf.vision_config(_gemma3_vision(tokens=IMAGE_TOKENS[:3]), gguf.model_config(header))
    with pytest.raises(Unsupported, match="carries no vision tower"):
        gguf.vision_config(_header("gemma3"), gguf.model_config(header))


QWEN25VL = {"embedding_length": 3584, "attention.head_count": 28, "attention.head_count_kv": 4,
            "feed_forward_length": 18944, "block_count": 28, "rope.freq_base": 1e6, "rope.mrope_section": [16, 24, 24],
            "vision.block_count": 32, "vision.embedding_length": 1280, "vision.attention.head_count": 16,
            "vision.num_channels": 3, "vision.patch_size": 14, "vision.spatial_merge_size": 2,
            "vision.spatial_patch_size": 14, "vision.window_size": 112, "vision.attention.layer_norm_epsilon": 1e-6,
            "vision.rope.freq_base": 1e4, "vision.fullatt_block_indexes": [7, 15, 23, 31],
            "vision.temporal_patch_size": 2}
QWEN_TOKENS = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
               "<|video_pad|>"]


def _qwen25vl(tokens=QWEN_TOKENS, gate=(3420, 1280), **keys) -> gguf.Header:
    """Qwen2.5-VL-7B's metadata as Ollama's converter writes it; the tower's MLP width is only
    in v.blk.0.ffn_gate's shape (GGUF order: innermost first)."""
    header = _header("qwen25vl", (), **{**QWEN25VL, **keys})
    tensors = (gguf.TensorInfo("v.blk.0.ffn_gate.weight", tuple(reversed(gate)), 0, 0),
               gguf.TensorInfo("blk.0.attn_q.weight", (3584, 3584), 0, 0))
    return gguf.Header(header.path, 3, {**header.metadata, "tokenizer.ggml.tokens": [*tokens, *"abc"]}, tensors)


def test_qwen25vl_text_runs_on_mlx_lms_qwen2():
    cfg = gguf.model_config(_qwen25vl())
    assert (cfg["model_type"], cfg["rope_theta"], cfg["hidden_size"], cfg["num_key_value_heads"]) == \
        ("qwen2", 1e6, 3584, 4)
    assert "rope_scaling" not in cfg and archs.get("qwen25vl").reads("blk.0.attn_q.weight")
    assert not archs.get("qwen25vl").reads("v.blk.0.attn_q.weight")
    assert gguf.map_name("blk.0.attn_q.bias", "qwen25vl") == "model.layers.0.self_attn.q_proj.bias"


def test_qwen25vl_tower_names_and_pieces_map_onto_mlx_vlms_qwen2_5_vl():
    """convert_qwen25vl.go's names back to mlx-vlm's; q/k/v and the two patch halves name the one
    parameter they were cut from, and say where they go in it."""
    vision = archs.get("qwen25vl").vision
    assert {n: vision.map_name(n) for n in (
        "v.blk.3.attn_q.weight", "v.blk.3.attn_v.bias", "v.blk.3.attn_out.weight", "v.blk.3.ffn_gate.weight",
        "v.blk.3.ffn_down.bias", "v.blk.3.ln1.weight", "v.blk.3.ln2.weight", "v.patch_embd_0.weight",
        "v.patch_embd_1.weight", "v.merger.ln_q.weight", "v.merger.mlp.0.weight", "v.merger.mlp.2.bias")} == {
        "v.blk.3.attn_q.weight": "vision_tower.blocks.3.attn.qkv.weight",
        "v.blk.3.attn_v.bias": "vision_tower.blocks.3.attn.qkv.bias",
        "v.blk.3.attn_out.weight": "vision_tower.blocks.3.attn.proj.weight",
        "v.blk.3.ffn_gate.weight": "vision_tower.blocks.3.mlp.gate_proj.weight",
        "v.blk.3.ffn_down.bias": "vision_tower.blocks.3.mlp.down_proj.bias",
        "v.blk.3.ln1.weight": "vision_tower.blocks.3.norm1.weight",
        "v.blk.3.ln2.weight": "vision_tower.blocks.3.norm2.weight",
        "v.patch_embd_0.weight": "vision_tower.patch_embed.proj.weight",
        "v.patch_embd_1.weight": "vision_tower.patch_embed.proj.weight",
        "v.merger.ln_q.weight": "vision_tower.merger.ln_q.weight",
        "v.merger.mlp.0.weight": "vision_tower.merger.mlp.0.weight",
        "v.merger.mlp.2.bias": "vision_tower.merger.mlp.2.bias"}
    assert [vision.piece(f"v.blk.0.attn_{p}.weight") for p in "qkv"] == [archs.Piece(i, 3) for i in range(3)]
    assert vision.piece("v.patch_embd_1.weight") == archs.Piece(1, 2, axis=1, stack=True)
    assert vision.piece("v.blk.0.attn_out.weight") is None and vision.piece("v.merger.mlp.0.weight") is None
    for bad in ("v.blk.0.attn.qkv.weight", "v.patch_embd.weight", "mm.0.weight"):   # llama.cpp's mmproj names
        with pytest.raises(Unsupported, match=f"{bad!r} has no mlx-vlm equivalent in qwen2.5-vl"):
            vision.map_name(bad)


def test_a_qwen25vl_file_takes_images_when_it_carries_the_tower():
    assert gguf.takes_images(_qwen25vl())
    assert not gguf.takes_images(_header("qwen25vl", ("v.blk.0.ffn_gate.weight",)))   # no vision.block_count
    assert not gguf.takes_images(_header("qwen25vl", ("blk.0.attn_q.weight",), **QWEN25VL))  # no tower tensors


@pytest.mark.parametrize(("header", "tower"), [
    (_gemma3_vision, {"model_type": "siglip_vision_model", "image_size": 56, "patch_size": 14,
                      "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                      "num_channels": 3, "layer_norm_eps": 1e-6}),
    # qwen25vl's MLP width is read from v.blk.0.ffn_gate's shape
    (_qwen25vl, {"model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                 "out_hidden_size": 3584, "num_heads": 16, "patch_size": 14, "spatial_patch_size": 14,
                 "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                 "fullatt_block_indexes": [7, 15, 23, 31], "in_channels": 3}),
], ids=["gemma3", "qwen25vl"])
def test_vision_config_reads_the_tower(header, tower):
    assert _vision_config(header())["vision_config"] == tower


def test_qwen25vl_vision_config_reads_the_text_keys_and_the_image_tokens():
    cfg = _vision_config(_qwen25vl())
    # mlx-vlm's qwen2_5_vl reads its text keys at the top level
    assert (cfg["model_type"], cfg["hidden_size"], cfg["rope_theta"], cfg["text_config"]["model_type"]) == \
        ("qwen2_5_vl", 3584, 1e6, "qwen2_5_vl")
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [16, 24, 24]} and "head_dim" not in cfg
    assert (cfg["image_token_id"], cfg["vision_start_token_id"], cfg["vision_end_token_id"],
            cfg["video_token_id"], cfg["vision_token_id"]) == (4, 1, 2, 5, 3)
    processor = cfg["processor"]
    assert (processor["min_pixels"], processor["max_pixels"], processor["merge_size"]) == (3136, 2 << 20, 2)
    assert processor["marker"] == "<|vision_start|><|image_pad|><|vision_end|>"
    # llama.cpp pads the sections to four with a zero; Ollama's fields its runner defaults
    padded = _qwen25vl(**{"rope.mrope_section": [16, 24, 24, 0], "vision.num_channels": 0})
    cfg = _vision_config(padded)
    assert cfg["rope_scaling"]["mrope_section"] == [16, 24, 24] and cfg["vision_config"]["in_channels"] == 3
    # the video and vision-pad tokens images never use may be absent: no id is theirs then
    without = _qwen25vl(tokens=[t for t in QWEN_TOKENS if t not in ("<|video_pad|>", "<|vision_pad|>")])
    cfg = _vision_config(without)
    assert (cfg["image_token_id"], cfg["video_token_id"], cfg["vision_token_id"]) == (3, -1, -1)


def test_qwen25vl_vision_what_mlx_vlm_cannot_run_is_refused_by_name():
    def config(**kw):
        return _vision_config(_qwen25vl(**kw))

    with pytest.raises(BadRequest, match="lacks qwen25vl.rope.mrope_section"):
        config(**{"rope.mrope_section": None})
    with pytest.raises(BadRequest, match=r"mrope_section \[16, 24, 20\] does not split the 64 rotary"):
        config(**{"rope.mrope_section": [16, 24, 20]})
    with pytest.raises(Unsupported, match="vision RMS epsilon 1e-05 and RoPE base 10000: mlx-vlm's qwen2_5_vl"):
        config(**{"vision.attention.layer_norm_epsilon": 1e-5})
    with pytest.raises(Unsupported, match="temporal_patch_size 3"):
        config(**{"vision.temporal_patch_size": 3})
    with pytest.raises(Unsupported, match=r"lacks qwen2.5-vl's image tokens \(<\|image_pad\|>\)"):
        config(tokens=[t for t in QWEN_TOKENS if t != "<|image_pad|>"])
    with pytest.raises(Unsupported, match="head size 64 \\(not width / heads\\)"):
        config(**{"attention.key_length": 64})
    with pytest.raises(Unsupported, match="RoPE scaling 'yarn'"):
        config(**{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})
    with pytest.raises(BadRequest, match="MLP width unknown"):
        config(gate=(0, 1280))
    with pytest.raises(BadRequest, match="max_pixels 100, MLP width 3420"):     # Ollama's 56x56 minimum
        config(**{"vision.max_pixels": 100})
    with pytest.raises(BadRequest, match="embedding_length 1280, attention.head_count 7"):
        config(**{"vision.attention.head_count": 7})
    with pytest.raises(BadRequest, match="metadata holds qwen25vl vision dimensions of the wrong type"):
        config(**{"vision.fullatt_block_indexes": "all"})
