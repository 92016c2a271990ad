"""Vision-language models on MLX through mlx-vlm, the optional extra `mlxlite[vision]`.

Owns: recognizing a vision model (`is_vision_config`: its config.json has a
`vision_config`), loading one with mlx-vlm (`load_vlm`; mlx-vlm is imported lazily, on the
first vision model's load: the core never needs it, and it imports transformers and more,
seconds; what mlx-vlm's load leaves wrong for a family is set there: gemma3's image marker and
hidden_size, a processor that drops `add_special_tokens`), `VisionLM` (what the text path
drives: the language model's logits and KV cache), `check_images` (does this loaded model take
images; without mlx-vlm the 400 says how to install it), `image_marker` (the text a template
writes per image where the processor expands it, for a model that names one: gemma3's
`<start_of_image>`, from safetensors or a GGUF's tower, `vision_gguf.py`; an Ollama Go
template's message gets it per image), `vision_tokens` (a rendered
prompt and its images -> token ids with the model's image placeholders expanded, plus the
pixel inputs) and `prefill` (the prompt's
embeddings with the image features merged in, into the KV cache in chunks, cancellable
between them). Images are decoded with Pillow (mlx-vlm's dependency): an image that does
not decode, or has more than `max_image_pixels`, is a `BadRequest`.
mlx-vlm's language models keep per-sequence state (Qwen2-VL's multimodal RoPE deltas), so
a vision model runs one sequence at a time (`results.SerialDecoder`), and `prefill` clears
that state first. Never imports the scheduler, the server or `model.py` (which imports this).
"""

from __future__ import annotations

import inspect
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlite import config
from mlxlite.errors import BadRequest, Unsupported

INSTALL = "pip install 'mlxlite[vision]'"
_STATE = ("_rope_deltas", "_position_ids")     # per-sequence state some language models keep


def is_vision_config(cfg: dict) -> bool:
    """A vision-language model's config.json: Hugging Face's and mlx-vlm's carry `vision_config`."""
    return isinstance(cfg.get("vision_config"), dict)


@dataclass(frozen=True)
class VisionInputs:
    """What `vision_tokens` made for one prompt: pixels and the processor's other arrays
    (Qwen2-VL's `image_grid_thw`, ...), and how many images they hold."""

    pixel_values: Any
    extra: dict = field(default_factory=dict)
    images: int = 0
    placeholder: int = -1           # the image token id, which the prompt holds `placeholders` times
    placeholders: int = 0


def check_placeholders(tokens: list[int], inputs: VisionInputs | None) -> None:
    """The prompt must hold exactly the image tokens its pixels fill (a `context` carried
    over from an earlier image turn holds others): a `BadRequest` at admission, not a failure
    in the middle of the model."""
    if inputs is not None and inputs.placeholder >= 0 and tokens.count(inputs.placeholder) != inputs.placeholders:
        raise BadRequest("the prompt holds image tokens its images do not fill (an earlier image turn's "
                         "context?); send the conversation as messages instead")


class VisionLM(nn.Module):
    """An mlx-vlm model as the text path sees a model: `model(tokens[None], cache=)` gives
    logits, `make_cache()` its language model's KV cache. `vlm` is the whole model."""

    def __init__(self, vlm: Any, processor: Any, marker: str | None = None) -> None:
        super().__init__()
        self.vlm = vlm
        self._processor = [processor]        # a list: nn.Module would treat it as a child
        # What the template writes per image, which the processor expands (gemma3's
        # `<start_of_image>`); None: the processor's `image_token`.
        self.marker = marker

    @property
    def processor(self) -> Any:
        return self._processor[0]

    @property
    def layers(self) -> Any:
        return self.vlm.language_model.layers

    def make_cache(self) -> list[Any]:
        # lazy: mlx-vlm is the optional extra (imported by the load already)
        from mlx_vlm.models.cache import make_prompt_cache

        return make_prompt_cache(self.vlm.language_model)

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        return self.vlm.language_model(inputs, cache=cache).logits


