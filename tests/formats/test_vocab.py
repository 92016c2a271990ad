"""GGUF tokenizers of every kind our families use, against independent tokenizers.

Each vocabulary is made offline with the `tokenizers` library, written as GGUF metadata the
way llama.cpp's converter writes it, rebuilt by `vocab.build_tokenizer`, and compared id
for id on hard strings (unicode, digits, whitespace runs, contractions, CJK, emoji, specials):
  - with the tokenizer it came from, whose pre-tokenizer is spelled as the model's own
    tokenizer.json spells it (llama.cpp's `'[sS]|...` contractions where that file has them);
  - with transformers' GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`)
    for every kind transformers builds (it lacks the deepseek, smollm and bert ones).
"""

from __future__ import annotations

import pytest

from mlxlite.formats import vocab
from tests.tiny_models import CORPUS

pytest.importorskip("gguf", reason="the metadata files are written by the gguf package")

HARD = [
    "Hello   world!! I'm can't WE'LL they've 12345 3.14159 1,000,000\n\n  indented\tTab\t\ttabs  trailing   ",
    "café naïve Grüße ÀÉÎ Ωμέγα привет мир 中文字符 日本語のテキスト 한국어 😀🎉 🧑\u200d💻 x²+y²=z² ½ ٣٤٥",
    "<|im_start|>user\nHi there<|im_end|>\ndef f(x):\n    return x**2  # ok\r\n\r\n",
    "  leading spaces, 2024-11-25 10:30, x=1e-9; ∑ “quotes” ‘single’ — dash... ok?! (yes) [no] {maybe}",
]
TRAIN = CORPUS + HARD * 3 + ["The year 1999 and 2024; numbers 0123456789 9876543210."] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
C = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # llama.cpp's spelling
# Kimi K2's pattern as its tokenization_kimi.py writes it (llama.cpp's unicode.cpp quotes it
# above the hand-written splitter it uses instead); `&&` intersects character classes.
KIMI_K2 = (r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
           r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
           r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _original_pre(pre: str):
    """The pre-tokenizer of the model family's own tokenizer.json."""
    from tokenizers import Regex, pre_tokenizers

    def seq(*regexes):
        return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    if pre == "llama-bpe":
        return seq(C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    if pre == "qwen2":
        return seq(C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    if pre == "gpt-4o":
        low, up = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
        return seq(rf"[^\r\n\p{{L}}\p{{N}}]?{up}*{low}+{C}?|[^\r\n\p{{L}}\p{{N}}]?{up}+{low}*{C}?"
                   r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    if pre == "deepseek-v3":
        return seq(r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                   r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    if pre == "kimi-k2":
        return seq(KIMI_K2)
    if pre == "deepseek-coder":
        return seq("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")
    if pre in ("smollm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert pre == "default"
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _train_bpe(pre: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _original_pre(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    return tok


def _bpe_meta(tok, pre: str, arch: str) -> dict:
    import json

    v = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(v.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return {"general.architecture": arch, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": v["<|im_start|>"],
            "tokenizer.ggml.eos_token_id": v["<|im_end|>"], "tokenizer.ggml.add_bos_token": False}


def _transformers_ids(meta: dict, tmp_path, texts: list[str]) -> list[list[int]]:
    """transformers' own GGUF tokenizer over a metadata-only GGUF written by `gguf`."""
    import gguf
    from transformers import AutoTokenizer

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), meta["general.architecture"])
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif value and isinstance(value[0], float):
            w.add_array(key, [float(x) for x in value])
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    return [theirs.encode(t) for t in texts]


# tokenizer.ggml.pre -> whether transformers' GGUF tokenizer knows it (and the arch written)
BPE_CASES = {"llama-bpe": ("llama", True), "qwen2": ("qwen2", True), "gpt-4o": ("llama", True),
             "default": ("starcoder2", True), "deepseek-v3": ("deepseek2", False),
             "deepseek-coder": ("llama", False), "smollm": ("llama", False), "starcoder": ("starcoder2", False),
             "kimi-k2": ("deepseek2", False)}


@pytest.mark.parametrize("pre", list(BPE_CASES))
def test_byte_level_bpe_pre_tokenizers_match_their_origin(pre, tmp_path):
    pytest.importorskip("torch", reason="transformers' GGUF reader needs torch")
    tok = _train_bpe(pre)
    arch, known = BPE_CASES[pre]
    meta = _bpe_meta(tok, pre, arch)
    ours = vocab.build_tokenizer(meta).tokenizer
    for text in HARD:
        assert ours.encode(text).ids == tok.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    if known:
        assert [ours.encode(t).ids for t in HARD] == _transformers_ids(meta, tmp_path, HARD)


def test_pre_tokenizers_differ_where_their_regexes_do():
    """The table is not one regex under many names: digits and CJK split per llama.cpp."""
    metas = {pre: _bpe_meta(_train_bpe("default"), pre, "llama") for pre in ("llama-bpe", "qwen2", "deepseek-v3")}
    pieces = {pre: vocab.build_tokenizer(m).tokenizer.pre_tokenizer.pre_tokenize_str("12345 中文字")
              for pre, m in metas.items()}
    assert [p for p, _ in pieces["llama-bpe"]][:2] == ["123", "45"]
    assert [p for p, _ in pieces["qwen2"]][:5] == ["1", "2", "3", "4", "5"]
    assert len(pieces["deepseek-v3"]) > 0 and pieces["deepseek-v3"][0][0] == "123"


def test_kimi_k2_splits_as_its_own_regex_says():
    """Han runs alone, other letters in gpt-4o's case runs, digits in threes, punctuation
    leading a word: Python's `regex` applying Kimi's pattern is the reference (GPT-2's
    regex, the fallback for an unknown name, keeps `12345` whole and `，` apart from `Hello`)."""
    regex = pytest.importorskip("regex", reason="the reference splitter")
    pre = vocab.build_tokenizer(_bpe_meta(_train_bpe("default"), "kimi-k2", "deepseek2")).tokenizer.pre_tokenizer
    unbyte = {c: b for b, c in vocab.bytes_to_unicode().items()}

    def pieces(text: str) -> list[str]:
        return [bytes(unbyte[c] for c in p).decode() for p, _ in pre.pre_tokenize_str(text)]

    mixed = "你好世界，Hello World! 价格是12345元。getUserName iPhone 東京タワー 中文abc中 x²³ don't\n\n  end"
    for text in [*HARD, mixed]:
        assert pieces(text) == regex.findall("(?V1)" + KIMI_K2, text), text
    assert pieces("你好世界，Hello 12345元。getUserName") == [
        "你好世界", "，Hello", " ", "123", "45", "元", "。get", "User", "Name"]


def test_llama3_vocabulary_adds_bos_unless_the_file_says_not():
    meta = _bpe_meta(_train_bpe("llama-bpe"), "llama-bpe", "llama")
    del meta["tokenizer.ggml.add_bos_token"]
    spec = vocab.build_tokenizer(meta)
    assert spec.add_bos and spec.tokenizer.encode("hi").ids[0] == meta["tokenizer.ggml.bos_token_id"]
    meta["tokenizer.ggml.add_bos_token"] = False
    assert not vocab.build_tokenizer(meta).add_bos


# ---- SentencePiece ----------------------------------------------------------------------
def _spm_meta(arch: str, *, pad_to: int = 0, space_tokens: bool = False, scores: str = "rank") -> dict:
    """An SPM-BPE vocabulary as llama.cpp writes one: <unk> <s> </s>, 256 byte tokens, pieces."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([t.replace("<|im_start|>", "").replace("<|im_end|>", "") for t in TRAIN],
                           vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1]) if t not in ("<unk>", "<s>", "</s>")]
    head = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3, 3] + [6] * 256
    filler = [f"▁zz{i:07d}qq" for i in range(max(0, pad_to - len(head) - len(trained) - 2))]
    extra = ["  ", "   "] if space_tokens else []  # gemma stores all-space tokens as real spaces
    tokens = head + filler + trained + extra
    types += [1] * (len(filler) + len(trained) + len(extra))
    if scores == "rank":
        score_list = [0.0] * len(head) + [-1e9] * len(filler) + [-float(i) for i in range(len(trained) + len(extra))]
    else:  # gemma: scores that say nothing about merge order
        score_list = [0.0] * len(tokens)
    meta = {"general.architecture": arch, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": score_list, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    if arch.startswith("gemma"):
        meta["tokenizer.ggml.add_space_prefix"] = False
    return meta


SPM_TEXTS = [t.replace("<|im_start|>", "<start_of_turn>").replace("<|im_end|>", "<end_of_turn>") for t in HARD]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_spm_matches_transformers_gguf_tokenizer(arch, tmp_path):
    pytest.importorskip("torch", reason="transformers' GGUF reader needs torch")
    meta = _spm_meta(arch)
    spec = vocab.build_tokenizer(meta)
    ours = [spec.tokenizer.encode(t).ids for t in SPM_TEXTS]
    assert ours == _transformers_ids(meta, tmp_path, SPM_TEXTS)
    assert spec.kind == "spm" and all(ids[0] == 1 for ids in ours)  # BOS
    assert any(i >= 5 + 256 for ids in ours for i in ids) and any(5 <= i < 5 + 256 for ids in ours for i in ids)


def test_phi3_puts_a_prefix_space_before_every_run_of_text():
    """Phi-3's tokenizer (and llama.cpp) prefix each text run, after specials too."""
    llama = vocab.build_tokenizer(_spm_meta("llama")).tokenizer
    phi3 = vocab.build_tokenizer(_spm_meta("phi3")).tokenizer
    assert phi3.encode("<end_of_turn>hello").tokens[2].startswith("▁")
    assert not llama.encode("<end_of_turn>hello").tokens[2].startswith("▁")


def test_gemma_262k_vocabulary_matches_transformers_gguf_tokenizer():
    """Gemma 3's size (262144 tokens, ids past 2^16 in use), no prefix space, all-space
    tokens stored as spaces, and merge order taken from token order, not scores."""
    pytest.importorskip("torch", reason="transformers' GGUF reader needs torch")
    meta = _spm_meta("gemma3", pad_to=262144, space_tokens=True, scores="flat")
    assert len(meta["tokenizer.ggml.tokens"]) == 262144
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    spec = vocab.build_tokenizer(meta)
    ours = [spec.tokenizer.encode(t, add_special_tokens=False).ids for t in SPM_TEXTS]
    # transformers' GGUF tokenizer builder on the same metadata (its file reader takes ~40 s
    # over 262k strings on this machine, so the dict is handed over directly).
    fields = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
              if f"tokenizer.{key}" in meta}
    theirs, _ = convert_gguf_tokenizer("gemma3", fields)
    assert ours == [theirs.encode(t, add_special_tokens=False).ids for t in SPM_TEXTS]
    assert max(max(ids) for ids in ours) > 65535
    assert spec.tokenizer.encode("a  b").tokens[-2:] == ["▁▁", "b"]  # the all-space token, respelled
    assert not spec.tokenizer.encode("hello").tokens[1].startswith("▁")  # no prefix space


# ---- WordPiece (bert) -------------------------------------------------------------------
def test_bert_wordpiece_matches_the_tokenizer_it_came_from():
    from tokenizers import BertWordPieceTokenizer

    bert = BertWordPieceTokenizer(lowercase=True)
    bert.train_from_iterator(TRAIN, vocab_size=600, show_progress=False)
    words = [t for t, _ in sorted(bert.get_vocab().items(), key=lambda kv: kv[1])]

    def phantom(t: str) -> str:  # llama.cpp's BertModel.set_vocab
        if t.startswith("[") and t.endswith("]"):
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t

    tokens = [phantom(t) for t in words]
    ids = {t: i for i, t in enumerate(words)}
    meta = {"general.architecture": "bert", "tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") else 2 if t == "[UNK]"
                                          else 1 for t in words],
            "tokenizer.ggml.cls_token_id": ids["[CLS]"], "tokenizer.ggml.seperator_token_id": ids["[SEP]"],
            "tokenizer.ggml.unknown_token_id": ids["[UNK]"], "tokenizer.ggml.padding_token_id": ids["[PAD]"]}
    from tokenizers.processors import BertProcessing

    bert.post_processor = BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))  # as BERT's own
    spec = vocab.build_tokenizer(meta)
    assert spec.kind == "wpm"
    for text in HARD:
        assert spec.tokenizer.encode(text).ids == bert.encode(text).ids, text
    assert spec.tokenizer.encode("hello").tokens[0] == "[CLS]" and spec.tokenizer.encode("hello").tokens[-1] == "[SEP]"
