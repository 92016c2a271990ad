"""The CLI's urllib client against a real server (fake engine): every route, error types,
streaming as it arrives, and the fast "is a daemon running?" check."""

import pytest

from mlxlite.cli import client as cl
from mlxlite.errors import Busy, MlxliteError, ModelNotFound, Unauthorized
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model


@pytest.fixture
def srv(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(hold_after=None), store) as s:
        yield s


def test_connect_if_running_is_none_when_nothing_listens():
    assert cl.connect_if_running("127.0.0.1:9") is None
    assert cl.is_running("127.0.0.1:9") is False


def test_base_url_maps_wildcards_and_defaults():
    assert cl.base_url("0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert cl.base_url(":7") == "http://127.0.0.1:7"
    assert cl.base_url("localhost") == "http://localhost:11435"
    assert cl.base_url("http://10.0.0.2:1/") == "http://10.0.0.2:1"
    assert cl.base_url("[::]:5") == "http://[::1]:5"


def test_every_route_through_the_client(srv, monkeypatch):
    monkeypatch.setenv("MLXLITE_HOST", f"127.0.0.1:{srv.port}")
    c = cl.connect_if_running()
    assert c is not None and c.version() and c.health()["status"] == "ok"
    assert [m["name"] for m in c.tags()] == ["fake:latest"]
    assert c.show("fake")["details"]["family"] == "fake"
    c.copy("fake", "twin")
    assert {m["name"] for m in c.tags()} == {"fake:latest", "twin:latest"}
    c.delete("twin")
    assert c.load("fake")["done_reason"] == "load"
    assert [m["name"] for m in c.ps()] == ["fake:latest"]
    assert c.stop("fake")["done_reason"] == "unload" and c.ps() == []
    chunks = list(c.chat("fake", [{"role": "user", "content": "hi"}], options={"num_predict": 3}))
    assert "".join(ch["message"]["content"] for ch in chunks) == "Hel" and chunks[-1]["done"]
    assert c.generate("fake", "hi", stream=False, options={"num_predict": 2})["response"] == "He"
    assert len(c.embed("fake", "x")["embeddings"]) == 1
    assert [ch["done"] for ch in c.stream("POST", "/api/generate", {"model": "fake", "prompt": "x",
                                                                   "options": {"num_predict": 1}})] == [False, True]


def test_errors_become_typed_exceptions(srv):
    c = cl.Client(srv.url)
    with pytest.raises(ModelNotFound, match="not found"):
        c.show("missing")
    with pytest.raises(MlxliteError) as err:
        c.generate("fake", "hi", stream=False, options={"temperature": "hot"})
    assert err.value.status == 400 and "temperature" in str(err.value)
    srv.engine.fail_after = 2
    with pytest.raises(MlxliteError, match="failed on purpose"):
        list(c.generate("fake", "hi"))


def test_api_key_is_sent(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store, api_key="k") as srv:
        with pytest.raises(Unauthorized):
            cl.Client(srv.url, api_key="").tags()
        assert cl.Client(srv.url, api_key="k").tags()[0]["name"] == "fake:latest"


def test_busy_maps_to_busy(store):
    from mlxlite.sched import Scheduler

    engine = FakeEngine(hold_after=0)
    add_fake_model(store)
    with RunningServer(engine, store, scheduler=Scheduler(store, engine, max_queue=0)) as srv:
        with pytest.raises(Busy):
            cl.Client(srv.url).generate("fake", "hi", stream=False)


def test_cli_verbs_go_through_the_daemon_when_it_answers(srv, run_cli, monkeypatch):
    monkeypatch.setenv("MLXLITE_HOST", f"127.0.0.1:{srv.port}")
    code, out, _ = run_cli("list")
    assert code == 0 and "fake:latest" in out
    assert run_cli("cp", "fake", "copy")[0] == 0
    assert "copy:latest" in run_cli("list")[1]
    assert run_cli("rm", "copy")[0] == 0
    assert "copy:latest" not in run_cli("list")[1]
    cl.Client(srv.url).load("fake", keep_alive=-1)
    code, out, _ = run_cli("ps")
    assert code == 0 and "fake:latest" in out and "Forever" in out
    assert run_cli("stop", "fake")[0] == 0
    assert "fake:latest" not in run_cli("ps")[1]
    paths = [r["path"] for r in srv.log_lines()]
    assert "/api/tags" in paths and "/api/copy" in paths and "/api/delete" in paths and "/api/ps" in paths
