"""The parse tree of a Go template, and Go's number literals."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from mlxlite.formats.gotemplate.lexer import CHAR_CONSTANT, COMPLEX, Item, unquote
from mlxlite.formats.gotemplate.values import go_quote


# ---- parse tree -----------------------------------------------------------------------------------
@dataclass
class _Node:
    pos: int


@dataclass
class ListNode(_Node):
    nodes: list = field(default_factory=list)


@dataclass
class TextNode(_Node):
    text: str


@dataclass
class PipeNode(_Node):
    decl: list = field(default_factory=list)      # VariableNodes
    is_assign: bool = False
    cmds: list = field(default_factory=list)      # CommandNodes


@dataclass
class ActionNode(_Node):
    pipe: PipeNode


@dataclass
class CommandNode(_Node):
    args: list = field(default_factory=list)


@dataclass
class FieldNode(_Node):
    ident: list


@dataclass
class VariableNode(_Node):
    ident: list


@dataclass
class ChainNode(_Node):
    node: Any
    field: list


@dataclass
class IdentifierNode(_Node):
    ident: str


@dataclass
class DotNode(_Node):
    pass


@dataclass
class NilNode(_Node):
    pass


@dataclass
class BoolNode(_Node):
    value: bool


@dataclass
class NumberNode(_Node):
    text: str
    is_int: bool = False
    is_uint: bool = False
    is_float: bool = False
    int_value: int = 0
    float_value: float = 0.0
    is_rune: bool = False


@dataclass
class StringNode(_Node):
    quoted: str
    text: str


@dataclass
class BranchNode(_Node):
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None


class IfNode(BranchNode):
    pass


class RangeNode(BranchNode):
    pass


class WithNode(BranchNode):
    pass


@dataclass
class TemplateNode(_Node):
    name: str
    pipe: PipeNode | None


@dataclass
class BreakNode(_Node):
    pass


@dataclass
class ContinueNode(_Node):
    pass


@dataclass
class EndNode(_Node):
    pass


@dataclass
class ElseNode(_Node):
    pass


def describe(node: Any) -> str:
    """A node as Go's String() would show it, for error messages."""
    if isinstance(node, FieldNode):
        return "." + ".".join(node.ident)
    if isinstance(node, VariableNode):
        return ".".join(node.ident)
    if isinstance(node, ChainNode):
        inner = describe(node.node)
        if isinstance(node.node, PipeNode):
            inner = f"({inner})"
        return inner + "".join("." + f for f in node.field)
    if isinstance(node, IdentifierNode):
        return node.ident
    if isinstance(node, DotNode):
        return "."
    if isinstance(node, NilNode):
        return "nil"
    if isinstance(node, BoolNode):
        return "true" if node.value else "false"
    if isinstance(node, NumberNode):
        return node.text
    if isinstance(node, StringNode):
        return node.quoted
    if isinstance(node, CommandNode):
        return " ".join(f"({describe(a)})" if isinstance(a, PipeNode) else describe(a) for a in node.args)
    if isinstance(node, PipeNode):
        decl = ", ".join(describe(v) for v in node.decl)
        head = f"{decl} {'=' if node.is_assign else ':='} " if decl else ""
        return head + " | ".join(describe(c) for c in node.cmds)
    if isinstance(node, ActionNode):
        return "{{" + describe(node.pipe) + "}}"
    if isinstance(node, EndNode):
        return "{{end}}"
    if isinstance(node, ElseNode):
        return "{{else}}"
    if isinstance(node, TemplateNode):
        return f"{{{{template {go_quote(node.name)}}}}}"
    return type(node).__name__


def is_empty_tree(node: Any) -> bool:
    if node is None:
        return True
    if isinstance(node, ListNode):
        return all(is_empty_tree(n) for n in node.nodes)
    if isinstance(node, TextNode):
        return not node.text.strip(" \t\r\n\v\f")
    return False


def parse_number(tok: Item) -> NumberNode:
    text = tok.val
    node = NumberNode(tok.pos, text)
    if tok.typ == COMPLEX:
        raise ValueError("complex numbers are not supported")
    if tok.typ == CHAR_CONSTANT:
        rune = unquote(text)
        if len(rune) != 1:
            raise ValueError(f"malformed character constant: {text}")
        node.is_int = node.is_uint = node.is_float = node.is_rune = True
        node.int_value, node.float_value = ord(rune), float(ord(rune))
        return node
    value = _parse_int(text)
    if value is not None:
        node.is_int = -(1 << 63) <= value < (1 << 63)
        node.is_uint = 0 <= value < (1 << 64) and (not text.startswith(("+", "-")) or value == 0)
        if not (node.is_int or node.is_uint):
            raise ValueError(f"integer overflow: {go_quote(text)}")
        node.is_float, node.int_value, node.float_value = True, value, float(value)
        return node
    try:
        f = float.fromhex(text) if re.match(r"[+-]?0[xX]", text) else float(text)
    except (ValueError, OverflowError):  # fromhex overflows where float() gives inf (0x1p99999)
        f = None
    if f is None or math.isinf(f):
        raise ValueError(f"illegal number syntax: {go_quote(text)}")
    node.is_float, node.float_value = True, f
    if f == int(f):
        i = int(f)
        node.is_int = -(1 << 63) <= i < (1 << 63)
        node.is_uint = 0 <= i < (1 << 64)
        node.int_value = i
    return node


def _underscores_ok(text: str) -> bool:
    """strconv's rule: an underscore only between digits, or after a base prefix."""
    body = text.lstrip("+-")
    hexa = body[:2].lower() == "0x"
    saw, i = "^", 0
    if body[:2].lower() in ("0b", "0o", "0x"):
        saw, i = "0", 2
    for c in body[i:]:
        if c.isdigit() or hexa and c.lower() in "abcdef":
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def _parse_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, ...) without the range check; None when not an integer."""
    m = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|0[0-7_]*|[1-9][0-9_]*)", text)
    if not m or ("_" in text and not _underscores_ok(text)):
        return None
    sign, body = m.groups()
    digits = body.replace("_", "")
    if digits[:2].lower() in ("0x", "0o", "0b"):
        value = int(digits[2:], {"x": 16, "o": 8, "b": 2}[digits[1].lower()])
    elif len(digits) > 1 and digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    return -value if sign == "-" else value
