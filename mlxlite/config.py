"""Every setting mlxlite reads: its env var, its `config.json` key, default and help.

Resolution order: environment variable, then `$MLXLITE_HOME/config.json`, then the
default. `MLXLITE_HOME` itself comes only from the environment (it locates the file).
Values are parsed by the setting's type; a bad value is a `BadRequest` naming it.
Nothing here imports anything heavy: `--help` and `list` read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxlite.errors import BadRequest


def parse_duration(value: Any) -> float:
    """Ollama-style keep-alive: seconds as a number, or '5m', '1h30m', '10s', '-1'.

    Returns seconds; negative means forever.
    """
    if isinstance(value, bool):
        raise BadRequest(f"invalid duration: {value!r}")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int past float's range (JSON allows any length)
            raise BadRequest("invalid duration: out of range") from None
    if not isinstance(value, str):  # named by type: the repr of a deeply nested value recurses
        raise BadRequest(f"invalid duration: expected a number or a string like '5m', got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"invalid duration: {value!r}")
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            raise BadRequest(f"invalid duration: {value!r}")
        try:
            total += float(number) * units[unit]
        except ValueError:
            raise BadRequest(f"invalid duration: {value!r}") from None
        number = ""
        i += len(unit)
    if number:
        raise BadRequest(f"invalid duration: {value!r} (missing unit)")
    return sign * total


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def _parse_image_fetch(value: Any) -> str:
    """"off", "public" (a true value) or "private" (public and private addresses)."""
    text = str(value).strip().lower()
    if text in ("public", "private"):
        return text
    return "public" if _parse_bool(value) else "off"


def _parse_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [part.strip() for part in str(value).split(",") if part.strip()]


SPLITS = ("auto", "tensor", "pipeline")


def _parse_split(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in SPLITS:
        raise ValueError(value)
    return text


@dataclass(frozen=True)
class Setting:
    key: str
    env: str
    default: Any
    parse: Callable[[Any], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "MLXLITE_HOST", "127.0.0.1:11435", str,
            "address the daemon binds and the CLI talks to (host:port)"),
    Setting("keep_alive", "MLXLITE_KEEP_ALIVE", "5m", parse_duration,
            "how long an idle model stays loaded (0 unloads at once, negative keeps forever)"),
    Setting("num_parallel", "MLXLITE_NUM_PARALLEL", 8, int,
            "most sequences decoded together in one batch per model"),
    Setting("max_queue", "MLXLITE_MAX_QUEUE", 512, int,
            "most requests waiting for the engine before new ones get 503"),
    Setting("max_loaded_models", "MLXLITE_MAX_LOADED_MODELS", 3, int,
            "most models resident at once; the least recently used idle one is evicted"),
    Setting("prefix_cache_bytes", "MLXLITE_PREFIX_CACHE_BYTES", 1 << 30, int,
            "memory budget of the prompt-prefix KV cache, in bytes"),
    Setting("prefix_cache_disk_bytes", "MLXLITE_PREFIX_CACHE_DISK_BYTES", 256 << 20, int,
            "prefix caches saved under MLXLITE_HOME when a model unloads, reused after a restart (0: off)"),
    Setting("memory_budget_bytes", "MLXLITE_MEMORY_BUDGET_BYTES", 0, int,
            "refuse to load models past this many bytes (0: 90% of the GPU's memory, on the CPU 75% of RAM)"),
    Setting("max_body_bytes", "MLXLITE_MAX_BODY_BYTES", 32 << 20, int,
            "largest JSON request body the daemon accepts, in bytes"),
    Setting("max_connections", "MLXLITE_MAX_CONNECTIONS", 256, int,
            "most client connections the daemon holds open (one thread each); past it a new one gets 503"),
    Setting("header_timeout", "MLXLITE_HEADER_TIMEOUT", 5.0, float,
            "seconds a connection has to send a request's line and headers, counted from when the "
            "daemon starts waiting (a new connection, or a kept-alive one after its last response)"),
    Setting("body_timeout", "MLXLITE_BODY_TIMEOUT", 30.0, float,
            "seconds without a byte of a request body before the request fails with 408"),
    Setting("origins", "MLXLITE_ORIGINS", [], _parse_list,
            "extra CORS origins allowed besides localhost ones (comma-separated)"),
    Setting("api_key", "MLXLITE_API_KEY", "", str,
            "bearer key required on every request when set (required off loopback)"),
    Setting("log_file", "MLXLITE_LOG_FILE", "", str,
            "file for the daemon's JSON request log (default: stderr)"),
    Setting("num_ctx", "MLXLITE_CONTEXT_LENGTH", 4096, int,
            "default context window in tokens when a request does not set num_ctx"),
    Setting("hf_endpoint", "MLXLITE_HF_ENDPOINT", "https://huggingface.co", str,
            "base URL of the Hugging Face hub for hf.co/ pulls"),
    Setting("hf_token", "HF_TOKEN", "", str,
            "Hugging Face token sent to the hub when set"),
    Setting("registry_auth", "MLXLITE_REGISTRY_AUTH", {}, dict,
            "credentials per registry host: {host: {username, password} or {token}}"),
    Setting("docker_config", "DOCKER_CONFIG", "", str,
            "directory of a docker-style config.json to read registry credentials from"),
    Setting("pull_streams", "MLXLITE_PULL_STREAMS", 4, int,
            "most parallel byte-range downloads per blob (two at first, more while each is slow)"),
    Setting("pull_part_bytes", "MLXLITE_PULL_PART_BYTES", 0, int,
            "bytes per parallel range of a pull (0: size/16, between 16 MiB and 1 GiB)"),
    Setting("pull_stall_timeout", "MLXLITE_PULL_STALL_TIMEOUT", 30.0, float,
            "seconds without a byte before a download range is retried"),
    Setting("push_chunk_bytes", "MLXLITE_PUSH_CHUNK_BYTES", 64 << 20, int,
            "blobs up to this size are pushed in one PUT, larger ones in chunks of it"),
    Setting("openblas", "MLXLITE_OPENBLAS", True, _parse_bool,
            "on Linux, load OpenBLAS into the process before mlx when it is installed"),
    Setting("float32_on_cpu", "MLXLITE_FLOAT32_ON_CPU", True, _parse_bool,
            "on CPU, dequantize weights to float32 when they fit the memory budget"),
    Setting("max_images", "MLXLITE_MAX_IMAGES", 8, int,
            "most images one request may carry (vision models; more is a 400)"),
    Setting("max_image_bytes", "MLXLITE_MAX_IMAGE_BYTES", 20 << 20, int,
            "largest image one request may carry, in bytes once decoded from base64 (more is a 400)"),
    Setting("max_image_pixels", "MLXLITE_MAX_IMAGE_PIXELS", 50_000_000, int,
            "largest image in pixels (width x height) the engine decodes (more is a 400)"),
    Setting("image_fetch", "MLXLITE_IMAGE_FETCH", "off", _parse_image_fetch,
            "fetch http(s) image URLs named in requests: 1 from public addresses only, `private` "
            "from loopback, LAN and link-local ones too (off: only data URLs and base64 are taken)"),
    Setting("dist_start_timeout", "MLXLITE_DIST_START_TIMEOUT", 120.0, float,
            "serve --ranks/--hostfile: seconds for every rank to start and join the group"),
    Setting("dist_step_timeout", "MLXLITE_DIST_STEP_TIMEOUT", 300.0, float,
            "serve --ranks/--hostfile: seconds rank 0 may take to answer one engine call (a load "
            "included) before the group counts as hung"),
    Setting("dist_beat_timeout", "MLXLITE_DIST_BEAT_TIMEOUT", 10.0, float,
            "serve --ranks/--hostfile: seconds without a rank's heartbeat before it counts as lost"),
    Setting("dist_rank_home", "MLXLITE_DIST_RANK_HOME", "", str,
            "serve --ranks: each rank's store, `{rank}` replaced by its number (empty: the daemon's "
            "own store); a rank missing a model's blobs fetches them from the daemon"),
    Setting("dist_split", "MLXLITE_DIST_SPLIT", "auto", _parse_split,
            "serve --ranks/--hostfile: how a model is split: tensor (each layer across every rank, "
            "two all-sums per layer a token), pipeline (a range of layers per rank, one hand-off "
            "per stage: better over slow links), auto (tensor where the heads divide, else pipeline)"),
)

_BY_KEY = {s.key: s for s in SETTINGS}


def home() -> Path:
    """The root of everything mlxlite writes (`MLXLITE_HOME`, default `~/.mlxlite`)."""
    return Path(os.environ.get("MLXLITE_HOME") or Path.home() / ".mlxlite").expanduser()


def _file_values() -> dict[str, Any]:
    path = home() / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"{path} must hold a JSON object")
    unknown = sorted(set(data) - set(_BY_KEY))
    if unknown:
        raise BadRequest(f"{path}: unknown setting {unknown[0]!r}")
    return data


def get(key: str) -> Any:
    """The current value of one setting (env over file over default)."""
    setting = _BY_KEY[key]
    raw: Any
    if setting.env in os.environ:
        raw = os.environ[setting.env]
        if setting.parse is dict:
            try:
                raw = json.loads(raw) if raw else {}
            except ValueError:
                raise BadRequest(f"{setting.env} must be JSON") from None
    else:
        file_values = _file_values()
        if key not in file_values:
            return setting.default
        raw = file_values[key]
    try:
        value = setting.parse(raw)
    except (TypeError, ValueError, BadRequest):
        raise BadRequest(f"invalid value for {setting.env} / {key}: {raw!r}") from None
    return value


def describe() -> str:
    """A table of every setting for `serve --help`."""
    lines = []
    for s in SETTINGS:
        lines.append(f"  {s.env:<28} {s.help} (default: {s.default!r})")
    return "\n".join(lines)


def memory_budget(value: int | None = None, device_bytes: int | None = None) -> int:
    """Bytes of models allowed resident: `value`, else the setting, else 90% of the GPU's
    memory when the engine reports one (`device_bytes`), else 75% of RAM."""
    budget = int(value if value is not None else get("memory_budget_bytes") or 0)
    if budget > 0:
        return budget
    if device_bytes:
        return int(device_bytes) * 9 // 10
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4)
    except (ValueError, OSError, AttributeError):
        return 8 << 30
