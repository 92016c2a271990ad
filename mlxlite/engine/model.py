"""A loaded model and its primitives on MLX: load and unload, tokens, the KV cache, prefill.

Contract:
  - `load(store, entry) -> Loaded`: integrity first (`store.check_integrity`), then GGUF
    (`engine/gguf.py`) or safetensors through mlx-lm from `store.view(entry)` (a vision model's
    through mlx-vlm when the extra is installed, `vision.py`, and so a GGUF carrying its vision
    tower, `vision_gguf.py`; else its text through mlx-lm, `info["vision"] == "missing"`); the Modelfile
    layers (params -> `defaults`, system, messages) are read. The prompt template is the
    model's template layer (an Ollama Go template, run as Go does, or jinja), else its own
    jinja template, else a fallback that fits its vocabulary. A harmony template (gpt-oss)
    makes its structural special tokens print (`formats.harmony.TAGS`), so its channels can
    be parsed from the text.
    On the CPU device quantized weights become float32 when that fits the memory budget
    (`float32_on_cpu`); activations, scales and norms are float32 on CPU.
  - `unload`, `tokenize`, `detokenize`, `token_bytes`, `token_piece` (a token as logprobs
    show it: its bytes, or a special token's name).
  - Per-sequence building blocks shared by `runner.generate` and `batch.Decoder`:
    `context_window`, `new_cache`, `prefill` (chunked, cancellable between chunks) and
    `check_prompt` (empty or too long for num_ctx is a `BadRequest`, unless truncating; so
    is any prompt to an embedding-only model, `info["capabilities"] == ["embedding"]`);
    `GENERATION_STREAM`, the (per-thread) stream they compute on.
  - `memory_budget()`: bytes of weights allowed resident, against the GPU's memory on a GPU
    (`mx.device_info()`), host RAM on the CPU; `end_thread()`: the MLX thread's last call.
Importing this module defers mlx-lm's package `__init__` (which imports transformers, and
torch where installed: seconds) until something asks the package itself for an attribute:
GGUF models need only mlx-lm's model classes, cache and samplers; safetensors models load
through `mlx_lm.utils`, which still imports transformers for their tokenizer.
Called on the scheduler's MLX thread only.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxlite import config
from mlxlite import options as options_mod
from mlxlite.engine import blas, vision, vision_gguf
from mlxlite.engine.gguf import load_gguf
from mlxlite.engine.text import token_table
from mlxlite.errors import BadRequest, IntegrityError, MlxliteError, Unsupported
from mlxlite.formats import archs, gguf, harmony, templates
from mlxlite.options import Options
from mlxlite.store import (
    MEDIA_GGUF,
    MEDIA_MESSAGES,
    MEDIA_OLLAMA_TEMPLATE,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    ModelEntry,
    Store,
)


def _defer_mlx_lm_init() -> None:
    """Register `mlx_lm` as a package whose `__init__` runs on first use of the package's
    own attributes (`mlx_lm.load`, `from mlx_lm import ...`), not when a submodule such as
    `mlx_lm.models.llama` is imported. Nothing changes for code that uses the package."""
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)
    lock = threading.Lock()

    def __getattr__(name: str) -> Any:
        with lock:
            if package.__dict__.pop("__getattr__", None) is not None:
                spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__
    sys.modules["mlx_lm"] = package


_defer_mlx_lm_init()

# Generation's own stream, one per thread (mlx-lm's is in `mlx_lm.generate`, which imports transformers).
GENERATION_STREAM = mx.new_thread_local_stream(mx.default_device())


@dataclass
class Loaded:
    name: str
    digest: str
    model: Any
    tokenizer: Any
    template: templates.ChatTemplate | templates.GoChatTemplate
    eos_token_ids: frozenset[int]
    context_length: int
    size_bytes: int
    info: dict
    defaults: Options
    system: str | None
    messages: list[dict]
    table: list[bytes] = field(default_factory=list, repr=False)  # token id -> raw bytes
    bos_token: str | None = None


# ---- device and memory -----------------------------------------------------------------
def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def device_memory() -> int | None:
    """Bytes of the GPU's memory that MLX may use, when the default device is a GPU: Metal's
    recommended working set (unified memory, shared with the host), CUDA's total memory."""
    if on_cpu():
        return None
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError, ValueError):
        return None
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        value = info.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def memory_budget() -> int:
    """The setting when set; else 90% of the GPU's memory on a GPU, 75% of RAM on the CPU."""
    return config.memory_budget(device_bytes=device_memory())


