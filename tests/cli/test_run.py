"""`mlxlite run`: one-shot, piped stdin, the interactive chat, and the same answers through
a running daemon (real runner, tiny generated model), plus `ps` and `stop`."""

import io
import re
import sys

import pytest

from tests.fake_engine import RunningServer, wait_for

GREEDY = ["--temperature", "0", "--num-predict", "6", "--seed", "1"]


@pytest.fixture(autouse=True)
def no_openblas_in_pytest(monkeypatch):
    # In-process `run` would load OpenBLAS into pytest itself, or not, depending on whether an
    # earlier test imported mlx: keep the test process's BLAS one way.
    monkeypatch.setenv("MLXLITE_OPENBLAS", "0")


def _stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def _count(err: str, label: str) -> int:
    return int(re.search(rf"^{label}:\s+(\d+) token", err, re.M).group(1))


def test_one_shot_streams_and_reports_counts(run_cli, tiny_gguf_model, monkeypatch):
    _stdin(monkeypatch, "")
    code, out, err = run_cli("run", tiny_gguf_model, "Hello there", *GREEDY, "--verbose")
    assert code == 0, err
    assert out.endswith("\n")
    assert 1 <= _count(err, "eval count") <= 6 and _count(err, "prompt eval count") > 2
    assert "eval rate:" in err and "load duration:" in err


def test_piped_stdin_is_the_prompt_and_adds_to_an_argument(run_cli, tiny_gguf_model, monkeypatch):
    _stdin(monkeypatch, "Hello there")
    code, piped, err = run_cli("run", tiny_gguf_model, *GREEDY, "--verbose")
    assert code == 0, err
    alone = _count(err, "prompt eval count")
    _stdin(monkeypatch, "")
    assert run_cli("run", tiny_gguf_model, "Hello there", *GREEDY)[1] == piped  # same prompt, same answer
    _stdin(monkeypatch, "Hello there")
    code, _, err = run_cli("run", tiny_gguf_model, "Summarize:", *GREEDY, "--verbose")
    assert code == 0 and _count(err, "prompt eval count") > alone


def test_bytes_that_are_not_utf8_in_argv_or_stdin_read_as_replacement_characters(run_cli, tiny_gguf_model,
                                                                                  monkeypatch):
    """Python hands them over as lone surrogates (surrogateescape): the tokenizer raised
    TypeError, a traceback. Now they are U+FFFD: the same answer as for U+FFFD typed in."""
    _stdin(monkeypatch, "c\udcfe")                       # what `printf 'c\xfe' |` gives under a C locale
    code, out, err = run_cli("run", tiny_gguf_model, "a\udcffb", "--system", "s\udcff", *GREEDY, "--verbose")
    assert code == 0, err
    _stdin(monkeypatch, "c\ufffd")
    code, same, err2 = run_cli("run", tiny_gguf_model, "a\ufffdb", "--system", "s\ufffd", *GREEDY, "--verbose")
    assert (code, same, _count(err2, "prompt eval count")) == (0, out, _count(err, "prompt eval count"))


def test_interactive_chat_keeps_history_and_understands_commands(tiny_gguf_model):
    from mlxlite.cli import chat

    backend = chat.LocalBackend(tiny_gguf_model, lambda _: None)
    lines = iter(["/set parameter temperature 0", "/set parameter num_predict 3", "/set parameter bogus 1",
                  "hi", "again", "/clear", "hi", "/nonsense", "/bye"])
    out = io.StringIO()
    assert chat.interactive(backend, {}, None, None, True, read=lambda _: next(lines), out=out) == 0
    text = out.getvalue()
    assert "Set parameter 'temperature' to '0'" in text and "invalid option 'bogus'" in text
    assert "Cleared session context" in text and "Unknown command '/nonsense'" in text
    prompts = [int(n) for n in re.findall(r"^prompt eval count:\s+(\d+)", text, re.M)]
    assert len(prompts) == 3
    assert prompts[1] > prompts[0]  # the second turn carries the first one
    assert prompts[2] == prompts[0]  # after /clear the history is gone


