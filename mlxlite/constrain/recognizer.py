"""Byte-level recognizer for JSON constrained by a compiled schema (`schema.Node`).

Pure Python. A state is a tuple of alternative stacks (anyOf, enums and numbers may be
ambiguous for a few bytes); a stack is an immutable linked list `(frame, parent)` of
small tuples, so states hash (mask caches key on them) and branching copies nothing.
`start(node)` is the initial state, `advance(state, byte)` the next one (empty tuple:
the byte is not allowed), `complete(state)` whether the bytes so far are a whole
document. Every state this accepts can still be completed (no dead ends) given a
vocabulary that can spell any byte.

Output shape: no whitespace before the value except one space or newline; between
tokens either nothing, one space, or a newline and at most 20 spaces/tabs (llama.cpp's
JSON grammar rule), so a model cannot loop on whitespace; nothing after the value.
Numbers: at most 16 integer digits, 16 fraction digits, 2 exponent digits. Containers
nest at most 64 deep. Strings: any
valid UTF-8 (no raw control bytes) and escapes, except \\u surrogates (raw UTF-8 says
it better); keys of objects that mix listed and extra properties take no \\u or \\/
escapes, so equal keys are equal bytes.
"""

from __future__ import annotations

from fractions import Fraction

from mlxlite.constrain import schema as cs
from mlxlite.constrain.schema import INF
from mlxlite.errors import Unsupported

F_ROOT, F_OBJ, F_KEY, F_ARR, F_STR, F_NUM, F_LIT = range(7)
O_OPEN, O_KEY, O_COLON, O_VALUE, O_AFTER, O_COMMA = range(6)
A_OPEN, A_AFTER, A_COMMA = range(3)
MAX_INDENT = 20
MAX_DEPTH = 64
MAX_ALTERNATIVES = 4096     # live parses of one output at once (see `advance`)
MAX_INT, MAX_FRAC, MAX_EXP = 16, 16, 2
BYTE = [bytes((i,)) for i in range(256)]
WS_BYTES = frozenset(b" \t\n")
ESCAPES = frozenset(b'"\\/bfnrt')
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")

# UTF-8 decoder states: 0 at rest; 1..7 = bytes still owed with the range of the next one.
U8_NEXT = {1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0xA0, 0xBF, 1), 4: (0x80, 0x9F, 1),
            5: (0x80, 0xBF, 2), 6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}
U8_NEED = {1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3}


def _lead(b: int) -> int:
    if 0xC2 <= b <= 0xDF:
        return 1
    if b == 0xE0:
        return 3
    if b == 0xED:
        return 4
    if 0xE1 <= b <= 0xEF:
        return 2
    if b == 0xF0:
        return 6
    if 0xF1 <= b <= 0xF3:
        return 5
    return 7 if b == 0xF4 else -1


U8 = [[-1] * 256 for _ in range(8)]
for _b in range(256):
    U8[0][_b] = 0 if _b < 0x80 else _lead(_b)
for _s, (_lo, _hi, _n) in U8_NEXT.items():
    for _b in range(_lo, _hi + 1):
        U8[_s][_b] = _n


def _ws(ws: int, b: int) -> int:
    """Whitespace gap: 0 nothing yet, 1 one space (done), 2+k newline then k indent bytes."""
    if b == 10:
        return 2 if ws == 0 else -1
    if 2 <= ws < 2 + MAX_INDENT:
        return ws + 1
    return 1 if (b == 32 and ws == 0) else -1


def _str_byte(u8: int, esc: int, b: int, key: bool) -> tuple[int, int, int] | None:
    """One string byte other than the closing quote -> (u8, esc, chars added) or None.
    esc: 1 after a backslash, 2..5 inside \\uXXXX (hex digits seen + 2), 6 after \\uD."""
    if esc:
        if esc == 1:
            if b in ESCAPES and not (key and b == 0x2F):
                return 0, 0, 0
            return (0, 2, 0) if b == 0x75 and not key else None
        if b not in HEX:
            return None
        if esc == 2:
            return 0, (6 if b in (0x44, 0x64) else 3), 0
        if esc == 6:  # \uD8xx..\uDFxx are surrogates: refused, raw UTF-8 says it better
            return (0, 4, 0) if 0x30 <= b <= 0x37 else None
        return (0, esc + 1, 0) if esc < 5 else (0, 0, 0)
    if u8:
        n = U8[u8][b]
        return None if n < 0 else (n, 0, 0)
    if b == 0x5C:
        return 0, 1, 1
    if b < 0x20 or b == 0x22:
        return None
    n = U8[0][b]
    return None if n < 0 else (n, 0, 1)


def _more(node: cs.Node, used: frozenset) -> bool:
    return node.additional is not None or any(n not in used for n in node.names)