def available() -> bool:
    """Whether mlx-vlm imports (the `vision` extra is installed)."""
    try:
        import mlx_vlm  # noqa: F401  lazy: importing it costs seconds (transformers); only asked on a vision load
    except ImportError:
        return False
    return True


# A family whose template writes one token per image that its processor expands around other
# ones (gemma3's `<start_of_image>` -> `\n\n<start_of_image>` + soft tokens + `<end_of_image>\n\n`):
# the processor attribute naming what the template writes. Others write the processor's `image_token`.
_MARKER = {"gemma3": "boi_token"}


def load_vlm(path: Path, display: str) -> VisionLM:
    """The model directory through mlx-vlm (weights, processor, image processor)."""
    try:
        from mlx_vlm.utils import load as vlm_load  # lazy: the optional extra, seconds to import
    except ImportError:
        raise Unsupported(f"model '{display}' is a vision model and needs mlx-vlm: {INSTALL}") from None
    try:
        vlm, processor = vlm_load(str(path))
    except (ValueError, KeyError, FileNotFoundError, OSError, TypeError) as exc:
        raise Unsupported(f"model '{display}' cannot be loaded by mlx-vlm: {exc}") from None
    model_type = getattr(vlm.config, "model_type", "")
    if model_type == "gemma3":
        # mlx-vlm divides image features by sqrt(config.hidden_size) and its text model multiplies
        # every embedding by sqrt(the text width); Google's config.json has no top-level hidden_size
        # (mlx-vlm's default, 2048, is the width of none of them): the text width, so the features
        # go in unscaled as transformers puts them (the GGUF path's config says the same).
        vlm.config.hidden_size = vlm.config.text_config.hidden_size
    marker = getattr(processor, _MARKER.get(model_type, ""), None)
    return VisionLM(vlm, naming_special_tokens(processor), marker=marker if isinstance(marker, str) else None)


def naming_special_tokens(processor: Any) -> Any:
    """`processor`, its `__call__` naming `add_special_tokens`: mlx-vlm's `prepare_inputs` forwards
    it only to a processor that names it, and one that does not (gemma3's) has its tokenizer add
    BOS before the BOS the template wrote."""
    cls = type(processor)
    if hasattr(processor, "process") or "add_special_tokens" in inspect.signature(cls.__call__).parameters:
        return processor    # mlx-vlm calls `process` where there is one

    class Named(cls):  # type: ignore[valid-type, misc]
        def __call__(self, images: Any = None, text: Any = None, add_special_tokens: bool = True,
                     **kwargs: Any) -> Any:
            return super().__call__(images=images, text=text, add_special_tokens=add_special_tokens, **kwargs)

    Named.__name__ = Named.__qualname__ = cls.__name__
    processor.__class__ = Named
    return processor


def is_vision(loaded: Any) -> bool:
    return isinstance(getattr(loaded, "model", None), VisionLM)


def image_marker(loaded: Any) -> str | None:
    """The text that stands for one image in a prompt, for a model that names one (its template
    layer, an Ollama Go template, cannot place content parts: the marker goes in the message, as
    Ollama puts its `[img-N]` tag), else None."""
    return loaded.model.marker if is_vision(loaded) else None


def check_images(loaded: Any) -> None:
    """A `BadRequest` unless this loaded model takes images."""
    if is_vision(loaded):
        return
    if loaded.info.get("vision") == "missing":
        raise BadRequest(f"model '{loaded.name}' needs mlx-vlm for images: {INSTALL}")
    raise BadRequest(f"model '{loaded.name}' does not support images")


# ---- images -> inputs ---------------------------------------------------------------------
def decode_image(data: bytes, index: int) -> Any:
    """An RGB PIL image, or a `BadRequest` saying why not."""
    from PIL import Image  # lazy: Pillow comes with the vision extra

    limit = int(config.get("max_image_pixels"))
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > limit:
                raise BadRequest(f"image {index} is {width}x{height} pixels, more than the limit of {limit} "
                                 "(max_image_pixels)")
            img.load()      # decodes it all here: a truncated file fails now, not in the processor
            return img.convert("RGB")
    except BadRequest:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"image {index} could not be decoded: {exc}") from None


