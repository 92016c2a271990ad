"""Go's text/template parser: items -> a checked tree (functions known at parse time)."""

from __future__ import annotations

from typing import Any

from mlxlite.formats.gotemplate.errors import TemplateError
from mlxlite.formats.gotemplate.lexer import (
    ASSIGN,
    BLOCK,
    BOOL,
    BREAK,
    CHAR,
    CHAR_CONSTANT,
    COMPLEX,
    CONTINUE,
    DECLARE,
    DEFINE,
    DOT,
    ELSE,
    END,
    EOF,
    ERROR,
    FIELD,
    IDENTIFIER,
    IF,
    LEFT_DELIM,
    LEFT_PAREN,
    NIL,
    NUMBER,
    PIPE,
    RANGE,
    RAW_STRING,
    RIGHT_DELIM,
    RIGHT_PAREN,
    SPACE,
    STRING,
    TEMPLATE,
    TEXT,
    VARIABLE,
    WITH,
    Item,
    Lexer,
    unquote,
)
from mlxlite.formats.gotemplate.tree import (
    ActionNode,
    BoolNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
    ElseNode,
    EndNode,
    FieldNode,
    IdentifierNode,
    IfNode,
    ListNode,
    NilNode,
    NumberNode,
    PipeNode,
    RangeNode,
    StringNode,
    TemplateNode,
    TextNode,
    VariableNode,
    WithNode,
    describe,
    is_empty_tree,
    parse_number,
)
from mlxlite.formats.gotemplate.values import go_quote


