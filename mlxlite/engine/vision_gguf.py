"""A GGUF that carries its vision tower inline (Ollama's gemma3 and qwen25vl) -> a
`vision.VisionLM` on mlx-vlm's model of the family, on MLX. Used by `model.load` when mlx-vlm
is installed.

Contract: `load(path, header, *, on_cpu, float32, budget)` returns what `gguf.load_gguf` does
(`(model, tokenizer, spec, header, config)`, config the text model's mlx-lm dict with the same
`_dequantized`/`_share`/`_tensors` keys), the model a `VisionLM` (marker: what the family's
template writes per image). The family's `archs.Vision` says where each tensor goes: the text
model's under `Vision.text` through the family's own map (its norm offset undone as the text
path does), the tower's and projector's through `Vision.map_name` (offsets, torch's conv
layout and the bare parameters that must be floats, as it declares; the pieces a converter cut
out of one parameter, `archs.Piece`, joined back: packed pieces of one type stay packed, pieces
of mixed types are read as floats). Packed tensors stay packed (MLX affine, group 32) in the
modules that can hold them, unless `float32` fits the budget, as for any GGUF; a tied output
shares the embedding's arrays where mlx-vlm's model has a head of its own. The processor is
built here, never downloaded: transformers' fast tokenizer over a copy of the GGUF's own (so
image prompts tokenize as text prompts do) and the family's image processor set from the
metadata.
mlx-vlm (the optional extra) is imported here only, at load. Never imports the scheduler, the
server or `model.py` (which imports this).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxlite.engine import quants
from mlxlite.engine.gguf import GGUFTokenizer, load_into, load_report
from mlxlite.engine.vision import INSTALL, VisionLM, naming_special_tokens
from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats import archs, gguf


def load(path: Path, header: gguf.Header, *, on_cpu: bool, float32: bool,
         budget: int) -> tuple[VisionLM, GGUFTokenizer, gguf.TokenizerSpec, gguf.Header, dict]:
    """See module doc."""
    text = gguf.model_config(header)    # Unsupported names the architecture / type
    vision = gguf.vision_of(header)
    if vision is None:
        raise Unsupported(f"{header.path}: GGUF {header.architecture} file carries no vision tower")
    embedding = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if embedding is not None and len(embedding.shape) == 2:
        text["vocab_size"] = int(embedding.shape[1])    # rows: a padded table can outnumber the tokens
    cfg = gguf.vision_config(header, text)
    settings = cfg.pop("processor")
    image_id = cfg.get("image_token_index", cfg.get("image_token_id"))     # gemma3's key, qwen2_5_vl's
    if image_id >= text["vocab_size"]:     # its embedding is looked up before the image replaces it
        raise Unsupported(f"{header.path}: the image token's id {image_id} is past the "
                          f"{text['vocab_size']}-row embedding table")
    spec = gguf.build_tokenizer(header.metadata)
    tokenizer = GGUFTokenizer(spec)
    dequantize = float32 and quants.float32_bytes(header) <= budget
    report: dict = {}
    weights = read_weights(path, header, vision, dequantize=dequantize, on_cpu=on_cpu, report=report)
    vlm = build(cfg, weights, dequantize=dequantize, on_cpu=on_cpu, text=vision.text)
    processor = PROCESSORS[vision.model_type](settings, tokenizer, spec)
    text.update(_dequantized=dequantize, _share=None, _tensors=load_report(report))
    return VisionLM(vlm, processor, marker=settings["marker"]), tokenizer, spec, header, text


def read_weights(path: Path, header: gguf.Header, vision: archs.Vision, *, dequantize: bool, on_cpu: bool,
                 report: dict | None = None) -> dict[str, mx.array]:
    """Every tensor under mlx-vlm's names, read one at a time (`quants.read_tensor`), the pieces
    of one parameter joined once all have been read."""
    arch = gguf.family(header)
    if arch.permute_qk or arch.rope_factors or arch.rope_freqs or arch.mla_kv_b:
        raise Unsupported(f"GGUF {header.architecture}: its vision tower does not load with its text quirks")
    embed = f"{vision.text}model.embed_tokens"
    as_floats = _mixed_pieces(header, vision)
    pending: dict[str, list[quants.Tensor | None]] = {}
    weights: dict[str, mx.array] = {}
    for info in header.tensors:
        tower = info.name.startswith(vision.prefixes)
        name = vision.map_name(info.name) if tower else vision.text + arch.map_name(info.name)
        prefix = name.rpartition(".")[0]
        piece = vision.piece(info.name) if tower else None
        dense = name in vision.dense or name in as_floats
        try:
            t = quants.read_tensor(path, info, header.data_offset, dequantize=dequantize or dense,
                                   float_dtype=mx.float32 if on_cpu else mx.float16,
                                   # an embedding's scales set its output dtype (float16 is slow on CPU)
                                   scale_dtype=mx.float32 if on_cpu and prefix == embed else mx.float16)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"cannot load GGUF tensor {info.name!r} from {path.name}: {exc}") from None
        if report is not None:
            report[info.name] = replace(t, weight=None, scales=None, biases=None)
        shifted = info.name in vision.norm_offset if tower else name.endswith("norm.weight")
        if shifted and arch.norm_offset:    # norms are float vectors in every GGUF, never packed
            t.weight = t.weight.astype(mx.float32) - arch.norm_offset
        if name in vision.conv:
            t.weight = t.weight.transpose(0, 2, 3, 1)
        if piece is not None:
            parts = pending.setdefault(name, [None] * piece.count)
            parts[piece.index] = t
            if any(p is None for p in parts):
                continue
            t = _join(pending.pop(name), piece)
        weights.update(t.arrays(prefix) if t.scales is not None else {name: t.weight})
    if pending:
        name, parts = next(iter(pending.items()))
        raise Unsupported(f"{path.name}: {name} is cut into {len(parts)} GGUF tensors and only "
                          f"{sum(p is not None for p in parts)} of them are in the file")
    return weights


def _mixed_pieces(header: gguf.Header, vision: archs.Vision) -> set[str]:
    """mlx-vlm names whose pieces must be read as floats to be joined: pieces of different GGML
    types (their packings differ), or joined along another axis than the rows."""
    types: dict[str, set[int]] = {}
    out = set()
    for info in header.tensors:
        piece = vision.piece(info.name) if info.name.startswith(vision.prefixes) else None
        if piece is not None:
            name = vision.map_name(info.name)
            types.setdefault(name, set()).add(info.type)
            if piece.axis or piece.stack:
                out.add(name)
    return out | {name for name, kinds in types.items() if len(kinds) > 1}


def _join(parts: list[quants.Tensor], piece: archs.Piece) -> quants.Tensor:
    """One parameter from its pieces: packed ones (one type, rows) joined packed, floats joined."""
    first = parts[0]
    if first.scales is not None:    # packed rows: words, scales and biases are each per row
        biases = None if first.biases is None else mx.concatenate([p.biases for p in parts])
        return replace(first, weight=mx.concatenate([p.weight for p in parts]),
                       scales=mx.concatenate([p.scales for p in parts]), biases=biases)
    arrays = [mx.expand_dims(p.weight, piece.axis) if piece.stack else p.weight for p in parts]
    return replace(first, weight=mx.concatenate(arrays, axis=piece.axis))


def _mlx_vlm(model_type: str) -> Any:
    try:    # lazy: the optional extra, seconds to import (transformers); the caller checked it is there
        return importlib.import_module(f"mlx_vlm.models.{model_type}")
    except ImportError:
        raise Unsupported(f"GGUF vision models need mlx-vlm: {INSTALL}") from None


def build(cfg: dict, weights: dict[str, mx.array], *, dequantize: bool, on_cpu: bool,
          text: str = "language_model.") -> Any:
    """mlx-vlm's model of `cfg["model_type"]` holding `weights` (packed modules quantized in it);
    `text`: where its language model's names start."""
    module = _mlx_vlm(cfg["model_type"])
    config = module.ModelConfig.from_dict(cfg)
    config.text_config = module.TextConfig.from_dict(cfg["text_config"])
    config.vision_config = module.VisionConfig.from_dict(cfg["vision_config"])
    model = module.Model(config)
    head, embed = f"{text}lm_head", f"{text}model.embed_tokens"
    if f"{head}.weight" not in weights and "lm_head" in model[text.rstrip(".")]:
        # tied (no output.weight) where mlx-vlm's text model has a head of its own (gemma3's):
        # the embedding's arrays, shared; a model that reads the embedding (tied qwen2_5_vl) gets none
        for part in ("weight", "scales", "biases"):
            if f"{embed}.{part}" in weights:
                weights[f"{head}.{part}"] = weights[f"{embed}.{part}"]
    load_into(model, model, "", weights, cfg, dequantize=dequantize, on_cpu=on_cpu)
    mx.eval(model.parameters())
    return model


