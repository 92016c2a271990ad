"""A small regular-expression engine for JSON Schema `pattern` (and a few `format`s),
stepped one character at a time by the constrained decoder. Pure Python.

`Regex(pattern)` compiles the subset below to a Thompson NFA whose states are small
ints; a match state is a frozenset of them (hashable, so masks cache on it). `start`,
`step(states, cp)`, `accepts(states)`, `min_left(states)` (fewest characters to a match:
maxLength feasibility), `max_left(states)` (most: minLength feasibility, INF when a loop
lies on the way) and `min_through`/`max_through(states, lo, hi)` (the same when the next
character is some code point in [lo, hi]: used while it is half-written in UTF-8 or \\uXXXX).

Subset (ECMA-262 syntax, as JSON Schema specifies): literals, `.`, classes `[a-z_]` and
`[^...]`, escapes \\d \\w \\s \\D \\W \\S and escaped punctuation, \\t \\n \\r \\f \\v, \\uXXXX,
groups `( )` and `(?: )`, alternation `|`, quantifiers `* + ? {n} {n,} {n,m}` (lazy `?`
suffixes accepted: they change which match is found, not whether one exists), and `^` / `$`
only at the very start / end (binding to the first / last alternative, as in ECMA-262:
`^a|b$` is `(?:^a)|(?:b$)`). Without `^` (or `$`) the pattern may match anywhere, as in
JSON Schema. Anything else (backreferences, lookaround, \\p{...}, \\b, anchors inside)
raises errors.Unsupported naming it.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

from mlxlite.errors import BadRequest, Unsupported

MAX_CP = 0x10FFFF
INF = float("inf")
MAX_STATES = 4000
MAX_GROUP_DEPTH = 50  # parsing and NFA building recurse per nested group
ANY = ((0, MAX_CP),)
DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
         (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
DOT = ((0, 0x09), (0x0B, 0x0C), (0x0E, 0x2027), (0x202A, MAX_CP))  # all but line terminators
SIMPLE_ESCAPES = {"t": 9, "n": 10, "r": 13, "f": 12, "v": 11, "0": 0}

# `format` values we can enforce, as patterns: RFC 3339 dates with the right number of days
# per month and leap years (year 0000 left out, as Python's datetime does), times with a
# required offset and no leap second, and UUIDs in the 8-4-4-4-12 hex form.
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
FORMATS = {
    "date": rf"^{_DATE}$",
    "time": rf"^{_TIME}$",
    "date-time": rf"^{_DATE}T{_TIME}$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
}


def _norm(ranges) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def _negate(ranges) -> tuple[tuple[int, int], ...]:
    out, at = [], 0
    for lo, hi in _norm(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= MAX_CP:
        out.append((at, MAX_CP))
    return tuple(out)


class _Parser:
    """Pattern text -> AST: ("set", ranges) | ("cat", [..]) | ("alt", [..]) | ("rep", ast, lo, hi|None)."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.depth = 0

    def fail(self, what: str) -> Unsupported:
        return Unsupported(f"pattern {self.s!r}: {what} is not supported (at offset {self.i})")

    def peek(self) -> str | None:
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self) -> str:
        c = self.s[self.i]
        self.i += 1
        return c

    def alt(self) -> tuple:
        items = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            items.append(self.cat())
        return items[0] if len(items) == 1 else ("alt", items)

    def cat(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repeat())
        return ("cat", items)

    def repeat(self) -> tuple:
        atom = self.atom()
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                atom = ("rep", atom, 0 if c != "+" else 1, 1 if c == "?" else None)
            elif c == "{" and (counts := self._brace()) is not None:
                atom = ("rep", atom, counts[0], counts[1])
            else:
                return atom
            if self.peek() == "?":  # lazy: same language
                self.i += 1
            c = self.peek()
            if c in ("*", "+", "?") or (c == "{" and self._brace(peek=True) is not None):
                # ECMA-262 (and Python) refuse `a**`, `a{2}{3}`; each one would also nest a level
                raise BadRequest(f"pattern {self.s!r}: nothing to repeat at offset {self.i}")

    def _brace(self, peek: bool = False) -> tuple[int, int | None] | None:
        j = self.s.find("}", self.i)
        body = self.s[self.i + 1:j] if j > 0 else ""
        parts = body.split(",")
        if not body or len(parts) > 2 or not parts[0].isdigit() or (len(parts) == 2 and parts[1] and not parts[1].isdigit()):
            return None  # a literal "{", as in ECMA-262 Annex B
        if peek:
            return 0, None
        self.i = j + 1
        lo = int(parts[0])
        hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
        if hi is not None and hi < lo:
            raise BadRequest(f"pattern {self.s!r}: {{{body}}} has max < min")
        if max(lo, hi or 0) > 1000:
            raise self.fail(f"a repeat count of {max(lo, hi or 0)}")
        return lo, hi

    def atom(self) -> tuple:
        c = self.take()
        if c == "(":
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.fail("lookaround or named groups")
            if self.depth >= MAX_GROUP_DEPTH:
                raise self.fail(f"groups nested more than {MAX_GROUP_DEPTH} deep")
            self.depth += 1
            inner = self.alt()
            self.depth -= 1
            if self.peek() != ")":
                raise BadRequest(f"pattern {self.s!r}: unbalanced parenthesis")
            self.i += 1
            return inner
        if c == "[":
            return ("set", self.cls())
        if c == ".":
            return ("set", DOT)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "^$":
            raise self.fail(f"{c!r} anywhere but the start/end of the pattern")
        if c in "*+?)":
            raise BadRequest(f"pattern {self.s!r}: nothing to repeat at offset {self.i - 1}")
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool) -> tuple[tuple[int, int], ...]:
        if self.peek() is None:
            raise BadRequest(f"pattern {self.s!r} ends with a backslash")
        c = self.take()
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c in classes:
            return classes[c]
        if c.lower() in classes:
            return _negate(classes[c.lower()])
        if c in SIMPLE_ESCAPES and not (c == "0" and (self.peek() or "").isdigit()):
            v = SIMPLE_ESCAPES[c]
            return ((v, v),)
        if c == "u" and len(self.s) >= self.i + 4 and all(h in "0123456789abcdefABCDEF" for h in self.s[self.i:self.i + 4]):
            v = int(self.s[self.i:self.i + 4], 16)
            self.i += 4
            return ((v, v),)
        if c == "x" and len(self.s) >= self.i + 2 and all(h in "0123456789abcdefABCDEF" for h in self.s[self.i:self.i + 2]):
            v = int(self.s[self.i:self.i + 2], 16)
            self.i += 2
            return ((v, v),)
        if c == "b" and in_class:
            return ((8, 8),)
        if c.isalnum():
            raise self.fail(f"the escape \\{c}")
        return ((ord(c), ord(c)),)

    def cls(self) -> tuple[tuple[int, int], ...]:
        neg = self.peek() == "^"
        if neg:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise BadRequest(f"pattern {self.s!r}: unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self._class_atom()
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self._class_atom()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1] or hi[0][0] < lo[0][0]:
                    raise BadRequest(f"pattern {self.s!r}: bad range in a character class")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        out = _norm(ranges)
        return _negate(out) if neg else out

    def _class_atom(self) -> tuple[tuple[int, int], ...]:
        c = self.take()
        if c == "\\":
            return self.escape(in_class=True)
        return ((ord(c), ord(c)),)


