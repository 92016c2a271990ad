"""`mlxlite show`: what a stored model is, as a summary, a human view or a Modelfile-style section.

Owns `model_summary` (the config blob, the template/system/license/params layers, and for
a GGUF what loading will do: the mlx-lm class it runs on, the tensors re-quantized or
dequantized), `show_text` (`--modelfile/--parameters/--template/--system/--license`) and
`show`, the verb's output. Imported by `cli/verbs.py` only when `show` runs (GGUF headers
and the Modelfile machinery are not for `--help` or `list`); never imports mlx, and never
writes to the store but the view a model directory is read through.
"""

from __future__ import annotations

import json

from mlxlite.cli.human import human_bytes
from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats import archs, gguf
from mlxlite.modelfile import read_json_layer, read_params, to_modelfile
from mlxlite.store import (
    MEDIA_GGUF,
    MEDIA_LICENSE,
    MEDIA_OLLAMA_TEMPLATE,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    ModelEntry,
    Store,
)


def model_summary(store: Store, entry: ModelEntry) -> dict:
    """What `show` prints: the config blob plus template/system/license/params layers."""
    info = store.read_config(entry)
    out = {
        "name": entry.name.display,
        "digest": entry.digest,
        "size": entry.size,
        "format": info.get("format"),
        "architecture": info.get("architecture"),
        "parameters": info.get("parameter_size") or info.get("parameter_count"),
        "quantization": info.get("quantization"),
        "context_length": info.get("context_length"),
        "files": info.get("files") or list(entry.manifest.files()),
    }
    # What the stored config says, as /api/tags lists it (images: the `vision` extra).
    out["capabilities"] = (["embedding"] if archs.is_encoder(str(info.get("architecture") or ""))
                           else ["completion"]) + (["vision"] if info.get("vision") else [])
    texts = {"template": (MEDIA_TEMPLATE, MEDIA_OLLAMA_TEMPLATE), "system": (MEDIA_SYSTEM,),
             "license": (MEDIA_LICENSE,)}
    for key, medias in texts.items():
        parts = [store.read_blob(layer.digest).decode("utf-8", "replace")
                 for media in medias for layer in entry.manifest.layers_of(media)]
        if parts:
            out[key] = "\n".join(parts)
    for layer in entry.manifest.layers_of(MEDIA_PARAMS):
        out["parameters_set"] = read_json_layer(store, entry, layer, "params")
    if info.get("format") == "gguf":
        files = entry.manifest.files()
        path = next((store.blob_path(layer.digest) for title, layer in files.items()
                     if title.endswith(".gguf") or layer.media_type == MEDIA_GGUF), None)
        if path is not None:
            header = gguf.read_gguf(path)
            out.setdefault("template", header.metadata.get("tokenizer.chat_template"))
            if header.metadata.get("general.license"):
                out.setdefault("license", header.metadata.get("general.license"))
            out.update(_load_plan_text(header))
            if out["runs_on"].startswith("nothing"):
                out["capabilities"] = []    # as /api/show says: a model nothing runs does nothing
    elif "template" not in out:
        view = store.view(entry)
        for candidate in ("chat_template.jinja", "tokenizer_config.json"):
            path = view / candidate
            if path.exists():
                text = path.read_text()
                out["template"] = text if candidate.endswith(".jinja") else json.loads(text).get("chat_template")
                break
    return {k: v for k, v in out.items() if v not in (None, "")}


def _load_plan_text(header: gguf.Header) -> dict:
    """What loading will do, from the header alone: the mlx-lm class the file runs on (or why
    none), the re-quantized and the dequantized tensors (`show` says it so nobody has to load
    the model to find out)."""
    ids = {name: t for t, name in gguf.GGML_TYPES.items()}
    plan = gguf.load_plan(header)
    try:
        out = {"runs_on": f"mlx-lm {gguf.model_config(header)['model_type']}"}
    except (Unsupported, BadRequest) as exc:
        out = {"runs_on": f"nothing: {exc}"}
    for how in ("requantized", "dequantized"):
        counts = plan.get(how, {})
        kinds = [f"{k} -> {gguf.LOADS[ids[k]][1]} bits" if how == "requantized" else k for k in sorted(counts)]
        n = sum(counts.values())
        out[f"{how}_at_load"] = f"{n} tensor{'s' * (n != 1)} ({', '.join(kinds)})" if n else "none"
    return out


def show_text(store: Store, entry: ModelEntry, section: str, summary: dict) -> str:
    """`show --modelfile/--parameters/--template/--system/--license` output."""
    if section == "modelfile":
        return to_modelfile(store, entry)
    if section == "parameters":
        out = []
        for key, value in (read_params(store, entry) or {}).items():
            for item in value if isinstance(value, list) else [value]:
                out.append(f"{key:<30} {json.dumps(item) if isinstance(item, str) else item}\n")
        return "".join(out)
    text = summary.get(section) or ""
    return text if text.endswith("\n") or not text else text + "\n"


def show(store: Store, model: str, section: str | None, as_json: bool) -> int:
    """The `show` verb: one Modelfile-style `section`, the summary as JSON, or the human view."""
    entry = store.resolve(model)
    summary = model_summary(store, entry)
    if section:  # Modelfile-style sections (issue 7)
        print(show_text(store, entry, section, summary), end="")
        return 0
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    print("  Model")
    for label, key in (("architecture", "architecture"), ("parameters", "parameters"),
                       ("context length", "context_length"), ("quantization", "quantization"),
                       ("format", "format"), ("runs on", "runs_on"), ("requantized at load", "requantized_at_load"),
                       ("dequantized at load", "dequantized_at_load"), ("digest", "digest"), ("size", "size")):
        if key in summary:
            value = human_bytes(summary[key]) if key == "size" else summary[key]
            print(f"    {label:<20}{value}")
    print("\n  Capabilities")
    for capability in summary.get("capabilities", []):
        print(f"    {capability}")
    if "parameters_set" in summary:
        print("\n  Parameters")
        for key, value in summary["parameters_set"].items():
            print(f"    {key:<20}{json.dumps(value)}")
    for key in ("system", "template", "license"):
        if key in summary:
            text = str(summary[key]).strip().splitlines()
            print(f"\n  {key.capitalize()}")
            for line in text[:12]:
                print(f"    {line}")
            if len(text) > 12:
                print(f"    ... ({len(text) - 12} more lines)")
    return 0
