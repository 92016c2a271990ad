"""The `mlxlite` command line: argparse verbs, each importing its wing when it runs.

Contract: `main(argv=None) -> int`. Every expected failure is an `MlxliteError` and
becomes one `error: ...` line on stderr and exit status 1 (130 on Ctrl-C); no
traceback for user mistakes (set MLXLITE_DEBUG=1 to see one for internal errors).
`--help`, `list`, `pull` never import mlx; verbs that generate go through a running
daemon when one answers on MLXLITE_HOST, else run in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable

from mlxlite import __version__, config
from mlxlite.cli.human import human_ago, human_bytes, table
from mlxlite.errors import BadRequest, MlxliteError, full_disk
from mlxlite.progress import Printer

Handler = Callable[[argparse.Namespace], int]


def _store():
    from mlxlite.store import Store  # lazy, as every wing below: --help stays fast

    return Store()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- store verbs ---------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    client = _daemon_client()
    if client is not None:
        from datetime import datetime

        rows = [[m["name"], m["digest"][:12], human_bytes(m["size"]),
                 human_ago(datetime.fromisoformat(m["modified_at"]).timestamp())] for m in client.tags()]
    else:
        rows = [[e.name.display, e.digest[7:19], human_bytes(e.size), human_ago(e.modified)]
                for e in _store().list()]
    print(table(rows, ["NAME", "ID", "SIZE", "MODIFIED"]))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from mlxlite.store.importers import import_path  # lazy: tarfile and GGUF readers, for this verb only

    results = import_path(_store(), args.path, args.name, say=_say)
    for result in results:
        print(result.summary())
    return 0


# `show`'s Modelfile-style sections: flag -> what it prints (`cli/show.show_text`).
SHOW_SECTIONS = {"modelfile": "a Modelfile that recreates the model", "parameters": "its parameters",
                 "template": "its chat template", "system": "its system prompt", "license": "its license"}


def cmd_show(args: argparse.Namespace) -> int:
    from mlxlite.cli import show  # lazy: GGUF headers and the Modelfile machinery are for `show` only

    section = next((k for k in SHOW_SECTIONS if getattr(args, k, False)), None)
    return show.show(_store(), args.model, section, args.json)


def cmd_rm(args: argparse.Namespace) -> int:
    client = _daemon_client()
    if client is not None:  # the daemon also unloads the model if it is resident
        for name in args.models:
            client.delete(name)
            print(f"deleted '{name}'")
        return 0
    store = _store()
    entries = [store.resolve(name) for name in args.models]  # all or nothing on a typo
    for entry in entries:
        freed = store.remove(entry.name)
        print(f"deleted '{entry.name.display}' ({human_bytes(freed)} freed)")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    client = _daemon_client()
    if client is not None:
        client.copy(args.source, args.destination)
        print(f"copied '{args.source}' to '{args.destination}'")
        return 0
    entry = _store().copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{entry.name.display}'")
    return 0


def _links_note(blob) -> str:
    """Where else a bad blob's bytes live: hardlinks share the damage (issue 14)."""
    if blob.links <= 0:
        return ""
    note = f"\n  it has {blob.links} other hard link{'s' if blob.links != 1 else ''} (the same damaged bytes)"
    if blob.linked:
        note += ": " + ", ".join(blob.linked) + " (recorded as its import source)"
    unknown = blob.links - len(blob.linked)
    if blob.linked and unknown > 0:
        note += f", and {unknown} the store did not record"
    return note