def vision_tokens(loaded: Any, text: str, images: list[bytes], add_special: bool = False
                  ) -> tuple[list[int], VisionInputs]:
    """Token ids of `text` with each image placeholder expanded to the image's features,
    and the pixel inputs. The template must have placed every image."""
    check_images(loaded)
    from mlx_vlm.utils import prepare_inputs  # lazy: the optional extra (imported by the load already)

    model: VisionLM = loaded.model
    processor = model.processor
    marker = model.marker or getattr(processor, "image_token", None)
    image_id = _image_token_id(model.vlm.config)
    if isinstance(marker, str) and marker and text.count(marker) != len(images):
        raise BadRequest(f"model '{loaded.name}': its template placed {text.count(marker)} of the request's "
                         f"{len(images)} images")
    pictures = [decode_image(data, i) for i, data in enumerate(images)]
    if add_special and getattr(loaded, "bos_token", None) and text.startswith(loaded.bos_token):
        add_special = False     # as `model.tokenize`: a template that wrote BOS gets no second one
    try:
        inputs = prepare_inputs(processor, images=pictures, prompts=[text],
                                image_token_index=image_id,
                                add_special_tokens=add_special)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise BadRequest(f"the images could not be prepared for model '{loaded.name}': {exc}") from None
    ids = inputs["input_ids"]
    tokens = [int(t) for t in (ids[0].tolist() if hasattr(ids, "tolist") else ids[0])]
    extra = {k: v for k, v in inputs.items()
             if k not in ("input_ids", "attention_mask", "pixel_values") and v is not None}
    pad = image_id if isinstance(image_id, int) else -1
    return tokens, VisionInputs(inputs.get("pixel_values"), extra, len(images), pad, tokens.count(pad))


def _image_token_id(cfg: Any) -> int | None:
    """The id the image features replace: Qwen2-VL's config says `image_token_id`, gemma3's
    `image_token_index`."""
    for key in ("image_token_id", "image_token_index"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


# ---- prefill --------------------------------------------------------------------------------
def reset(model: VisionLM) -> None:
    """Forget the previous sequence's state (a new prompt starts from an empty cache)."""
    lm = model.vlm.language_model
    for name in _STATE:
        if hasattr(lm, name):
            setattr(lm, name, None)


def prefill(model: VisionLM, prompt: list[int], inputs: VisionInputs | None, cache: list[Any], step: int,
            cancel: threading.Event | None = None) -> bool:
    """Everything but the prompt's last token into `cache` (the caller steps that one), the
    images' features in place of their placeholders; False if cancelled between chunks."""
    reset(model)
    vlm = model.vlm
    lm = vlm.language_model
    ids = mx.array(prompt, dtype=mx.int32)[None]
    pixels = inputs.pixel_values if inputs is not None else None
    extra = dict(inputs.extra) if inputs is not None else {}
    if cancel is not None and cancel.is_set():
        return False
    try:
        features = vlm.get_input_embeddings(ids, pixels, mask=mx.ones_like(ids), **extra)
    except (ValueError, IndexError) as exc:
        raise BadRequest(f"the prompt's images do not match its tokens: {exc}") from None
    embeds = features.inputs_embeds
    # As mlx-vlm's own generate: the processor's arrays and what the embedding step derived
    # (Qwen2-VL's position ids and RoPE deltas) go to every prefill chunk.
    kwargs = {**extra, **{k: v for k, v in features.to_dict().items() if k != "inputs_embeds" and v is not None}}
    mx.eval(embeds)
    n = len(prompt) - 1
    for start in range(0, n, step):
        if cancel is not None and cancel.is_set():
            return False
        end = min(n, start + step)
        lm(ids[:, start:end], inputs_embeds=embeds[:, start:end], cache=cache, n_to_process=end - start, **kwargs)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
    return True
