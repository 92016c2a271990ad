"""Hugging Face hub repos -> the store: `hf.co/<org>/<repo>[:<revision or quant>]`.

Lists the repo's files through the hub API (`/api/models/<repo>/revision/<rev>?blobs=true`,
which gives every file's size and, for LFS files, its sha256), downloads them through
`/<repo>/resolve/<commit>/<file>` (redirects to a CDN followed without our token), and
writes an OCI manifest with one titled layer per file plus a config blob like the
importers' (format, architecture, parameter count, quantization, context length, files).
- safetensors repos (mlx-community and the like): the model's files (config, weights,
  tokenizer, chat template, license), chosen by the importers' file pattern;
- GGUF repos: one file; a `:Q4_K_M`-style tag picks it among several quantizations
  (without one: the only GGUF, else Q4_K_M when present, else an error listing them).
LFS files go through `download.fetch` (resumable, verified against the hub's sha256);
small git files through `download.fetch_unknown` (hashed as they arrive, size checked).
The endpoint is config `hf_endpoint` (`MLXLITE_HF_ENDPOINT`); `HF_TOKEN` is sent to it.
Never imports mlx.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse

from mlxlite import config, names
from mlxlite.errors import (
    BadRequest,
    IntegrityError,
    ModelNotFound,
    NotFound,
    RegistryError,
    Unauthorized,
    Unsupported,
)
from mlxlite.names import ModelName
from mlxlite.progress import Emit, layer, quiet
from mlxlite.remote import download
from mlxlite.remote.registry import Registry
from mlxlite.store import (
    MEDIA_FILE,
    MEDIA_GGUF,
    TITLE,
    Layer,
    ModelEntry,
    Store,
    build_manifest,
    check_title,
    importers,
)

_QUANT = re.compile(r"(i?q[0-9]([._a-z0-9]*)|f16|f32|bf16|fp16)\Z", re.IGNORECASE)
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf\Z", re.IGNORECASE)
DEFAULT_QUANT = "Q4_K_M"


def _client() -> tuple[Registry, str]:
    endpoint = str(config.get("hf_endpoint")).rstrip("/")
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadRequest(f"hf_endpoint must be an http(s) URL, got {endpoint!r}")
    token = config.get("hf_token")
    reg = Registry(parts.netloc, base=f"{parts.scheme}://{parts.netloc}",
                   auth_header=f"Bearer {token}" if token else None)
    return reg, endpoint


def list_files(reg: Registry, endpoint: str, repo: str, revision: str) -> tuple[str, list[dict]]:
    """(commit sha, [{path, size, sha256|None}]) of a repo at a revision."""
    url = f"{endpoint}/api/models/{repo}/revision/{urllib.parse.quote(revision, safe='')}?blobs=true"
    try:
        resp = reg.request("GET", url, headers={"Accept": "application/json"})
    except NotFound:
        raise ModelNotFound(f"hf.co/{repo}: no such repository or revision {revision!r}") from None
    except Unauthorized:
        raise Unauthorized(f"hf.co/{repo}: access denied; set HF_TOKEN for gated or private repos") from None
    with resp:
        try:
            data = json.loads(resp.read(64 << 20))
        except ValueError:
            raise RegistryError(f"hf.co/{repo}: the hub API did not answer JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("siblings"), list):
        raise RegistryError(f"hf.co/{repo}: the hub API answer has no file list")
    files = []
    for sib in data["siblings"]:
        path = sib.get("rfilename") if isinstance(sib, dict) else None
        if not isinstance(path, str):
            continue
        lfs = sib.get("lfs") if isinstance(sib.get("lfs"), dict) else {}
        size = lfs.get("size", sib.get("size"))
        sha = lfs.get("sha256") or lfs.get("oid")
        files.append({"path": path, "size": size if isinstance(size, int) else None,
                      "sha256": sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None})
    return str(data.get("sha") or revision), files


def choose_files(repo: str, files: list[dict], quant: str | None) -> tuple[str, list[dict]]:
    """("gguf" | "safetensors", the files to download) for a listing and an optional quant tag."""
    ggufs = [f for f in files if f["path"].lower().endswith(".gguf") and "mmproj" not in f["path"].lower()]
    has_safetensors = any(f["path"].endswith(".safetensors") for f in files)
    if quant or (ggufs and not has_safetensors):
        if not ggufs:
            raise Unsupported(f"hf.co/{repo} has no GGUF files; the tag {quant!r} names a quantization")
        wanted = quant or (DEFAULT_QUANT if len(ggufs) > 1 else None)
        chosen = ggufs
        if wanted:
            exact = re.compile(rf"(^|[-._/]){re.escape(wanted)}\.gguf\Z", re.IGNORECASE)
            loose = re.compile(rf"(^|[-._/]){re.escape(wanted)}([-._]|$)", re.IGNORECASE)
            chosen = [f for f in ggufs if exact.search(f["path"])] or [
                f for f in ggufs if loose.search(f["path"].rsplit("/", 1)[-1][:-5] + ".")]
        available = sorted({m.group(1) for f in ggufs
                            if (m := re.search(r"[-._]((?:i?q\d|f16|f32|bf16)[a-z0-9_]*)\.gguf$",
                                               f["path"], re.IGNORECASE))})
        if len(chosen) != 1:
            what = f"no GGUF file matching {wanted!r}" if not chosen else f"{len(chosen)} GGUF files match {wanted!r}"
            raise BadRequest(f"hf.co/{repo}: {what}; pick one with a tag, e.g. "
                             f"hf.co/{repo}:{available[0] if available else DEFAULT_QUANT} "
                             f"(available: {', '.join(available) or 'none recognised'})")
        if _SPLIT.search(chosen[0]["path"]):
            raise Unsupported(f"hf.co/{repo}: {chosen[0]['path']} is split into several files; "
                              "split GGUF files are not supported")
        return "gguf", chosen
    if not has_safetensors:
        raise Unsupported(f"hf.co/{repo} has neither .safetensors nor .gguf weights")
    keep = [f for f in files if importers.KEEP_FILES.match(f["path"].rsplit("/", 1)[-1])
            and not any(part.startswith(".") for part in f["path"].split("/"))]
    if not any(f["path"] == "config.json" for f in keep):
        raise Unsupported(f"hf.co/{repo} has no config.json at its root: not a model repository")
    return "safetensors", keep


def pull(store: Store, name: ModelName, *, progress: Emit = quiet,
         cancel: threading.Event | None = None, tuning: download.Tuning | None = None) -> ModelEntry:
    """Pull `hf.co/<org>/<repo>[:<revision or quant>]` into the store under that name."""
    tuning = tuning or download.Tuning.from_config()
    reg, endpoint = _client()
    repo = f"{name.namespace}/{name.model}"
    tag = name.tag
    quant = tag if _QUANT.match(tag) else None
    revision = "main" if quant or tag.lower() == "latest" else tag
    progress({"status": "pulling manifest"})
    commit, files = list_files(reg, endpoint, repo, revision)
    kind, chosen = choose_files(repo, files, quant)
    for f in chosen:
        check_title(f["path"])
        if f["size"] is None:
            raise RegistryError(f"hf.co/{repo}: the hub did not report the size of {f['path']}")
    sha = urllib.parse.quote(commit, safe="")

    def open_for(path: str) -> download.OpenRange:
        url = f"{endpoint}/{repo}/resolve/{sha}/{urllib.parse.quote(path)}"

        def open_range(start: int, end: int, timeout: float):
            try:
                return reg.request("GET", url, headers={"Range": f"bytes={start}-{end - 1}"},
                                   ok=(200, 206), timeout=timeout)
            except NotFound:
                raise NotFound(f"hf.co/{repo}: {path} not found at {commit}") from None
        return open_range

    layers: list[Layer] = []
    with store.writing():
        download.check_space(store, sum(f["size"] for f in chosen if not (
            f["sha256"] and store.has_blob("sha256:" + f["sha256"], f["size"]))))
        for f in chosen:
            media = MEDIA_GGUF if kind == "gguf" else MEDIA_FILE
            if f["sha256"]:
                digest = "sha256:" + f["sha256"]
                download.fetch(store, digest, f["size"], open_for(f["path"]),
                               progress=layer(progress, "pulling", digest, f["size"]),
                               tuning=tuning, cancel=cancel)
            else:  # a small git-stored file: no digest up front, hashed as it arrives
                label = f["path"]  # the event's "digest" names the file until its digest is known
                digest = download.fetch_unknown(store, f["size"], open_for(f["path"]),
                                                progress=layer(progress, "pulling", label, f["size"]),
                                                tuning=tuning, cancel=cancel)
            layers.append(Layer(media, names.parse_digest(digest), f["size"], {TITLE: f["path"]}))
        progress({"status": "verifying sha256 digest"})
        for lay in layers:
            if not store.has_blob(lay.digest, lay.size):
                raise IntegrityError(f"blob {lay.digest} vanished before the manifest was written")
        paths = {lay.title: store.blob_path(lay.digest) for lay in layers}
        if kind == "gguf":
            cfg = importers.gguf_config(paths[chosen[0]["path"]])
        else:
            cfg = importers.dir_config(paths)
        cfg["files"] = sorted(paths)
        cfg["source"] = f"hf.co/{repo}@{commit}"
        progress({"status": "writing manifest"})
        raw = build_manifest(store.put_json(cfg), layers)
        target = ModelName(name.host, name.namespace, name.model, name.tag)
        store.write_manifest(target, raw)
        entry = store.resolve(target)  # under the lock: an rm right after cannot make it "not found"
    progress({"status": "success"})
    return entry