def _repair_from_catalog(store, blob) -> str | None:
    """Pull a catalog model using the blob again: its source file is re-checked (and
    re-fetched if damaged) and the import replaces the damaged blob."""
    from mlxlite.remote import catalog  # lazy: the catalog and importers are for this path only

    for model in blob.models:
        if catalog.lookup(model) is None:
            continue
        try:
            catalog.install(store, model, say=_say)
        except MlxliteError as exc:
            _say(f"could not pull {model} again: {exc}")
            continue
        if all(b.digest != blob.digest for b in store.verify([model])):
            return f"pulled {model} again from the built-in catalog"
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store()
    entries = [store.resolve(n) for n in args.models] if args.models else store.list()
    # All: listed again by verify, so a model removed in between is not asked for by name.
    wanted = [e.name.full for e in entries] if args.models else None
    bad = store.verify(wanted) if entries else []
    for blob in bad:
        print(f"bad blob {blob.digest}: {blob.reason}; used by {', '.join(blob.models)}{_links_note(blob)}")
    blobs = {layer.digest for e in entries for layer in e.manifest.blobs}
    if bad and args.repair:
        for blob in bad:
            how = store.repair_blob(blob.digest) or _repair_from_catalog(store, blob)
            print(f"repaired {blob.digest}: {how}" if how else
                  f"cannot repair {blob.digest}: no recorded source hashes right and no model using it is in "
                  f"the catalog; used by {', '.join(blob.models)}")
        bad = store.verify(wanted)  # what is still bad after the repairs, checked again
        if bad:
            _say(f"error: {len(bad)} of {len(blobs)} blobs could not be repaired; remove the models using them "
                 "(`mlxlite rm`) and pull or import them again")
            return 1
    elif bad:
        _say(f"error: {len(bad)} of {len(blobs)} blobs failed verification; `mlxlite verify --repair` restores "
             "them from their import sources or the catalog")
        return 1
    print(f"verified {len(entries)} models, {len(blobs)} blobs: all ok")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from mlxlite.remote import partial  # lazy: --help stays fast

    store = _store()
    removed, freed = store.prune()
    if args.partials:
        more, more_bytes = partial.prune_partials(store)
        removed, freed = removed + more, freed + more_bytes
    print(f"removed {removed} files, {human_bytes(freed)} freed")
    kept = [p for p in partial.partial_dir(store).glob("*") if p.suffix == ""] if not args.partials else []
    if kept:
        size = sum(p.stat().st_blocks * 512 for p in kept)
        print(f"kept {len(kept)} interrupted downloads ({human_bytes(size)} on disk): the next pull resumes "
              "them; `mlxlite prune --partials` deletes them")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from mlxlite.store import layout  # lazy: tarfile, for this verb only

    result = layout.pack(_store(), args.models, args.output, progress=Printer())
    print(result.summary())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from mlxlite.remote import pull  # lazy: the network clients are not for --help or list

    entry = pull(_store(), args.model, insecure=args.insecure, sha256=args.sha256, progress=Printer())
    print(f"pulled {entry.name.display} ({entry.digest[7:19]}, {human_bytes(entry.size)})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from mlxlite.remote import push  # lazy: the network clients are not for --help or list

    digest = push(_store(), args.model, insecure=args.insecure, progress=Printer())
    print(f"pushed {args.model} ({digest[7:19]})")
    return 0


# ---- generation ----------------------------------------------------------------------
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "seed", "num_predict", "num_ctx",
                  "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty")


def _daemon_client():
    """A client of the running daemon, or None when nothing answers on MLXLITE_HOST."""
    from mlxlite.cli import client  # lazy: only verbs that talk to a daemon need it

    return client.connect_if_running()


