"""Walking a parsed tree over data the way Go's text/template executes it (missingkey=zero),
within MAX_DEPTH, MAX_STEPS and MAX_OUTPUT."""

from __future__ import annotations

import re
from typing import Any

from mlxlite.formats.gotemplate.errors import TemplateError
from mlxlite.formats.gotemplate.funcs import BUILTINS, CallError, Func, indirect, is_true, truth
from mlxlite.formats.gotemplate.parser import line_col
from mlxlite.formats.gotemplate.tree import (
    ActionNode,
    BoolNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
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
)
from mlxlite.formats.gotemplate.values import MISSING, NOFINAL, GoMap, GoStruct, fmt_v, go_quote, go_type

MAX_DEPTH = 100                 # nested {{ template }} calls (Go allows 100000; a chat template needs a few)
MAX_STEPS = 5_000_000           # nodes walked in one execution: a hostile template cannot spin forever
MAX_OUTPUT = 64 << 20           # characters written by one execution


# ---- executor -------------------------------------------------------------------------------------
class Break(Exception):
    pass


class Continue(Exception):
    pass


class State:
    def __init__(self, text: str, funcs: dict[str, Func], trees: dict[str, ListNode]) -> None:
        self.text = text          # the template's source, for line:column in errors
        self.funcs = funcs
        self.trees = trees
        self.vars: list[list] = []
        self.out: list[str] = []
        self.size = 0
        self.steps = 0
        self.depth = 0
        self.node: Any = None
        self.missing_zero = True        # Option("missingkey=zero"), as Ollama parses templates

    def error(self, message: str) -> TemplateError:
        if self.node is None:
            return TemplateError(message)
        line, col = line_col(self.text, self.node.pos)
        return TemplateError(f"executing at <{describe(self.node)}>: {message}", line, col)

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > MAX_OUTPUT:
            raise self.error(f"output longer than {MAX_OUTPUT} characters")
        self.out.append(text)

    # -- variables
    def var_value(self, name: str) -> Any:
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry[1]
        raise self.error(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for entry in reversed(self.vars):
            if entry[0] == name:
                entry[1] = value
                return
        raise self.error(f"undefined variable: {name}")

    # -- walking
    def walk(self, dot: Any, node: Any) -> None:
        self.node = node
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise self.error(f"template ran for more than {MAX_STEPS} steps")
        if isinstance(node, TextNode):
            self.write(node.text)
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.node = node
                self.write("<no value>" if value is MISSING else fmt_v(value, depth=-1))
        elif isinstance(node, (IfNode, WithNode)):
            mark = len(self.vars)
            try:
                value = self.eval_pipeline(dot, node.pipe)
                truth, ok = is_true(indirect(value))
                if not ok:
                    raise self.error(f"if/with can't use {fmt_v(value)}")
                if truth:
                    self.walk(value if isinstance(node, WithNode) else dot, node.list)
                elif node.else_list is not None:
                    self.walk(dot, node.else_list)
            finally:
                del self.vars[mark:]
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, BreakNode):
            raise Break
        elif isinstance(node, ContinueNode):
            raise Continue
        else:
            raise self.error(f"unknown node: {describe(node)}")

    def walk_range(self, dot: Any, node: RangeNode) -> None:
        outer = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            mark = len(self.vars)
            ndecl = len(node.pipe.decl)

            def one(index: Any, elem: Any) -> None:
                if ndecl > 0:
                    self.vars[-1][1] = elem
                if ndecl > 1:
                    self.vars[-2][1] = index
                try:
                    self.walk(elem, node.list)
                except Continue:
                    pass
                finally:
                    del self.vars[mark:]

            if isinstance(value, (list, tuple)):
                if value:
                    for i, elem in enumerate(value):
                        one(i, elem)
                    return
            elif isinstance(value, dict):
                if value:
                    for key in sorted(value):
                        one(key, value[key])
                    return
            elif isinstance(value, int) and not isinstance(value, bool):     # Go 1.22: range over an int
                if ndecl > 1:
                    raise self.error(f"can't use {value} to iterate over more than one variable")
                if value > 0:
                    for i in range(value):
                        one(i, i)
                    return
            elif value is not MISSING:
                self.node = node
                raise self.error(f"range can't iterate over {fmt_v(value)}")
            if node.else_list is not None:
                self.walk(dot, node.else_list)
        except Break:
            pass
        finally:
            del self.vars[outer:]

    def walk_template(self, dot: Any, node: TemplateNode) -> None:
        tree = self.trees.get(node.name)
        if tree is None:
            raise self.error(f"template {go_quote(node.name)} not defined")
        if self.depth >= MAX_DEPTH:
            raise self.error(f"exceeded maximum template depth ({MAX_DEPTH})")
        dot = self.eval_pipeline(dot, node.pipe)
        saved = self.vars
        self.vars = [["$", dot]]
        self.depth += 1
        try:
            self.walk(dot, tree)
        finally:
            self.vars = saved
            self.depth -= 1

    # -- evaluation
    def eval_pipeline(self, dot: Any, pipe: PipeNode | None) -> Any:
        if pipe is None:
            return MISSING
        self.node = pipe
        value = NOFINAL
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
            if value is None:           # an interface holding nil: no value at all
                value = MISSING
        for var in pipe.decl:
            if pipe.is_assign:
                self.set_var(var.ident[0], value)
            else:
                self.vars.append([var.ident[0], value])
        return value

    def not_a_function(self, args: list, final: Any) -> None:
        if len(args) > 1 or final is not NOFINAL:
            raise self.error(f"can't give argument to non-function {describe(args[0])}")

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        if isinstance(first, FieldNode):
            self.node = first
            return self.eval_field_chain(dot, dot, first, first.ident, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd.args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if isinstance(first, BoolNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            raise self.error("nil is not a command")
        if isinstance(first, NumberNode):
            return self.ideal_constant(first)
        if isinstance(first, StringNode):
            return first.text
        raise self.error(f"can't evaluate command {go_quote(describe(first))}")

    def ideal_constant(self, node: NumberNode) -> Any:
        self.node = node
        hex_int = len(node.text) > 2 and node.text[0] == "0" and node.text[1] in "xX" and not re.search(
            "[pP]", node.text)
        if node.is_float and not hex_int and not node.is_rune and re.search("[.eEpP]", node.text):
            return node.float_value
        if node.is_int:
            return node.int_value
        if node.is_uint:
            raise self.error(f"{node.text} overflows int")
        return MISSING

    def eval_chain(self, dot: Any, chain: ChainNode, args: list | None, final: Any) -> Any:
        self.node = chain
        if isinstance(chain.node, NilNode):
            raise self.error(f"indirection through explicit nil in {describe(chain)}")
        receiver = self.eval_arg(dot, None, chain.node)
        return self.eval_field_chain(dot, receiver, chain, chain.field, args, final)

    def eval_variable(self, dot: Any, var: VariableNode, args: list | None, final: Any) -> Any:
        self.node = var
        value = self.var_value(var.ident[0])
        if len(var.ident) == 1:
            self.not_a_function(args or [var], final)
            return value
        return self.eval_field_chain(dot, value, var, var.ident[1:], args, final)

    def eval_field_chain(self, dot: Any, receiver: Any, node: Any, ident: list, args: list | None,
                         final: Any) -> Any:
        for name in ident[:-1]:
            receiver = self.eval_field(dot, name, node, None, NOFINAL, receiver)
        return self.eval_field(dot, ident[-1], node, args, final, receiver)

    def eval_field(self, dot: Any, name: str, node: Any, args: list | None, final: Any, receiver: Any) -> Any:
        if receiver is MISSING:
            return MISSING
        if receiver is None:
            raise self.error(f"nil pointer evaluating interface {{}}.{name}")
        if name == "String" and hasattr(receiver, "go_string"):
            return self.eval_call(dot, Func(receiver.go_string), node, name, args, final)
        has_args = (args is not None and len(args) > 1) or final is not NOFINAL
        if isinstance(receiver, GoStruct):
            if name in receiver.__dict__ and not name.startswith("_"):
                if has_args:
                    raise self.error(f"{name} has arguments but cannot be invoked as function")
                return getattr(receiver, name)
        elif isinstance(receiver, dict):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            if name in receiver:
                return receiver[name]
            if not self.missing_zero:
                return MISSING
            return receiver.go_zero() if isinstance(receiver, GoMap) else None
        raise self.error(f"can't evaluate field {name} in type {go_type(receiver)}")

    def eval_function(self, dot: Any, node: IdentifierNode, args: list, final: Any) -> Any:
        self.node = node
        func = self.funcs.get(node.ident)
        if func is None:
            raise self.error(f"{go_quote(node.ident)} is not a defined function")
        return self.eval_call(dot, func, node, node.ident, args, final)

    def eval_call(self, dot: Any, func: Func, node: Any, name: str, args: list | None, final: Any) -> Any:
        args = list(args[1:]) if args else []
        num_in = len(args) + (final is not NOFINAL)
        fixed = len(func.params)
        if func.variadic is not None:
            if num_in < fixed:
                raise self.error(f"wrong number of args for {name}: want at least {fixed} got {len(args)}")
        elif num_in != fixed:
            raise self.error(f"wrong number of args for {name}: want {fixed} got {num_in}")
        if name in ("and", "or") and func is BUILTINS[name]:
            value = MISSING
            for arg in args:
                value = self.eval_arg(dot, "value", arg)
                if truth(value) == (name == "or"):
                    return value
            return final if final is not NOFINAL else value
        argv = [self.eval_arg(dot, func.params[i] if i < fixed else func.variadic, arg)
                for i, arg in enumerate(args)]
        if final is not NOFINAL:
            argv.append(self.validate(final, func.params[num_in - 1] if num_in - 1 < fixed else func.variadic))
        try:
            return func.fn(*argv)
        except CallError as exc:
            self.node = node
            raise self.error(f"error calling {name}: {exc}") from None

    def validate(self, value: Any, kind: str | None) -> Any:
        if kind == "any":
            return None if value is MISSING else value
        if kind == "string":
            if value is MISSING:
                raise self.error("invalid value; expected string")
            if not isinstance(value, str):
                raise self.error(f"wrong type for value; expected string; got {go_type(value)}")
        return value

    def eval_arg(self, dot: Any, kind: str | None, node: Any) -> Any:
        self.node = node
        if isinstance(node, DotNode):
            return self.validate(dot, kind)
        if isinstance(node, NilNode):
            if kind == "string":
                raise self.error("cannot assign nil to string")
            return None if kind == "any" else MISSING
        if isinstance(node, FieldNode):
            return self.validate(self.eval_field_chain(dot, dot, node, node.ident, [node], NOFINAL), kind)
        if isinstance(node, VariableNode):
            return self.validate(self.eval_variable(dot, node, None, NOFINAL), kind)
        if isinstance(node, PipeNode):
            return self.validate(self.eval_pipeline(dot, node), kind)
        if isinstance(node, IdentifierNode):
            return self.validate(self.eval_function(dot, node, [node], NOFINAL), kind)
        if isinstance(node, ChainNode):
            return self.validate(self.eval_chain(dot, node, None, NOFINAL), kind)
        if kind == "string":
            if isinstance(node, StringNode):
                return node.text
            raise self.error(f"expected string; found {describe(node)}")
        if isinstance(node, BoolNode):
            return node.value
        if isinstance(node, NumberNode):
            return self.ideal_constant(node)
        if isinstance(node, StringNode):
            return node.text
        raise self.error(f"can't handle {describe(node)} for arg")
