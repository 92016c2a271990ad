"""Build models from a Modelfile or an /api/create request: the base's layers, shared, plus
small content-addressed layers (params JSON, system, template, messages JSON, licenses).

Contract:
  - `create(store, name, spec, base_dir=, say=)` resolves the base (a store model; a .gguf
    file or model directory, imported zero-copy by `importers.import_path`, only with a
    `base_dir`, the directory of a Modelfile on disk; or uploaded blobs named in `spec.files`).
    Without `base_dir` (an /api/create request) FROM is a model name, never a path. It then
    replaces the base's layers of each kind the spec sets (parameters merge over the
    base's, as Ollama does), writes only blobs not yet stored, and writes the manifest last. Status lines go to `say`: "using existing layer
    sha256:...", "creating new layer sha256:...", "writing manifest", "success".
  - Same inputs -> same manifest bytes -> same digest (canonical JSON, fixed layer order:
    the base's other layers as they were, then template, system, params, messages,
    licenses). A value equal to the base's keeps the base's layer byte for byte. A template
    in Go syntax is stored as Ollama stores it (an `application/vnd.ollama.image.template`
    layer, as written), a jinja one as mlxlite's jinja layer; either replaces the other.
  - `to_modelfile(store, entry)` prints a Modelfile whose `create` gives the same digest.
  - `check(store, spec, base_dir)` is `validate`: everything but writing.
Never imports mlx.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlxlite import names, options
from mlxlite import store as st
from mlxlite.errors import BadRequest, IntegrityError, MlxliteError, ModelNotFound
from mlxlite.formats import templates as template_formats
from mlxlite.modelfile import parser
from mlxlite.modelfile.quantize import Quantizer, check_source, quantized_base
from mlxlite.names import ModelName
from mlxlite.remote import catalog
from mlxlite.store import Layer, ModelEntry, Store
from mlxlite.store.importers import import_path

Say = Callable[[str], None]
SMALL = (st.MEDIA_TEMPLATE, st.MEDIA_SYSTEM, st.MEDIA_PARAMS, st.MEDIA_MESSAGES, st.MEDIA_LICENSE)
SETTINGS = (*SMALL, st.MEDIA_OLLAMA_TEMPLATE)   # what a Modelfile can set (a pulled Go template sits in place)


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class CreateSpec:
    """What to build; None means "keep the base's"."""

    from_: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (file name, digest) of uploaded blobs
    template: str | None = None  # Go (Ollama's) or jinja, told apart by its syntax
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    licenses: tuple[str, ...] | None = None
    requires: str | None = None
    quantize: str | None = None  # a `quantize.TYPES` name: the weights are quantized on create


def spec_from_modelfile(mf: parser.Modelfile) -> CreateSpec:
    return CreateSpec(
        from_=mf.from_.source,
        template=mf.template,
        system=mf.system,
        parameters=mf.parameters,
        messages=tuple((m["role"], m["content"]) for m in mf.messages) or None,
        licenses=tuple(mf.licenses) or None,
        requires=mf.requires,
    )


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def normalize_params(values: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """Typed, JSON-ready params; unknown keys raise (strict) or are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        try:
            typed = options.coerce(key, value, from_text=True)
        except MlxliteError:
            if strict:
                raise
            typed = value
        out[key] = list(typed) if isinstance(typed, tuple) else typed
    return out


# ---- reading a model's small layers ------------------------------------------------------
def _text(store: Store, layer: Layer) -> str:
    # A pulled model's text layer is whatever its author wrote: odd bytes show as U+FFFD.
    return store.read_blob(layer.digest).decode("utf-8", errors="replace")


def _texts(store: Store, entry: ModelEntry, media: str) -> list[str]:
    return [_text(store, layer) for layer in entry.manifest.layers_of(media)]


def read_json_layer(store: Store, entry: ModelEntry, layer: Layer, what: str) -> Any:
    """A small JSON layer; one that is not JSON is the model's defect, said plainly (as the
    engine says it at load)."""
    try:
        return json.loads(store.read_blob(layer.digest))
    except (ValueError, RecursionError):
        raise IntegrityError(f"model '{entry.name.display}' has a {what} layer that is not JSON") from None


def read_params(store: Store, entry: ModelEntry) -> dict[str, Any] | None:
    layers = entry.manifest.layers_of(st.MEDIA_PARAMS)
    if not layers:
        return None
    data = read_json_layer(store, entry, layers[-1], "params")
    return data if isinstance(data, dict) else {}


