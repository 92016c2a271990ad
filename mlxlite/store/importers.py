"""Bring models that are already on disk into the store, without copying bytes where
the file system allows it (hardlink, then reflink, then copy; the output says which).

Sources, detected by `import_path`:
  - a single `.gguf` file (magic and header validated; metadata recorded in the config);
  - a model directory in the mlx-community / Hugging Face layout (`config.json`,
    `*.safetensors`, tokenizer and chat-template files);
  - a Hugging Face cache repo (`models--org--repo`) or one of its snapshots: LFS blobs
    are already named by their sha256, so they are linked without being re-read;
  - an Ollama models directory (`manifests/` + `blobs/sha256-<hex>`): every model in it,
    manifests kept byte for byte, so digests match Ollama's;
  - an OCI image layout directory or tar (`oci-layout` marker), via `layout.py`.
Every import holds the store's writer lock and writes its manifest last.
Never imports mlx.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mlxlite import names
from mlxlite.errors import BadRequest, IntegrityError, MlxliteError
from mlxlite.formats import gguf
from mlxlite.names import ModelName
from mlxlite.store import layout
from mlxlite.store.imported import ImportResult, default_name, staged
from mlxlite.store.manifest import MEDIA_FILE, MEDIA_GGUF, TITLE, Layer, Manifest, build_manifest
from mlxlite.store.store import Store

Say = Callable[[str], None]

# Files of a model directory worth keeping; weights in other formats are skipped.
KEEP_FILES = re.compile(
    r"(.*\.(json|safetensors|jinja|txt|model|tiktoken|md)|LICENSE.*|NOTICE.*|tokenizer\..*)\Z",
    re.IGNORECASE,
)
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def _quiet(_: str) -> None:
    pass


class _Collector:
    """Puts files into the store and remembers how each one got there."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.methods: Counter[str] = Counter()
        self.copied = 0

    def add(self, path: Path, title: str, media: str = MEDIA_FILE, known_digest: str | None = None) -> Layer:
        digest, size, method = self.store.put_file(path, known_digest=known_digest)
        self.methods[method] += 1
        if method == "copy":
            self.copied += size
        return Layer(media, digest, size, {TITLE: title})


def _commit(store: Store, name: ModelName, config: dict, layers: list[Layer],
            collector: _Collector, commit: bool = True) -> ImportResult:
    config_layer = store.put_json(config)
    raw = build_manifest(config_layer, layers)
    if not commit:  # the caller writes its own manifest over these blobs (create), under its lock
        return ImportResult(staged(name, raw), dict(collector.methods), collector.copied)
    store.write_manifest(name, raw)
    return ImportResult(store.resolve(name), dict(collector.methods), collector.copied)


def _human_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


# ---- GGUF --------------------------------------------------------------------------
def gguf_config(path: Path) -> dict:
    """The config blob of a GGUF model, from its header (validated)."""
    header = gguf.read_gguf(path)
    meta = header.metadata
    arch = header.architecture
    params = gguf.parameter_count(header)
    return {
        "format": "gguf",
        "architecture": arch,
        "family": arch,
        "parameter_count": params,
        "parameter_size": _human_count(params),
        "quantization": gguf.file_type_name(meta.get("general.file_type")),
        "context_length": meta.get(f"{arch}.context_length"),
        "files": [path.name],
        **({"vision": True} if gguf.takes_images(header) else {}),  # its vision tower inline (mlx-vlm)
    }


def import_gguf(store: Store, path: Path, name: ModelName | None = None, say: Say = _quiet,
                known_digest: str | None = None, extra: tuple[tuple[str, bytes], ...] = (),
                commit: bool = True) -> ImportResult:
    """Import a GGUF file; `extra` are small layers (media type, bytes) to add after it,
    such as a template the catalog gives the model."""
    path = Path(path)
    name = name or default_name(path)
    config = gguf_config(path)
    title = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name)
    with store.writing():
        collector = _Collector(store)
        layer = collector.add(path, title, MEDIA_GGUF, known_digest)
        small = [Layer(media, store.put_bytes(data), len(data)) for media, data in extra]
        config["files"] = [title]
        return _commit(store, name, config, [layer, *small], collector, commit)


