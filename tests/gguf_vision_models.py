"""A tiny random gemma3 GGUF that carries its vision tower inline, written as Ollama's
converter writes the library's gemma3 files, and the same network as mlx-vlm's own model.

`make_gemma3_gguf(root, qtype, seed)` builds mlx-vlm's gemma3 `Model` (6 text layers of width
64, a 2-layer SigLIP tower of width 32 over 56x56 images in 14x14 patches, 4 tokens per
image: a 4x4 patch grid pooled 2x2) with random weights, then writes it the way Ollama's
convert_gemma3.go does, independently of our loader's map:
  - names: the Hugging Face names (mlx-vlm keeps them) through convert_gemma3.go's replacement
    list, applied as Go's `strings.NewReplacer` applies it (one pass, first match in argument
    order), so `vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight` becomes
    `v.blk.0.attn_q.weight` and `multi_modal_projector.mm_input_projection_weight`
    `mm.mm_input_projection.weight`;
  - values: 1 added to every `*_norm.weight` outside `v.` (text norms and the projector's),
    the patch embedding in torch's conv layout [out, in, kH, kW], no output.weight (tied);
  - metadata: the keys its multimodal branch writes (`gemma3.vision.*`, `gemma3.mm.tokens_per_image`,
    no RMS epsilon, RoPE bases or window pattern: the readers' defaults apply) and the
    tokenizer's (a small BPE vocabulary with gemma3's specials and image tokens), plus a
    jinja chat template that places `{"type": "image"}` parts as gemma3's does;
  - types: F32, or Q8_0 for every 2-D weight whose rows split into 32-blocks (text and vision
    linears, the embedding, the projection), the reference then holding the dequantized values.
`VisionGGUF.reference` is the mlx-vlm model holding exactly what the file holds. The other
vision families' builders (`gguf_qwen25vl_models`, `st_gemma3_models`) share `VisionGGUF`,
`go_replace`, `bpe_metadata`, `gguf_metadata`, `mlx_vlm_model`, `f32_and_q8_0` and
`import_with_template` from here.
`GO_TEMPLATE` is Ollama's gemma3 template layer. Fixtures: `gemma3_vision_files` (F32 and
Q8_0, once per session), `gemma3_vision_model` (the F32 file imported with Ollama's template
layer, as `pull gemma3` stores it; returns its name). mlx-vlm is the optional extra: without
it these fixtures skip.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import tiny_models
from tests.tiny_models import quantize_rows, write_gguf
from tests.vision_models import need_mlx_vlm

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
            "<end_of_image>", "<image_soft_token>"]
TEXT = {"hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16, "max_position_embeddings": 512}
VISION = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2,
          "image_size": 56, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6}
TOKENS_PER_IMAGE = 4
JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Ollama's template/gemma3-instruct.gotmpl, the template layer of its gemma3 models.
GO_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{- if and (eq $i 1) $.System }}
{{ $.System }}
{{ end }}
{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- end }}"""
# convert_gemma3.go's Replacements(), in its order.
REPLACEMENTS = [
    ("lm_head", "output"), ("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"),
    ("vision_tower.vision_model.embeddings", "v"), ("vision_tower.vision_model", "v"),
    ("vision_model.vision_model.embeddings", "v"), ("vision_model.vision_model", "v"), ("language_model.", ""),
    ("model.layers", "blk"), ("encoder.layers", "blk"), ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.k_norm", "attn_k_norm"), ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
    ("self_attn.out_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down"),
    ("mlp.up_proj", "ffn_up"), ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
    ("input_projection_weight", "input_projection.weight"), ("multi_modal_projector", "mm"),
]


def go_replace(name: str, pairs: list[tuple[str, str]] | None = None) -> str:
    """Go's strings.NewReplacer(pairs...).Replace (default: gemma3's REPLACEMENTS): one
    left-to-right pass, at each position the first pair (in argument order) whose old string
    starts there."""
    out, i = [], 0
    while i < len(name):
        hit = next(((old, new) for old, new in pairs or REPLACEMENTS if name.startswith(old, i)), None)
        if hit:
            out.append(hit[1])
            i += len(hit[0])
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def build_tokenizer():
    return tiny_models.build_tokenizer(SPECIALS)


