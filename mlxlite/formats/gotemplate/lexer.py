"""Go's text/template lexer: actions between `{{ }}`, trim markers, comments, literals."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlxlite.formats.gotemplate.values import go_quote

# ---- lexer --------------------------------------------------------------------------------------
# Item types. Keywords are the last group (Go's itemKeyword and after).
(ERROR, BOOL, CHAR, CHAR_CONSTANT, COMPLEX, ASSIGN, DECLARE, EOF, FIELD, IDENTIFIER, LEFT_DELIM,
 LEFT_PAREN, NUMBER, PIPE, RAW_STRING, RIGHT_DELIM, RIGHT_PAREN, SPACE, STRING, TEXT, VARIABLE,
 KEYWORD, BLOCK, BREAK, CONTINUE, DOT, DEFINE, ELSE, END, IF, NIL, RANGE, TEMPLATE, WITH) = range(34)
_KEYWORDS = {"block": BLOCK, "break": BREAK, "continue": CONTINUE, "define": DEFINE, "else": ELSE,
             "end": END, "if": IF, "range": RANGE, "nil": NIL, "template": TEMPLATE, "with": WITH}
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class Item:
    typ: int
    pos: int
    val: str

    def __str__(self) -> str:
        if self.typ == EOF:
            return "EOF"
        if self.typ == ERROR:
            return self.val
        if self.typ > KEYWORD:
            return f"<{self.val}>"
        if len(self.val) > 10:
            return go_quote(self.val[:10]) + "..."
        return go_quote(self.val)


def _alnum(c: str) -> bool:
    return c == "_" or c.isalpha() or c.isdecimal()


class Lexer:
    """Go's lexer, run to the end at once: a list of items ending in EOF or ERROR."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.start, self.paren = text, 0, 0, 0
        self.items: list[Item] = []

    def emit(self, typ: int) -> None:
        self.items.append(Item(typ, self.start, self.text[self.start:self.pos]))
        self.start = self.pos

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def accept(self, valid: str) -> bool:
        if self.peek() and self.peek() in valid:
            self.pos += 1
            return True
        return False

    def accept_run(self, valid: str) -> None:
        while self.accept(valid):
            pass

    def left_trim(self, i: int) -> bool:
        return self.text[i:i + 1] == "-" and self.text[i + 1:i + 2] in tuple(_SPACE)

    def right_trim(self, i: int) -> bool:
        return self.text[i:i + 1] in tuple(_SPACE) and self.text[i + 1:i + 2] == "-"

    def at_right_delim(self) -> tuple[bool, bool]:
        if self.right_trim(self.pos) and self.text.startswith("}}", self.pos + 2):
            return True, True
        return self.text.startswith("}}", self.pos), False

    def at_terminator(self) -> bool:
        c = self.peek()
        return c == "" or c in _SPACE or c in ".,|:()" or self.text.startswith("}}", self.pos)

    def run(self) -> list[Item]:
        try:
            self._text()
        except _LexFail as fail:
            self.items.append(Item(ERROR, self.start, fail.message))
        return self.items

    def _text(self) -> None:
        text = self.text
        while True:
            x = text.find("{{", self.pos)
            if x < 0:
                self.pos = len(text)
                if self.pos > self.start:
                    self.emit(TEXT)
                self.emit(EOF)
                return
            trim = 0
            if self.left_trim(x + 2):
                chunk = text[self.start:x]
                trim = len(chunk) - len(chunk.rstrip(_SPACE))
            self.pos = x - trim
            if self.pos > self.start:
                self.emit(TEXT)
            self.pos = x
            self.start = self.pos
            self._left_delim()

    def _left_delim(self) -> None:
        self.pos += 2
        after = 2 if self.left_trim(self.pos) else 0
        if self.text.startswith("/*", self.pos + after):
            self.pos += after
            self.start = self.pos
            self._comment()
            return
        self.emit(LEFT_DELIM)
        self.pos += after
        self.start = self.pos
        self.paren = 0
        self._inside_action()

    def _comment(self) -> None:
        self.pos += 2
        i = self.text.find("*/", self.pos)
        if i < 0:
            raise _LexFail("unclosed comment")
        self.pos = i + 2
        delim, trim = self.at_right_delim()
        if not delim:
            raise _LexFail("comment ends before closing delimiter")
        self.pos += 4 if trim else 2
        if trim:
            self.pos += len(self.text[self.pos:]) - len(self.text[self.pos:].lstrip(_SPACE))
        self.start = self.pos

    def _right_delim(self) -> None:
        trim = self.right_trim(self.pos)
        if trim:
            self.pos += 2
            self.start = self.pos
        self.pos += 2
        self.emit(RIGHT_DELIM)
        if trim:
            rest = self.text[self.pos:]
            self.pos += len(rest) - len(rest.lstrip(_SPACE))
            self.start = self.pos

    def _inside_action(self) -> None:
        text = self.text
        while True:
            delim, _ = self.at_right_delim()
            if delim:
                if self.paren == 0:
                    self._right_delim()
                    return
                raise _LexFail("unclosed left paren")
            c = self.peek()
            if not c:
                raise _LexFail("unclosed action")
            if c in _SPACE:
                if self._space():
                    self._right_delim()
                    return
                continue
            self.pos += 1
            if c == "=":
                self.emit(ASSIGN)
            elif c == ":":
                if self.peek() != "=":
                    raise _LexFail("expected :=")
                self.pos += 1
                self.emit(DECLARE)
            elif c == "|":
                self.emit(PIPE)
            elif c == '"':
                self._quote()
            elif c == "`":
                j = text.find("`", self.pos)
                if j < 0:
                    raise _LexFail("unterminated raw quoted string")
                self.pos = j + 1
                self.emit(RAW_STRING)
            elif c == "$":
                self._field_or_variable(VARIABLE)
            elif c == "'":
                self._char()
            elif c == "." and self.peek() and not ("0" <= self.peek() <= "9"):
                self._field_or_variable(FIELD)
            elif c in "+-." or "0" <= c <= "9":
                self.pos -= 1
                self._number()
            elif _alnum(c):
                self.pos -= 1
                self._identifier()
            elif c == "(":
                self.emit(LEFT_PAREN)
                self.paren += 1
            elif c == ")":
                self.emit(RIGHT_PAREN)
                self.paren -= 1
                if self.paren < 0:
                    raise _LexFail("unexpected right paren U+0029 ')'")
            elif c.isascii() and c.isprintable():
                self.emit(CHAR)
            else:
                raise _LexFail(f"unrecognized character in action: U+{ord(c):04X} {c!r}")

    def _space(self) -> bool:
        """Emit a run of spaces; True when it ends at a ` -}}` (the action is over)."""
        n = 0
        while self.peek() and self.peek() in _SPACE:
            self.pos += 1
            n += 1
        if self.right_trim(self.pos - 1) and self.text.startswith("}}", self.pos + 1):
            self.pos -= 1
            if n == 1:
                return True
        self.emit(SPACE)
        return False

    def _identifier(self) -> None:
        while self.peek() and _alnum(self.peek()):
            self.pos += 1
        word = self.text[self.start:self.pos]
        if not self.at_terminator():
            raise _LexFail(f"bad character U+{ord(self.peek()):04X} {self.peek()!r}")
        if word in _KEYWORDS:
            self.emit(_KEYWORDS[word])
        elif word in ("true", "false"):
            self.emit(BOOL)
        else:
            self.emit(IDENTIFIER)

    def _field_or_variable(self, typ: int) -> None:
        if self.at_terminator():
            self.emit(VARIABLE if typ == VARIABLE else DOT)
            return
        while self.peek() and _alnum(self.peek()):
            self.pos += 1
        if not self.at_terminator():
            raise _LexFail(f"bad character U+{ord(self.peek()):04X} {self.peek()!r}")
        self.emit(typ)

    def _quote(self) -> None:
        self._delimited('"', STRING, "unterminated quoted string")

    def _char(self) -> None:
        self._delimited("'", CHAR_CONSTANT, "unterminated character constant")

    def _delimited(self, close: str, kind: int, unterminated: str) -> None:
        """A "..." or '...' literal: backslash escapes anything but a newline."""
        while True:
            c = self.peek()
            self.pos += 1
            if c == "\\":
                c = self.peek()
                self.pos += 1
                if c and c != "\n":
                    continue
                raise _LexFail(unterminated)
            if c in ("", "\n"):
                raise _LexFail(unterminated)
            if c == close:
                break
        self.emit(kind)

    def _number(self) -> None:
        if not self._scan_number():
            raise _LexFail(f"bad number syntax: {go_quote(self.text[self.start:self.pos])}")
        if self.peek() in ("+", "-") and self.peek():
            if not self._scan_number() or self.text[self.pos - 1] != "i":
                raise _LexFail(f"bad number syntax: {go_quote(self.text[self.start:self.pos])}")
            self.emit(COMPLEX)
        else:
            self.emit(NUMBER)

    def _scan_number(self) -> bool:
        self.accept("+-")
        digits = "0123456789_"
        if self.accept("0"):
            if self.accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif self.accept("oO"):
                digits = "01234567_"
            elif self.accept("bB"):
                digits = "01_"
        self.accept_run(digits)
        if self.accept("."):
            self.accept_run(digits)
        if len(digits) == 11 and self.accept("eE"):
            self.accept("+-")
            self.accept_run("0123456789_")
        if len(digits) == 23 and self.accept("pP"):
            self.accept("+-")
            self.accept_run("0123456789_")
        self.accept("i")
        if self.peek() and _alnum(self.peek()):
            self.pos += 1
            return False
        return True


