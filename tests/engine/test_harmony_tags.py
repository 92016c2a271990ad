"""A model whose template is harmony's (gpt-oss) prints its structural special tokens, so the
server can read its channels from the text; any other model's special tokens never print."""

import json
import shutil

import pytest

from mlxlite.engine import model as engine_model
from mlxlite.engine.text import TextStream
from mlxlite.formats import harmony
from mlxlite.store.importers import import_path

HARMONY_JINJA = ("{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant{% endif %}{# <|channel|> #}")


@pytest.mark.parametrize("template_is_harmony", [True, False])
def test_harmony_tags_print_only_for_harmony_templates(store, tiny_safetensors_dir, tmp_path, template_is_harmony):
    from tokenizers import AddedToken, Tokenizer

    src = tmp_path / "gptoss-like"
    shutil.copytree(tiny_safetensors_dir, src)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in harmony.TAGS])
    tok.save(str(src / "tokenizer.json"))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    if template_is_harmony:
        cfg["chat_template"] = HARMONY_JINJA
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    import_path(store, src, "gptoss-like")
    loaded = engine_model.load(store, store.resolve("gptoss-like"))
    ids = [tok.token_to_id(t) for t in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")]
    stream = TextStream(loaded.table)
    text = "".join(stream.add(i) for i in [ids[0], *tok.encode("final", add_special_tokens=False).ids, ids[1]])
    if template_is_harmony:
        assert text == "<|channel|>final<|message|>"
        assert all(loaded.table[i] == tag.encode() for i, tag in zip(ids, ("<|channel|>", "<|message|>", "<|end|>",
                                                                            "<|start|>"), strict=True))
    else:
        assert text == "final" and all(loaded.table[i] == b"" for i in ids)
    # the chat template's own special tokens still never print
    assert loaded.table[tok.token_to_id("<|im_end|>")] == b""