def _start(node: cs.Node, parent: tuple, b: int) -> list:
    """Stacks after byte b opens a value of `node`, returning to `parent` when it ends."""
    k = node.kind
    while k == "ref":
        node = node.target
        k = node.kind
    if k == "union":
        out: list = []
        for alt in node.alts:
            out.extend(_start(alt, parent, b))
        return out
    if k == "any":
        node = _ANY_BY_BYTE.get(b)
        if node is None:
            return []
        k = node.kind
    if k == "object":
        if b != 0x7B or _too_deep(parent):
            return []
        return [((F_OBJ, node, O_OPEN, 0, frozenset(), None), parent)]
    if k == "array":
        if b != 0x5B or _too_deep(parent):
            return []
        return [((F_ARR, node, A_OPEN, 0, 0), parent)]
    if k == "string":
        aux = None if node.regex is None else (0, node.regex.start)
        return [((F_STR, node, 0, 0, 0, aux), parent)] if b == 0x22 else []
    if k == "number":
        nf = _num_step((F_NUM, node, 0, b""), b)
        return [(nf, parent)] if nf else []
    return _step(((F_LIT, node.cands, 0), parent), b)


def _too_deep(stack: tuple | None) -> bool:
    """Containers nest at most MAX_DEPTH deep (parsers recurse; a model may not)."""
    depth = 0
    while stack is not None:
        depth += 1
        stack = stack[1]
    return depth > MAX_DEPTH


_ANY_BY_BYTE = {0x7B: cs.ANY_OBJECT, 0x5B: cs.ANY_ARRAY, 0x22: cs.ANY_STRING, 0x2D: cs.ANY_NUMBER,
                0x74: cs.TRUE, 0x66: cs.FALSE, 0x6E: cs.NULL, **{d: cs.ANY_NUMBER for d in DIGITS}}


def _step(stack: tuple, b: int) -> list:
    """All stacks reachable from `stack` by byte b (empty: b is not allowed here)."""
    frame, parent = stack
    tag = frame[0]
    if tag == F_STR:
        _, node, n, u8, esc, aux = frame
        if aux is not None:
            return _pattern_step(frame, parent, b)
        if b == 0x22 and not u8 and not esc:
            return [parent] if n >= node.min else []
        r = _str_byte(u8, esc, b, False)
        if r is None:
            return []
        if r[2]:
            if n >= node.max:
                return []
            n += 1
            if node.max >= INF and n > node.min:  # past minLength the count no longer matters
                n = node.min
        return [((F_STR, node, n, r[0], r[1], None), parent)]
    if tag == F_OBJ:
        _, node, ph, ws, used, val = frame
        if b in WS_BYTES:
            w = _ws(ws, b)
            return [] if w < 0 else [((F_OBJ, node, ph, w, used, val), parent)]
        if ph == O_VALUE:
            return _start(val, ((F_OBJ, node, O_AFTER, 0, used, None), parent), b)
        if ph == O_COLON:
            return [((F_OBJ, node, O_VALUE, 0, used, val), parent)] if b == 0x3A else []
        if ph == O_AFTER:
            if b == 0x2C:
                return [((F_OBJ, node, O_COMMA, 0, used, None), parent)] if _more(node, used) else []
            return [parent] if b == 0x7D and node.required <= used else []
        if b == 0x22 and _more(node, used):
            buf = b"" if (node.track or node.additional is None) else None
            return [((F_KEY, node, buf, 0, 0), ((F_OBJ, node, O_KEY, 0, used, None), parent))]
        return [parent] if b == 0x7D and ph == O_OPEN and node.required <= used else []
    if tag == F_KEY:
        _, node, buf, u8, esc = frame
        used = parent[0][4]
        if node.additional is None:  # only the listed names: match their bytes literally
            if b == 0x22 and buf in node.props and buf not in used:
                return [((F_OBJ, node, O_COLON, 0, used | {buf}, node.props[buf]), parent[1])]
            nb = buf + BYTE[b]
            for name in node.names:
                if name not in used and name.startswith(nb):
                    return [((F_KEY, node, nb, 0, 0), parent)]
            return []
        if b == 0x22 and not u8 and not esc:
            if not node.track:
                return [((F_OBJ, node, O_COLON, 0, used, node.additional), parent[1])]
            if buf in used:
                return []
            return [((F_OBJ, node, O_COLON, 0, used | {buf}, node.props.get(buf, node.additional)), parent[1])]
        r = _str_byte(u8, esc, b, node.track)
        if r is None:
            return []
        return [((F_KEY, node, buf + BYTE[b] if node.track else None, r[0], r[1]), parent)]
    if tag == F_ARR:
        _, node, ph, ws, count = frame
        if b in WS_BYTES:
            w = _ws(ws, b)
            return [] if w < 0 else [((F_ARR, node, ph, w, count), parent)]
        if ph == A_AFTER:
            if b == 0x2C:
                return [((F_ARR, node, A_COMMA, 0, count), parent)] if count < node.max else []
            return [parent] if b == 0x5D and count >= node.min else []
        if ph == A_OPEN and (b == 0x5D or node.max == 0):
            return [parent] if b == 0x5D and node.min == 0 else []
        item = node.prefix[count] if count < len(node.prefix) else node.items
        nxt = count + 1
        if node.max >= INF:  # beyond minItems and the prefix, the count no longer matters
            nxt = min(nxt, max(node.min, len(node.prefix)))
        return _start(item, ((F_ARR, node, A_AFTER, 0, nxt), parent), b)
    if tag == F_NUM:
        out = []
        nf = _num_step(frame, b)
        if nf:
            out.append((nf, parent))
        if _num_end(frame):
            out.extend(_step(parent, b))
        return out
    if tag == F_LIT:
        _, cands, pos = frame
        nc = tuple(c for c in cands if len(c) > pos and c[pos] == b)
        out = []
        if nc:
            if all(len(c) == pos + 1 for c in nc):
                out.append(parent)
            else:
                out.append(((F_LIT, nc, pos + 1), parent))
        if any(len(c) == pos for c in cands):
            out.extend(_step(parent, b))
        return out
    # F_ROOT
    _, node, ph, ws = frame
    if ph:
        return []
    if b in (0x20, 0x0A):
        return [((F_ROOT, node, 0, 1), None)] if ws == 0 else []
    return _start(node, ((F_ROOT, node, 1, 0), None), b)