# ---- parser ------------------------------------------------------------------------------------
class Parser:
    """Go's recursive-descent parser over the lexer's items; trees go into `trees`."""

    def __init__(self, text: str, funcs: frozenset[str], trees: dict[str, ListNode]) -> None:
        self.text = text
        self.items = Lexer(text).run()
        self.i = 0
        self.funcs = funcs
        self.trees = trees
        self.vars = ["$"]
        self.range_depth = 0
        self.last = self.items[0]

    # -- tokens
    def next(self) -> Item:
        item = self.items[min(self.i, len(self.items) - 1)]
        self.i += 1
        self.last = item
        return item

    def backup(self) -> None:
        self.i -= 1

    def peek(self) -> Item:
        return self.items[min(self.i, len(self.items) - 1)]

    def next_non_space(self) -> Item:
        while True:
            item = self.next()
            if item.typ != SPACE:
                return item

    def peek_non_space(self) -> Item:
        item = self.next_non_space()
        self.backup()
        return item

    def error(self, message: str, pos: int | None = None) -> TemplateError:
        line, col = line_col(self.text, self.last.pos if pos is None else pos)
        return TemplateError(message, line, col)

    def expect(self, typ: int, context: str) -> Item:
        item = self.next_non_space()
        if item.typ != typ:
            raise self.unexpected(item, context)
        return item

    def unexpected(self, item: Item, context: str) -> TemplateError:
        if item.typ == ERROR:
            return self.error(item.val, item.pos)
        return self.error(f"unexpected {item} in {context}", item.pos)

    # -- structure
    def parse(self) -> ListNode:
        root = ListNode(self.peek().pos)
        while self.peek().typ != EOF:
            if self.peek().typ == ERROR:
                raise self.unexpected(self.peek(), "input")
            if self.peek().typ == LEFT_DELIM:
                save = self.i
                self.next()
                if self.next_non_space().typ == DEFINE:
                    self.definition()
                    continue
                self.i = save
            node = self.text_or_action()
            if isinstance(node, (EndNode, ElseNode)):
                raise self.error(f"unexpected {describe(node)}", node.pos)
            root.nodes.append(node)
        return root

    def add(self, name: str, root: ListNode) -> None:
        old = self.trees.get(name)
        if old is None or is_empty_tree(old):
            self.trees[name] = root
        elif not is_empty_tree(root):
            raise self.error(f"template: multiple definition of template {go_quote(name)}")

    def _sub_tree(self, context: str) -> ListNode:
        """The body of a define or block: a new tree with its own variables."""
        saved, saved_depth = self.vars, self.range_depth
        self.vars, self.range_depth = ["$"], 0
        try:
            body, end = self.item_list()
            if not isinstance(end, EndNode):
                raise self.error(f"unexpected {describe(end)} in {context}", end.pos)
            return body
        finally:
            self.vars, self.range_depth = saved, saved_depth

    def definition(self) -> None:
        context = "define clause"
        tok = self.next_non_space()
        if tok.typ not in (STRING, RAW_STRING):
            raise self.unexpected(tok, context)
        name = self.unquote(tok)
        self.expect(RIGHT_DELIM, context)
        self.add(name, self._sub_tree(context))

    def item_list(self) -> tuple[ListNode, Any]:
        lst = ListNode(self.peek_non_space().pos)
        while self.peek_non_space().typ != EOF:
            node = self.text_or_action()
            if isinstance(node, (EndNode, ElseNode)):
                return lst, node
            lst.nodes.append(node)
        raise self.error("unexpected EOF")

    def text_or_action(self) -> Any:
        tok = self.next_non_space()
        if tok.typ == TEXT:
            return TextNode(tok.pos, tok.val)
        if tok.typ == LEFT_DELIM:
            return self.action()
        raise self.unexpected(tok, "input")

    def action(self) -> Any:
        tok = self.next_non_space()
        typ = tok.typ
        if typ == BLOCK:
            return self.block_control()
        if typ in (BREAK, CONTINUE):
            word = "break" if typ == BREAK else "continue"
            after = self.next_non_space()
            if after.typ != RIGHT_DELIM:
                raise self.unexpected(after, f"{{{{{word}}}}}")
            if self.range_depth == 0:
                raise self.error(f"{{{{{word}}}}} outside {{{{range}}}}", tok.pos)
            return BreakNode(tok.pos) if typ == BREAK else ContinueNode(tok.pos)
        if typ == ELSE:
            peek = self.peek_non_space()
            if peek.typ in (IF, WITH):      # `else if`, and Go 1.23's `else with`
                return ElseNode(peek.pos)
            return ElseNode(self.expect(RIGHT_DELIM, "else").pos)
        if typ == END:
            return EndNode(self.expect(RIGHT_DELIM, "end").pos)
        if typ == IF:
            return IfNode(*self.control(True, "if"))
        if typ == RANGE:
            return RangeNode(*self.control(False, "range"))
        if typ == WITH:
            return WithNode(*self.control(False, "with"))
        if typ == TEMPLATE:
            return self.template_control()
        self.backup()
        return ActionNode(self.peek().pos, self.pipeline("command", RIGHT_DELIM))

    def control(self, allow_else_if: bool, context: str) -> tuple:
        mark = len(self.vars)
        try:
            pipe = self.pipeline(context, RIGHT_DELIM)
            if context == "range":
                self.range_depth += 1
            body, nxt = self.item_list()
            if context == "range":
                self.range_depth -= 1
            else_list = None
            if isinstance(nxt, ElseNode):
                if allow_else_if and self.peek().typ == IF:
                    self.next()
                    else_list = ListNode(nxt.pos, [IfNode(*self.control(True, "if"))])
                elif context == "with" and self.peek().typ == WITH:
                    self.next()
                    else_list = ListNode(nxt.pos, [WithNode(*self.control(False, "with"))])
                else:
                    else_list, nxt = self.item_list()
                    if not isinstance(nxt, EndNode):
                        raise self.error(f"expected end; found {describe(nxt)}", nxt.pos)
            return pipe.pos, pipe, body, else_list
        finally:
            del self.vars[mark:]

    def template_name(self, tok: Item, context: str) -> str:
        if tok.typ not in (STRING, RAW_STRING):
            raise self.unexpected(tok, context)
        return self.unquote(tok)

    def block_control(self) -> TemplateNode:
        context = "block clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = self.pipeline(context, RIGHT_DELIM)
        self.add(name, self._sub_tree(context))
        return TemplateNode(tok.pos, name, pipe)

    def template_control(self) -> TemplateNode:
        context = "template clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = None
        if self.next_non_space().typ != RIGHT_DELIM:
            self.backup()
            pipe = self.pipeline(context, RIGHT_DELIM)
        return TemplateNode(tok.pos, name, pipe)

    def pipeline(self, context: str, end: int) -> PipeNode:
        pipe = PipeNode(self.peek_non_space().pos)
        while True:     # declarations: `$x :=`, `$x =`, range's `$i, $x :=`
            v = self.peek_non_space()
            if v.typ != VARIABLE:
                break
            save = self.i
            self.next()
            nxt = self.peek_non_space()
            if nxt.typ in (ASSIGN, DECLARE):
                pipe.is_assign = nxt.typ == ASSIGN
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, [v.val]))
                self.vars.append(v.val)
            elif nxt.typ == CHAR and nxt.val == ",":
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, [v.val]))
                self.vars.append(v.val)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().typ in (VARIABLE, RIGHT_DELIM, RIGHT_PAREN):
                        continue
                    raise self.error("range can only initialize variables")
                raise self.error(f"too many declarations in {context}")
            else:
                self.i = save
            break
        while True:
            tok = self.next_non_space()
            if tok.typ == end:
                if not pipe.cmds:
                    raise self.error(f"missing value for {context}", tok.pos)
                for k, cmd in enumerate(pipe.cmds[1:]):
                    if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                        raise self.error(f"non executable command in pipeline stage {k + 2}", cmd.pos)
                return pipe
            if tok.typ in (BOOL, CHAR_CONSTANT, COMPLEX, DOT, FIELD, IDENTIFIER, NUMBER, NIL, RAW_STRING, STRING,
                           VARIABLE, LEFT_PAREN):
                self.backup()
                pipe.cmds.append(self.command())
            else:
                raise self.unexpected(tok, context)

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            tok = self.next()
            if tok.typ == SPACE:
                continue
            if tok.typ in (RIGHT_DELIM, RIGHT_PAREN):
                self.backup()
            elif tok.typ != PIPE:
                raise self.unexpected(tok, "operand")
            break
        if not cmd.args:
            raise self.error("empty command")
        return cmd

    def operand(self) -> Any:
        node = self.term()
        if node is None or self.peek().typ != FIELD:
            return node
        pos, fields = self.peek().pos, []
        while self.peek().typ == FIELD:
            fields.append(self.next().val[1:])
        if isinstance(node, FieldNode):
            return FieldNode(pos, node.ident + fields)
        if isinstance(node, VariableNode):
            return VariableNode(pos, node.ident + fields)
        if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
            raise self.error(f"unexpected . after term {go_quote(describe(node))}")
        return ChainNode(pos, node, fields)

    def term(self) -> Any:
        tok = self.next_non_space()
        typ = tok.typ
        if typ == IDENTIFIER:
            if tok.val not in self.funcs:
                raise self.error(f"function {go_quote(tok.val)} not defined", tok.pos)
            return IdentifierNode(tok.pos, tok.val)
        if typ == DOT:
            return DotNode(tok.pos)
        if typ == NIL:
            return NilNode(tok.pos)
        if typ == VARIABLE:
            if tok.val not in self.vars:
                raise self.error(f"undefined variable {go_quote(tok.val)}", tok.pos)
            return VariableNode(tok.pos, [tok.val])
        if typ == FIELD:
            return FieldNode(tok.pos, [tok.val[1:]])
        if typ == BOOL:
            return BoolNode(tok.pos, tok.val == "true")
        if typ in (CHAR_CONSTANT, COMPLEX, NUMBER):
            try:
                return parse_number(tok)
            except ValueError as exc:
                raise self.error(str(exc), tok.pos) from None
        if typ == LEFT_PAREN:
            return self.pipeline("parenthesized pipeline", RIGHT_PAREN)
        if typ in (STRING, RAW_STRING):
            return StringNode(tok.pos, tok.val, self.unquote(tok))
        self.backup()
        return None

    def unquote(self, tok: Item) -> str:
        try:
            return unquote(tok.val)
        except (ValueError, IndexError):
            raise self.error("invalid syntax", tok.pos) from None


def line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1
