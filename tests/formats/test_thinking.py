"""Thinking sections split out of generated text: whole, and streamed in any pieces."""

from __future__ import annotations

import pytest

from mlxlite.formats.thinking import ThinkingParser, split

CASES = [
    # (output, start inside thinking, (thinking, content))
    ("<think>\nWeigh it.\n</think>\n\nParis.", False, ("Weigh it.\n", "Paris.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("Paris, no tags.", False, ("", "Paris, no tags.")),
    ("  leading space kept", False, ("", "  leading space kept")),
    ("An answer that mentions <think> later", False, ("", "An answer that mentions <think> later")),
    ("<think>never closed", False, ("never closed", "")),
    ("<thi", False, ("", "<thi")),                                   # a cut-off tag is text, not lost
    ("<think>a</thi", False, ("a</thi", "")),
    ("<think></think>", False, ("", "")),
    ("I think.</think>\nSo: 4.", True, ("I think.", "So: 4.")),     # the prompt opened the tag
    ("4 < 5 </think> yes", True, ("4 < 5 ", "yes")),
]


@pytest.mark.parametrize("text,started,want", CASES)
def test_whole_text_splits_into_thinking_and_content(text, started, want):
    assert split(text, thinking=started) == want


def _streamed(pieces, started):
    parser = ThinkingParser(thinking=started)
    parts = [p for piece in pieces for p in parser.feed(piece)] + parser.finish()
    assert all(text for _, text in parts)
    kinds = [kind for kind, _ in parts]
    assert kinds == sorted(kinds, key=lambda k: k != "thinking")     # thinking first, then content
    return ("".join(t for k, t in parts if k == "thinking"), "".join(t for k, t in parts if k == "content"))


@pytest.mark.parametrize("text,started,want", CASES)
def test_any_split_of_the_stream_gives_the_same_result(text, started, want):
    assert _streamed(list(text), started) == want
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert _streamed([text[:i], text[i:j], text[j:]], started) == want, (i, j)


def test_thinking_streams_before_the_section_closes():
    parser = ThinkingParser()
    assert parser.feed("<think>") == []
    assert parser.feed("step one, ") == [("thinking", "step one, ")]
    assert parser.feed("step two</th") == [("thinking", "step two")]      # "</th" held: it may close
    assert parser.feed("ink>") == []
    assert parser.feed(" Done.") == [("content", "Done.")]
