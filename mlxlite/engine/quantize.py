"""`create --quantize` on MLX: a float model quantized into an mlx-lm model directory.

Contract: `quantize_model(source, qtype, out, say)` reads `source` (a model directory: an
mlx-lm / Hugging Face one with config.json and float16, bfloat16 or float32 safetensors, or
one holding a float GGUF file) and writes into the empty directory `out` what `mlx_lm.load`
and our loader read: `model*.safetensors` + `model.safetensors.index.json` and a config.json
with mlx-lm's `quantization` (and `quantization_config`) keys, as `mlx_lm.convert` writes
them (its modes, its predicate: every module with `to_quantized` whose input size the group
divides, and the model's own `quant_predicate`). From a GGUF it also writes the tokenizer
(`tokenizer.json`, `tokenizer_config.json` with the file's chat template). A quantized
source, an embedding (encoder) GGUF, or a GGUF whose RoPE scaling mlx-lm's config cannot
express is a `BadRequest`.
Memory: safetensors are mapped lazily and each output tensor is evaluated on its own, so
at most one source tensor is in memory as float beside the quantized output; a GGUF's
floats are read once (one float copy) and each is dropped as its quantized form is made.
Runs on its caller's thread (the CLI's, or the server's create thread) on a stream of its
own. mlx-lm prints an `[INFO]` line to stdout as it quantizes: it becomes one of our status
lines (`say`), and anything else printed meanwhile still reaches stdout.
Never writes the store (`modelfile.quantize` stores the files) and never decides names.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from mlxlite.engine.gguf import GGUFTokenizer, read_weights
from mlxlite.errors import Unsupported
from mlxlite.formats import gguf
from mlxlite.modelfile.quantize import TYPES, check_source

Say = Callable[[str], None]
FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
SHARD_BYTES = 5 << 30  # mlx-lm's shard size


def _quiet(_: str) -> None:
    pass


def quantize_model(source: Path, qtype: str, out: Path, say: Say = _quiet) -> None:
    """See module doc."""
    mode, bits, group = TYPES[qtype]
    check_source(source)  # the caller checked too, before its first status line
    ggufs = sorted(p for p in source.iterdir() if p.name.lower().endswith(".gguf"))
    with mx.stream(mx.new_stream(mx.default_device())):  # not the scheduler's stream
        if not (source / "config.json").is_file() and ggufs:
            model, config, tokenizer_files = _from_gguf(ggufs[0], say)
        else:
            model, config = _from_safetensors(source)
            tokenizer_files = {}
        from mlx_lm.utils import quantize_model as mlx_quantize  # imports transformers: create only

        with _info_lines_to(say):
            model, config = mlx_quantize(model, config, group, bits, mode=mode)
        _save(model, out, say)
    _save_config(config, out / "config.json")
    for title, text in tokenizer_files.items():
        (out / title).write_text(text)


# ---- mlx-lm's prints -------------------------------------------------------------------------
class _InfoLines(io.TextIOBase):
    """Stands in for stdout while mlx-lm quantizes: its `[INFO] ...` lines go to `say` as
    status lines; every other line goes on to `out` as it was written."""

    def __init__(self, out: TextIO, say: Say) -> None:
        self.out, self.say, self.pending = out, say, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._line(line, "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def finish(self) -> None:
        if self.pending:
            self._line(self.pending, "")
            self.pending = ""
        self.out.flush()

    def _line(self, line: str, end: str) -> None:
        if line.startswith("[INFO] "):
            text = line.removeprefix("[INFO] ").strip().rstrip(".")
            self.say(text[:1].lower() + text[1:])
        else:
            self.out.write(line + end)


_STDOUT = threading.Lock()  # two creates quantizing at once must not swap stdout under each other


@contextlib.contextmanager
def _info_lines_to(say: Say) -> Iterator[None]:
    with _STDOUT:
        lines = _InfoLines(sys.stdout, say)
        try:
            with contextlib.redirect_stdout(lines):
                yield
        finally:
            lines.finish()


# ---- sources --------------------------------------------------------------------------------
def _from_safetensors(source: Path) -> tuple[nn.Module, dict]:
    from mlx_lm.utils import load_model  # imports transformers: create only

    try:
        model, config = load_model(source, lazy=True)
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        raise Unsupported(f"mlx-lm cannot load the model to quantize it: {exc}") from None
    # As mlx_lm.convert: the config's own dtype, when it names a float type.
    dtype = FLOAT_DTYPES.get(config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype") or "")
    if dtype is not None:
        keep = getattr(model, "cast_predicate", lambda _: True)
        model.update(tree_map_with_path(lambda k, v: v.astype(dtype) if keep(k) else v, model.parameters()))
    return model, config


def _from_gguf(path: Path, say: Say) -> tuple[nn.Module, dict, dict[str, str]]:
    header = gguf.read_gguf(path)
    config = gguf.model_config(header)
    say(f"reading {path.name} ({len(header.tensors)} tensors)")
    weights = read_weights(path, header, config)  # the one float copy
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise Unsupported(f"GGUF tensors do not fit the {config['model_type']} model: {exc}") from None
    weights.clear()
    spec = gguf.build_tokenizer(header.metadata)
    config["eos_token_id"] = sorted(spec.eos_token_ids)
    if spec.bos_token is not None:
        config["bos_token_id"] = spec.tokenizer.token_to_id(spec.bos_token)
    tokenizer = GGUFTokenizer(spec)
    specials = {k: v for k, v in (("bos_token", spec.bos_token), ("eos_token", spec.eos_token),
                                  ("unk_token", spec.unk_token), ("pad_token", spec.pad_token)) if v}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                  "model_max_length": config.get("max_position_embeddings")}
    template = header.metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        tok_config["chat_template"] = template
    files = {"tokenizer.json": tokenizer.backend_tokenizer.to_str(),
             "tokenizer_config.json": json.dumps(tok_config, indent=2)}
    return model, config, files


# ---- writing --------------------------------------------------------------------------------
def _shards(weights: dict[str, mx.array]) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = []
    size = 0
    for key, value in weights.items():
        if not shards or size + value.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards


def _save(model: nn.Module, out: Path, say: Say) -> None:
    """As mlx-lm's `save_model`, but each tensor evaluated on its own before its shard is
    written, so only one source tensor is ever materialized as float."""
    weights = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in weights.values())
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))  # the model lets go of them
    shards = _shards(weights)
    weights.clear()
    names = ("model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
             for i in range(len(shards)))
    index: dict[str, str] = {}
    for i, name in enumerate(names):
        shard, shards[i] = shards[i], {}
        for value in shard.values():
            mx.eval(value)
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        index.update(dict.fromkeys(shard, name))
        say(f"wrote {name} ({len(shard)} tensors)")
        del shard
    data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(data, indent=4))


def _save_config(config: dict, path: Path) -> None:
    from mlx_lm.utils import save_config  # imports transformers: create only

    save_config(dict(config), path)
