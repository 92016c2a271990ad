"""`go_reference`: Go's own text/template, for byte-for-byte comparisons.

Builds `gotemplate_ref/main.go` (standard library only) once per test session into a
temporary directory, with its build cache there too and no network (GOPROXY=off), and
returns `run(cases) -> results`: one process for a whole list of cases. Tests that need it
are skipped, saying why, when Go is not installed (`apt-get install golang-go`; test.sh does).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REF = Path(__file__).resolve().parent / "gotemplate_ref" / "main.go"


@pytest.fixture(scope="session")
def go_reference(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go): cannot compare with Go's text/template")
    work = tmp_path_factory.mktemp("goref")
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GOFLAGS": "-mod=mod",
           "GOPROXY": "off", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GO111MODULE": "on"}
    binary = work / "ref"
    built = subprocess.run([go, "build", "-o", str(binary), str(REF)], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr

    def run(cases: list[dict]) -> list[dict]:
        proc = subprocess.run([str(binary)], input=json.dumps(cases), capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout)
        assert len(results) == len(cases)
        return results

    return run