class Regex:
    """A compiled pattern; see the module doc for the interface."""

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise BadRequest("pattern must be a string")
        body = pattern
        anchored_start = body.startswith("^")
        anchored_end = body.endswith("$") and not body.endswith("\\$")
        body = body[1 if anchored_start else 0:len(body) - 1 if anchored_end else len(body)]
        p = _Parser(body)
        ast = p.alt()
        if p.peek() is not None:
            raise BadRequest(f"pattern {pattern!r}: unbalanced parenthesis")
        # `^` binds to the first alternative only and `$` to the last: `^a|b$` is `(?:^a)|(?:b$)`.
        alts = ast[1] if ast[0] == "alt" else [ast]
        loose = ("rep", ("set", ANY), 0, None)
        for k, item in enumerate(alts):
            if not (anchored_start and k == 0):
                item = ("cat", [loose, item])
            if not (anchored_end and k == len(alts) - 1):
                item = ("cat", [item, loose])
            alts[k] = item
        ast = alts[0] if len(alts) == 1 else ("alt", alts)
        self.pattern = pattern
        self.edges: list[list[tuple[tuple | None, int]]] = []  # state -> [(ranges or None=epsilon, target)]
        s, f = self._build(ast)
        self.final = f
        self.closure = [self._eclose(i) for i in range(len(self.edges))]
        self.start = self.closure[s]
        self.dist = self._distances()
        self.longest = self._longest()
        self._step = lru_cache(maxsize=65536)(self._step_uncached)

    def _new(self) -> int:
        if len(self.edges) >= MAX_STATES:
            raise Unsupported(f"pattern {self.pattern!r} is too large (over {MAX_STATES} states)")
        self.edges.append([])
        return len(self.edges) - 1

    def _build(self, ast: tuple) -> tuple[int, int]:
        kind = ast[0]
        if kind == "set":
            a, b = self._new(), self._new()
            self.edges[a].append((ast[1], b))
            return a, b
        if kind == "cat":
            a = cur = self._new()
            for item in ast[1]:
                s, f = self._build(item)
                self.edges[cur].append((None, s))
                cur = f
            return a, cur
        if kind == "alt":
            a, b = self._new(), self._new()
            for item in ast[1]:
                s, f = self._build(item)
                self.edges[a].append((None, s))
                self.edges[f].append((None, b))
            return a, b
        _, inner, lo, hi = ast
        a = cur = self._new()
        for _ in range(lo):
            s, f = self._build(inner)
            self.edges[cur].append((None, s))
            cur = f
        if hi is None:
            s, f = self._build(inner)
            self.edges[cur].append((None, s))
            self.edges[f].append((None, s))
            end = self._new()
            self.edges[cur].append((None, end))
            self.edges[f].append((None, end))
            return a, end
        end = self._new()
        self.edges[cur].append((None, end))
        for _ in range(hi - lo):
            s, f = self._build(inner)
            self.edges[cur].append((None, s))
            self.edges[f].append((None, end))
            cur = f
        return a, end

    def _eclose(self, i: int) -> frozenset[int]:
        seen, todo = {i}, [i]
        while todo:
            for r, t in self.edges[todo.pop()]:
                if r is None and t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def _distances(self) -> list[float]:
        """Fewest characters from each state to the final state (inf: none)."""
        into: list[list[tuple[int, int]]] = [[] for _ in self.edges]
        for i, out in enumerate(self.edges):
            for r, t in out:
                into[t].append((i, 0 if r is None else 1))
        dist = [INF] * len(self.edges)
        dist[self.final] = 0
        todo = deque([self.final])
        # 0-1 BFS backwards from the final state (epsilon edges cost 0, others 1): linear, where
        # Bellman-Ford took seconds on a 4000-state chain such as `a{1000}`.
        while todo:
            t = todo.popleft()
            for i, cost in into[t]:
                if dist[t] + cost < dist[i]:
                    dist[i] = dist[t] + cost
                    (todo.append if cost else todo.appendleft)(i)
        return dist

    def _longest(self) -> list[float]:
        """Most characters from each state to the final state (INF: unbounded, -INF: none):
        strongly connected components (Tarjan, iterative), longest paths over their DAG."""
        n = len(self.edges)
        useful = [d < INF for d in self.dist]
        index, low, on, stack, comp = [-1] * n, [0] * n, [False] * n, [], [-1] * n
        comps: list[list[int]] = []
        counter = 0
        for root in range(n):
            if index[root] >= 0 or not useful[root]:
                continue
            work = [(root, 0)]
            while work:
                v, k = work.pop()
                if k == 0:
                    index[v] = low[v] = counter
                    counter += 1
                    stack.append(v)
                    on[v] = True
                out = [t for _, t in self.edges[v] if useful[t]]
                if k < len(out):
                    work.append((v, k + 1))
                    t = out[k]
                    if index[t] < 0:
                        work.append((t, 0))
                    elif on[t]:
                        low[v] = min(low[v], index[t])
                    continue
                for t in out:  # children done: fold their lows in
                    if on[t]:
                        low[v] = min(low[v], low[t])
                if low[v] == index[v]:
                    members = []
                    while True:
                        w = stack.pop()
                        on[w] = False
                        comp[w] = len(comps)
                        members.append(w)
                        if w == v:
                            break
                    comps.append(members)
        best = [-INF] * len(comps)
        for c, members in enumerate(comps):  # Tarjan emits sinks first
            val = 0 if self.final in members else -INF
            for v in members:
                for r, t in self.edges[v]:
                    if not useful[t]:
                        continue
                    if comp[t] == c:
                        if r is not None:
                            val = INF  # a character loop on the way to a match
                    else:
                        val = max(val, best[comp[t]] + (0 if r is None else 1))
            best[c] = val
        return [best[comp[i]] if comp[i] >= 0 else -INF for i in range(n)]

    def _step_uncached(self, states: frozenset[int], cp: int) -> frozenset[int]:
        out: set[int] = set()
        for i in states:
            for r, t in self.edges[i]:
                if r is not None and any(lo <= cp <= hi for lo, hi in r):
                    out |= self.closure[t]
        return frozenset(i for i in out if self.dist[i] < INF)  # drop states that cannot match

    def step(self, states: frozenset[int], cp: int) -> frozenset[int]:
        return self._step(states, cp)

    def accepts(self, states: frozenset[int]) -> bool:
        return self.final in states

    def min_through(self, states: frozenset[int], lo: int, hi: int) -> float:
        """Fewest characters to a match when the next one is some code point in [lo, hi]
        (counting that one); INF if no such code point can come next."""
        best = INF
        for i in states:
            for r, t in self.edges[i]:
                if r is not None and self.dist[t] + 1 < best and any(a <= hi and lo <= b for a, b in r):
                    best = self.dist[t] + 1
        return best

    def min_left(self, states: frozenset[int]) -> float:
        return min(self.dist[i] for i in states)

    def max_left(self, states: frozenset[int]) -> float:
        return max(self.longest[i] for i in states)

    def max_through(self, states: frozenset[int], lo: int, hi: int) -> float:
        """Most characters to a match when the next one is in [lo, hi] (counting it)."""
        best = -INF
        for i in states:
            for r, t in self.edges[i]:
                if r is not None and self.longest[t] + 1 > best and any(a <= hi and lo <= b for a, b in r):
                    best = self.longest[t] + 1
        return best