def bpe_metadata(tok, specials: list[str], pre: str, template: str, ids: dict[str, str],
                 **flags: bool) -> dict:
    """The tokenizer's GGUF keys for the tests' BPE `tok` (shared by the vision families): its
    tokens in id order, `specials` typed control, its merges, pre-tokenizer `pre` and chat
    `template`; `ids` names the special tokens' keys (`bos` -> `tokenizer.ggml.bos_token_id`),
    `flags` the booleans (`add_bos_token`)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.to_str())["model"]["merges"]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in merges],
        **{f"tokenizer.ggml.{key}_token_id": vocab[token] for key, token in ids.items()},
        **{f"tokenizer.ggml.{key}": value for key, value in flags.items()},
        "tokenizer.chat_template": template,
    }


def tokenizer_metadata(tok) -> dict:
    return bpe_metadata(tok, SPECIALS, "default", JINJA, {"bos": "<bos>", "eos": "<eos>", "eot": "<end_of_turn>",
                                                          "padding": "<pad>", "unknown": "<unk>"},
                        add_bos_token=True, add_eos_token=False)


def mlx_vlm_model(family: str, cfg: dict) -> Any:
    """mlx-vlm's `family` Model (its module under mlx_vlm.models) for the config dict `cfg`."""
    models = importlib.import_module(f"mlx_vlm.models.{family}")
    cfg = json.loads(json.dumps(cfg))       # from_dict keeps our dicts: a copy of their own
    config = models.ModelConfig.from_dict(cfg)
    config.text_config = models.TextConfig.from_dict(cfg["text_config"])
    config.vision_config = models.VisionConfig.from_dict(cfg["vision_config"])
    return models.Model(config)


def import_with_template(store, path: Path, name: str, template: str) -> str:
    """The GGUF at `path` in the store as `name` with a Go template layer, as a pull of Ollama's
    library stores a model (the file's own jinja template is then not used); returns `name`."""
    from mlxlite import names
    from mlxlite.store import MEDIA_OLLAMA_TEMPLATE
    from mlxlite.store.importers import import_gguf

    import_gguf(store, path, names.parse(name), extra=((MEDIA_OLLAMA_TEMPLATE, template.encode()),))
    return name


def reference_config(vocab: int, image_token: int) -> dict:
    """mlx-vlm's gemma3 config for what the file's metadata states (and the readers' defaults
    for what Ollama's converter leaves out)."""
    return {
        "model_type": "gemma3", "hidden_size": TEXT["hidden_size"], "vocab_size": vocab,
        "image_token_index": image_token, "pad_token_id": 0,
        "text_config": {"model_type": "gemma3_text", **TEXT, "vocab_size": vocab, "rms_norm_eps": 1e-6,
                        "rope_global_base_freq": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": None,
                        "query_pre_attn_scalar": TEXT["head_dim"], "sliding_window_pattern": 6,
                        "mm_tokens_per_image": TOKENS_PER_IMAGE},
        "vision_config": {"model_type": "siglip_vision_model", **VISION},
    }


@dataclass
class VisionGGUF:
    path: Path
    reference: Any          # mlx-vlm's Model of the family holding the file's values (float32)
    tokenizer: Any          # the `tokenizers.Tokenizer` the file's vocabulary came from
    tensors: dict[str, str]  # GGUF name -> GGML type written


def gguf_metadata(arch: str, qtype: str, text: dict, keys: dict) -> dict:
    """A vision family's GGUF metadata but the tokenizer's: the general keys, the text model's
    standard keys from its mlx-vlm config `text`, and the family's `keys`, all under `arch.`."""
    standard = {"block_count": text["num_hidden_layers"], "context_length": text["max_position_embeddings"],
                "embedding_length": text["hidden_size"], "feed_forward_length": text["intermediate_size"],
                "attention.head_count": text["num_attention_heads"],
                "attention.head_count_kv": text["num_key_value_heads"]}
    return {"general.architecture": arch, "general.file_type": 7 if qtype == "Q8_0" else 0,
            "general.quantization_version": 2, **{f"{arch}.{k}": v for k, v in {**standard, **keys}.items()}}


def _metadata(tok, qtype: str) -> dict:
    t, v = TEXT, VISION
    return {
        **gguf_metadata("gemma3", qtype, t, {
            "attention.sliding_window": t["sliding_window"],
            "attention.key_length": t["head_dim"], "attention.value_length": t["head_dim"],
            "vision.block_count": v["num_hidden_layers"], "vision.embedding_length": v["hidden_size"],
            "vision.feed_forward_length": v["intermediate_size"], "vision.image_size": v["image_size"],
            "vision.patch_size": v["patch_size"], "vision.num_channels": v["num_channels"],
            "vision.attention.head_count": v["num_attention_heads"],
            "vision.attention.layer_norm_epsilon": v["layer_norm_eps"], "mm.tokens_per_image": TOKENS_PER_IMAGE}),
        **tokenizer_metadata(tok),
    }


