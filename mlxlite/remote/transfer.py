"""`pull` and `push`: bring models into the store from anywhere, and send them to registries.

`pull(store, ref)` dispatches on the reference:
  - a catalog name (`smollm2:135m`) installs from the built-in catalog, before registries;
  - `http(s)://.../file.gguf` downloads one GGUF file (resumable when `sha256` is given);
  - `hf.co/<org>/<repo>[:<revision or quant>]` goes through `hub.py`;
  - `oci-layout:PATH[:REF]` imports an OCI image layout dir or tar through `store/layout.py`;
  - anything else is `[host/][namespace/]model[:tag][@digest]` on an OCI registry.
Registry pulls fetch the manifest, then every blob through `download.fetch` (skip if
present, parallel ranges, resume, verify), all under `store.writing()`; the manifest is
committed last, byte for byte as served, so digests match the registry's.
`push(store, name)` sends a local model to the registry its name names: HEAD skips blobs
the registry has, cross-repository mount from other local models of that host, then
monolithic or chunked upload; the manifest goes last. Progress is reported through a
callback with Ollama's event shapes (see `mlxlite/progress.py`). Never imports mlx.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from mlxlite import config, names
from mlxlite.errors import BadRequest, IntegrityError, RegistryError, Unsupported
from mlxlite.names import ModelName
from mlxlite.progress import Emit, layer, quiet
from mlxlite.remote import catalog, download, hub
from mlxlite.remote.registry import Registry
from mlxlite.store import (
    MEDIA_GGUF,
    OCI_MANIFEST,
    TITLE,
    Layer,
    Manifest,
    ModelEntry,
    Store,
    build_manifest,
    importers,
    layout,
)

HUB_HOSTS = ("hf.co", "huggingface.co")


def pull(store: Store, ref: str, *, insecure: bool = False, progress: Emit = quiet,
         sha256: str | None = None, cancel: threading.Event | None = None,
         tuning: download.Tuning | None = None) -> ModelEntry:
    """Pull `ref` into the store and return the model entry (see the module docstring)."""
    if not isinstance(ref, str) or not ref.strip():
        raise BadRequest("pull needs a model name or URL")
    if ref.startswith("oci-layout:"):  # a package on disk: layout.py verifies it like a pull
        return layout.pull(store, ref, progress=progress)
    tuning = tuning or download.Tuning.from_config()
    if ref.startswith(("http://", "https://")):
        return pull_url(store, ref, sha256=sha256, progress=progress, cancel=cancel, tuning=tuning)
    if sha256:
        raise BadRequest("--sha256 applies to URL pulls only")
    if catalog.lookup(ref) is not None:
        progress({"status": "pulling manifest"})
        entry = catalog.install(store, ref, say=lambda text: progress({"status": text}))
        progress({"status": "success"})
        return entry
    name = names.parse(ref)
    if name.host.lower() in HUB_HOSTS:
        return hub.pull(store, name, progress=progress, cancel=cancel, tuning=tuning)
    return pull_registry(store, name, insecure=insecure, progress=progress, cancel=cancel, tuning=tuning)


def fetch_layers(store: Store, layers: tuple[Layer, ...] | list[Layer], open_for: Callable[[Layer], download.OpenRange],
                 progress: Emit, cancel: threading.Event | None, tuning: download.Tuning) -> None:
    """Download every layer not yet in the store; `open_for(layer)` gives its OpenRange."""
    missing = [lay for lay in layers if not store.has_blob(lay.digest, lay.size)]
    download.check_space(store, sum(lay.size - download.partial_bytes(store, lay.digest, lay.size)
                           for lay in {lay.digest: lay for lay in missing}.values()))
    for lay in layers:
        report = layer(progress, "pulling", lay.digest, lay.size)
        download.fetch(store, lay.digest, lay.size, open_for(lay), progress=report,
                       tuning=tuning, cancel=cancel)


def pull_registry(store: Store, name: ModelName, *, insecure: bool = False, progress: Emit = quiet,
                  cancel: threading.Event | None = None,
                  tuning: download.Tuning | None = None) -> ModelEntry:
    tuning = tuning or download.Tuning.from_config()
    reg = Registry(name.host, insecure=insecure)
    repo = name.repository
    progress({"status": "pulling manifest"})
    raw, _media = reg.get_manifest(repo, name.digest or name.tag)
    actual = "sha256:" + hashlib.sha256(raw).hexdigest()
    if name.digest and actual != name.digest:
        raise IntegrityError(f"the registry sent a manifest with digest {actual}, expected {name.digest}")
    manifest = Manifest.parse(raw)  # validates every digest and file name before any download

    def open_for(lay: Layer) -> download.OpenRange:
        return lambda start, end, timeout: reg.open_blob(repo, lay.digest, start, end - 1, timeout)

    with store.writing():
        fetch_layers(store, manifest.blobs, open_for, progress, cancel, tuning)
        progress({"status": "verifying sha256 digest"})
        for lay in manifest.blobs:  # each was hashed as it arrived; a blob skipped as present
            if not store.has_blob(lay.digest, lay.size):  # must still be there with its size
                raise IntegrityError(f"blob {lay.digest} vanished before the manifest was written")
        progress({"status": "writing manifest"})
        store.write_manifest(ModelName(name.host, name.namespace, name.model, name.tag), raw)
        entry = store.resolve(name)  # under the lock: an rm right after cannot make it "not found"
    progress({"status": "success"})
    return entry


# ---- plain URLs --------------------------------------------------------------------------
def pull_url(store: Store, url: str, *, sha256: str | None = None, progress: Emit = quiet,
             cancel: threading.Event | None = None, tuning: download.Tuning | None = None,
             name: str | None = None) -> ModelEntry:
    """Download one `.gguf` file from a URL and import it (resumable when `sha256` is given)."""
    tuning = tuning or download.Tuning.from_config()
    parts = urllib.parse.urlsplit(url)
    filename = os.path.basename(urllib.parse.unquote(parts.path))
    if not filename.lower().endswith(".gguf"):
        raise Unsupported(f"cannot pull {url}: only URLs of .gguf files are supported")
    title = "".join(c if c.isalnum() or c in "._-" else "-" for c in filename)
    model_name = names.parse(name) if name else importers.default_name(Path(filename))
    reg = Registry(parts.netloc, base=f"{parts.scheme}://{parts.netloc}")
    progress({"status": "pulling manifest"})
    digest = names.parse_digest(sha256 if sha256.startswith("sha256") else "sha256:" + sha256) \
        if sha256 else None
    with store.writing():
        head = reg.request("HEAD", url, ok=(200,))
        with head:
            length = head.headers.get("Content-Length")
        if not length or not length.isdigit():
            raise RegistryError(f"{url} did not say how large the file is (no Content-Length)")
        size = int(length)

        def open_range(start: int, end: int, timeout: float):
            return reg.request("GET", url, headers={"Range": f"bytes={start}-{end - 1}"},
                               ok=(200, 206), timeout=timeout)

        if digest is None:
            report = layer(progress, "pulling", "sha256:" + title, size)
            digest = download.fetch_unknown(store, size, open_range, progress=report,
                                            tuning=tuning, cancel=cancel)
        else:
            download.check_space(store, size - download.partial_bytes(store, digest, size))
            download.fetch(store, digest, size, open_range, progress=layer(progress, "pulling", digest, size),
                           tuning=tuning, cancel=cancel)
        progress({"status": "verifying sha256 digest"})
        cfg = importers.gguf_config(store.blob_path(digest))
        cfg["files"] = [title]
        cfg["source"] = url
        gguf_layer = Layer(MEDIA_GGUF, digest, size, {TITLE: title})
        progress({"status": "writing manifest"})
        raw = build_manifest(store.put_json(cfg), [gguf_layer])
        store.write_manifest(model_name, raw)
        entry = store.resolve(model_name)  # under the lock: an rm right after cannot make it "not found"
    progress({"status": "success"})
    return entry


# ---- push --------------------------------------------------------------------------------
def _mount_sources(store: Store, name: ModelName, digest: str) -> list[str]:
    """Repositories on the same registry host that hold `digest`, per local manifests."""
    out = []
    for entry in store.list():
        if entry.name.host.lower() != name.host.lower() or entry.name.repository == name.repository:
            continue
        if any(lay.digest == digest for lay in entry.manifest.blobs) and entry.name.repository not in out:
            out.append(entry.name.repository)
    return out


def push(store: Store, name: str | ModelName, *, insecure: bool = False, progress: Emit = quiet,
         chunk_size: int | None = None) -> str:
    """Push a local model to the registry its name names; returns the manifest digest."""
    entry = store.resolve(name)
    target = entry.name
    if target.host.lower() in HUB_HOSTS:
        raise Unsupported("pushing to the Hugging Face hub is not supported; push to an OCI registry")
    if target.host.lower() == names.DEFAULT_HOST and target.namespace.lower() == names.DEFAULT_NAMESPACE:
        raise BadRequest(f"cannot push '{target.display}': name it for a registry you can write to "
                         "(mlxlite cp MODEL host/namespace/model:tag)")
    chunk = chunk_size or max(1 << 20, config.get("push_chunk_bytes"))
    reg = Registry(target.host, insecure=insecure)
    repo = target.repository
    progress({"status": "retrieving manifest"})
    store.check_integrity(entry)  # never send bytes that do not match their digest
    for lay in entry.manifest.blobs:
        report = layer(progress, "pushing", lay.digest, lay.size)
        report(0)
        if reg.has_blob(repo, lay.digest, "pull,push") is not None:
            report(lay.size)
            continue
        location = None
        for source in _mount_sources(store, target, lay.digest):
            location = reg.mount(repo, lay.digest, source)
            if location is None:
                break  # mounted: no bytes sent
            # the registry opened an ordinary upload instead; use it
            break
        else:
            location = reg.start_upload(repo)
        if location is not None:
            sent = [0]

            def on_sent(n: int, sent: list[int] = sent, report=report) -> None:
                sent[0] += n
                report(sent[0])

            reg.upload(repo, location, store.blob_path(lay.digest), lay.digest, lay.size,
                       chunk_size=chunk, progress=on_sent)
        report(lay.size)
    progress({"status": "pushing manifest"})
    try:
        media = json.loads(entry.manifest.raw).get("mediaType") or OCI_MANIFEST
    except ValueError:
        raise IntegrityError(f"model '{target.display}' has a damaged manifest") from None
    sent_digest = reg.put_manifest(repo, target.tag.lower(), entry.manifest.raw, media)
    if sent_digest and sent_digest != entry.digest:
        raise RegistryError(f"{target.host} stored the manifest as {sent_digest}, expected {entry.digest}")
    progress({"status": "success"})
    return entry.digest


__all__ = ["pull", "push", "pull_registry", "pull_url"]