def test_ctrl_d_quits_the_chat(tiny_gguf_model):
    from mlxlite.cli import chat

    def eof(_: str) -> str:
        raise EOFError

    backend = chat.LocalBackend(tiny_gguf_model, lambda _: None)
    assert chat.interactive(backend, {}, None, None, False, read=eof, out=io.StringIO()) == 0


def test_through_a_running_daemon_the_answer_is_the_same(run_cli, store, tiny_gguf_model, monkeypatch):
    _stdin(monkeypatch, "")
    code, local, err = run_cli("run", tiny_gguf_model, "Hello there", *GREEDY)
    assert code == 0, err
    with RunningServer(None, store) as srv:
        monkeypatch.setenv("MLXLITE_HOST", f"{srv.host}:{srv.port}")
        code, remote, err = run_cli("run", tiny_gguf_model, "Hello there", *GREEDY)
        assert code == 0, err
        assert remote == local
        # Again: all but the last prompt token come from the prefix cache, and -v says so.
        code, _, err = run_cli("run", tiny_gguf_model, "Hello there", *GREEDY, "--verbose")
        assert code == 0, err
        chats = lambda: [line for line in srv.log_lines() if line.get("path") == "/api/chat"]  # noqa: E731
        wait_for(lambda: len(chats()) == 2, 10, "the second chat log line")
        whole = chats()[-1]["prompt_tokens"]
        assert re.search(rf"^prompt eval count:\s+1 token\(s\) \({whole - 1} cached\)", err, re.M), err
        # The log line is written once the response is finished: wait for it.
        wait_for(lambda: any(line.get("path") == "/api/chat" for line in srv.log_lines()), 10, "the chat log line")
        code, out, _ = run_cli("ps")
        assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "ID", "SIZE"]
        assert "tiny-gguf:latest" in out
        assert run_cli("stop", tiny_gguf_model)[0] == 0
        assert "tiny-gguf" not in run_cli("ps")[1]
        code, _, err = run_cli("stop", tiny_gguf_model)
        assert code == 1 and "is not loaded" in err
    code, _, err = run_cli("ps")
    assert code == 1 and "no mlxlite daemon" in err


