"""`create` from Modelfiles: layers shared with the base, small layers content-addressed,
same inputs -> same digest, `show --modelfile` round-trips, `validate` writes nothing."""

import json
import os

import pytest

from mlxlite import store as st
from mlxlite.errors import BadRequest, IntegrityError, ModelNotFound
from mlxlite.modelfile import build as cr
from mlxlite.modelfile import parser as modelfile

PIRATE = '''FROM smollm2:135m
SYSTEM """You are a pirate. Answer every question like a pirate, arr!"""
PARAMETER temperature 0
PARAMETER stop "<|im_end|>"
PARAMETER stop "Captain:"
MESSAGE user Who are you?
MESSAGE assistant "Ahoy, matey! I be the ship's parrot."
LICENSE """Apache License 2.0
(example text)"""
LICENSE MIT
'''


def _create(store, name, text, base_dir=None):
    lines = []
    entry = cr.create(store, name, cr.spec_from_modelfile(modelfile.parse(text)), base_dir, say=lines.append)
    return entry, lines


def _blobs(store) -> set[str]:
    return {p.name for p in store.blob_dir.iterdir() if not p.name.startswith(".")}


def test_create_shares_the_base_weights_and_adds_small_layers(store, default_model):
    base = store.resolve(default_model)
    entry, lines = _create(store, "pirate", PIRATE)
    weights = base.manifest.layers_of(st.MEDIA_GGUF)
    assert entry.manifest.layers_of(st.MEDIA_GGUF) == weights
    assert entry.manifest.config == base.manifest.config
    assert lines[0] == f"using existing layer {weights[0].digest}"
    assert sum(line.startswith("creating new layer sha256:") for line in lines) == 5
    assert lines[-2:] == ["writing manifest", "success"]
    summary = cr.settings_of(store, entry)
    assert summary.system.startswith("You are a pirate.")
    assert summary.parameters == {"temperature": 0.0, "stop": ["<|im_end|>", "Captain:"]}
    assert summary.messages == (("user", "Who are you?"), ("assistant", "Ahoy, matey! I be the ship's parrot."))
    assert summary.licenses == ("Apache License 2.0\n(example text)", "MIT")
    params = json.loads(store.read_blob(entry.manifest.layers_of(st.MEDIA_PARAMS)[0].digest))
    assert params == {"stop": ["<|im_end|>", "Captain:"], "temperature": 0.0}


def test_same_inputs_give_the_same_digest_and_no_new_blobs(store, default_model):
    first, _ = _create(store, "pirate", PIRATE)
    before = _blobs(store)
    again, lines = _create(store, "pirate-copy", PIRATE)
    assert again.digest == first.digest
    assert _blobs(store) == before
    assert not any(line.startswith("creating new layer") for line in lines)


def test_changing_only_the_system_prompt_writes_one_small_blob(store, default_model):
    _create(store, "pirate", PIRATE)
    before = _blobs(store)
    changed = PIRATE.replace("You are a pirate.", "You are a ninja.")
    entry, lines = _create(store, "ninja", changed)
    new = _blobs(store) - before
    assert len(new) == 1
    (system,) = entry.manifest.layers_of(st.MEDIA_SYSTEM)
    assert new == {system.digest[7:]} and system.size < 200
    assert [line for line in lines if line.startswith("creating")] == [f"creating new layer {system.digest}"]


def test_layers_of_a_base_are_replaced_params_merged(store, default_model):
    _create(store, "pirate", PIRATE)
    entry, _ = _create(store, "calm-pirate", "FROM pirate\nPARAMETER temperature 0.5\nSYSTEM calm\n")
    settings = cr.settings_of(store, entry)
    assert settings.system == "calm"
    assert settings.parameters == {"temperature": 0.5, "stop": ["<|im_end|>", "Captain:"]}
    assert len(entry.manifest.layers_of(st.MEDIA_SYSTEM)) == 1
    assert len(entry.manifest.layers_of(st.MEDIA_LICENSE)) == 2  # inherited
    assert settings.messages == cr.settings_of(store, store.resolve("pirate")).messages


def test_show_modelfile_round_trips_through_a_base(store, default_model, run_cli, tmp_path):
    entry, _ = _create(store, "pirate", PIRATE)
    code, text, _ = run_cli("show", "pirate", "--modelfile")
    assert code == 0
    assert f"FROM smollm2:135m@{store.resolve(default_model).digest}" in text
    assert "PARAMETER temperature 0\n" in text and 'PARAMETER stop "Captain:"' in text
    (tmp_path / "Modelfile").write_text(text)
    code, out, err = run_cli("create", "pirate-again", "-f", str(tmp_path / "Modelfile"))
    assert code == 0, err
    assert out.strip().endswith("success")
    assert store.resolve("pirate-again").digest == entry.digest