_ESCAPED = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 8, 0x66: 12, 0x6E: 10, 0x72: 13, 0x74: 9}
_HEX_SEEN = {3: 1, 6: 1, 4: 2, 5: 3}  # esc state -> \u hex digits seen


def _pattern_step(frame: tuple, parent: tuple, b: int) -> list:
    """A string byte under a `pattern`: the regex steps per decoded character; while a
    character is half-written (UTF-8 lead byte, \\u digits) the code points it can still
    become must include one the regex takes next. aux = (partial code point, regex states)."""
    _, node, n, u8, esc, (part, states) = frame
    rx = node.regex
    if b == 0x22 and not u8 and not esc:
        return [parent] if n >= node.min and rx.accepts(states) else []
    r = _str_byte(u8, esc, b, False)
    if r is None:
        return []
    nu8, nesc, add = r
    if add:
        if n >= node.max:
            return []
        n += 1
    cp = lo = hi = -1
    if esc == 0 and u8 == 0:
        if b == 0x5C:
            lo, hi = 0, 0xFFFF  # an escape can still write any BMP character
        elif b < 0x80:
            cp = b
        else:
            k = U8_NEED[nu8]
            part = b & (0x1F, 0x0F, 0x07)[k - 1]
            # the floor: E0 and F0 leads allow no overlong (short-codable) characters
            lo, hi = max(part << 6 * k, (0x80, 0x800, 0x10000)[k - 1]), ((part + 1) << 6 * k) - 1
    elif esc == 0:
        part = (part << 6) | (b & 0x3F)
        if nu8 == 0:
            cp = part
        else:
            k = U8_NEED[nu8]
            lo, hi = part << 6 * k, ((part + 1) << 6 * k) - 1
    elif esc == 1:
        if b == 0x75:
            part, lo, hi = 0, 0, 0xFFFF
        else:
            cp = _ESCAPED[b]
    else:
        part = part * 16 + int(chr(b), 16)
        if nesc == 0:
            cp = part
        else:
            k = 4 - _HEX_SEEN[nesc]
            lo, hi = part << 4 * k, ((part + 1) << 4 * k) - 1
    if cp >= 0:
        states = rx.step(states, cp)
        if not states or n + rx.min_left(states) > node.max or n + rx.max_left(states) < node.min:
            return []
        part = 0
    elif n - 1 + rx.min_through(states, lo, hi) > node.max or n - 1 + rx.max_through(states, lo, hi) < node.min:
        return []  # no character in [lo, hi] fits (min_through is INF) or fits the length bounds
    if node.max >= INF and n > node.min:
        n = node.min
    return [((F_STR, node, n, nu8, nesc, (part, states)), parent)]


