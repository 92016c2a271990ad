"""One racing process for test_store_race.py: a few threads, each doing a seeded random
sequence of store verbs on one shared store, through the functions the CLI verbs call
(`import_path`, `layout.pull`, `pull` from a registry, `create`, `Store.copy`, `Store.remove`,
`Store.prune`, `Store.list`, `Store.verify`, `show`'s `model_summary`).

Run as a script with one JSON argument (the plan); prints "ready", waits for a line on
stdin, then prints one JSON record per verb: actor, op, name, src, start, end (the machine's
monotonic clock, the same in every process), ok, digest, error (the typed error's class),
message, untyped (a traceback: any other exception), violation (an invariant a `list`
under the writer lock found broken: a listed model whose blob is missing).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from mlxlite.cli.show import model_summary
    from mlxlite.errors import MlxliteError
    from mlxlite.modelfile import create, parse, spec_from_modelfile
    from mlxlite.remote import pull
    from mlxlite.store import Store
    from mlxlite.store import layout as store_layout
    from mlxlite.store.importers import import_path

    plan = json.loads(sys.argv[1])
    store = Store(Path(plan["root"]))
    pool: list[str] = plan["names"]
    out_lock = threading.Lock()

    def record(**fields: object) -> None:
        with out_lock:
            print(json.dumps(fields), flush=True)

    def listed() -> tuple[None, str | None]:
        with store.writing():       # rm and prune wait: every blob a listed model names is there
            for entry in store.list():
                for layer in entry.manifest.blobs:
                    if not store.has_blob(layer.digest, layer.size):
                        return None, f"listed {entry.name.display} but its blob {layer.digest} is missing"
        return None, None

    def done(_: object) -> tuple[None, None]:
        return None, None

    def verified() -> tuple[None, str | None]:
        bad = store.verify()
        return None, f"verify found bad blobs: {bad}" if bad else None

    def op(rng: random.Random) -> tuple[str, str | None, str | None, object]:
        """(op, name, src, a function giving (digest, violation))."""
        name = rng.choice(pool)
        src = rng.choice(pool)
        kind = rng.choices(list(plan["weights"]), weights=list(plan["weights"].values()))[0]
        if kind == "import-gguf":
            path = rng.choice(plan["ggufs"])
            return kind, name, path, lambda: (import_path(store, path, name)[0].entry.digest, None)
        if kind == "import-dir":
            return kind, name, None, lambda: (import_path(store, plan["model_dir"], name)[0].entry.digest, None)
        if kind == "pull-layout":
            source = "oci-layout:" + plan["layout"]
            return kind, name, None, lambda: (store_layout.pull(store, source, name=name).digest, None)
        if kind == "pull-registry":
            ref = plan["registry_name"]
            return kind, ref, None, lambda: (pull(store, ref, insecure=True).digest, None)
        if kind == "create":
            text = f"FROM {src}\nSYSTEM {rng.choice(['be brief', 'be kind'])}\n"
            return kind, name, src, lambda: (create(store, name, spec_from_modelfile(parse(text))).digest, None)
        if kind == "cp":
            return kind, name, src, lambda: (store.copy(src, name).digest, None)
        if kind == "rm":
            return kind, name, None, lambda: done(store.remove(name))
        if kind == "prune":
            return kind, None, None, lambda: done(store.prune())
        if kind == "show":
            return kind, name, None, lambda: (model_summary(store, store.resolve(name))["digest"], None)
        if kind == "verify":
            return kind, None, None, verified
        return "list", None, None, listed

    def actor(index: int) -> None:
        rng = random.Random(f"{plan['seed']}-{plan['worker']}-{index}")
        for _ in range(plan["rounds"]):
            kind, name, src, run = op(rng)
            start = time.monotonic()
            fields = {"actor": f"{plan['worker']}.{index}", "op": kind, "name": name, "src": src, "ok": False,
                      "digest": None, "error": None, "message": None, "untyped": None, "violation": None}
            try:
                fields["digest"], fields["violation"] = run()
                fields["ok"] = True
            except MlxliteError as exc:
                fields["error"], fields["message"] = type(exc).__name__, str(exc)
            except Exception as exc:
                fields["error"], fields["message"] = type(exc).__name__, str(exc)
                fields["untyped"] = traceback.format_exc()
            record(**fields, start=start, end=time.monotonic())

    print("ready", flush=True)
    sys.stdin.readline()
    threads = [threading.Thread(target=actor, args=(i,)) for i in range(plan["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