def read_messages(store: Store, entry: ModelEntry) -> list[tuple[str, str]] | None:
    layers = entry.manifest.layers_of(st.MEDIA_MESSAGES)
    if not layers:
        return None
    data = read_json_layer(store, entry, layers[-1], "messages")
    if not isinstance(data, list):
        return []
    return [(str(m.get("role", "")), str(m.get("content") or "")) for m in data if isinstance(m, dict)]


def _read_config(store: Store, entry: ModelEntry) -> dict:
    try:
        data = json.loads(store.read_blob(entry.manifest.config.digest))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _template(store: Store, entry: ModelEntry) -> str | None:
    """The model's template layer (Go or jinja) as text."""
    layer = entry.manifest.template_layer()
    return _text(store, layer) if layer is not None else None


def settings_of(store: Store, entry: ModelEntry) -> CreateSpec:
    """Everything a Modelfile can set, as this model has it."""
    systems = _texts(store, entry, st.MEDIA_SYSTEM)
    messages = read_messages(store, entry)
    licenses = _texts(store, entry, st.MEDIA_LICENSE)
    return CreateSpec(
        template=_template(store, entry),
        system=systems[-1] if systems else None,
        parameters=normalize_params(read_params(store, entry) or {}, strict=False),
        messages=tuple(messages) if messages is not None else None,
        licenses=tuple(licenses) or None,
        requires=_read_config(store, entry).get("requires"),
    )


# ---- planning: the manifest a spec gives over a base --------------------------------------
@dataclass(frozen=True)
class Plan:
    config: Layer
    layers: tuple[Layer, ...]
    blobs: dict[str, bytes]  # new small blobs by digest (some may already be stored)
    raw: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()


def plan(store: Store, base: ModelEntry, spec: CreateSpec) -> Plan:
    blobs: dict[str, bytes] = {}

    def blob(media: str, data: bytes) -> Layer:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return Layer(media, digest, len(data))

    manifest = base.manifest
    kept = [layer for layer in manifest.layers if layer.media_type not in SMALL]
    small = {media: manifest.layers_of(media) for media in SMALL}
    old = base.manifest.template_layer()
    go = spec.template is not None and template_formats.is_go_template(spec.template)
    media = st.MEDIA_OLLAMA_TEMPLATE if go else st.MEDIA_TEMPLATE
    if spec.template is not None and (_template(store, base) != spec.template or old.media_type != media):
        # One template: the new one, in the template slot, replaces either kind.
        small[st.MEDIA_TEMPLATE] = [blob(media, spec.template.encode())]
        kept = [layer for layer in kept if layer.media_type != st.MEDIA_OLLAMA_TEMPLATE]
    if spec.system is not None and _texts(store, base, st.MEDIA_SYSTEM)[-1:] != [spec.system]:
        small[st.MEDIA_SYSTEM] = [blob(st.MEDIA_SYSTEM, spec.system.encode())]
    if spec.parameters:
        old = normalize_params(read_params(store, base) or {}, strict=False)
        merged = {**old, **normalize_params(spec.parameters)}
        if merged != old or not small[st.MEDIA_PARAMS]:
            small[st.MEDIA_PARAMS] = [blob(st.MEDIA_PARAMS, canonical_json(merged))]
    if spec.messages is not None and read_messages(store, base) != list(spec.messages):
        data = [{"role": role, "content": content} for role, content in spec.messages]
        small[st.MEDIA_MESSAGES] = [blob(st.MEDIA_MESSAGES, canonical_json(data))] if data else []
    if spec.licenses is not None and _texts(store, base, st.MEDIA_LICENSE) != list(spec.licenses):
        small[st.MEDIA_LICENSE] = [blob(st.MEDIA_LICENSE, text.encode()) for text in spec.licenses]
    config = manifest.config
    base_config = _read_config(store, base)
    if spec.requires is not None and base_config.get("requires") != spec.requires:
        config = blob(st.CONFIG_MEDIA_TYPE, canonical_json({**base_config, "requires": spec.requires}))
    layers = (*kept, *(layer for media in SMALL for layer in small[media]))
    return Plan(config, layers, blobs, st.build_manifest(config, list(layers)))