# ---- model directories ---------------------------------------------------------------
def _safetensors_params(path: Path, bits: int | None) -> int:
    """Parameter count from a safetensors header, unpacking quantized weights."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise BadRequest(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20:
            raise BadRequest(f"{path}: safetensors header is implausibly large")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            raise BadRequest(f"{path}: not a safetensors file (bad header)") from None
    total = 0
    for key, info in header.items():
        if key == "__metadata__" or key.endswith((".scales", ".biases")):
            continue
        count = 1
        for dim in info.get("shape", []):
            count *= dim
        if bits and info.get("dtype") == "U32":
            count = count * 32 // bits
        total += count
    return total


def dir_config(files: dict[str, Path]) -> dict:
    try:
        cfg = json.loads(files["config.json"].read_text())
    except ValueError as exc:
        raise BadRequest(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise BadRequest("config.json must hold a JSON object")
    quant = cfg.get("quantization") or cfg.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    params = sum(_safetensors_params(p, bits) for t, p in files.items() if t.endswith(".safetensors"))
    if bits:
        mode = quant.get("mode") or "affine"   # mlx-lm's key: affine, mxfp4, nvfp4, mxfp8
        quantization = (f"Q{bits}" if mode == "affine" else str(mode).upper()) \
            + (f" (group {quant.get('group_size')})" if quant.get("group_size") else "")
    else:
        quantization = str(cfg.get("torch_dtype") or cfg.get("dtype") or "").upper()
    arch = cfg.get("model_type") or ""
    return {
        "format": "safetensors",
        "architecture": arch,
        "family": arch,
        "parameter_count": params,
        "parameter_size": _human_count(params),
        "quantization": quantization,
        "context_length": cfg.get("max_position_embeddings") or cfg.get("max_sequence_length"),
        "files": sorted(files),
        **({"vision": True} if isinstance(cfg.get("vision_config"), dict) else {}),  # takes images (mlx-vlm)
    }


def _model_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    keep: dict[str, Path] = {}
    skipped: list[str] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if not path.is_file():
            continue
        title = rel.as_posix()
        (keep.__setitem__(title, path) if KEEP_FILES.match(path.name) else skipped.append(title))
    return keep, skipped


def import_model_dir(store: Store, root: Path, name: ModelName | None = None, say: Say = _quiet,
                     known_digests: dict[str, str] | None = None, commit: bool = True) -> ImportResult:
    root = Path(root)
    files, skipped = _model_files(root)
    if "config.json" not in files:
        raise BadRequest(f"{root} has no config.json: not a model directory")
    if not any(t.endswith(".safetensors") for t in files):
        raise BadRequest(f"{root} has no .safetensors weights")
    if skipped:
        say(f"skipping {len(skipped)} files that are not part of an MLX model: {', '.join(skipped[:5])}")
    config = dir_config(files)
    name = name or default_name(root)
    known = known_digests or {}
    with store.writing():
        collector = _Collector(store)
        layers = [collector.add(path, title, MEDIA_FILE, known.get(title)) for title, path in files.items()]
        return _commit(store, name, config, layers, collector, commit)


# ---- Hugging Face cache ----------------------------------------------------------------
def _hf_repo_and_snapshot(path: Path) -> tuple[Path, Path, str]:
    """(repo dir `models--org--repo`, snapshot dir, revision label) for a repo or snapshot path."""
    if path.parent.name == "snapshots":
        repo, snapshot = path.parent.parent, path
        revision = next((ref.name for ref in (repo / "refs").glob("*")
                         if ref.is_file() and ref.read_text().strip() == snapshot.name), snapshot.name[:12])
        return repo, snapshot, revision
    repo = path
    main = repo / "refs" / "main"
    if main.is_file():
        return repo, repo / "snapshots" / main.read_text().strip(), "main"
    snapshots = sorted((repo / "snapshots").glob("*"))
    if len(snapshots) != 1:
        raise BadRequest(f"{repo} has {len(snapshots)} snapshots and no refs/main; import one snapshot directory")
    return repo, snapshots[0], snapshots[0].name[:12]


def import_hf_cache(store: Store, path: Path, name: ModelName | None = None, say: Say = _quiet,
                    commit: bool = True) -> ImportResult:
    repo, snapshot, revision = _hf_repo_and_snapshot(Path(path))
    if not snapshot.is_dir():
        raise BadRequest(f"{snapshot} is missing: the cache entry is incomplete")
    parts = repo.name.split("--")
    if len(parts) < 3:
        raise BadRequest(f"{repo.name} is not a Hugging Face cache repo (models--org--repo)")
    if name is None:
        tag = "latest" if revision == "main" else revision
        name = names.parse(f"hf.co/{parts[1]}/{'--'.join(parts[2:])}:{tag}")
    # LFS files are symlinks to blobs named by their sha256: trust the name, verify later.
    known: dict[str, str] = {}
    for file in snapshot.rglob("*"):
        if file.is_symlink() and _HEX64.match(file.resolve().name):
            known[file.relative_to(snapshot).as_posix()] = "sha256:" + file.resolve().name
    ggufs = sorted(p for p in snapshot.rglob("*.gguf"))
    if not (snapshot / "config.json").exists() and ggufs:
        if len(ggufs) > 1:
            listing = ", ".join(p.name for p in ggufs)
            raise BadRequest(f"{repo.name} holds several GGUF files ({listing}); import one of them by path")
        rel = ggufs[0].relative_to(snapshot).as_posix()
        return import_gguf(store, ggufs[0].resolve(), name, say, known.get(rel), commit=commit)
    resolved_dir = snapshot
    return import_model_dir(store, resolved_dir, name, say, known, commit)


# ---- Ollama's store ------------------------------------------------------------------
def import_ollama(store: Store, root: Path, say: Say = _quiet) -> list[ImportResult]:
    root = Path(root)
    manifests = sorted(p for p in (root / "manifests").glob("*/*/*/*") if p.is_file())
    if not manifests:
        raise BadRequest(f"{root} holds no Ollama manifests")
    results = []
    for path in manifests:
        host, namespace, model, tag = path.relative_to(root / "manifests").parts
        try:
            name = names.parse(f"{host}/{namespace}/{model}:{tag}")
            raw = path.read_bytes()
            manifest = Manifest.parse(raw)
        except MlxliteError as exc:
            say(f"skipping {path}: {exc}")
            continue
        with store.writing():
            collector = _Collector(store)
            try:
                for layer in manifest.blobs:
                    blob = root / "blobs" / ("sha256-" + layer.digest.split(":", 1)[1])
                    if not blob.is_file():
                        raise IntegrityError(f"blob {layer.digest} of {name.display} is missing in {root}")
                    collector.add(blob, "", layer.media_type, layer.digest)
                store.write_manifest(name, raw)
                entry = store.resolve(name)  # under the lock: an rm right after cannot make it "not found"
            except MlxliteError as exc:
                say(f"skipping {name.display}: {exc}")
                continue
        results.append(ImportResult(entry, dict(collector.methods), collector.copied))
    return results


# ---- dispatch ------------------------------------------------------------------------
def _is_layout(path: Path) -> bool:
    if path.is_dir():
        return (path / "oci-layout").is_file()
    if path.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        return True  # a damaged layout tar gets layout.py's clear error, not a GGUF one
    return layout.is_layout(path)


def import_path(store: Store, path: str | Path, name: str | None = None, say: Say = _quiet,
                commit: bool = True) -> list[ImportResult]:
    """Import whatever `path` is; returns one result per model imported. `commit=False`
    stores the blobs but writes no manifest (`create` writes the one model it makes); the
    caller holds `store.writing()` until its own manifest names them, or `prune` may take them."""
    src = Path(path).expanduser()
    parsed = names.parse(name) if name else None
    if not src.exists():
        raise BadRequest(f"{src}: no such file or directory")
    if _is_layout(src):
        return [layout.import_layout_result(store, src, name=parsed, progress=layout.plain_progress(say),
                                            commit=commit)]
    if src.is_file():
        real = src.resolve()
        known = "sha256:" + real.name if src.is_symlink() and _HEX64.match(real.name) else None
        return [import_gguf(store, real, parsed or default_name(src), say, known, commit=commit)]
    if (src / "snapshots").is_dir() or src.parent.name == "snapshots":
        return [import_hf_cache(store, src, parsed, say, commit)]
    if (src / "manifests").is_dir() and (src / "blobs").is_dir():
        if parsed:
            raise BadRequest("--name does not apply to an Ollama models directory (it imports every model)")
        if not commit:
            raise BadRequest(f"{src} is an Ollama models directory: it holds several models; name one")
        return import_ollama(store, src, say)
    return [import_model_dir(store, src, parsed, say, commit=commit)]
