"""GGUF tokenizer metadata (`tokenizer.ggml.*`) -> a `tokenizers.Tokenizer` and its specials.

Owns the three vocabulary kinds llama.cpp writes and how each splits text:
  - `gpt2`: byte-level BPE. `tokenizer.ggml.pre` names the pre-tokenizer: llama.cpp's table of
    split regexes (`PRE_SPLITS`: llama-bpe, qwen2, gpt-4o, tekken, deepseek-llm/-coder/-v3,
    kimi-k2, starcoder/smollm, ...), applied in order before the byte alphabet; unknown names get
    GPT-2's regex, as llama.cpp does. llama3-style vocabularies skip merges for words that
    are whole tokens (`ignore_merges`) and add BOS unless the file says otherwise.
  - `llama`: SentencePiece BPE with byte fallback. Merges from the file, or derived from the
    vocabulary ranked by score. Gemma files: no prefix space, all-space tokens respelled with
    `▁`, merges ranked by position (their scores do not follow merge order). Phi-3: the prefix
    space comes from a normalizer (before every text run), as its tokenizer.json does.
  - `bert`: WordPiece over llama.cpp's "phantom space" spelling (`▁word` starts a word, a bare
    piece continues one), BERT's normalizer (uncased, stripping accents, unless the
    vocabulary has capitals), `[CLS] ... [SEP]` around every input.
These follow transformers' GGUF tokenizer where it has the vocabulary kind (ids equal on hard
strings; tests/formats/test_vocab.py), llama.cpp's tables where it does not (deepseek, tekken,
smollm, bert). Pure: `tokenizers` is imported inside `build_tokenizer` (start-up time of the
CLI's `list`/`show`); never imports mlx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxlite.errors import BadRequest, Unsupported

TOKENIZER_MODELS = ("gpt2", "llama", "bert")  # tokenizer.ggml.model values we build
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # tokenizer.ggml.token_type values

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), in the order it applies them;
# `(?i:...)` is the tokenizer.json spelling of its `'[sS]|'[tT]...` contractions.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_STARCODER = (r"\p{N}", _GPT2)
_DEEPSEEK_LLM = (
    "[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# Kimi K2's own pattern (its tokenization_kimi.py; llama.cpp quotes it above its hand-written
# splitter): gpt-4o's letter runs minus Han (`&&` is a class intersection, which `tokenizers`'
# Oniguruma reads), Han runs on their own, digits in threes.
_NOT_HAN_UP, _NOT_HAN_LOW = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_K2 = (r"[\p{Han}]+"
            rf"|[^\r\n\p{{L}}\p{{N}}]?{_NOT_HAN_UP}*{_NOT_HAN_LOW}+{_CONTRACTIONS}?"
            rf"|[^\r\n\p{{L}}\p{{N}}]?{_NOT_HAN_UP}+{_NOT_HAN_LOW}*{_CONTRACTIONS}?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), _STARCODER),
    "tekken": _TEKKEN,
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense"), _DEEPSEEK3),
    "kimi-k2": _KIMI_K2,
}
# llama.cpp: these vocabularies take a word that is one token whole (ignore_merges) and add BOS.
_WHOLE_WORDS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}
GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@dataclass(frozen=True)
class TokenizerSpec:
    tokenizer: Any              # tokenizers.Tokenizer
    kind: str                   # "bpe" (byte-level), "spm" or "wpm" (WordPiece)
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    eos_token_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None
    special_ids: frozenset[int]


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SPM vocabularies without merges: every split into two in-vocab pieces, best score first
    (ties: shorter left piece, then shorter right piece, as transformers' `generate_merges`)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _split_pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers  # lazy: start-up time (see module doc)

    regexes = PRE_SPLITS.get(pre or "")
    if regexes is None:  # llama.cpp: unknown or "default" -> GPT-2's regex
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _phantom_to_wordpiece(token: str) -> str:
    """llama.cpp's BERT vocab spelling back to WordPiece's: `▁word` -> `word`, `ing` -> `##ing`."""
    if token.startswith("[") and token.endswith("]"):
        return token
    return token[1:] if token.startswith("\u2581") else "##" + token


def _uncased(meta: dict[str, Any], words: list[str]) -> bool:
    """Whether a WordPiece vocabulary lowercases (and strips accents from) its input: the
    metadata's say if it has one, else the vocabulary's (an uncased one has no capitals;
    a cased one, bert-base-cased say, has thousands)."""
    said = meta.get("tokenizer.ggml.lowercase", meta.get("tokenizer.ggml.do_lower_case"))
    if isinstance(said, bool):
        return said
    plain = [w for w in words if not (w.startswith("[") and w.endswith("]"))]
    capitals = sum(1 for w in plain if any(c.isupper() for c in w))
    return capitals <= len(plain) // 200


def _check_arrays(meta: dict[str, Any]) -> None:
    """The metadata arrays the builder iterates hold what it expects (a hostile file may not)."""
    for key, kinds, what in (("tokens", (str,), "strings"), ("token_type", (int,), "integers"),
                             ("merges", (str,), "strings"), ("scores", (int, float), "numbers")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and (not isinstance(value, list) or not all(
                isinstance(v, kinds) and not isinstance(v, bool) for v in value)):
            raise BadRequest(f"GGUF metadata tokenizer.ggml.{key} is not an array of {what}")
    if not all(" " in m for m in meta.get("tokenizer.ggml.merges") or []):
        raise BadRequest("GGUF metadata tokenizer.ggml.merges holds a merge without a space")
    if not isinstance(meta.get("tokenizer.ggml.pre"), (str, type(None))):
        raise BadRequest("GGUF metadata tokenizer.ggml.pre is not a string")


def build_tokenizer(meta: dict[str, Any]) -> TokenizerSpec:
    """A `tokenizers.Tokenizer` equivalent to the GGUF's vocabulary (see module doc)."""
    _check_arrays(meta)
    try:
        return _build_tokenizer(meta)
    except BadRequest:
        raise
    except Exception as exc:  # tokenizers (Rust) refuses what it cannot build with plain Exceptions
        raise BadRequest(f"GGUF tokenizer metadata cannot be used: {exc}") from None