def end_thread() -> None:
    """The MLX thread's last call before it exits: wait for its work, then free the streams it
    made. MLX frees them at thread exit otherwise, which races the interpreter's own exit
    (SIGABRT, "terminate called without an active exception", after a clean shutdown)."""
    mx.synchronize()
    clear = getattr(mx, "clear_streams", None)
    if clear is not None:
        clear()


def _nbytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ---- loading ----------------------------------------------------------------------------
def _layer_text(store: Store, entry: ModelEntry, media: str) -> str | None:
    layers = entry.manifest.layers_of(media)
    if not layers:
        return None
    return store.read_blob(layers[-1].digest).decode("utf-8", errors="replace")


def _template_layer(store: Store, entry: ModelEntry) -> tuple[str | None, bool]:
    """(text, whether it is an Ollama Go template) of the model's template layer, if any."""
    layer = entry.manifest.template_layer()
    if layer is None:
        return None, False
    return store.read_blob(layer.digest).decode("utf-8", errors="replace"), layer.media_type == MEDIA_OLLAMA_TEMPLATE


def _modelfile_layers(store: Store, entry: ModelEntry) -> tuple[Options, str | None, list[dict]]:
    display = entry.name.display
    defaults = Options()
    params = _layer_text(store, entry, MEDIA_PARAMS)
    if params is not None:
        try:
            values = json.loads(params)
        except ValueError:
            raise IntegrityError(f"model '{display}' has a params layer that is not JSON") from None
        try:
            defaults = options_mod.parse(values)
        except BadRequest as exc:
            raise BadRequest(f"model '{display}' has invalid parameters: {exc}") from None
    system = _layer_text(store, entry, MEDIA_SYSTEM)
    messages: list[dict] = []
    raw = _layer_text(store, entry, MEDIA_MESSAGES)
    if raw is not None:
        try:
            messages = json.loads(raw)
        except ValueError:
            raise IntegrityError(f"model '{display}' has a messages layer that is not JSON") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise IntegrityError(f"model '{display}' has a messages layer that is not a list of messages")
    return defaults, system, messages


def _gguf_layer(entry: ModelEntry) -> Any:
    for title, layer in entry.manifest.files().items():
        if title.lower().endswith(".gguf"):
            return layer
    layers = entry.manifest.layers_of(MEDIA_GGUF)
    return layers[0] if layers else None


def _hf_specials(tokenizer: Any) -> frozenset[int]:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ids = set(getattr(hf, "all_special_ids", []) or [])
    return frozenset(ids)


def _load_safetensors(store: Store, entry: ModelEntry, f32: bool,
                      lazy: bool = False) -> tuple[Any, Any, dict, bool, Path]:
    from mlx_lm.utils import load as mlx_load

    view = store.view(entry)
    if not (view / "config.json").is_file():
        raise BadRequest(f"model '{entry.name.display}' has neither a GGUF file nor config.json + safetensors")
    try:
        model_cfg = json.loads((view / "config.json").read_text())
    except ValueError:
        raise BadRequest(f"model '{entry.name.display}': config.json is not valid JSON") from None
    if vision.is_vision_config(model_cfg) and vision.available():
        model = vision.load_vlm(view, entry.name.display)
        dequantized = _on_cpu_dtype(model, model_cfg, f32)
        mx.eval(model.parameters())
        return model, _vision_tokenizer(model, model_cfg), model_cfg, dequantized, view
    try:
        model, tokenizer = mlx_load(str(view), lazy=lazy)
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        hint = f" (a vision model: {vision.INSTALL})" if vision.is_vision_config(model_cfg) else ""
        raise Unsupported(f"model '{entry.name.display}' cannot be loaded by mlx-lm: {exc}{hint}") from None
    dequantized = _on_cpu_dtype(model, model_cfg, f32)
    if on_cpu() and not lazy:
        mx.eval(model.parameters())
    return model, tokenizer, model_cfg, dequantized, view


def _on_cpu_dtype(model: Any, model_cfg: dict, f32: bool) -> bool:
    """On the CPU device: a quantized model's packed modules become float32 when that fits the
    budget, and every float is float32 (float16 on MLX's CPU backend is far slower). Whether it
    dequantized."""
    if not on_cpu():
        return False
    dequantized = False
    quantized = "quantization" in model_cfg or "quantization_config" in model_cfg
    if quantized and f32 and _float32_estimate(model) <= memory_budget():
        # lazy: mlx-lm's package __init__ imports transformers (deferred above)
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)     # swaps the modules in place
        dequantized = True
    model.set_dtype(mx.float32)
    return dequantized


