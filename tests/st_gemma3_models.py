"""A tiny random gemma3 vision model DIRECTORY as mlx-community ships its gemma-3-*-it (safetensors
through mlx-vlm), the same network shape as the GGUF one of `tests/gguf_vision_models.py`.

`make_gemma3_dir(root, seed)` builds mlx-vlm's gemma3 `Model` at that file's shape (6 text layers
of width 64, a 2-layer SigLIP tower of width 32 over 56x56 images, 4 tokens per image) with its
random values (`random_weights`), and writes what mlx-vlm's convert writes from Google's checkpoint:
  - config.json in transformers' Gemma3Config layout: `boi_token_index`, `eoi_token_index`,
    `image_token_index`, `mm_tokens_per_image`, eos ids, `text_config`, `vision_config`, and no
    top-level `hidden_size` (Google's states none; mlx-vlm's config class defaults it to 2048).
    The text config states every size the small shape needs (Google's leave most to defaults),
    `mm_tokens_per_image` too: mlx-vlm reads it there, defaulting to the real models' 256;
  - model.safetensors under mlx-vlm's names (the patch embedding in MLX's layout, no lm_head: tied);
  - tokenizer.json: a Gemma-style BPE (spaces as `▁`, `<0xNN>` byte fallback) with gemma3's specials
    and image tokens; tokenizer_config.json as Gemma 3's (`GemmaTokenizer`, `add_bos_token`, the
    boi/eoi/image tokens, Gemma 3's chat template, which writes `<bos>` and places an image part as
    `<start_of_image>`);
  - preprocessor_config.json (Gemma3ImageProcessor: 56x56 square, bilinear, mean = std = 0.5) and
    processor_config.json (Gemma3Processor, `image_seq_length`).
`quantize_dir(src, dst)` runs mlx-vlm's own convert at 4 bits, group 64, as mlx-community's -4bit
are made (text linears and embedding packed; the vision tower and projector kept as they are).
`hf_logits(built, ids, pixels)` is transformers' Gemma3ForConditionalGeneration (torch) on the same
values: the independent word on how image features enter the text model. It runs without
`token_type_ids`, so causally as mlx-vlm does: given them (its processor's default), transformers
lets one image's tokens attend to each other both ways, which neither mlx-vlm nor mlxlite does.
Fixtures: `gemma3_st_dirs` (once per session: {"float": ..., "4bit": ...}), `gemma3_st_model` (the
float directory imported into the test's store; returns its name). mlx-vlm is the optional extra:
without it these fixtures skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.gguf_vision_models import (
    SPECIALS,
    TOKENS_PER_IMAGE,
    VISION,
    mlx_vlm_model,
    random_weights,
    reference_config,
)
from tests.tiny_models import CORPUS
from tests.vision_models import need_mlx_vlm

IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
# Gemma 3's chat template (google/gemma-3-*-it's chat_template).
TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@dataclass
class Gemma3Dir:
    path: Path
    tokenizer: Any          # the `tokenizers.Tokenizer` written to tokenizer.json
    weights: dict           # mlx-vlm name -> float32 values (before any quantization)
    config: dict            # what config.json holds


def build_tokenizer():
    """A Gemma-style BPE trained on the tests' corpus: `▁` for spaces, `<0xNN>` byte fallback
    for what it never saw, gemma3's specials (ids 0..) special, `<bos>` added by its post-processor."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    def pipeline(tok: Tokenizer) -> Tokenizer:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok

    trained = pipeline(Tokenizer(models.BPE(unk_token="<unk>")))
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS,
                                                            show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):    # byte fallback's tokens, plain ones (they print)
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = pipeline(Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    return tok


def make_gemma3_dir(root: Path, seed: int = 0) -> Gemma3Dir:
    import mlx.core as mx

    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ref = reference_config(vocab, ids["<image_soft_token>"])
    weights = random_weights(mlx_vlm_model("gemma3", ref), seed)
    text = {**ref["text_config"], "rope_theta": ref["text_config"]["rope_global_base_freq"],  # transformers' name
            "final_logit_softcapping": None, "attn_logit_softcapping": None}
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": ids["<start_of_image>"], "eoi_token_index": ids["<end_of_image>"],
        "image_token_index": ids["<image_soft_token>"], "mm_tokens_per_image": TOKENS_PER_IMAGE,
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]], "initializer_range": 0.02,
        "text_config": text, "vision_config": {**ref["vision_config"], "vision_use_head": False},
        "torch_dtype": "float32",
    }
    root.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(root / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    (root / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        **IMAGE_TOKENS, "extra_special_tokens": IMAGE_TOKENS, "chat_template": TEMPLATE,
        "model_max_length": 1000000, "processor_class": "Gemma3Processor", "spaces_between_special_tokens": False,
    }, indent=2))
    size = VISION["image_size"]
    (root / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
        "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": TOKENS_PER_IMAGE, "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size}, "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
    }, indent=2))
    (root / "processor_config.json").write_text(json.dumps({"image_seq_length": TOKENS_PER_IMAGE,
                                                            "processor_class": "Gemma3Processor"}))
    return Gemma3Dir(root, tok, weights, config)


def quantize_dir(src: Gemma3Dir, dst: Path) -> Gemma3Dir:
    """mlx-vlm's convert of `src` to 4 bits, group 64 (mlx-community's -4bit)."""
    import contextlib
    import io

    from mlx_vlm.convert import convert

    with contextlib.redirect_stdout(io.StringIO()):     # its progress lines
        convert(str(src.path), mlx_path=str(dst), quantize=True, q_bits=4, q_group_size=64)
    return Gemma3Dir(dst, src.tokenizer, src.weights, json.loads((dst / "config.json").read_text()))


def hf_logits(built: Gemma3Dir, ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
    """transformers' Gemma3ForConditionalGeneration (torch, float32) holding `built`'s values:
    logits for every position, attending causally."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration(Gemma3Config(**json.loads(json.dumps(built.config)))).eval()
    state = {}
    for name, value in built.weights.items():
        if name.endswith("patch_embedding.weight"):
            value = value.transpose(0, 3, 1, 2)                 # MLX [O, kH, kW, C] -> torch [O, C, kH, kW]
        name = name.replace("language_model.model.", "language_model.").replace("vision_model.", "")
        state["model." + name] = torch.from_numpy(value)
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    with torch.no_grad():   # no token_type_ids: causal, as mlx-vlm and we run it (see the module doc)
        out = model(input_ids=torch.tensor([ids]),
                    pixel_values=None if pixels is None else torch.from_numpy(np.ascontiguousarray(pixels)))
    return out.logits[0].float().numpy()


@pytest.fixture(scope="session")
def gemma3_st_dirs(tmp_path_factory) -> dict[str, Gemma3Dir]:
    need_mlx_vlm()
    root = tmp_path_factory.mktemp("gemma3-st")
    built = make_gemma3_dir(root / "gemma-3-tiny-it")
    return {"float": built, "4bit": quantize_dir(built, root / "gemma-3-tiny-it-4bit")}


@pytest.fixture
def gemma3_st_model(store, gemma3_st_dirs) -> str:
    from mlxlite.store.importers import import_path

    import_path(store, gemma3_st_dirs["float"].path, "tiny-gemma3-st")
    return "tiny-gemma3-st"