def _build_tokenizer(meta: dict[str, Any]) -> TokenizerSpec:
    # lazy: `tokenizers` is only needed to run a model, not to list or show one
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    arch = str(meta.get("general.architecture") or "")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise BadRequest("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    def tok_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = (tok_at(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    add_bos_key = meta.get("tokenizer.ggml.add_bos_token")
    control = [t for t, ty in zip(tokens, types, strict=False) if ty == CONTROL]
    if kind == "gpt2":
        alphabet = set(bytes_to_unicode().values())
        spell = bytes_to_unicode()
        # Tokens outside the byte alphabet are respelled (transformers does the same).
        vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode())): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        pre = meta.get("tokenizer.ggml.pre")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _WHOLE_WORDS))
        tok.pre_tokenizer = _split_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        add_bos = bool(add_bos_key if add_bos_key is not None else pre in _WHOLE_WORDS)
        control = [t for t in control if set(t) <= alphabet]  # a control token outside it is a mislabel
        out_kind = "bpe"
    elif kind == "llama":
        gemma = arch in GEMMA_ARCHS
        if gemma:  # all-space tokens are stored as real spaces; SPM looks them up as ▁
            tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges_raw = meta.get("tokenizer.ggml.merges")
        if merges_raw:
            merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        elif gemma:  # gemma's scores do not follow its merge order; its token order does
            merges = _merges_from_vocab(vocab, {t: -float(i) for i, t in enumerate(tokens)})
        else:
            scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
            merges = _merges_from_vocab(vocab, dict(zip(tokens, scores, strict=False)))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                   unk_token=unk, ignore_merges=False))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
        if arch == "phi3" and prefix:  # a prefix space before every run of text, as Phi-3's own tokenizer
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                         split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        add_bos = bool(add_bos_key if add_bos_key is not None else True)
        out_kind = "spm"
    elif kind == "bert":
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(_phantom_to_wordpiece(t), i)
        tokens = [_phantom_to_wordpiece(t) for t in tokens]
        unk = tok_at("unknown_token_id")
        unk = _phantom_to_wordpiece(unk) if unk else "[UNK]"
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    lowercase=_uncased(meta, tokens))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        control = [_phantom_to_wordpiece(t) for t in control]
        if unk in vocab and unk not in control:  # BERT's tokenizers match "[UNK]" in text as the token too
            control.append(unk)
        bos = tokens[meta["tokenizer.ggml.cls_token_id"]] if isinstance(meta.get("tokenizer.ggml.cls_token_id"), int) \
            else bos
        sep_id = meta.get("tokenizer.ggml.seperator_token_id", meta.get("tokenizer.ggml.eos_token_id"))
        sep = tokens[sep_id] if isinstance(sep_id, int) and 0 <= sep_id < len(tokens) else eos
        pad = _phantom_to_wordpiece(pad) if pad else None
        eos = sep
        add_bos = bos is not None and sep is not None
        if add_bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A {sep}", pair=f"{bos} $A {sep} $B:1 {sep}:1",
                special_tokens=[(bos, vocab[bos]), (sep, vocab[sep])])
        out_kind = "wpm"
    else:
        raise Unsupported(f"GGUF tokenizer type {kind!r} is not supported ({', '.join(TOKENIZER_MODELS)} are)")
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if out_kind != "wpm" and add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))])
    eos_ids = {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)}
    special = {i for i, ty in enumerate(types) if ty == CONTROL}
    return TokenizerSpec(tok, out_kind, bos, eos, unk, pad, frozenset(eos_ids), add_bos,
                         meta.get("tokenizer.chat_template"), frozenset(special))
