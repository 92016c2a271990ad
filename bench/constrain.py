"""Constrained-decoding speed on the real 49k-token SmolLM2 vocabulary, side by side in one run.

For each format it takes a random walk of allowed tokens (drifting towards completion)
and times `allowed_mask()` at every step: cold (fresh mask cache for that schema) and
warm (the same token sequence replayed: what a repeated request costs), next to a
brute-force mask (every token's bytes fed to the recognizer) on the first few steps.
Also prints the one-off cost of indexing the vocabulary and compiling a schema.

Usage: python bench/constrain.py [--walks 3] [--steps 200] [--brute 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxlite.constrain import TokenConstraint  # noqa: E402
from mlxlite.constrain import recognizer as cj  # noqa: E402
from mlxlite.constrain.tokens import _VOCABS  # noqa: E402
from mlxlite.engine.text import token_table  # noqa: E402
from mlxlite.formats import gguf  # noqa: E402
from mlxlite.remote import catalog  # noqa: E402
from tests.constrain.test_constrain import SCHEMAS, _distance  # noqa: E402


def vocab() -> tuple[list[bytes], int]:
    path = catalog.fetch(catalog.CATALOG[catalog.DEFAULT_MODEL])
    spec = gguf.build_tokenizer(gguf.read_metadata(path))
    (eos,) = spec.eos_token_ids
    return token_table(spec.tokenizer, spec.special_ids), eos


def walk(spec, tokens: list[bytes], eos: int, rng: random.Random, steps: int) -> tuple[list[int], list[float]]:
    """A random walk; returns the tokens taken and the seconds of each mask."""
    c = TokenConstraint(spec, tokens, [eos])
    taken, times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        mask = c.allowed_mask()
        times.append(time.perf_counter() - t0)
        if mask[eos]:
            break
        ids = np.flatnonzero(mask)
        picks = [int(ids[rng.randrange(len(ids))]) for _ in range(16)]
        tok = min(picks, key=lambda i: _distance(c, tokens[i])) if rng.random() < 0.3 + step / 40 else picks[0]
        c.advance(tok)
        taken.append(tok)
    return taken, times


def replay(spec, tokens: list[bytes], eos: int, taken: list[int]) -> list[float]:
    c = TokenConstraint(spec, tokens, [eos])
    times = []
    for tok in taken + [None]:
        t0 = time.perf_counter()
        c.allowed_mask()
        times.append(time.perf_counter() - t0)
        if tok is not None:
            c.advance(tok)
    return times


def brute(spec, tokens: list[bytes], eos: int, taken: list[int], n: int) -> list[float]:
    """Masks computed token by token (no trie, no cache) for the first n states of a walk."""
    c = TokenConstraint(spec, tokens, [eos])
    times = []
    for tok in taken[:n]:
        t0 = time.perf_counter()
        mask = np.zeros(len(tokens), dtype=bool)
        for i, t in enumerate(tokens):
            if t:
                state = c._state
                for b in t:
                    state = cj.advance(state, b)
                    if not state:
                        break
                mask[i] = bool(state)
        times.append(time.perf_counter() - t0)
        assert np.array_equal(mask & ~np.isin(np.arange(len(tokens)), [eos]),
                              c.allowed_mask() & ~np.isin(np.arange(len(tokens)), [eos]))
        c.advance(tok)
    return times


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
    return f"mean {statistics.mean(xs) * 1e3:6.2f}  p50 {xs[len(xs) // 2] * 1e3:6.2f}  p95 {p95 * 1e3:6.2f}  max {xs[-1] * 1e3:6.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--brute", type=int, default=5, help="brute-force masks per format (slow: ~0.3 s each)")
    args = ap.parse_args()
    tokens, eos = vocab()
    t0 = time.perf_counter()
    TokenConstraint("json", tokens, [eos])
    print(f"vocabulary: {len(tokens)} tokens; index (tries + plain-token tables) built in "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms (once per vocabulary)")
    t0 = time.perf_counter()
    TokenConstraint(SCHEMAS["pydantic"], tokens, [eos])
    print(f"a cached vocabulary + compiling the pydantic-style schema: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    for name in ["json", "person", "pydantic", "tree", "bounds", "map", "pattern"]:
        spec = SCHEMAS[name]
        rng = random.Random(name)
        cold: list[float] = []
        warm: list[float] = []
        slow: list[float] = []
        fast: list[float] = []
        for w in range(args.walks):
            for v in _VOCABS.values():
                v.grammars.clear()  # cold: no mask cached for this schema
            taken, times = walk(spec, tokens, eos, rng, args.steps)
            cold += times
            warm += replay(spec, tokens, eos, taken)
            if w == 0 and args.brute:
                slow = brute(spec, tokens, eos, taken, args.brute)
                fast = times[: len(slow)]
        print(f"\n{name}: {len(cold)} steps over {args.walks} walks")
        print(f"  cold  {ms(cold)}")
        print(f"  warm  {ms(warm)}")
        if slow:
            print(f"  brute force {ms(slow)}  -> trie walk is {statistics.mean(slow) / statistics.mean(fast):.0f}x "
                  f"faster on the same {len(slow)} states (cold)")


if __name__ == "__main__":
    main()
