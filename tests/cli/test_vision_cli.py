"""`mlxlite show` lists a vision model's `vision` capability (from the stored config, as
`/api/tags` does); a text model's list has none."""

from __future__ import annotations

import json


def test_show_lists_the_vision_capability(run_cli, tiny_vision_model, tiny_safetensors_model):
    code, out, _ = run_cli("show", "tiny-vl", "--json")
    assert code == 0 and json.loads(out)["capabilities"] == ["completion", "vision"]
    code, out, _ = run_cli("show", "tiny-vl")
    assert code == 0 and "  Capabilities\n    completion\n    vision\n" in out
    code, out, _ = run_cli("show", "tiny-st", "--json")
    assert code == 0 and json.loads(out)["capabilities"] == ["completion"]