def _vision_tokenizer(model: vision.VisionLM, cfg: dict) -> Any:
    """The processor's tokenizer in mlx-lm's wrapper (what the text path reads), its EOS
    ids from config.json too (Qwen2-VL's list both <|im_end|> and <|endoftext|>)."""
    # lazy: mlx-lm's package __init__ imports transformers (deferred above)
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    eos = cfg.get("eos_token_id", (cfg.get("text_config") or {}).get("eos_token_id"))
    ids = [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
    return TokenizerWrapper(model.processor.tokenizer, eos_token_ids=ids)


def _float32_estimate(model: Any) -> int:
    import mlx.nn as nn

    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.shape[0] * m.scales.shape[-1] * m.group_size * 4
    return total + _nbytes(model)


def load(store: Store, entry: ModelEntry, *, lazy: bool = False, pick: Any = None) -> Loaded:
    """Load a stored model into MLX (see module doc). Errors are MlxliteErrors. `lazy`: a
    safetensors model's weights stay unread until evaluated (a distributed rank shards
    first, so it reads only its share). `pick`: what of a GGUF this rank reads (`gguf.load_gguf`:
    a pipeline stage's layers, or each layer sliced as it is read)."""
    store.check_integrity(entry)
    info = dict(store.read_config(entry))
    defaults, system, messages = _modelfile_layers(store, entry)
    template_override, go_template = _template_layer(store, entry)
    f32 = bool(config.get("float32_on_cpu")) and on_cpu()
    layer = _gguf_layer(entry)
    try:
        if layer is not None:
            path = store.blob_path(layer.digest)
            header = gguf.read_gguf(path)
            # A vision tower inline (Ollama's gemma3, qwen25vl): images through mlx-vlm, else text only (the 400
            # says why). A distributed rank (`pick`) loads the text.
            sees = gguf.takes_images(header) and pick is None
            if sees and vision.available():
                model, tokenizer, spec, header, cfg = vision_gguf.load(
                    path, header, on_cpu=on_cpu(), float32=f32, budget=memory_budget())
            else:
                model, tokenizer, spec, header, cfg = load_gguf(
                    path, on_cpu=on_cpu(), float32=f32, budget=memory_budget(), pick=pick, header=header)
            if sees:
                info["vision"] = True if isinstance(model, vision.VisionLM) else "missing"
            dequantized = cfg.pop("_dequantized")
            share = cfg.pop("_share")
            if share:
                info["share"] = share   # how this rank's load split the model: `distributed.shard` follows it
            info["tensors"] = cfg.pop("_tensors")  # per GGML type: repacked / requantized (+ error) / dequantized
            context_length = int(cfg.get("max_position_embeddings") or 4096)
            source = template_override or templates.find_template(None, header.metadata)
            specials = spec.special_ids
            bos, eos = spec.bos_token, spec.eos_token
            eos_ids = frozenset(spec.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
            info.setdefault("format", "gguf")
            info["architecture"] = header.architecture
            if archs.is_encoder(header.architecture):
                info["capabilities"] = ["embedding"]
        else:
            model, tokenizer, cfg, dequantized, view = _load_safetensors(store, entry, f32, lazy)
            text_cfg = cfg.get("text_config") or {}
            context_length = int(cfg.get("max_position_embeddings") or text_cfg.get("max_position_embeddings")
                                 or info.get("context_length") or 4096)
            source = template_override or templates.find_template(view)
            specials = _hf_specials(tokenizer)
            bos, eos = tokenizer.bos_token, tokenizer.eos_token
            eos_ids = frozenset(tokenizer.eos_token_ids)
            info.setdefault("format", "safetensors")
            info.setdefault("architecture", cfg.get("model_type", ""))
            if vision.is_vision_config(cfg):    # images: through mlx-vlm, else text only (the 400 says why)
                info["vision"] = True if isinstance(model, vision.VisionLM) else "missing"
    except MlxliteError:
        raise
    except (RuntimeError, ValueError) as exc:  # mlx's own errors on a malformed file
        raise BadRequest(f"model '{entry.name.display}' failed to load: {exc}") from None
    backend = _backend(tokenizer)
    vocab_size = int(cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size") or 0)
    table = token_table(backend, specials, vocab_size)
    if source is None:
        fallback = templates.fallback(backend.get_vocab(with_added_tokens=True))
        template = templates.ChatTemplate(templates.FALLBACKS[fallback], bos_token=bos, eos_token=eos, name=fallback)
    elif source is template_override:       # the model's template layer
        template = templates.load(source, go=go_template, bos_token=bos, eos_token=eos,
                                  name="ollama" if go_template else "modelfile")
    else:
        template = templates.ChatTemplate(source, bos_token=bos, eos_token=eos, name="model")
    if harmony.is_harmony(getattr(template, "source", "")):
        _print_tags(table, backend)
    info.update({
        "context_length": context_length,
        "device": "cpu" if on_cpu() else "gpu",
        "weights": "float32" if dequantized else ("quantized" if _is_quantized(model) else "float"),
        "openblas": blas.active(),
        "template": template.name,
    })
    return Loaded(entry.name.display, entry.digest, model, tokenizer, template, eos_ids, context_length,
                  _nbytes(model), info, defaults, system, messages, table, bos)


def _print_tags(table: list[bytes], backend: Any) -> None:
    """gpt-oss's structural tokens are special (they never print), but its channels are
    read from them: they print as their text, as Ollama keeps them in the output."""
    vocab = backend.get_vocab(with_added_tokens=True)
    for tag in harmony.TAGS:
        i = vocab.get(tag)
        if i is not None and 0 <= i < len(table):
            table[i] = tag.encode()


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` under mlx-lm's and transformers' wrappers."""
    backend = getattr(tokenizer, "_tokenizer", tokenizer)
    return getattr(backend, "backend_tokenizer", backend)


def _is_quantized(model: Any) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def unload(loaded: Loaded) -> None:
    """Drop the model's arrays and give their memory back."""
    loaded.model = None
    loaded.tokenizer = None
    loaded.table = []
    gc.collect()
    mx.clear_cache()


def is_embedding_only(loaded: Loaded) -> bool:
    """An encoder (bert family): it embeds and never generates."""
    return loaded.info.get("capabilities") == ["embedding"]


# ---- tokens -------------------------------------------------------------------------------
def tokenize(loaded: Loaded, text: str, add_special: bool = True) -> list[int]:
    # A template that already wrote the BOS token must not get a second one.
    if add_special and loaded.bos_token and text.startswith(loaded.bos_token):
        add_special = False
    return list(loaded.tokenizer.encode(text, add_special_tokens=add_special))


def detokenize(loaded: Loaded, tokens: list[int]) -> str:
    return loaded.tokenizer.decode(list(tokens))


def token_bytes(loaded: Loaded) -> list[bytes]:
    """Raw bytes of every token id; special tokens (EOS, control) are b"" (never text)."""
    return loaded.table


def token_piece(loaded: Loaded, token: int) -> bytes:
    """A token as logprobs show it: its bytes, or for a special token (which prints
    nothing) its name, such as `<|im_end|>`."""
    table = loaded.table
    raw = table[token] if 0 <= token < len(table) else b""
    if raw:
        return raw
    name = _backend(loaded.tokenizer).id_to_token(token)
    return name.encode() if name else b""


def alternatives(loaded: Loaded, ids: list[int], values: list[float]) -> tuple[tuple[bytes, float], ...]:
    """A step's top alternatives as (token bytes, logprob) pairs; tokens a constraint
    masked (-inf, which JSON cannot carry) are left out."""
    return tuple((token_piece(loaded, i), v) for i, v in zip(ids, values, strict=True) if math.isfinite(v))


# ---- sampling building blocks (one per sequence; the scheduler reuses them) ---------------
def context_window(loaded: Loaded, options: Options) -> int:
    """Effective num_ctx: the request's, else the setting, capped by the model."""
    n = options.num_ctx or int(config.get("num_ctx"))
    return max(4, min(n, loaded.context_length))


def new_cache(loaded: Loaded) -> list[Any]:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(loaded.model)


def prefill(loaded: Loaded, tokens: list[int], cache: list[Any], step: int,
            cancel: threading.Event | None = None) -> bool:
    """Run `tokens` through the model into `cache` in chunks; False if cancelled between chunks."""
    model = loaded.model
    for start in range(0, len(tokens), step):
        if cancel is not None and cancel.is_set():
            return False
        model(mx.array(tokens[start:start + step])[None], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
    return True


def check_prompt(loaded: Loaded, prompt: list[int], num_ctx: int, options: Options, truncate: bool) -> list[int]:
    if is_embedding_only(loaded):
        raise BadRequest(f"model '{loaded.name}' is an embedding model and does not generate")
    if not prompt:
        raise BadRequest("the prompt is empty")
    if len(prompt) < num_ctx:
        return prompt
    if not truncate:
        raise BadRequest(f"prompt is {len(prompt)} tokens, longer than the context window num_ctx={num_ctx}; "
                         "shorten it, raise num_ctx, or ask for truncation")
    room = options.num_predict if options.num_predict > 0 else num_ctx // 2
    keep = max(1, num_ctx - max(1, min(room, num_ctx // 2)))
    return prompt[-keep:]