def test_show_modelfile_round_trips_without_a_base(store, default_gguf, tmp_path):
    (tmp_path / "m.gguf").symlink_to(default_gguf)
    text = PIRATE.replace("FROM smollm2:135m", "FROM ./m.gguf")
    entry, lines = _create(store, "pirate", text, base_dir=tmp_path)
    printed = cr.to_modelfile(store, entry)
    assert "\nFROM pirate:latest\n" in printed
    again, _ = _create(store, "pirate", printed)
    assert again.digest == entry.digest


def test_from_a_gguf_path_relative_to_the_modelfile(store, default_gguf, tmp_path, run_cli):
    (tmp_path / "smol.gguf").symlink_to(default_gguf)
    (tmp_path / "Modelfile").write_text("FROM ./smol.gguf\nSYSTEM hi\n")
    code, out, err = run_cli("create", "mine", "-f", str(tmp_path / "Modelfile"))
    assert code == 0, err
    entry = store.resolve("mine")
    (gguf,) = entry.manifest.layers_of(st.MEDIA_GGUF)
    assert gguf.digest == "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert cr.settings_of(store, entry).system == "hi"


def test_from_a_safetensors_directory(store, tiny_safetensors_dir, tmp_path):
    # A path in FROM is read only for a Modelfile on disk (base_dir), as the CLI gives.
    entry, _ = _create(store, "tiny-pirate", f"FROM {tiny_safetensors_dir}\nSYSTEM arr\nPARAMETER top_k 5\n",
                       base_dir=tmp_path)
    assert "model.safetensors" in entry.manifest.files()
    assert cr.settings_of(store, entry).parameters == {"top_k": 5}
    again, _ = _create(store, "tiny-pirate", cr.to_modelfile(store, entry))
    assert again.digest == entry.digest


def test_jinja_template_layer_replaces_an_ollama_go_template(store, default_model):
    base = store.resolve(default_model)
    go = st.Layer(st.MEDIA_OLLAMA_TEMPLATE, store.put_bytes(b"{{ .Prompt }}"), 13)
    store.write_manifest("ollama-style", st.build_manifest(base.manifest.config, [*base.manifest.layers, go]))
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    entry, _ = _create(store, "jinja", f'FROM ollama-style\nTEMPLATE """{jinja}"""\n')
    assert not entry.manifest.layers_of(st.MEDIA_OLLAMA_TEMPLATE)
    (layer,) = entry.manifest.layers_of(st.MEDIA_TEMPLATE)
    assert store.read_blob(layer.digest).decode() == jinja
    assert cr.to_modelfile(store, entry).count("TEMPLATE") == 1


def test_foreign_params_layer_is_kept_byte_for_byte_on_round_trip(store, default_model):
    base = store.resolve(default_model)
    raw = b'{"temperature":1,"stop":["<|im_end|>"],"num_gqa":8}'  # Ollama-written: ints, unknown key
    params = st.Layer(st.MEDIA_PARAMS, store.put_bytes(raw), len(raw))
    store.write_manifest("foreign", st.build_manifest(base.manifest.config, [*base.manifest.layers, params]))
    entry = store.resolve("foreign")
    printed = cr.to_modelfile(store, entry)
    assert "# PARAMETER num_gqa 8" in printed and "PARAMETER temperature 1\n" in printed
    again, _ = _create(store, "foreign", printed)
    assert again.digest == entry.digest


def test_a_foreign_models_damaged_small_layers_show_or_fail_plainly(store, default_model, run_cli):
    """A pulled model's system layer in Latin-1 and its params layer not JSON: `show
    --modelfile` printed a traceback (UnicodeDecodeError / JSONDecodeError), /api/show a 500."""
    from mlxlite.server.models import show_model

    base = store.resolve(default_model)
    system = "Réponds en français.".encode("latin-1")
    layers = [st.Layer(st.MEDIA_SYSTEM, store.put_bytes(system), len(system))]
    store.write_manifest("latin", st.build_manifest(base.manifest.config, [*base.manifest.layers, *layers]))
    code, out, err = run_cli("show", "latin", "--modelfile")
    assert code == 0 and 'SYSTEM R\ufffdponds en fran\ufffdais.\n' in out, err
    bad = b'{"temperature": 0.5,'
    layers.append(st.Layer(st.MEDIA_PARAMS, store.put_bytes(bad), len(bad)))
    store.write_manifest("broken", st.build_manifest(base.manifest.config, [*base.manifest.layers, *layers]))
    code, out, err = run_cli("show", "broken", "--modelfile")
    assert code == 1 and err.strip() == "error: model 'broken:latest' has a params layer that is not JSON"
    with pytest.raises(IntegrityError, match="params layer that is not JSON"):
        show_model(store, store.resolve("broken"))