def _num_step(frame: tuple, b: int) -> tuple | None:
    """Number states: 0 start, 1 '-', 2 '0', 3 int digits, 4 '.', 5 fraction, 6 'e', 7 exp sign, 8 exp."""
    _, node, st, text = frame
    d = b in DIGITS
    bounded = node.lo is not None or node.hi is not None
    if st == 0:
        ns = 1 if b == 0x2D else 2 if b == 0x30 else 3 if d else -1
    elif st == 1:
        ns = 2 if b == 0x30 else 3 if d else -1
    elif st in (2, 3):
        if d and st == 3:
            ns = 3 if len(text) - (text[0] == 0x2D) < MAX_INT else -1
        elif b == 0x2E and not node.integer:
            ns = 4
        elif b in (0x65, 0x45) and not node.integer and not bounded:
            ns = 6
        else:
            ns = -1
    elif st in (4, 5):
        if d:
            ns = 5 if len(text) - text.index(b".") - 1 < MAX_FRAC else -1
        else:
            ns = 6 if st == 5 and b in (0x65, 0x45) and not bounded else -1
    elif st in (6, 7):
        ns = 7 if st == 6 and b in (0x2B, 0x2D) else 8 if d else -1
    else:
        ns = 8 if d and len(text) - max(text.find(b"e"), text.find(b"E"), text.find(b"+"), text.find(b"-")) - 1 < MAX_EXP else -1
    if ns < 0:
        return None
    text += BYTE[b]
    if bounded and not _viable(node, text, ns):
        return None
    return (F_NUM, node, ns, text)


def _num_end(frame: tuple) -> bool:
    _, node, st, text = frame
    if st not in (2, 3, 5, 8):
        return False
    if node.lo is None and node.hi is None:
        return True
    return _in_range(node, Fraction(text.decode()))


def _in_range(node: cs.Node, v: Fraction) -> bool:
    if node.lo is not None and (v < node.lo or (node.lo_x and v == node.lo)):
        return False
    return node.hi is None or v < node.hi or (v == node.hi and not node.hi_x)


def _viable(node: cs.Node, text: bytes, st: int) -> bool:
    """Can the number prefix `text` still be completed into a value within the bounds?
    Completions of a prefix are a few magnitude intervals [a, b) (or a point)."""
    neg = text[:1] == b"-"
    body = text[1:] if neg else text
    if neg:  # bounds on the magnitude -v
        lo, lo_x = (-node.hi, node.hi_x) if node.hi is not None else (None, False)
        hi, hi_x = (-node.lo, node.lo_x) if node.lo is not None else (None, False)
    else:
        lo, lo_x, hi, hi_x = node.lo, node.lo_x, node.hi, node.hi_x
    eps = 1 if node.integer else Fraction(1, 10**MAX_FRAC)
    spans: list[tuple[Fraction | int, Fraction | int, bool]] = []  # (a, b, b included)
    if st == 1:
        spans.append((0, 10**MAX_INT, False))
    elif st == 2:
        spans.append((0, 0, True) if node.integer else (0, 1, False))
    elif st == 3:
        n, k = int(body), len(body)
        for j in range(MAX_INT - k + 1):
            a, z = n * 10**j, (n + 1) * 10**j
            spans.append((a, z - 1, True) if node.integer else (a, z, False))
    elif st == 4:
        n = int(body[:-1])
        spans.append((n, n + 1, False))
    else:
        v = Fraction(body.decode())
        m = len(body) - body.index(b".") - 1
        spans.append((v, v, True) if m >= MAX_FRAC else (v, v + Fraction(1, 10**m), False))
    for a, z, closed in spans:
        c = a if lo is None or a > lo else lo
        if lo is not None and lo_x and c == lo:
            c += eps
        if (c < z or (closed and c == z)) and (hi is None or c < hi or (c == hi and not hi_x)):
            return True
    return False


def _complete(stack: tuple) -> bool:
    frame, parent = stack
    tag = frame[0]
    if tag == F_ROOT:
        return frame[2] == 1
    if tag == F_NUM:
        return _num_end(frame) and _complete(parent)
    if tag == F_LIT:
        return any(len(c) == frame[2] for c in frame[1]) and _complete(parent)
    return False


def start(node: cs.Node) -> tuple:
    """The state before the first byte of a document of `node`."""
    return (((F_ROOT, node, 0, 0), None),)


def advance(state: tuple, b: int) -> tuple:
    """The state after byte b; empty when b is not allowed. `Unsupported` past
    `MAX_ALTERNATIVES` live parses: a schema whose unions overlap (two array branches that
    recurse into the same union) doubles them at every `[`, and each byte costs their number."""
    if len(state) == 1:
        nxt = _step(state[0], b)
    else:
        nxt = [s for st in state for s in _step(st, b)]
    if len(nxt) <= 1:
        return tuple(nxt)
    out = tuple(dict.fromkeys(nxt))
    if len(out) > MAX_ALTERNATIVES:
        raise Unsupported(f"the schema is too ambiguous to follow: more than {MAX_ALTERNATIVES:,} ways to "
                          "read the output at once (anyOf branches that overlap)")
    return out


def complete(state: tuple) -> bool:
    return any(_complete(s) for s in state)