def random_weights(model: Any, seed: int) -> dict[str, np.ndarray]:
    """Random float32 values for every parameter of mlx-vlm's gemma3 `model` under its names
    and layouts, but the tied head (gemma3 checkpoints have no lm_head)."""
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    held: dict[str, np.ndarray] = {}
    for name, p in tree_flatten(model.parameters()):
        shape = p.shape
        if name.startswith("language_model.lm_head"):
            continue
        if "norm" in name and name.endswith("weight") and "vision_tower" not in name:
            w = 0.2 * rng.standard_normal(shape)                # gemma's RMSNorm scales by 1 + w
        elif name.endswith("bias") or "norm" in name:
            w = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) * (0.5 if "embed" in name else 0.2)
        held[name] = w.astype(np.float32)
    return held


def make_gemma3_gguf(root: Path, qtype: str = "F32", seed: int = 0) -> VisionGGUF:
    import mlx.core as mx

    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    model = mlx_vlm_model("gemma3", reference_config(vocab, tok.token_to_id("<image_soft_token>")))
    held = random_weights(model, seed)
    tensors, kinds = [], {}
    for name, w in held.items():
        gname = go_replace(name)
        stored = w
        if gname == "v.patch_embedding.weight":
            stored = w.transpose(0, 3, 1, 2)                    # MLX [O, kH, kW, C] -> torch [O, C, kH, kW]
        if not gname.startswith("v.") and gname.endswith("_norm.weight"):
            stored = w + np.float32(1.0)                        # convert_gemma's addOne
        stored = np.ascontiguousarray(stored, dtype=np.float32)
        quantize = (qtype == "Q8_0" and stored.ndim == 2 and stored.shape[-1] % 32 == 0
                    and gname.endswith("weight") and "position_embedding" not in gname)
        if quantize:
            data, back = quantize_rows(stored, "Q8_0")
            held[name] = back                                   # a linear: no transform to undo
            kind = "Q8_0"
        else:
            data, kind = stored.tobytes(), "F32"
        tensors.append((gname, stored.shape, kind, data))
        kinds[gname] = kind
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"tiny-gemma3-vision-{qtype}.gguf"
    write_gguf(path, _metadata(tok, qtype), tensors)
    held["language_model.lm_head.weight"] = held["language_model.model.embed_tokens.weight"]
    model.load_weights([(k, mx.array(v)) for k, v in held.items()], strict=True)
    mx.eval(model.parameters())
    return VisionGGUF(path, model, tok, kinds)


def reference_pixels(image_bytes: bytes) -> np.ndarray:
    """[1, 3, size, size] pixels as Ollama's gemma3 preprocesses an image: RGB, a bilinear
    resize to the square, scaled to [0, 1], mean = std = 0.5 (Pillow's resize here)."""
    import io

    from PIL import Image

    size = VISION["image_size"]
    with Image.open(io.BytesIO(image_bytes)) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)[None]


def image_text(tok) -> str:
    """What one image becomes in the prompt's text (Gemma3Processor's `full_image_sequence`,
    Ollama's PostTokenize)."""
    return "\n\n<start_of_image>" + "<image_soft_token>" * TOKENS_PER_IMAGE + "<end_of_image>\n\n"


def reference_logits(built: VisionGGUF, ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
    """mlx-vlm's own forward pass (embeddings with the image merged, then its text model)."""
    import mlx.core as mx

    model = built.reference
    arr = mx.array(ids)[None]
    features = model.get_input_embeddings(arr, None if pixels is None else mx.array(pixels),
                                          mask=mx.ones_like(arr))
    logits = model.language_model(arr, inputs_embeds=features.inputs_embeds).logits
    return np.array(logits[0].astype(mx.float32))


def f32_and_q8_0(tmp_path_factory, folder: str, make: Callable[[Path, str], VisionGGUF]) -> dict[str, VisionGGUF]:
    """A family's F32 and Q8_0 files (`make(root, qtype)`), in a session folder; skips without
    mlx-vlm, which builds the reference."""
    need_mlx_vlm()
    root = tmp_path_factory.mktemp(folder)
    return {q: make(root, q) for q in ("F32", "Q8_0")}


@pytest.fixture(scope="session")
def gemma3_vision_files(tmp_path_factory) -> dict[str, VisionGGUF]:
    return f32_and_q8_0(tmp_path_factory, "gemma3-vision", make_gemma3_gguf)


@pytest.fixture
def gemma3_vision_model(store, gemma3_vision_files) -> str:
    """The F32 file in the store with Ollama's gemma3 template layer, as a pull of Ollama's
    gemma3 stores it (the file's own jinja template is then not used)."""
    return import_with_template(store, gemma3_vision_files["F32"].path, "tiny-gemma3-vl", GO_TEMPLATE)