def test_requires_goes_into_the_config(store, default_model):
    entry, _ = _create(store, "req", "FROM smollm2:135m\nREQUIRES 0.14.0\n")
    assert json.loads(store.read_blob(entry.manifest.config.digest))["requires"] == "0.14.0"
    again, _ = _create(store, "req2", cr.to_modelfile(store, entry))
    assert again.digest == entry.digest


def test_validate_checks_without_writing(store, default_model, run_cli, tmp_path):
    before = (_blobs(store), [e.name.display for e in store.list()])
    (tmp_path / "Modelfile").write_text(PIRATE)
    code, out, err = run_cli("validate", "-f", str(tmp_path / "Modelfile"))
    assert code == 0 and out.startswith("ok: 9 instructions"), err
    assert (_blobs(store), [e.name.display for e in store.list()]) == before
    (tmp_path / "Bad").write_text("FROM smollm2:135m\nPARAMETER top_p 2\n")
    code, out, err = run_cli("validate", "-f", str(tmp_path / "Bad"))
    assert code == 1 and err.strip().startswith("error: ") and f"{tmp_path / 'Bad'}:2:17:" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("text", "exc", "words"), [
    ("FROM nosuchmodel\n", ModelNotFound, "not found"),
    ("FROM ./missing.gguf\n", BadRequest, "no such file"),
    ("FROM bad name!\n", BadRequest, "invalid model name"),
])
def test_bad_bases_are_typed_errors(store, text, exc, words, tmp_path):
    with pytest.raises(exc, match=words):
        _create(store, "x", text, base_dir=tmp_path)
    assert store.list() == []


def test_create_cli_errors_are_one_line(run_cli, tmp_path):
    code, _, err = run_cli("create", "x", "-f", str(tmp_path / "nope"))
    assert code == 1 and err.startswith("error: cannot read") and err.count("\n") == 1
    (tmp_path / "Modelfile").write_text("FROM x\nADAPTER ./lora.gguf\n")
    code, _, err = run_cli("create", "x", "-f", str(tmp_path / "Modelfile"))
    assert code == 1 and ":2:1: ADAPTER is not supported" in err


def test_show_sections(store, default_model, run_cli):
    _create(store, "pirate", PIRATE)
    assert run_cli("show", "pirate", "--system")[1] == "You are a pirate. Answer every question like a pirate, arr!\n"
    params = run_cli("show", "pirate", "--parameters")[1].splitlines()
    assert params == [f"{'stop':<30} \"<|im_end|>\"", f"{'stop':<30} \"Captain:\"", f"{'temperature':<30} 0.0"]
    assert "Apache License 2.0" in run_cli("show", "pirate", "--license")[1]
    assert "<|im_start|>" in run_cli("show", "pirate", "--template")[1]  # the GGUF's own template


PIRATE_DEMO = '''FROM smollm2:135m
SYSTEM """You are a pirate captain. Always talk like a pirate: say Arr, matey and Ahoy."""
PARAMETER temperature 0
'''


