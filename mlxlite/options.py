"""Generation options with Ollama's names, types, defaults and ranges.

Pure (no mlx): the API validates requests with it, the Modelfile parser checks
`PARAMETER` lines with it, the CLI parses `/set parameter` with it, and the runner maps
the result onto mlx-lm's samplers. Wrong types and out-of-range values are `BadRequest`s
that name the field. A request's `options` object is read as Ollama reads it
(`parse_partial`): `null` values are skipped (clients send every option, unset ones as
null) and unknown names are ignored, logged once per name; `coerce` (Modelfile, CLI)
still refuses unknown names. Layering: defaults < model params < request.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mlxlite.errors import BadRequest

log = logging.getLogger("mlxlite.options")


@dataclass(frozen=True)
class OptionSpec:
    name: str
    kind: type  # int, float, bool, str, or list (of str, for stop)
    default: Any
    low: float | None = None
    high: float | None = None
    help: str = ""


SPECS: dict[str, OptionSpec] = {
    s.name: s
    for s in (
        OptionSpec("temperature", float, 0.8, 0.0, 100.0, "sampling temperature; 0 is greedy"),
        OptionSpec("top_k", int, 40, 0, 1 << 20, "sample from the k most likely tokens (0: all)"),
        OptionSpec("top_p", float, 0.9, 0.0, 1.0, "nucleus sampling mass (1: off)"),
        OptionSpec("min_p", float, 0.0, 0.0, 1.0, "drop tokens below min_p x the top probability"),
        OptionSpec("typical_p", float, 1.0, 0.0, 1.0, "accepted for compatibility; 1 only"),
        OptionSpec("seed", int, -1, -(1 << 63), (1 << 63) - 1, "random seed (-1: random)"),
        OptionSpec("num_predict", int, -1, -2, 1 << 24, "most tokens to generate (-1: until the context ends)"),
        OptionSpec("stop", list, (), None, None, "strings that end generation (never emitted)"),
        OptionSpec("repeat_penalty", float, 1.0, 0.0, 100.0, "penalty on recently seen tokens (1: off)"),
        OptionSpec("repeat_last_n", int, 64, -1, 1 << 20, "how many recent tokens the penalties look at (-1: num_ctx)"),
        OptionSpec("presence_penalty", float, 0.0, -100.0, 100.0, "additive penalty on tokens already present"),
        OptionSpec("frequency_penalty", float, 0.0, -100.0, 100.0, "additive penalty by token frequency"),
        OptionSpec("num_ctx", int, 0, 4, 1 << 22, "context window in tokens (0: the server default)"),
        OptionSpec("num_keep", int, 4, -1, 1 << 22, "accepted for compatibility"),
        OptionSpec("num_batch", int, 512, 1, 1 << 16, "prompt tokens processed per step"),
        OptionSpec("draft_num_predict", int, 4, 0, 64,
                   "speculative decoding: tokens drafted per step (0: off)"),
        OptionSpec("draft", str, "", None, None,
                   "speculative decoding: a draft model's name (empty: prompt lookup, no second model)"),
        OptionSpec("num_thread", int, 0, 0, 1024, "accepted for compatibility"),
        OptionSpec("num_gpu", int, -1, -1, 1 << 16, "accepted for compatibility"),
        OptionSpec("main_gpu", int, 0, 0, 1 << 16, "accepted for compatibility"),
        OptionSpec("use_mmap", bool, True, None, None, "accepted for compatibility"),
        OptionSpec("use_mlock", bool, False, None, None, "accepted for compatibility"),
        OptionSpec("numa", bool, False, None, None, "accepted for compatibility"),
        OptionSpec("low_vram", bool, False, None, None, "accepted for compatibility"),
        OptionSpec("penalize_newline", bool, False, None, None, "accepted for compatibility"),
        OptionSpec("mirostat", int, 0, 0, 2, "accepted for compatibility; 0 only"),
        OptionSpec("mirostat_tau", float, 5.0, 0.0, 100.0, "accepted for compatibility"),
        OptionSpec("mirostat_eta", float, 0.1, 0.0, 100.0, "accepted for compatibility"),
        OptionSpec("tfs_z", float, 1.0, 0.0, 100.0, "accepted for compatibility"),
    )
}


@dataclass(frozen=True)
class Options:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int = -1
    num_predict: int = -1
    stop: tuple[str, ...] = field(default_factory=tuple)
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_ctx: int = 0
    num_keep: int = 4
    num_batch: int = 512
    draft_num_predict: int = 4
    draft: str = ""
    num_thread: int = 0
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    numa: bool = False
    low_vram: bool = False
    penalize_newline: bool = False
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    tfs_z: float = 1.0

    def merged(self, overrides: dict[str, Any]) -> Options:
        """These options with validated overrides applied (e.g. request over model)."""
        return replace(self, **parse_partial(overrides))

    def to_dict(self, only_changed: bool = False) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if only_changed and value == SPECS[f.name].default:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def coerce(name: str, value: Any, *, from_text: bool = False) -> Any:
    """One option value, checked; `from_text` parses strings (Modelfile, CLI)."""
    spec = SPECS.get(name)
    if spec is None:
        raise BadRequest(f"invalid option {name!r}: unknown option")
    if from_text and isinstance(value, str) and spec.kind not in (list, str):
        text = value.strip()
        try:
            if spec.kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                value = text.lower() == "true"
            elif spec.kind is int:
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise BadRequest(f"invalid option {name!r}: {value!r} is not a {spec.kind.__name__}") from None
    if spec.kind is str:
        if not isinstance(value, str) or len(value) > 512:
            raise BadRequest(f"invalid option {name!r}: expected a string (at most 512 characters)")
        return value.strip()
    if spec.kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"invalid option {name!r}: expected a list of strings")
        if any(v == "" for v in value) or len(value) > 64 or any(len(v) > 1024 for v in value):
            raise BadRequest(f"invalid option {name!r}: stop strings must be non-empty (at most 64)")
        return tuple(value)
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise BadRequest(f"invalid option {name!r}: expected true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"invalid option {name!r}: expected a number, got {type(value).__name__}")
    if spec.kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise BadRequest(f"invalid option {name!r}: expected an integer")
            value = int(value)
    else:
        try:
            value = float(value)
        except OverflowError:  # an int past float's range (JSON allows any length)
            raise BadRequest(f"invalid option {name!r}: outside [{spec.low}, {spec.high}]") from None
        if not math.isfinite(value):
            raise BadRequest(f"invalid option {name!r}: must be finite")
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        raise BadRequest(f"invalid option {name!r}: {value} is outside [{spec.low}, {spec.high}]")
    return value


_ignored: set[str] = set()         # unknown option names already logged (once each)
_ignored_lock = threading.Lock()


def parse_partial(values: Any) -> dict[str, Any]:
    """Validate a request's `options` object into {name: value}, as Ollama does: a null
    value is "not set" and skipped; an unknown name is ignored (logged once per name);
    a present value of a known option is still checked for type and range."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BadRequest("invalid options: expected an object")
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in SPECS:
            _log_ignored(name)
            continue
        out[name] = coerce(name, value)
    return out


def _log_ignored(name: str) -> None:
    with _ignored_lock:
        if name in _ignored or len(_ignored) >= 1024:   # bounded: names come from clients
            return
        _ignored.add(name)
    log.warning("ignoring unknown option %r", name[:100])


def parse(values: Any, base: Options | None = None) -> Options:
    return (base or Options()).merged(values or {})