def _text_tokenizer(tokenizer: GGUFTokenizer, spec: gguf.TokenizerSpec, tokens: dict[str, str]) -> Any:
    """transformers' fast tokenizer over a copy of the GGUF's (transformers sets padding on the
    one it wraps), the family's image tokens named."""
    # lazy: transformers (mlx-vlm's dependency), seconds to import
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos_token, eos_token=spec.eos_token,
                                   unk_token=spec.unk_token, pad_token=spec.pad_token or spec.eos_token,
                                   extra_special_tokens=tokens)


def gemma3_processor(settings: dict, tokenizer: GGUFTokenizer, spec: gguf.TokenizerSpec) -> Any:
    """mlx-vlm's Gemma3Processor over transformers' Gemma3 image processor (PIL), set up as
    Ollama's runner preprocesses (a square of image_size, bilinear, mean = std = 0.5, no
    pan-and-scan), and the GGUF's tokenizer with gemma3's image tokens named."""
    # lazy: the optional extra and transformers (mlx-vlm's dependency), seconds to import
    from mlx_vlm.models.gemma3.processing_gemma3 import Gemma3Processor
    from PIL import Image

    try:    # transformers 5 names the PIL one apart (its default needs torchvision)
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil as ImageProcessor,
        )
    except ImportError:
        from transformers import Gemma3ImageProcessor as ImageProcessor

    size = settings["image_size"]
    images = ImageProcessor(size={"height": size, "width": size}, resample=Image.Resampling.BILINEAR,
                            image_mean=settings["image_mean"], image_std=settings["image_std"], do_resize=True,
                            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                            do_pan_and_scan=False)
    # naming add_special_tokens: a template that writes BOS itself gets none added
    return naming_special_tokens(Gemma3Processor(image_processor=images,
                                                 tokenizer=_text_tokenizer(tokenizer, spec, settings["tokens"]),
                                                 image_seq_length=settings["image_seq_length"]))