def _run(home, *argv):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MLXLITE_HOME": str(home), "MLXLITE_HOST": "127.0.0.1:9"}
    proc = subprocess.run([sys.executable, str(root / "mlxlite.py"), *argv], env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_pirate_demo_answers_in_character_and_round_trips(store, default_model, run_cli, mlxlite_home, tmp_path):
    from mlxlite.engine import runner

    (tmp_path / "Modelfile").write_text(PIRATE_DEMO)
    assert run_cli("create", "pirate", "-f", str(tmp_path / "Modelfile"))[0] == 0
    entry = store.resolve("pirate")
    loaded = runner.load(store, entry)
    try:
        assert loaded.system.startswith("You are a pirate captain.")
        assert loaded.defaults.temperature == 0.0
    finally:
        runner.unload(loaded)
    pirate = _run(mlxlite_home, "run", "pirate", "Who are you?", "--num-predict", "24")
    plain = _run(mlxlite_home, "run", "smollm2:135m", "Who are you?", "--num-predict", "24", "--temperature", "0")
    assert pirate.strip() and pirate != plain
    assert any(word in pirate.lower() for word in ("arr", "aye", "ahoy", "matey", "captain", "pirate", "sea")), pirate
    code, text, _ = run_cli("show", "pirate", "--modelfile")
    (tmp_path / "Shown").write_text(text)
    assert run_cli("create", "pirate-again", "-f", str(tmp_path / "Shown"))[0] == 0
    assert store.resolve("pirate-again").digest == entry.digest


def test_from_errors_found_at_create_time_point_at_the_from_line(run_cli, tmp_path):
    (tmp_path / "Modelfile").write_text("# base\n\nFROM nosuch\n")
    code, _, err = run_cli("create", "x", "-f", str(tmp_path / "Modelfile"))
    assert code == 1 and f"{tmp_path / 'Modelfile'}:3:1: FROM 'nosuch'" in err and "not found" in err
    (tmp_path / "Modelfile").write_text("FROM llama3 # my base\n")
    code, _, err = run_cli("validate", "-f", str(tmp_path / "Modelfile"))
    assert code == 1 and ":1:1: FROM" in err and "comment must be on a line of its own" in err


GO_CHATML = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n'
             '{{ end }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n')


def test_a_go_template_is_stored_as_written_as_ollama_stores_it(store, default_model, run_cli, tmp_path):
    (tmp_path / "Modelfile").write_text(f'FROM smollm2:135m\nTEMPLATE """{GO_CHATML}"""\n')
    code, out, err = run_cli("create", "chatml", "-f", str(tmp_path / "Modelfile"))
    assert code == 0, err
    entry = store.resolve("chatml")
    (layer,) = entry.manifest.layers_of(st.MEDIA_OLLAMA_TEMPLATE)
    assert store.read_blob(layer.digest).decode() == GO_CHATML      # no mapping: the text itself
    assert not entry.manifest.layers_of(st.MEDIA_TEMPLATE)
    assert cr.settings_of(store, entry).template == GO_CHATML
    # show --modelfile prints it, and creating from that gives the same model back.
    text = cr.to_modelfile(store, entry)
    assert text.count("TEMPLATE") == 1 and f"FROM {default_model}@" in text
    again, _ = _create(store, "chatml-again", text)
    assert again.digest == entry.digest
    # A jinja template over it replaces it, and a Go one over that jinja one replaces it back.
    jinja, _ = _create(store, "jinja", 'FROM chatml\nTEMPLATE "{% for m in messages %}{{ m.content }}{% endfor %}"\n')
    assert not jinja.manifest.layers_of(st.MEDIA_OLLAMA_TEMPLATE) and jinja.manifest.layers_of(st.MEDIA_TEMPLATE)
    back, _ = _create(store, "back", f'FROM jinja\nTEMPLATE """{GO_CHATML}"""\n')
    assert back.digest == entry.digest


def test_from_a_catalog_name_fetches_the_base_first(store, default_gguf):
    entry, lines = _create(store, "pirate", "FROM smollm2:135m\nSYSTEM arr\n")
    assert lines[0] == "pulling smollm2:135m from the built-in catalog"
    assert store.exists("smollm2:135m")
    assert entry.manifest.layers_of(st.MEDIA_GGUF) == store.resolve("smollm2:135m").manifest.layers_of(st.MEDIA_GGUF)


def test_create_from_a_file_shows_the_new_name_only_when_it_is_whole(store, tiny_gguf_path, tmp_path):
    """create imported the file under the new name first and wrote the real manifest after:
    in between (and for good, after a kill -9 there: tests/attacks/test_kill_verbs.py) the
    name was listed without its SYSTEM and PARAMETER layers."""
    import shutil

    shutil.copyfile(tiny_gguf_path, tmp_path / "w.gguf")
    listed_while_creating = []

    def say(line: str) -> None:
        listed_while_creating.append([e.name.display for e in store.list()])

    spec = cr.spec_from_modelfile(modelfile.parse("FROM ./w.gguf\nSYSTEM hi\nPARAMETER top_k 5\n"))
    entry = cr.create(store, "mine", spec, tmp_path, say=say)
    assert listed_while_creating[:-1] and all(names == [] for names in listed_while_creating[:-1])
    assert listed_while_creating[-1] == ["mine:latest"]          # "success", after the manifest
    assert [e.name.display for e in store.list()] == ["mine:latest"]
    assert cr.settings_of(store, entry).system == "hi" and cr.settings_of(store, entry).parameters == {"top_k": 5}
    again = cr.create(store, "mine", spec, tmp_path)
    assert again.digest == entry.digest