def _valid_text(text: str | None) -> str | None:
    """Bytes that are not UTF-8 in argv or piped stdin reach Python as lone surrogates
    (surrogateescape), which the tokenizer refuses with a TypeError: each becomes U+FFFD,
    as it does when Ollama's client sends such bytes as JSON."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text) if text else text


def cmd_run(args: argparse.Namespace) -> int:
    from mlxlite import options as opts  # lazy: its dataclasses cost `list` a few ms
    from mlxlite.cli import chat  # lazy: the chat and engine set-up are for `run` only
    from mlxlite.engine import blas  # lazy, and imports no mlx: it must run before mlx loads

    overrides = {}
    for flag in SAMPLING_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = opts.coerce(flag, value)
    if args.stop:
        overrides["stop"] = list(opts.coerce("stop", args.stop))
    fmt = None
    if args.format:
        try:
            fmt = "json" if args.format == "json" else json.loads(args.format)
        except ValueError:
            raise BadRequest("--format must be 'json' or a JSON schema") from None
    prompt = " ".join(args.prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read().rstrip()  # `echo` adds a newline the model would answer differently
        prompt = f"{prompt}\n\n{piped}" if prompt and piped.strip() else (prompt or piped)
    prompt, system = _valid_text(prompt), _valid_text(args.system)
    client = _daemon_client()
    if client is not None:
        chat.resolve_or_fetch(_store(), args.model, _say)  # catalog models land in the shared store
        backend = chat.DaemonBackend(args.model, client)
    else:
        blas.preload()  # before mlx is imported; no re-exec, so stdin read above stays read
        backend = chat.LocalBackend(args.model, _say)
        backend.load()
    if not prompt.strip() and sys.stdin.isatty():
        return chat.interactive(backend, overrides, system, fmt, args.verbose)
    if not prompt.strip():
        raise BadRequest("empty prompt")
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": prompt})
    _, stats = chat.stream_turn(backend, messages, overrides, fmt)
    print(flush=True)
    if isinstance(backend, chat.LocalBackend):
        stats.load = backend.load_seconds
        stats.total += backend.load_seconds
    if args.verbose:
        _say(stats.render())
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from mlxlite.cli import modelfile  # lazy: the Modelfile machinery is not for --help or list

    return modelfile.cmd_create(args)


def cmd_validate(args: argparse.Namespace) -> int:
    from mlxlite.cli import modelfile  # lazy: the Modelfile machinery is not for --help or list

    return modelfile.cmd_validate(args)


def _require_daemon():
    client = _daemon_client()
    if client is None:
        raise MlxliteError(f"no mlxlite daemon answers on {config.get('host')}; start one with `mlxlite serve`")
    return client


def cmd_serve(args: argparse.Namespace) -> int:
    from mlxlite.engine import blas  # lazy, and imports no mlx: it must run before mlx loads

    blas.preload()  # before the scheduler thread imports mlx
    from mlxlite.server import serve_forever  # lazy: the daemon is for `serve` only

    if args.ranks is None and args.hostfile is None:
        return serve_forever(args.host)
    from mlxlite.dist import Group, LockstepEngine  # lazy: only a distributed daemon needs it

    if args.split:
        os.environ["MLXLITE_DIST_SPLIT"] = args.split     # the ranks read it (MLXLITE_* settings reach them)
    group = Group(ranks=args.ranks, hostfile=args.hostfile, backend=args.backend)
    return serve_forever(args.host, engine=LockstepEngine(group))


def cmd_ps(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    rows = []
    for m in _require_daemon().ps():
        expires = m.get("expires_at") or ""
        until = "Forever"
        if expires and not expires.startswith("2318"):
            left = datetime.fromisoformat(expires).timestamp() - datetime.now(timezone.utc).timestamp()
            until = f"{int(left // 60)} minutes from now" if left >= 60 else f"{max(0, int(left))} seconds from now"
        processor = "100% " + ("GPU" if m.get("size_vram") else "CPU")
        placement = m.get("placement") or {}
        if placement.get("ranks", 1) > 1:   # a distributed group: its ranks and how the model is split
            processor += f" x {placement['ranks']} ranks ({placement.get('mode')})"
        rows.append([m["name"], m.get("digest", "")[:12], human_bytes(m.get("size", 0)),
                     processor, str(m.get("context_length", "")), until])
    print(table(rows, ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from mlxlite import names  # lazy: --help stays fast

    client = _require_daemon()
    wanted = names.parse(args.model).key
    if not any(names.parse(m["name"]).key == wanted for m in client.ps()):
        raise MlxliteError(f"model '{args.model}' is not loaded")
    client.stop(args.model)
    return 0


# ---- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxlite", description="Run large language models locally on MLX.")
    parser.add_argument("--version", action="version", version=f"mlxlite {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")

    def verb(name: str, handler: Handler, help: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(handler=handler)
        return p

    p = verb("run", cmd_run, "run a model: answer PROMPT, piped stdin, or chat interactively")
    p.add_argument("model")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--format", help="'json' or a JSON schema the answer must follow")
    p.add_argument("--verbose", action="store_true", help="print timings and token rates")
    for flag in SAMPLING_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=float if flag in (
            "temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty") else int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p = verb("serve", cmd_serve, "start the daemon (Ollama-compatible and OpenAI-compatible APIs)",
             epilog="settings (environment variables; also keys of $MLXLITE_HOME/config.json):\n"
             + config.describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="address to bind, host:port (default: MLXLITE_HOST or 127.0.0.1:11435)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ranks", type=int, metavar="N",
                       help="serve each model across N local processes (MLX's distributed engine, loopback)")
    where.add_argument("--hostfile", metavar="FILE",
                       help="serve each model across the hosts of MLX's hostfile (rank 0: this host)")
    p.add_argument("--backend", default="ring", choices=["ring", "jaccl", "nccl", "any"],
                   help="MLX's distributed backend for --ranks/--hostfile (default ring)")
    p.add_argument("--split", choices=list(config.SPLITS),
                   help="how --ranks/--hostfile split a model (default: MLXLITE_DIST_SPLIT or auto: tensor "
                        "parallel where the heads divide, else pipeline; pipeline suits slow links)")
    verb("ps", cmd_ps, "list the models the daemon has loaded")
    p = verb("stop", cmd_stop, "unload a model from the daemon")
    p.add_argument("model")
    p = verb("pull", cmd_pull, "pull a model from a registry, hf.co/<org>/<repo>[:<tag>] or an https URL")
    p.add_argument("model")
    p.add_argument("--insecure", action="store_true", help="use plain HTTP for the registry")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of a URL's file (makes it resumable)")
    p = verb("push", cmd_push, "push a model to the OCI registry its name names")
    p.add_argument("model")
    p.add_argument("--insecure", action="store_true", help="use plain HTTP for the registry")
    p = verb("import", cmd_import, "import a GGUF file, model directory, HF cache repo, Ollama store or OCI layout")
    p.add_argument("path")
    p.add_argument("--name", help="model name (default: from the file or directory name)")
    verb("list", cmd_list, "list models in the store", aliases=["ls"])
    p = verb("show", cmd_show, "show a model's details")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    for flag, what in SHOW_SECTIONS.items():
        p.add_argument("--" + flag, action="store_true", help="print " + what)
    p = verb("create", cmd_create, "create a model from a Modelfile")
    p.add_argument("name")
    p.add_argument("-f", "--file", default="Modelfile", help="path to the Modelfile (default: ./Modelfile)")
    p.add_argument("-q", "--quantize", metavar="TYPE",
                   help="quantize a float model's weights: q4, q8 (affine, group 64), mxfp4, nvfp4")
    p = verb("validate", cmd_validate, "check a Modelfile (syntax, parameters, base model) without writing")
    p.add_argument("-f", "--file", default="Modelfile", help="path to the Modelfile (default: ./Modelfile)")
    p = verb("rm", cmd_rm, "remove models")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p = verb("cp", cmd_cp, "copy a model under another name")
    p.add_argument("source")
    p.add_argument("destination")
    p = verb("verify", cmd_verify, "re-hash every blob of the given models (default: all)")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--repair", action="store_true",
                   help="restore bad blobs from a recorded import source that hashes right, or pull "
                   "catalog models again")
    p = verb("prune", cmd_prune, "delete blobs no model uses and leftovers of interrupted writes")
    p.add_argument("--partials", action="store_true", help="also delete interrupted downloads (resumable otherwise)")
    p = verb("pack", cmd_pack, "pack models into an OCI image layout (a directory, or PATH.tar)")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="a .tar file, else a directory (blobs hardlinked from the store)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except MlxliteError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("")
        return 130
    except BrokenPipeError:
        return 0
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("mlx", "mlx_lm", "tokenizers", "jinja2", "numpy"):
            raise
        _say(f"error: the Python package {exc.name!r} is missing; install mlxlite's dependencies "
             "(pip install -e ., or pip install 'mlx[cpu]' mlx-lm tokenizers on Linux)")
        return 1
    except (OSError, ValueError) as exc:
        full = full_disk(exc)
        if full is not None:    # the user's to fix (free space), so never a traceback
            _say(f"error: {full}")
            return 1
        if os.environ.get("MLXLITE_DEBUG"):
            raise
        _say(f"error: {exc}")
        return 1


__all__ = ["main", "build_parser"]
