"""Speculative decoding through the real server and runner: a draft model named by the
Modelfile (`PARAMETER draft NAME`) or by the request's `draft` option is loaded beside the
model and drafts for it; the answer is plain decoding's; a draft that can't be found is a 404,
one with another vocabulary a 400."""

from __future__ import annotations

import http.client
import json

from mlxlite.modelfile import build as cr
from mlxlite.modelfile import parser as modelfile
from tests.fake_engine import RunningServer

GREEDY = {"temperature": 0, "num_predict": 48}
PROMPT = "def main():\n\treturn 42\n\ndef main():\n\treturn"


def generate(srv, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
    conn.request("POST", "/api/generate", json.dumps({**body, "stream": False}))
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def decoder_of(srv, store, name):
    return srv.scheduler.batches._decoders[store.resolve(name).digest]


def test_a_draft_model_from_the_modelfile_or_the_request_drafts_and_changes_nothing(
        store, tiny_gguf_model, tiny_safetensors_model, monkeypatch):
    from mlxlite.engine.speculative import Speculator

    monkeypatch.setattr(Speculator, "gate", False)      # speculate whenever there are drafts: no timing
    cr.create(store, "tiny-spec", cr.spec_from_modelfile(modelfile.parse(
        f"FROM {tiny_gguf_model}\nPARAMETER draft {tiny_safetensors_model}\n")), None, say=lambda _: None)
    with RunningServer(None, store) as srv:
        status, plain = generate(srv, {"model": tiny_gguf_model, "prompt": PROMPT,
                                       "options": {**GREEDY, "draft_num_predict": 0}})
        assert status == 200 and plain["eval_count"] > 8
        assert decoder_of(srv, store, tiny_gguf_model).speculator.steps == 0

        status, got = generate(srv, {"model": "tiny-spec", "prompt": PROMPT, "options": GREEDY})
        assert status == 200 and got["response"] == plain["response"]
        assert got["eval_count"] == plain["eval_count"]
        spec = decoder_of(srv, store, "tiny-spec").speculator
        assert spec.steps > 0 and spec.emitted > spec.steps     # drafts were kept
        names = {r.name for r in srv.scheduler.ps()}
        assert {"tiny-spec:latest", f"{tiny_safetensors_model}:latest"} <= names

        before = decoder_of(srv, store, tiny_gguf_model).speculator.steps
        status, got = generate(srv, {"model": tiny_gguf_model, "prompt": PROMPT,
                                     "options": {**GREEDY, "draft": tiny_safetensors_model}})
        assert status == 200 and got["response"] == plain["response"]
        assert decoder_of(srv, store, tiny_gguf_model).speculator.steps > before

        status, err = generate(srv, {"model": tiny_gguf_model, "prompt": PROMPT,
                                     "options": {**GREEDY, "draft": "no-such-draft"}})
        assert status == 404 and "no-such-draft" in err["error"]


def test_a_draft_model_with_another_vocabulary_is_a_bad_request(store, tiny_gguf_model, default_model):
    with RunningServer(None, store) as srv:
        status, err = generate(srv, {"model": tiny_gguf_model, "prompt": PROMPT,
                                     "options": {**GREEDY, "draft": default_model}})
        assert status == 400 and "vocabulary" in err["error"]
        status, ok = generate(srv, {"model": tiny_gguf_model, "prompt": PROMPT, "options": GREEDY})
        assert status == 200 and ok["eval_count"] > 0