@pytest.mark.e2e
def test_readme_command_answers_paris(tmp_path, default_gguf):
    """The README's first command, as a user runs it: a fresh home, the catalog fetch, OpenBLAS."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXLITE_")}
    env.update(MLXLITE_HOME=str(tmp_path / "home"), MLXLITE_HOST="127.0.0.1:9")
    proc = subprocess.run([sys.executable, "mlxlite.py", "run", "smollm2:135m", "What is the capital of France?",
                           "--temperature", "0"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "pulling smollm2:135m" in proc.stderr  # fetched from the catalog on first use


def test_piped_prompt_is_answered_in_a_real_process_with_openblas(tmp_path, tiny_gguf_path):
    """Issue 14: `echo PROMPT | mlxlite run MODEL` with OpenBLAS installed used to re-exec for the
    preload and find stdin drained ("error: empty prompt"). A real process, a real pipe: the prompt
    reaches the model, and libmlx's `cblas_sgemm` is bound to OpenBLAS (the dynamic linker's own
    record of the binding, LD_DEBUG=bindings)."""
    import os
    import subprocess
    from pathlib import Path

    from mlxlite.engine import blas
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    if blas.find_openblas() is None:
        pytest.skip("libopenblas0-pthread is not installed")
    home = tmp_path / "home"
    import_path(Store(home / "models"), tiny_gguf_path, "tiny-gguf")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXLITE_") and k != "LD_PRELOAD"}
    env.update(MLXLITE_HOME=str(home), MLXLITE_HOST="127.0.0.1:9",
               LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / "ld"))
    proc = subprocess.run([sys.executable, "mlxlite.py", "run", "tiny-gguf", *GREEDY, "--verbose"],
                          input="Hello there, how are you?", cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "empty prompt" not in proc.stderr
    assert _count(proc.stderr, "prompt eval count") > 2 and _count(proc.stderr, "eval count") >= 1
    bindings = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ld.*"))
    sgemm = [line for line in bindings.splitlines() if "libmlx.so" in line and "`cblas_sgemm'" in line]
    assert sgemm and all("libopenblas" in line for line in sgemm), sgemm


@pytest.mark.e2e
def test_readme_piped_command_answers_paris(tmp_path, default_gguf):
    """Issue 14, as reported: `echo 'What is the capital of France?' | mlxlite run smollm2:135m`
    with OpenBLAS installed answers Paris (it printed "error: empty prompt"; and the newline
    `echo` adds is not part of the question)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXLITE_")}
    env.update(MLXLITE_HOME=str(tmp_path / "home"), MLXLITE_HOST="127.0.0.1:9")
    proc = subprocess.run([sys.executable, "mlxlite.py", "run", "smollm2:135m", "--temperature", "0"],
                          input="What is the capital of France?\n", cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_serve_preloads_openblas_and_answers_a_piped_run(tmp_path, tiny_gguf_path):
    """The daemon path of issue 14: `mlxlite serve` (a real process) gets OpenBLAS without a
    re-exec, and `echo PROMPT | mlxlite run MODEL` answers through it."""
    import os
    import subprocess
    from pathlib import Path

    from mlxlite.engine import blas
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    if blas.find_openblas() is None:
        pytest.skip("libopenblas0-pthread is not installed")
    home = tmp_path / "home"
    import_path(Store(home / "models"), tiny_gguf_path, "tiny-gguf")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXLITE_") and k != "LD_PRELOAD"}
    env["MLXLITE_HOME"] = str(home)
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        daemon = subprocess.Popen([sys.executable, "mlxlite.py", "serve", "--host", "127.0.0.1:0"], cwd=root,
                                  env={**env, "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(tmp_path / "ld")},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: "listening on http://" in log.read_text() or daemon.poll() is not None, 120, "the daemon")
        url = log.read_text().split("listening on ")[1].split()[0]
        proc = subprocess.run([sys.executable, "mlxlite.py", "run", "tiny-gguf", *GREEDY, "--verbose"],
                              input="Hello there, how are you?\n", cwd=root, capture_output=True, text=True,
                              env={**env, "MLXLITE_HOST": url.removeprefix("http://")}, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert _count(proc.stderr, "prompt eval count") > 2 and _count(proc.stderr, "eval count") >= 1
        wait_for(lambda: '"/api/chat"' in log.read_text(), 60, "the daemon's log line of the chat")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    bindings = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ld.*"))
    sgemm = [line for line in bindings.splitlines() if "libmlx.so" in line and "`cblas_sgemm'" in line]
    assert sgemm and all("libopenblas" in line for line in sgemm), sgemm


def test_through_a_daemon_the_thinking_it_splits_off_is_still_shown(run_cli, store, monkeypatch):
    """The daemon moves a thinking model's `<think>` section into `thinking`; `run` shows it
    in its tags before the answer, as the in-process runner (which does not split) does."""
    from tests.fake_engine import FakeEngine, add_fake_model

    _stdin(monkeypatch, "")
    add_fake_model(store)
    with RunningServer(FakeEngine("<think>plan</think>answer", thinking=True), store) as srv:
        monkeypatch.setenv("MLXLITE_HOST", f"{srv.host}:{srv.port}")
        code, out, err = run_cli("run", "fake", "hi")
        assert code == 0, err
        assert re.fullmatch(r"<think>\s*plan\s*</think>\s*answer\s*", out), out
        srv.engine.reply = "<think>only a plan"        # cut off while thinking: the tag is still closed
        code, out, err = run_cli("run", "fake", "hi")
        assert code == 0 and re.fullmatch(r"<think>\s*only a plan\s*</think>\s*", out), out