class _LexFail(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


_HEX_ESCAPE = {"x": 2, "u": 4, "U": 8}


def unquote(token: str) -> str:
    """strconv.Unquote of a "..." or `...` string, or a '...' character constant."""
    if token.startswith("`"):
        return token[1:-1].replace("\r", "")
    quote, body = token[0], token[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        e = body[i + 1:i + 2]
        i += 2
        if e in _ESCAPES:
            out += _ESCAPES[e].encode()
        elif e == quote:
            out += e.encode()
        elif e in _HEX_ESCAPE and re.fullmatch("[0-9a-fA-F]{%d}" % _HEX_ESCAPE[e], body[i:i + _HEX_ESCAPE[e]]):  # noqa: UP031
            code = int(body[i:i + _HEX_ESCAPE[e]], 16)
            i += _HEX_ESCAPE[e]
            if e == "x":
                out.append(code)            # a byte, as Go strings hold bytes
            elif code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ValueError("invalid syntax")
            else:
                out += chr(code).encode()
        elif e and e in "01234567" and re.fullmatch("[0-7]{2}", body[i:i + 2]) and int(e + body[i:i + 2], 8) < 256:
            out.append(int(e + body[i:i + 2], 8))
            i += 2
        else:
            raise ValueError("invalid syntax")
    return out.decode("utf-8", "replace")
