"""Go's text/template language, as Ollama's template layers use it: lex, parse, execute.

Contract:
  - `parse(text) -> Template` checks the whole text (Go's grammar: `{{ }}` actions with `-`
    trim markers, `{{/* comments */}}`, pipelines with `|`, `$x :=`/`$x =` variables, field
    chains, `if`/`else if`/`else`/`end`, `range` (with `$i, $x :=`, `else`, `break`,
    `continue`), `with` (and Go 1.23's `else with`), `define`/`template`/`block`). Functions
    are checked at parse time: Go's builtins (`and or not len index slice eq ne lt le gt ge
    print printf println html js urlquery call`) and Ollama's (`json currentDate
    yesterdayDate toTypeScriptType`). Ranges over an int run as Go 1.22 runs them.
  - `Template.execute(data, funcs=True) -> str` runs it the way Go's `text/template` does with
    `missingkey=zero`: Go's truthiness, comparisons and `fmt` printing (`<no value>` for a
    missing map key, `map[k:v]`, `[a b]`, floats as `%v` writes them), maps ranged in key
    order. Data is Python: dict = `map[string]any`, list = slice, str/bool, int = Go int,
    float = float64 (JSON numbers are floats, as Go decodes them), None = a nil interface,
    and `GoStruct` for Go structs (fields in order, an optional `String()`, JSON tags).
    `funcs=False` runs without Ollama's functions or defined templates (Ollama's last
    legacy pass does). `go_json(value)` is Go's `encoding/json` output for such data.
  - `Template.identifiers()` is Ollama's `Vars()`; `Template.with_response()` appends
    `{{ .Response }}`; `Template.cut_after_response()` is Ollama's legacy cut (everything
    after the first `.Response` field dropped).
  - Every mistake is a `TemplateError` (a `BadRequest`) naming the template's line:column.
Modules: `lexer` -> `parser` (over `tree`) -> `execute` (with `funcs` and `values`: Go's
values and printing); `errors` holds `TemplateError`. Pure, standard library only; never
does I/O.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.gotemplate.errors import TemplateError
from mlxlite.formats.gotemplate.execute import MAX_OUTPUT, Break, Continue, State
from mlxlite.formats.gotemplate.funcs import ALL_FUNCS, BUILTINS, OLLAMA_FUNCS
from mlxlite.formats.gotemplate.parser import Parser, line_col
from mlxlite.formats.gotemplate.tree import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    PipeNode,
    TemplateNode,
    VariableNode,
)
from mlxlite.formats.gotemplate.values import GoList, GoMap, GoStruct, fmt_v, go_float, go_json

# ---- the public face -------------------------------------------------------------------------------
__all__ = ["parse", "Template", "TemplateError", "GoList", "GoMap", "GoStruct", "go_json", "go_float", "fmt_v",
           "MAX_OUTPUT"]


class Template:
    """A parsed Go template: the main tree (name "") and the templates it defines."""

    def __init__(self, text: str, trees: dict[str, ListNode]) -> None:
        self.text = text
        self.trees = trees

    @property
    def root(self) -> ListNode:
        return self.trees[""]

    def execute(self, data: Any, funcs: bool = True) -> str:
        """Run the template over `data` (see the module doc). `funcs=False` runs the main tree
        alone as a template built from a bare parse tree does: Go's builtins only, no
        defined templates, and Go's default for a missing key (no value, not a nil one)."""
        table = {**BUILTINS, **OLLAMA_FUNCS} if funcs else dict(BUILTINS)
        trees = self.trees if funcs else {"": self.root}
        state = State(self.text, table, trees)
        state.missing_zero = funcs
        state.vars = [["$", data]]
        try:
            state.walk(data, self.root)
        except (Break, Continue):
            pass
        except RecursionError:
            raise state.error("template nests too deeply") from None
        return "".join(state.out)

    def identifiers(self) -> set[str]:
        """Ollama's Vars(): the lower-cased names of every field and variable the template
        uses (`.Messages` -> "messages", `$.Tools` -> "$", "tools"). A `{{ template }}` call
        without a pipeline is an error there, so it is here."""
        names: set[str] = set()

        def visit(node: Any) -> None:
            if isinstance(node, ListNode):
                for child in node.nodes:
                    visit(child)
            elif isinstance(node, TemplateNode):
                if node.pipe is None:
                    line, col = line_col(self.text, node.pos)
                    raise TemplateError("undefined template specified", line, col)
                visit(node.pipe)
            elif isinstance(node, ActionNode):
                visit(node.pipe)
            elif isinstance(node, BranchNode):
                visit(node.pipe)
                visit(node.list)
                if node.else_list is not None:
                    visit(node.else_list)
            elif isinstance(node, PipeNode):
                for cmd in node.cmds:
                    for arg in cmd.args:
                        visit(arg)
            elif isinstance(node, (FieldNode, VariableNode)):
                names.update(part.lower() for part in node.ident)

        for tree in self.trees.values():
            visit(tree)
        return names

    def with_response(self) -> Template:
        """This template with `{{ .Response }}` appended to its main tree."""
        action = ActionNode(len(self.text), PipeNode(len(self.text), cmds=[
            CommandNode(len(self.text), [FieldNode(len(self.text), ["Response"])])]))
        return Template(self.text, {**self.trees, "": ListNode(self.root.pos, [*self.root.nodes, action])})

    def cut_after_response(self) -> Template:
        """Ollama's legacy cut: walking the main tree in order, the first `.Response` field
        stays and every node after it goes (the pipelines of if/range/with are not looked
        into); actions and pipelines left empty go too."""
        cut = False

        def gone(node: Any) -> bool:
            nonlocal cut
            if isinstance(node, FieldNode) and "Response" in node.ident:
                cut = True
                return False
            return cut

        def walk(node: Any) -> Any:
            if gone(node):
                return None
            if isinstance(node, ListNode):
                return ListNode(node.pos, [n for n in (walk(c) for c in node.nodes) if n is not None])
            if isinstance(node, BranchNode):
                body = walk(node.list) or ListNode(node.list.pos)
                rest = walk(node.else_list) if node.else_list is not None else None
                return type(node)(node.pos, node.pipe, body, rest)
            if isinstance(node, ActionNode):
                pipe = walk(node.pipe)
                return None if pipe is None else ActionNode(node.pos, pipe)
            if isinstance(node, PipeNode):
                cmds = []
                for cmd in node.cmds:
                    args = [a for a in (walk(x) for x in cmd.args) if a is not None]
                    if not args:
                        return None
                    cmds.append(CommandNode(cmd.pos, args))
                return PipeNode(node.pos, node.decl, node.is_assign, cmds) if cmds else None
            return node

        return Template(self.text, {**self.trees, "": walk(self.root) or ListNode(self.root.pos)})


def parse(text: str) -> Template:
    """Parse a whole template (see the module doc); a mistake is a `TemplateError`."""
    if not isinstance(text, str):
        raise TemplateError("a template must be text")
    trees: dict[str, ListNode] = {}
    parser = Parser(text, ALL_FUNCS, trees)
    try:
        root = parser.parse()
    except RecursionError:
        raise TemplateError("template nests too deeply") from None
    parser.add("", root)
    trees.setdefault("", root)
    return Template(text, trees)