def qwen2_5_vl_processor(settings: dict, tokenizer: GGUFTokenizer, spec: gguf.TokenizerSpec) -> Any:
    """mlx-vlm's Qwen2_5_VLProcessor over transformers' Qwen2-VL image processor (PIL), set up as
    Ollama's runner preprocesses (sides to multiples of patch x merge between min and max
    pixels, bilinear, CLIP's mean/std, each patch repeated over the two temporal frames), and
    the GGUF's tokenizer with the image tokens named."""
    # lazy: the optional extra and transformers (mlx-vlm's dependency), seconds to import
    from mlx_vlm.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from PIL import Image

    try:    # transformers 5 names the PIL one apart (its default needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor,
        )
    except ImportError:
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    images = ImageProcessor(min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"],
                            patch_size=settings["patch_size"], merge_size=settings["merge_size"],
                            temporal_patch_size=settings["temporal_patch_size"], resample=Image.Resampling.BILINEAR,
                            image_mean=settings["image_mean"], image_std=settings["image_std"], do_resize=True,
                            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    return naming_special_tokens(Qwen2_5_VLProcessor(image_processor=images,
                                                     tokenizer=_text_tokenizer(tokenizer, spec, settings["tokens"])))


# mlx-vlm model type -> its processor from the GGUF
PROCESSORS = {"gemma3": gemma3_processor, "qwen2_5_vl": qwen2_5_vl_processor}
