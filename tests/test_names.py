"""The model-name grammar: a table of accepted/rejected names and a randomized round trip."""

import random
import string

import pytest

from mlxlite import names
from mlxlite.errors import InvalidName

ACCEPTED = [
    ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest"), "smollm2:latest"),
    ("smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m"), "smollm2:135m"),
    ("me/model:v1", ("registry.ollama.ai", "me", "model", "v1"), "me/model:v1"),
    ("hf.co/Org/Repo:Q4_K_M", ("hf.co", "org", "repo", "q4_k_m"), "hf.co/org/repo:q4_k_m"),
    ("localhost:5000/model", ("localhost:5000", "library", "model", "latest"),
     "localhost:5000/library/model:latest"),
    ("127.0.0.1:5000/ns/m:t", ("127.0.0.1:5000", "ns", "m", "t"), "127.0.0.1:5000/ns/m:t"),
    ("example.com/model", ("example.com", "library", "model", "latest"), "example.com/library/model:latest"),
    ("a.b_c-d:1.2_3-x", ("registry.ollama.ai", "library", "a.b_c-d", "1.2_3-x"), "a.b_c-d:1.2_3-x"),
    ("host:65535/m", ("host:65535", "library", "m", "latest"), "host:65535/library/m:latest"),
    ("host:1/ns/m:t", ("host:1", "ns", "m", "t"), "host:1/ns/m:t"),
]

REJECTED = [
    "", " ", "../../x", "a/../b", "..", ".", "/abs/path", "a/b/c/d", ":tag", "m:", "m:.", "-m", "_m",
    "m/", "/m", "a//b", "m:t:t", "a\x00b", "a\\b", "m@sha256:123", "m@md5:" + "a" * 64,
    "x" * 129, "m:" + "t" * 129, "ns with space/m", "m\n", "https://host/m", "a/.hidden",
    "host..x/ns/m", "m?x", "m*", "é",
    # Ports outside 1..65535 (or spelled two ways) name no registry.
    "host:99999/ns/m", "host:65536/m", "host:0/m", "host:080/m", "host:123456/m", "host:/m",
]


@pytest.mark.parametrize(("text", "key", "display"), ACCEPTED)
def test_name_table_accepts(text, key, display):
    parsed = names.parse(text)
    assert parsed.key == key
    assert parsed.display == display
    assert names.parse(parsed.display).key == key


@pytest.mark.parametrize("text", REJECTED)
def test_name_table_rejects_anything_that_could_escape_a_path(text):
    with pytest.raises(InvalidName):
        names.parse(text)


def test_digest_suffix_is_kept_and_normalized():
    hexd = "AB" * 32
    parsed = names.parse(f"m:t@sha256:{hexd}")
    assert parsed.digest == "sha256:" + hexd.lower()
    assert names.parse_digest("sha256-" + "c" * 64) == "sha256:" + "c" * 64
    with pytest.raises(InvalidName):
        names.parse_digest("sha256:" + "g" * 64)


def test_lookup_is_case_insensitive():
    assert names.parse("SmolLM2:135M").key == names.parse("smollm2:135m").key


def _random_part(rng: random.Random, alphabet: str) -> str:
    first = rng.choice(string.ascii_letters + string.digits)
    return first + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))


def test_randomized_round_trip():
    rng = random.Random(1234)
    body = string.ascii_letters + string.digits + "._-"
    for _ in range(2000):
        host = rng.choice([None, "hf.co", "example.com", "localhost:5000", "10.0.0.1:443"])
        # Without a host, a first part with '.' reads as a host (docker's rule), so keep it out.
        ns = rng.choice([None, _random_part(rng, body if host else body.replace(".", ""))])
        model = _random_part(rng, body)
        tag = rng.choice([None, _random_part(rng, body)])
        text = "/".join(p for p in (host, ns if (ns or host) else None, model) if p)
        if host and not ns:
            text = f"{host}/{model}"
        if tag:
            text += f":{tag}"
        parsed = names.parse(text)
        again = names.parse(parsed.full)
        assert again.key == parsed.key
        assert names.parse(parsed.display).key == parsed.key
        assert all(".." != part and "/" not in part for part in parsed.key[1:])


def test_randomized_garbage_never_escapes():
    rng = random.Random(99)
    alphabet = string.printable + "\x00é/.."
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        try:
            parsed = names.parse(text)
        except InvalidName:
            continue
        for part in parsed.key:
            assert part not in ("", ".", "..")
            assert "\x00" not in part and "\\" not in part
        assert "/" not in "".join(parsed.key[1:])


def test_randomized_ports_accept_exactly_1_to_65535():
    rng = random.Random(7)
    for _ in range(3000):
        port = rng.choice([str(rng.randint(0, 200_000)), str(rng.randint(0, 10)),
                           "0" + str(rng.randint(0, 9999)), str(rng.randint(65530, 65540))])
        valid = port[0] != "0" and 1 <= int(port) <= 65535
        text = f"{rng.choice(['localhost', 'example.com', '10.0.0.1'])}:{port}/ns/m"
        if valid:
            assert names.parse(text).host.endswith(f":{port}")
        else:
            with pytest.raises(InvalidName, match="port"):
                names.parse(text)
