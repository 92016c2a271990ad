"""Shared test setup: every test gets its own empty MLXLITE_HOME.

Area fixtures live in their own modules (listed in `pytest_plugins`) so the parts of
the suite can grow without touching each other.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Before anything imports mlx: in-process engine tests run on OpenBLAS, as `run`/`serve` do
# (the wheel's reference BLAS makes a long prompt's prefill minutes instead of seconds).
from mlxlite.engine import blas  # noqa: E402

blas.preload()

pytest_plugins = ["tests.tiny_models", "tests.registry_fixtures", "tests.default_model", "tests.vision_models",
                  "tests.gguf_vision_models", "tests.st_gemma3_models", "tests.gguf_qwen25vl_models"]


@pytest.fixture(autouse=True)
def mlxlite_home(tmp_path_factory, monkeypatch) -> Path:
    home = tmp_path_factory.mktemp("mlxlite_home")
    monkeypatch.setenv("MLXLITE_HOME", str(home))
    # Tests never talk to a daemon the developer happens to run.
    monkeypatch.setenv("MLXLITE_HOST", "127.0.0.1:9")
    for var in ("MLXLITE_API_KEY", "MLXLITE_ORIGINS", "HF_TOKEN", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def store(mlxlite_home):
    from mlxlite.store import Store

    return Store()


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from mlxlite.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def pytest_report_header(config):
    return f"MLXLITE python {sys.version.split()[0]}, cwd {os.getcwd()}"
