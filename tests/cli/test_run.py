"""`mlxlite run`: one-shot, piped stdin, the interactive chat, and the same answers through
a running daemon (real runner, tiny generated model), plus `ps` and `stop`."""

import io
import re
import sys

import pytest

from tests.fake_engine import RunningServer, wait_for

GREEDY = ["--temperature", "0", "--num-predict", "6", "--seed", "1"]


@pytest.fixture(autouse=True)
def no_reexec(monkeypatch):
    # `run` re-execs itself with OpenBLAS preloaded; inside pytest that would restart the run.
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