# ---- the base -------------------------------------------------------------------------------
def _local_path(source: str, base_dir: Path) -> Path | None:
    """Ollama's rule: absolute, ~, or relative to the Modelfile's directory; None if absent."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return path if path.exists() else None


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.lower().endswith((".gguf", ".bin")) \
        or "\\" in source


def _from_name(store: Store, source: str, say: Say | None = None) -> ModelEntry:
    """A stored model; a built-in catalog name is fetched first when `say` is given (create)."""
    try:
        parsed = names.parse(source)
    except MlxliteError as exc:
        hint = " (a # comment must be on a line of its own)" if "#" in source else ""
        raise BadRequest(f"FROM {source!r}: not an existing file or directory, and {exc}{hint}") from None
    try:
        return store.resolve(parsed)
    except ModelNotFound:
        if say is not None and parsed.digest is None and catalog.lookup(source) is not None:
            say(f"pulling {source} from the built-in catalog")
            return catalog.install(store, source, say)
        raise ModelNotFound(f"FROM {source!r}: model '{parsed.display}' not found; "
                            "pull or import it first") from None


def _stage(store: Store, files: tuple[tuple[str, str], ...]) -> Path:
    """Uploaded blobs as a model directory (hardlinks) the importers can read."""
    tmp = store.root / f"{st.TMP_PREFIX}create-{os.getpid()}-{secrets.token_hex(6)}"
    tmp.mkdir(parents=True)
    for fname, digest in files:
        title = st.check_title(fname.replace("\\", "/").lstrip("/"))
        digest = names.parse_digest(digest)
        if not store.has_blob(digest):
            shutil.rmtree(tmp, ignore_errors=True)
            raise BadRequest(f"file {fname!r}: blob {digest} was not uploaded (POST /api/blobs/{digest})")
        dst = tmp / title
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(store.blob_path(digest), dst)
        except OSError:
            shutil.copyfile(store.blob_path(digest), dst)
    return tmp


def _import(store: Store, path: Path, name: ModelName, say: Say) -> ModelEntry:
    # Blobs only: a manifest written now would show `name` half made (without its layers)
    # until the real one replaces it, and for good if create is killed in between.
    results = import_path(store, path, name.full, say=say, commit=False)
    if len(results) != 1:
        raise BadRequest(f"FROM {path}: holds {len(results)} models; name one file or model directory")
    return results[0].entry


def resolve_base(store: Store, name: ModelName, spec: CreateSpec, base_dir: Path | None,
                 say: Say = _quiet) -> ModelEntry:
    """The base model; files and paths are imported first (zero-copy), their blobs only."""
    if spec.files:
        if spec.from_:
            raise BadRequest("give either 'from' or 'files', not both")
        ggufs = [f for f in spec.files if f[0].lower().endswith(".gguf")]
        if len(ggufs) > 1:
            raise BadRequest("more than one .gguf file given; split GGUF files are not supported")
        tmp = _stage(store, spec.files)
        try:
            target = tmp / st.check_title(ggufs[0][0].lstrip("/")) if ggufs else tmp
            if spec.quantize:   # before importing: a source quantize refuses leaves nothing behind
                check_source(target)
            return _import(store, target, name, say)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not spec.from_:
        raise BadRequest("neither 'from' nor 'files' was given (a Modelfile needs FROM)")
    if base_dir is None:
        # No Modelfile on disk (an /api/create request): FROM names a stored model, never a
        # path, so a request cannot read files of the daemon's machine.
        return _from_name(store, spec.from_, say)
    path = _local_path(spec.from_, base_dir)
    if path is not None:
        if spec.quantize:
            check_source(path)
        return _import(store, path, name, say)
    if _looks_like_path(spec.from_):
        raise BadRequest(f"FROM {spec.from_!r}: no such file or directory")
    return _from_name(store, spec.from_, say)


def check(store: Store, spec: CreateSpec, base_dir: Path | None = None) -> str:
    """`validate`: the base must exist and the spec must apply; nothing is written."""
    if spec.parameters:
        normalize_params(spec.parameters)
    if spec.from_:
        path = _local_path(spec.from_, base_dir) if base_dir is not None else None
        if path is not None:
            if path.is_file() and not path.name.lower().endswith((".gguf", ".bin", ".tar")):
                raise BadRequest(f"FROM {spec.from_!r}: not a .gguf file")
            return f"FROM {path} (to import)"
        if base_dir is not None and _looks_like_path(spec.from_):
            raise BadRequest(f"FROM {spec.from_!r}: no such file or directory")
        base = _from_name(store, spec.from_)
        result = plan(store, base, spec)
        quantized = f", quantized to {spec.quantize} on create" if spec.quantize else ""
        return f"FROM {base.name.display} ({base.digest[7:19]}): {len(result.layers)} layers{quantized}"
    raise BadRequest("neither 'from' nor 'files' was given (a Modelfile needs FROM)")


def create(store: Store, name: str | ModelName, spec: CreateSpec, base_dir: Path | None = None,
           say: Say = _quiet, quantizer: Quantizer | None = None) -> ModelEntry:
    """Build `name` (see module doc); with `spec.quantize`, `quantizer` (the engine's, which
    this wing cannot import) writes the quantized weights the new model gets instead."""
    target = names.parse(name) if isinstance(name, str) else name
    if target.digest:
        raise BadRequest(f"cannot create '{name}': a new model's name has no @digest")
    if spec.quantize and quantizer is None:
        raise BadRequest("quantize needs the engine: this caller gave no quantizer")
    if spec.parameters:
        spec = replace(spec, parameters=normalize_params(spec.parameters))
    with store.writing():
        base = resolve_base(store, target, spec, base_dir, say)
        if spec.quantize:
            base = quantized_base(store, base, spec.quantize, quantizer, say)
        result = plan(store, base, spec)
        for layer in (*result.layers, result.config):
            if layer.digest in result.blobs and not store.has_blob(layer.digest, layer.size):
                store.put_bytes(result.blobs[layer.digest])
                say(f"creating new layer {layer.digest}")
            elif layer is not result.config:
                say(f"using existing layer {layer.digest}")
        say("writing manifest")
        store.write_manifest(target, result.raw)
        entry = store.resolve(target)  # under the lock: an rm right after cannot make it "not found"
    say("success")
    return entry


# ---- show --modelfile ----------------------------------------------------------------------
def find_base(store: Store, entry: ModelEntry, settings: CreateSpec) -> ModelEntry | None:
    """Another stored model that `settings` over it rebuilds `entry` exactly, if any."""
    mine = sorted(layer.digest for layer in entry.manifest.layers if layer.media_type not in SETTINGS)
    candidates = []
    for other in store.list():
        if other.name.key == entry.name.key or other.digest == entry.digest:
            continue
        theirs = sorted(layer.digest for layer in other.manifest.layers if layer.media_type not in SETTINGS)
        if theirs == mine or set(mine) <= set(theirs):
            candidates.append(other)
    candidates.sort(key=lambda e: (sum(1 for x in e.manifest.layers if x.media_type in SETTINGS),
                                   len(e.name.display), e.name.display))
    for other in candidates:
        try:
            if plan(store, other, settings).digest == entry.digest:
                return other
        except MlxliteError:
            continue
    return None


def _block(keyword: str, value: str) -> list[str]:
    try:
        return [f"{keyword} {parser.quote(value)}"]
    except BadRequest:  # not expressible: leave it out, so it is inherited from FROM
        return [f"# {keyword} (not expressible in Modelfile syntax; inherited from FROM)"]


def to_modelfile(store: Store, entry: ModelEntry) -> str:
    settings = settings_of(store, entry)
    base = find_base(store, entry, settings)
    lines = ['# Modelfile generated by "mlxlite show"',
             "# To build a new Modelfile based on this one, replace the FROM line with:",
             f"# FROM {entry.name.display}", ""]
    lines.append(f"FROM {base.name.display}@{base.digest}" if base else f"FROM {entry.name.display}")
    if settings.template is not None:
        lines += _block("TEMPLATE", settings.template)
    if settings.system is not None:
        lines += _block("SYSTEM", settings.system)
    for key, value in settings.parameters.items():
        if key not in options.SPECS:
            lines.append(f"# PARAMETER {key} {json.dumps(value)} (unknown to mlxlite; inherited)")
            continue
        for item in (value if isinstance(value, list) else [value]):
            try:
                lines.append(f"PARAMETER {key} {parser.format_parameter(item)}")
            except BadRequest:  # e.g. a stop string with a control character: inherited
                lines.append(f"# PARAMETER {key} (not expressible in Modelfile syntax; inherited from FROM)")
    if settings.messages is not None:
        try:
            if any(role not in parser.ROLES for role, _ in settings.messages):
                raise BadRequest("role")
            lines += [f"MESSAGE {role} {parser.quote(content)}" for role, content in settings.messages]
        except BadRequest:  # a role or text Modelfiles cannot hold: keep them by inheritance
            lines.append("# MESSAGE lines: not expressible in Modelfile syntax (inherited from FROM)")
    for text in settings.licenses or ():
        lines += _block("LICENSE", text)
    if settings.requires:
        lines.append(f"REQUIRES {settings.requires}")
    return "\n".join(lines) + "\n"
